"""The emitter's §6 verifier against the vectors, the legacy interop captures, and the
cases the vectors do not cover (each built by re-signing with the vectors' test seeds,
so only the one property under test is wrong)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import load_vectors

from emitter.ledger import Ledger
from emitter.verify import (
    CODES,
    Expectation,
    FeedbackRejected,
    VerifiedFeedback,
    check_feedback,
    load_feedback_keyring,
)
from keyring.ed25519 import PrivateKey
from keyring.keys import Key, Keyring, KeyringError, KeyStatus, parse_jwks
from schemas.signing import feedback_signing_input

FEEDBACK = load_vectors("feedback_v1.json")
CASES = {case["name"]: case for case in FEEDBACK["cases"]}
RING = parse_jwks(FEEDBACK["keyring"])
SKEW = FEEDBACK["clock_skew_s"]
SEEDS = {kid: bytes.fromhex(seed) for kid, seed in
         FEEDBACK["feedback_private_key_seed_hex"].items()}
BASE = CASES["accept_basic"]
INTEROP = [load_vectors(f"interop/feedback_{n}.json") for n in ("01", "02")]


def _expectation(case: dict[str, Any]) -> Expectation:
    return Expectation(case["requested_tenant"], case["request_nonce"], case["sent"])


def _check(case: dict[str, Any], response: Any = None, **kw: Any) -> VerifiedFeedback:
    kw = {"keyring": RING, "now": case["now"], "skew_s": SKEW, **kw}
    return check_feedback(case["response"] if response is None else response,
                          _expectation(case), **kw)


def _code(case: dict[str, Any], response: Any = None, **kw: Any) -> str:
    with pytest.raises(FeedbackRejected) as info:
        _check(case, response, **kw)
    return info.value.code


# -- the vector set ----------------------------------------------------------------------

def test_vector_set_is_complete() -> None:
    assert len(FEEDBACK["cases"]) == len(CASES) == 21
    assert {c["expect"] for c in CASES.values()} <= {"ok", *CODES}
    assert {c["expect"] for c in CASES.values()} == {"ok", *CODES}  # every code exercised


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_vector(case: dict[str, Any], tmp_path: Path) -> None:
    if "after" in case:  # replay: the earlier response is applied first, in a real ledger
        first = CASES[case["after"]]
        with Ledger(tmp_path / "emitter.db") as ledger:
            ledger.apply(_check(first), now=first["now"])
            verified = _check(case)  # steps 1-8 pass: only the replay cache can refuse
            with pytest.raises(FeedbackRejected) as info:
                ledger.apply(verified, now=case["now"])
        assert info.value.code == case["expect"]
    elif case["expect"] == "ok":
        verified = _check(case)
        response = case["response"]
        assert (verified.kid, verified.nonce, verified.signed_at) == (
            response["kid"], response["nonce"], response["signed_at"])
        skipped = case.get("skipped", [])  # v1.1: executions this emitter never sent
        assert verified.skipped_executions == skipped
        assert list(verified.adjustments) == [
            adj for adj in response["data"] if adj["execution_fingerprint"] not in skipped]
        assert list(verified.skipped) == [
            adj for adj in response["data"] if adj["execution_fingerprint"] in skipped]
    else:
        assert _code(case) == case["expect"]


# -- interop: the legacy gateway's captured responses ------------------------------------

def _interop(vec: dict[str, Any], **kw: Any) -> VerifiedFeedback:
    ring = Keyring([Key(kid=vec["kid"],
                        public=base64.b64decode(vec["feedback_verify_public_key_b64"]))])
    headers = dict(vec["query_request"]["headers"])
    response = vec["response_json"]
    sent = {a["execution_fingerprint"]: a["attestation_measurement_hash"]
            for a in response["data"]}
    expect = Expectation(vec["tenant_id"], headers["X-Telemetry-Nonce"], sent)
    return check_feedback(response, expect, keyring=ring, now=response["signed_at"], **kw)


@pytest.mark.parametrize("vec", INTEROP, ids=[v["vector_id"] for v in INTEROP])
def test_interop_verifies_with_legacy_switch(vec: dict[str, Any]) -> None:
    verified = _interop(vec, legacy_unbound_nonce=True)
    assert list(verified.adjustments) == vec["response_json"]["data"]
    assert len(verified.adjustments) == 2


@pytest.mark.parametrize("vec", INTEROP, ids=[v["vector_id"] for v in INTEROP])
def test_interop_rejected_by_default(vec: dict[str, Any]) -> None:
    with pytest.raises(FeedbackRejected) as info:
        _interop(vec)
    assert info.value.code == "nonce_not_bound"


@pytest.mark.parametrize("vec", INTEROP, ids=[v["vector_id"] for v in INTEROP])
def test_legacy_switch_skips_only_the_nonce_check(vec: dict[str, Any]) -> None:
    tampered = copy.deepcopy(vec)
    tampered["response_json"]["data"][0]["action"] = "relax"
    with pytest.raises(FeedbackRejected) as info:
        _interop(tampered, legacy_unbound_nonce=True)
    assert info.value.code == "invalid_signature"


# -- beyond the vectors: re-signed variants of accept_basic ------------------------------

def _resign(response: dict[str, Any], tenant: str = BASE["requested_tenant"],
            seed_kid: str | None = None) -> dict[str, Any]:
    """Sign ``response`` as the gateway would (kid's seed unless ``seed_kid`` is given)."""
    kid = response.get("kid", BASE["response"]["kid"])
    key = PrivateKey(SEEDS[seed_kid or kid])
    message = feedback_signing_input(tenant, response["signed_at"], response["nonce"],
                                     response["schema_version"], kid, response["data"])
    return {**response, "signature": base64.b64encode(key.sign(message)).decode("ascii")}


def _variant(**changes: Any) -> dict[str, Any]:
    """accept_basic with top-level members replaced (None deletes), then re-signed."""
    response = copy.deepcopy(BASE["response"])
    for name, value in changes.items():
        if value is None:
            response.pop(name, None)
        else:
            response[name] = value
    return _resign(response)


def _with_adjustment(**changes: Any) -> dict[str, Any]:
    adjustment = {**BASE["response"]["data"][0], **changes}
    return _variant(data=[adjustment])


def _signature(raw: bytes) -> dict[str, Any]:
    return {**BASE["response"], "signature": base64.b64encode(raw).decode("ascii")}


VALID_SIG = base64.b64decode(BASE["response"]["signature"])
NONCE = BASE["request_nonce"]
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SIG = BASE["response"]["signature"]
NONCANONICAL = _SIG[:85] + _B64[_B64.index(_SIG[85]) + 1] + "=="
assert base64.b64decode(NONCANONICAL) == VALID_SIG
OTHER_FP = "ab" * 32
OTHER_ATT = "cd" * 32

TABLE: list[tuple[str, Any, str]] = [
    ("response_not_object", ["not", "an", "object"], "malformed_response"),
    ("signed_at_bool", _variant(signed_at=True), "malformed_response"),
    ("signed_at_string", _variant(signed_at="1794999999"), "malformed_response"),
    ("kid_missing", _variant(kid=None), "malformed_response"),
    ("nonce_not_string", _variant(nonce=12345), "malformed_response"),
    ("schema_version_other", _variant(schema_version="feedback.response.v2"),
     "malformed_response"),
    ("data_item_not_object", _variant(data=["tighten"]), "malformed_response"),
    ("adjustment_member_missing",
     _variant(data=[{k: v for k, v in BASE["response"]["data"][0].items()
                     if k != "attestation_measurement_hash"}]), "malformed_response"),
    ("adjustment_unknown_member", _with_adjustment(extra=1), "malformed_response"),
    ("confidence_bool", _with_adjustment(confidence=True), "malformed_response"),
    ("confidence_above_one", _with_adjustment(confidence=1.5), "malformed_response"),
    ("ttl_below_60", _with_adjustment(ttl_seconds=59), "malformed_response"),
    ("ttl_above_86400", _with_adjustment(ttl_seconds=86401), "malformed_response"),
    # an int beyond any float: compared, never converted (math.isfinite would overflow)
    ("confidence_10_pow_400", _with_adjustment(confidence=10**400), "malformed_response"),
    ("confidence_minus_10_pow_400", _with_adjustment(confidence=-10**400),
     "malformed_response"),
    # not JSON, so not signable: step 1 judges them before the signature anyway
    ("confidence_nan", {**BASE["response"], "data": [
        {**BASE["response"]["data"][0], "confidence": float("nan")}]}, "malformed_response"),
    ("confidence_inf", {**BASE["response"], "data": [
        {**BASE["response"]["data"][0], "confidence": float("inf")}]}, "malformed_response"),
    # SQLite holds signed 64-bit integers: the timestamp must fit
    ("timestamp_2_pow_63", _with_adjustment(timestamp=2**63), "malformed_response"),
    ("timestamp_negative", _with_adjustment(timestamp=-1), "malformed_response"),
    ("adjustment_schema_other", _with_adjustment(schema_version="feedback.adjustment.v2"),
     "malformed_response"),
    # a malformed response is malformed before its algorithm is looked at (step 1 < 2)
    ("malformed_and_alg_missing", _variant(signed_at=True, signature_algorithm=None),
     "malformed_response"),
    ("alg_lowercase", _variant(signature_algorithm="ed25519"), "unsupported_algorithm"),
    ("alg_not_string", _variant(signature_algorithm=["Ed25519"]), "unsupported_algorithm"),
    ("signature_not_base64", {**BASE["response"], "signature": "not base64 at all!"},
     "invalid_signature"),
    ("signature_unpadded", {**BASE["response"],
                            "signature": BASE["response"]["signature"].rstrip("=")},
     "invalid_signature"),
    ("signature_urlsafe_alphabet", {**BASE["response"], "signature": base64.urlsafe_b64encode(
        VALID_SIG).decode()}, "invalid_signature"),
    # same 64 bytes, but the padding bits of the last character set: one encoding only
    ("signature_noncanonical_bits", {**BASE["response"], "signature": NONCANONICAL},
     "invalid_signature"),
    ("signature_63_bytes", _signature(VALID_SIG[:63]), "invalid_signature"),
    ("signature_65_bytes", _signature(VALID_SIG + b"\0"), "invalid_signature"),
    ("signature_empty", {**BASE["response"], "signature": ""}, "invalid_signature"),
    ("signed_by_other_key", _resign(copy.deepcopy(BASE["response"]), seed_kid="vv-fb-2027"),
     "invalid_signature"),
    ("nonce_bound_suffix_15", _variant(nonce=f"{NONCE}.{'a' * 15}"), "nonce_not_bound"),
    ("nonce_bound_empty_suffix", _variant(nonce=f"{NONCE}."), "nonce_not_bound"),
    ("nonce_no_dot", _variant(nonce=f"{NONCE}{'a' * 16}"), "nonce_not_bound"),
    ("nonce_suffix_not_urlsafe", _variant(nonce=f"{NONCE}.{'a' * 15}+"), "nonce_not_bound"),
    ("nonce_prefix_only_partial", _variant(nonce=f"{NONCE[:-1]}.{'a' * 16}"),
     "nonce_not_bound"),
    ("second_adjustment_mismatch",
     _variant(data=[BASE["response"]["data"][0],
                    {**BASE["response"]["data"][0],
                     "attestation_measurement_hash": OTHER_ATT}]), "attestation_mismatch"),
    # steps 7 before 8: an adjustment wrong in both ways is a tenant_mismatch
    ("tenant_and_attestation_wrong",
     _with_adjustment(tenant_id="3526adb4-6352-d1d7-fa72-23d93cd439b3",
                      attestation_measurement_hash=OTHER_ATT), "tenant_mismatch"),
]


@pytest.mark.parametrize(("response", "code"), [(r, c) for _, r, c in TABLE],
                         ids=[name for name, _, _ in TABLE])
def test_rejection_table(response: Any, code: str) -> None:
    assert _code(BASE, response) == code


@pytest.mark.parametrize(("changes", "ok"), [
    ({"timestamp": 2**63 - 1}, True), ({"timestamp": 0}, True),
    ({"confidence": 0}, True), ({"confidence": 1}, True), ({"ttl_seconds": 86400}, True),
    ({"ttl_seconds": 60}, True), ({"confidence": 1.0000001}, False),
])
def test_adjustment_range_bounds(changes: dict[str, Any], ok: bool) -> None:
    response = _with_adjustment(**changes)
    if ok:
        _check(BASE, response)
    else:
        assert _code(BASE, response) == "malformed_response"


def test_more_adjustments_than_the_query_limit_is_malformed() -> None:
    """An answer may not carry more adjustments than the query's ``limit`` asked for."""
    adj = BASE["response"]["data"][0]
    two = _variant(data=[adj, {**adj, "action": "observe"}])
    expect = Expectation(BASE["requested_tenant"], NONCE, BASE["sent"], limit=1)
    with pytest.raises(FeedbackRejected) as info:
        check_feedback(two, expect, keyring=RING, now=BASE["now"], skew_s=SKEW)
    assert info.value.code == "malformed_response" and "limit 1" in info.value.detail
    for limit in (2, None):  # at the limit, or no limit given: accepted
        expect = Expectation(BASE["requested_tenant"], NONCE, BASE["sent"], limit=limit)
        verified = check_feedback(two, expect, keyring=RING, now=BASE["now"], skew_s=SKEW)
        assert len(verified.adjustments) == 2


def test_resigned_base_is_accepted() -> None:
    """The table's re-signing is sound: an unchanged re-signed response verifies."""
    _check(BASE, _variant())
    _check(BASE, _variant(nonce=f"{NONCE}.{'a' * 16}"))  # exactly 16: the minimum


def test_bound_nonce_shorter_suffix_accepted_only_with_legacy_switch() -> None:
    response = _variant(nonce=f"{NONCE}.{'a' * 15}")
    assert _check(BASE, response, legacy_unbound_nonce=True).nonce == response["nonce"]


def test_hex_case_does_not_matter_for_attestation() -> None:
    adj = BASE["response"]["data"][0]
    upper = {adj["execution_fingerprint"].upper(): adj["attestation_measurement_hash"].upper()}
    expect = Expectation(BASE["requested_tenant"], NONCE, upper)
    check_feedback(BASE["response"], expect, keyring=RING, now=BASE["now"])


def _ring(**overrides: Any) -> Keyring:
    key = RING["vv-fb-2026"]
    return Keyring([Key(kid=key.kid, public=key.public, **overrides)])


@pytest.mark.parametrize(("overrides", "code"), [
    ({"status": KeyStatus.REVOKED}, "unknown_kid"),
    ({"not_before": BASE["now"] + 1}, "unknown_kid"),
    ({"not_after": BASE["now"] - 1}, "unknown_kid"),
    ({"status": KeyStatus.RETIRED}, None),  # verify-only: still accepted in its window
    ({"not_before": BASE["now"], "not_after": BASE["now"]}, None),  # bounds inclusive
])
def test_key_status_and_window(overrides: dict[str, Any], code: str | None) -> None:
    if code is None:
        _check(BASE, keyring=_ring(**overrides))
    else:
        assert _code(BASE, keyring=_ring(**overrides)) == code


def test_empty_keyring_never_falls_back_to_a_key() -> None:
    assert _code(BASE, keyring=Keyring()) == "unknown_kid"


@pytest.mark.parametrize(("delta", "ok"), [(-SKEW, True), (SKEW, True),
                                           (-SKEW - 1, False), (SKEW + 1, False)])
def test_window_bounds(delta: int, ok: bool) -> None:
    response = _variant(signed_at=BASE["now"] + delta)
    if ok:
        _check(BASE, response)
    else:
        assert _code(BASE, response) == "timestamp_out_of_window"


def test_skew_parameter_is_used() -> None:
    response = _variant(signed_at=BASE["now"] - 45)
    assert _code(BASE, response) == "timestamp_out_of_window"
    _check(BASE, response, skew_s=60)


def test_verifier_does_not_alias_the_response() -> None:
    response = copy.deepcopy(BASE["response"])
    verified = _check(BASE, response)
    verified.adjustments[0]["action"] = "changed"
    assert response["data"][0]["action"] == "tighten"


def test_forged_response_never_burns_the_nonce(tmp_path: Path) -> None:
    """A forgery carrying the genuine nonce is refused before the ledger; the genuine
    response is then still accepted and applied."""
    forged = copy.deepcopy(BASE["response"])
    forged["data"][0]["action"] = "relax"
    with Ledger(tmp_path / "emitter.db") as ledger:
        assert _code(BASE, forged) == "invalid_signature"
        assert not ledger.claimed(BASE["response"]["nonce"])
        assert len(ledger.apply(_check(BASE), now=BASE["now"])) == 1


def test_rejection_codes() -> None:
    with pytest.raises(ValueError):
        FeedbackRejected("not_a_code", "x")
    error = FeedbackRejected("unknown_kid", "kid is not in the keyring")
    assert (error.code, error.detail) == ("unknown_kid", "kid is not in the keyring")


def test_load_feedback_keyring(tmp_path: Path) -> None:
    path = tmp_path / "feedback.jwks"
    path.write_text(json.dumps(FEEDBACK["keyring"]), encoding="utf-8")
    assert set(load_feedback_keyring(path)) == {"vv-fb-2026", "vv-fb-2027"}
    producer = {"keys": [{**FEEDBACK["keyring"]["keys"][0], "identity": "spectrastrike"}]}
    path.write_text(json.dumps(producer), encoding="utf-8")
    with pytest.raises(KeyringError, match="producer key"):
        load_feedback_keyring(path)


# -- v1.1 §6 step 8: an execution this emitter never sent is skipped, not a rejection ----

def test_unsent_execution_is_skipped_and_the_rest_applies(tmp_path: Path) -> None:
    known = BASE["response"]["data"][0]
    unknown = {**known, "execution_fingerprint": OTHER_FP, "attestation_measurement_hash":
               OTHER_ATT}
    verified = _check(BASE, _variant(data=[unknown, known]))
    assert (list(verified.adjustments), list(verified.skipped)) == ([known], [unknown])
    assert verified.skipped_executions == [OTHER_FP]
    with Ledger(tmp_path / "emitter.db") as ledger:  # only the known one is applied
        assert ledger.apply(verified, now=BASE["now"]) == [known]
        assert ledger.applied() == [known] and ledger.claimed(verified.nonce)


def test_only_unsent_executions_verifies_with_nothing_to_apply() -> None:
    unknown = {**BASE["response"]["data"][0], "execution_fingerprint": OTHER_FP}
    verified = _check(BASE, _variant(data=[unknown]))
    assert (verified.adjustments, verified.skipped) == ((), (unknown,))


@pytest.mark.parametrize("order", ["unknown_first", "mismatch_first"])
def test_a_skip_never_hides_a_mismatch_on_a_sent_execution(order: str) -> None:
    known = BASE["response"]["data"][0]
    unknown = {**known, "execution_fingerprint": OTHER_FP}
    mismatch = {**known, "attestation_measurement_hash": OTHER_ATT}
    data = [unknown, mismatch] if order == "unknown_first" else [mismatch, unknown]
    assert _code(BASE, _variant(data=data)) == "attestation_mismatch"


def test_a_skip_does_not_bypass_the_earlier_checks() -> None:
    unknown = {**BASE["response"]["data"][0], "execution_fingerprint": OTHER_FP}
    other_tenant = {**unknown, "tenant_id": "3526adb4-6352-d1d7-fa72-23d93cd439b3"}
    assert _code(BASE, _variant(data=[other_tenant])) == "tenant_mismatch"
    forged = {**_variant(data=[unknown]), "data": [{**unknown, "action": "relax"}]}
    assert _code(BASE, forged) == "invalid_signature"
