"""tests/vectors is a verbatim copy of ../shared/vectors; it must not drift."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "vectors"
COPY = ROOT / "tests" / "vectors"


def _files(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file()}


def test_vector_copy_is_verbatim():
    if not SHARED.is_dir():
        pytest.skip("no ../shared checkout beside this repository")
    assert _files(SHARED) == _files(COPY)


def test_vector_copy_is_complete():
    names = set(_files(COPY))
    for name in ("canonical_json.json", "telemetry_v1.json", "feedback_v1.json",
                 "external/wycheproof_ed25519_test.json", "interop/telemetry_01.json",
                 "interop/replay_01.json", "interop/feedback_01.json"):
        assert name in names
