"""docs/PROTOCOL.md documents every error code the code can emit.

The codes are collected from the code, never listed here: every ``GatewayError``
subclass (and ``ALL_ERRORS``), the router codes of ``gateway.http.app``, and the emitter's
§6 rejection codes (``emitter.verify.CODES`` and any other ``*CODES`` / ``*_CODE``
constant of that module). A gateway code must have its own row in the codes table,
``| `code` | status |``, with the status the code answers; an emitter code must appear
in backticks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emitter import verify
from gateway.http import app
from gateway.pipeline import errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def gateway_codes() -> dict[str, str]:
    """code → documented status ("4xx" for the router's catch-all)."""
    classes = {*errors.ALL_ERRORS, *_subclasses(errors.GatewayError), errors.GatewayError}
    # a class names a code only if it sets ``error`` itself (AuthenticationError is a group)
    codes = {cls.error: str(cls.status) for cls in classes if "error" in vars(cls)}
    codes.update({code: str(status) for status, code in app.ROUTER_CODES.items()})
    codes[app.OTHER_HTTP_CODE] = "4xx"
    return codes


def emitter_codes() -> set[str]:
    found = set(verify.CODES)
    for name, value in vars(verify).items():
        if name.endswith("CODES") and isinstance(value, tuple | frozenset | set):
            found |= {v for v in value if isinstance(v, str)}
        elif name.endswith("_CODE") and isinstance(value, str):
            found.add(value)
    return found


def test_the_code_sets_are_not_empty():
    assert {"invalid_signature", "not_found", "internal_error"} <= gateway_codes().keys()
    assert "nonce_not_bound" in emitter_codes()


@pytest.mark.parametrize("code", sorted(gateway_codes()))
def test_gateway_code_has_a_row_with_its_status(code):
    status = gateway_codes()[code]
    row = re.compile(rf"^\| `{re.escape(code)}` \| {re.escape(status)} \|", re.MULTILINE)
    assert row.search(DOC.read_text(encoding="utf-8")), f"docs/PROTOCOL.md: no row for {code}"


@pytest.mark.parametrize("code", sorted(emitter_codes()))
def test_emitter_code_is_documented(code):
    assert f"`{code}`" in DOC.read_text(encoding="utf-8")
