"""Stored records read back for the policy engine (gateway/feedback/evidence.py).

Each row is a stored record as an older version, a bug or an edit could have left it;
``read_evidence`` must either give the checked members or name why the record is left
out (never another exception: the policy skips it, it never denies a tenant).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from lab import TELEMETRY_BODY, VALIDATORS

from gateway.feedback.evidence import (
    BAD_MEMBER,
    UNREADABLE_BODY,
    UNREADABLE_RECORD,
    SkipReport,
    Unusable,
    read_evidence,
)
from schemas.canonical import dumps

ATT = "CD" * 32
BODY = {**TELEMETRY_BODY, "timestamp": 7, "nonce": "nonce-0001"}  # a valid telemetry body
FP = BODY["execution_hash"]
GOOD: dict[str, Any] = {
    "finding_id": "f-1", "identity": "spectrastrike-producer", "tenant_id": "t",
    "execution_fingerprint": FP, "attestation_measurement_hash": ATT, "received_at": 7,
    "body_b64": base64.b64encode(dumps(BODY)).decode(),
}
BIG = b"9" * 309


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def changed(**changes: Any) -> bytes:
    return dumps({k: v for k, v in {**GOOD, **changes}.items() if v is not None})


ROWS: dict[str, tuple[bytes, str]] = {
    "record_int_beyond_64_bits": (
        changed(received_at=0).replace(b'"received_at":0', b'"received_at":' + BIG),
        UNREADABLE_RECORD),
    "record_u64_int_in_free_member": (changed(extra=2**64 - 1), UNREADABLE_RECORD),
    "record_not_json": (b"{torn", UNREADABLE_RECORD),
    "record_duplicate_key": (b'{"identity":"a","identity":"b"}', UNREADABLE_RECORD),
    "record_array": (b"[]", UNREADABLE_RECORD),
    "record_not_utf8": (b'{"a":"\xff"}', UNREADABLE_RECORD),
    "identity_missing": (changed(identity=None), BAD_MEMBER),
    "identity_not_text": (changed(identity=7), BAD_MEMBER),
    "tenant_missing": (changed(tenant_id=None), BAD_MEMBER),
    "fingerprint_not_hex": (changed(execution_fingerprint="x" * 64), BAD_MEMBER),
    "attestation_missing": (changed(attestation_measurement_hash=None), BAD_MEMBER),
    "received_at_text": (changed(received_at="7"), BAD_MEMBER),
    "received_at_bool": (changed(received_at=True), BAD_MEMBER),
    "body_b64_missing": (changed(body_b64=None), BAD_MEMBER),
    "body_b64_not_base64": (changed(body_b64="not base64!"), UNREADABLE_BODY),
    "body_not_json": (changed(body_b64=b64(b"{torn")), UNREADABLE_BODY),
    "body_int_beyond_64_bits": (changed(body_b64=b64(b'{"free":' + BIG + b"}")),
                                UNREADABLE_BODY),
    "body_not_object": (changed(body_b64=b64(b"[1]")), UNREADABLE_BODY),
    # strict JSON, but not the shape its kind's schema gives: the policy would raise
    # TypeError reading it (a 500 for every query of the tenant)
    "body_severity_a_list": (changed(body_b64=b64(dumps(
        {**BODY, "payload": {**BODY["payload"], "severity": ["critical"]}}))),
        UNREADABLE_BODY),
    "body_payload_missing": (changed(body_b64=b64(dumps(
        {k: v for k, v in BODY.items() if k != "payload"}))), UNREADABLE_BODY),
    "body_free_object_graph_not_finding": (changed(body_b64=b64(b'{"free":1}')),
                                           UNREADABLE_BODY),
}


@pytest.mark.parametrize(("raw", "reason"), ROWS.values(), ids=ROWS)
def test_unusable_record_names_its_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(Unusable) as info:
        read_evidence("finding", raw, validators=VALIDATORS)
    assert info.value.reason == reason


def test_a_body_is_checked_against_its_own_kinds_schema() -> None:
    """A valid finding body stored as a graph is not a graph."""
    with pytest.raises(Unusable) as info:
        read_evidence("graph", changed(), validators=VALIDATORS)
    assert info.value.reason == UNREADABLE_BODY


def test_good_record_is_read_with_lower_case_hex() -> None:
    got = read_evidence("finding", changed(), validators=VALIDATORS)
    assert (got.identity, got.tenant_id, got.received_at) == ("spectrastrike-producer", "t", 7)
    assert (got.execution_fingerprint, got.attestation_hash) == (FP, ATT.lower())
    assert got.body == BODY


def test_skip_report_is_bounded_and_names_ids() -> None:
    report = SkipReport()
    assert not report
    for n in range(50):
        report.add("finding", changed(finding_id=f"f-{n}", identity=None), BAD_MEMBER)
    report.add("graph", b"{torn", UNREADABLE_RECORD)
    assert report.counts == {BAD_MEMBER: 50, UNREADABLE_RECORD: 1}
    assert report.ids == [f"finding f-{n}" for n in range(5)]
    assert report.summary().startswith(
        "51 stored record(s) left out of the feedback decision "
        "(bad_member=50, unreadable_record=1): finding f-0, ")
    assert report.summary().endswith(" ...")
