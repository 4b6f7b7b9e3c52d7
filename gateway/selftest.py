"""The gateway's known-answer tests: run at start-up (a failure stops it, one line) and by
``fedgate selftest`` (one line per test, exit 0/1). The same list in both places.

1. ``ed25519``: RFC 8032 test 1 signs and verifies in the loaded libraries; a tampered
   signature fails (keyring.ed25519.self_test).
2. ``canonical_json``: a fixed object serialises to fixed bytes (sorted keys, no spaces,
   non-ASCII escaped, integers and floats as the signer wrote them), and parses back.
3. ``schema``: a fixed feedback query passes the compiled validators; the same query
   with an extra member, and with a bad nonce, fails.
4. ``feedback_signer``: the configured feedback key — a file, or the PKCS#11 token —
   signs twice identically and verifies with libsodium (keyring.signer.check_signer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from keyring.ed25519 import SelfTestError, self_test
from keyring.signer import check_signer
from schemas.canonical import dumps, loads
from schemas.validate import Validators

_CANONICAL_IN = {"b": 1, "a": {"d": [1, 2.5, {"z": 0, "y": None}], "c": True},
                 "name": "café 日本", "neg": -7}
_CANONICAL_OUT = (b'{"a":{"c":true,"d":[1,2.5,{"y":null,"z":0}]},"b":1,'
                  b'"name":"caf\\u00e9 \\u65e5\\u672c","neg":-7}')
_QUERY = {"operator_id": "op-001", "tenant_id": "7758e414-233a-5ea0-575b-cf0c26f5259a",
          "timestamp": 1795000000, "nonce": "selftest-nonce-01", "limit": 10}


def canonical_json() -> None:
    out = dumps(_CANONICAL_IN)
    if out != _CANONICAL_OUT:
        raise SelfTestError(f"canonical JSON self-test: got {out[:80]!r}")
    if loads(out) != _CANONICAL_IN:
        raise SelfTestError("canonical JSON self-test: the bytes do not parse back")


def schema(validators: Validators | None = None) -> None:
    v = validators or Validators()
    if not v.is_valid("feedback_query", _QUERY):
        raise SelfTestError("schema self-test: a valid feedback query was refused")
    for bad in ({**_QUERY, "extra": 1}, {**_QUERY, "nonce": "bad nonce!"}):
        if v.is_valid("feedback_query", bad):
            raise SelfTestError("schema self-test: an invalid feedback query passed")


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    ok: bool
    detail: str


def tests(signer=None, validators: Validators | None = None) -> list[tuple[str,
                                                                           Callable[[], None]]]:
    """(name, test) in order; the signer's test only when a signer is given."""
    out = [("ed25519", self_test), ("canonical_json", canonical_json),
           ("schema", lambda: schema(validators))]
    if signer is not None:
        what = f"feedback signer ({getattr(signer, 'uri', 'file key')})"
        out.append(("feedback_signer", lambda: check_signer(signer, what)))
    return out


def run_all(signer=None, validators: Validators | None = None) -> list[Result]:
    """Every test, each reported (``fedgate selftest``)."""
    results = []
    for name, test in tests(signer, validators):
        try:
            test()
        except (SelfTestError, ValueError) as exc:
            results.append(Result(name, False, str(exc)))
        else:
            results.append(Result(name, True, "ok"))
    return results


def run_startup(signer=None, validators: Validators | None = None) -> None:
    """Start-up: the first failure raises SelfTestError (one line; the gateway stops)."""
    for result in run_all(signer, validators):
        if not result.ok:
            raise SelfTestError(result.detail)
