"""Project Wycheproof Ed25519 verification vectors, run as is against keyring.ed25519.verify.

151 cases: RFC 8032 known answers, malleable S (S >= L), non-canonical R/S encodings,
truncated and padded signatures, Tink overflow regressions. ``verify`` must return True
exactly for ``valid`` and False for ``invalid``; it never raises.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
from conftest import VECTORS

from keyring.ed25519 import verify

WYCHEPROOF = VECTORS / "external" / "wycheproof_ed25519_test.json"
EXPECTED_TOTAL = 151


DOC = json.loads(WYCHEPROOF.read_text(encoding="utf-8"))


def _cases() -> list[tuple[str, bytes, bytes, bytes, str, list[str]]]:
    cases = []
    for group in DOC["testGroups"]:
        assert group["type"] == "EddsaVerify"
        assert group["publicKey"]["curve"] == "edwards25519"
        pk = bytes.fromhex(group["publicKey"]["pk"])
        for test in group["tests"]:
            case_id = f"tc{test['tcId']}"
            if test["comment"]:
                slug = re.sub(r"[^A-Za-z0-9]+", "_", test["comment"]).strip("_")
                case_id += "-" + slug[:48].rstrip("_")
            cases.append((
                case_id, pk, bytes.fromhex(test["sig"]), bytes.fromhex(test["msg"]),
                test["result"], test["flags"],
            ))
    return cases


CASES = _cases()


def test_total_count_is_exactly_151() -> None:
    assert DOC["algorithm"] == "EDDSA"
    assert DOC["numberOfTests"] == EXPECTED_TOTAL
    assert len(CASES) == EXPECTED_TOTAL
    assert len({c[0] for c in CASES}) == EXPECTED_TOTAL  # ids unique


def test_results_are_only_known_values() -> None:
    results = {c[4] for c in CASES}
    assert results <= {"valid", "invalid", "acceptable"}
    assert {"valid", "invalid"} <= results


@pytest.mark.parametrize(
    ("pk", "sig", "msg", "result", "flags"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_wycheproof_ed25519(
    pk: bytes, sig: bytes, msg: bytes, result: str, flags: list[str],
    record_property: pytest.RecordProperty,
) -> None:
    outcome = verify(pk, sig, msg)
    assert isinstance(outcome, bool)
    if result == "valid":
        assert outcome is True, flags
    elif result == "invalid":
        assert outcome is False, flags
    else:  # "acceptable": either answer is allowed; record which one we gave
        record_property("wycheproof_acceptable_outcome", outcome)
        warnings.warn(
            f"Wycheproof 'acceptable' case {flags}: verify returned {outcome}", stacklevel=1
        )
