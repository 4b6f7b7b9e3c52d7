"""Feedback answers through the real gateway (mTLS, in-process server, SQLite and Redis).

1. Skip, never deny (issue 7): a stored record the policy cannot use — written by an
   older version, e.g. a finding whose signed body holds a 309-digit integer that the
   v1.0 parser accepted — is put straight into the REAL store. The next query still
   answers 200 with the good records' adjustments; the record is counted in
   ``fedgate_feedback_records_skipped_total{reason=…}`` and named in one audit event;
   the same query replayed answers 409, not 500.
2. Scoping (§5 [v1.1]): two identities share a tenant; each one's answer carries only
   the executions it sent itself.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import uuid
from typing import Any

import pytest
from lab import IDENTITY, KEYS, NOW, PRODUCER, TELEMETRY_BODY, TENANT, TENANT_B, body_for
from promtext import value
from stack import FEEDBACK_SEED, Stack

from audit import verify_file
from emitter.signing import sign_request
from gateway.feedback.policy import DEFAULT_RULES_FILE
from gateway.store import Record, open_store
from keyring import Key, Keyring, PrivateKey, verify
from schemas.canonical import dumps
from schemas.routes import QUERY_PATH, TELEMETRY_PATH
from schemas.signing import feedback_signing_input

OTHER = "spectrastrike-other"
OTHER_KEY = PrivateKey(hashlib.sha256(b"lab producer key, spectrastrike-other").digest())
SIGNERS = {IDENTITY: (PRODUCER, "lab-2026"), OTHER: (OTHER_KEY, "lab-other-2026")}
FP_A, FP_B = "a1" * 32, "b2" * 32
FEEDBACK_PUBLIC = PrivateKey(FEEDBACK_SEED).public
ATT = {fp: hashlib.sha256(f"attestation {fp}".encode()).hexdigest() for fp in (FP_A, FP_B)}


class PolicyStack(Stack):
    """The lab's stack with the default rules, and ``spectrastrike-other`` also allowed
    to send for the producer's tenant (its own key, bound to that tenant)."""

    TENANTS = {IDENTITY: [TENANT], OTHER: [TENANT, TENANT_B]}
    KEYRING = Keyring([*(KEYS[kid] for kid in KEYS),
                       Key("lab-other-2026", OTHER_KEY.public, identity=OTHER,
                           tenants=frozenset({TENANT}))])
    POLICY_RULES = DEFAULT_RULES_FILE


def critical_finding(fp: str) -> dict[str, Any]:
    """Telemetry that the default rules turn into ``isolate`` for ``fp``."""
    body = copy.deepcopy(TELEMETRY_BODY)
    body["execution_hash"] = fp
    body["payload"].update(severity="critical", mitre_tactics=["TA0006"])
    body["payload"]["attributes"].update(execution_fingerprint=fp,
                                         attestation_measurement_hash=ATT[fp])
    return body


def signed(identity: str, body: dict[str, Any], nonce: str | None = None):
    key, kid = SIGNERS[identity]
    out = sign_request(key, body, identity=identity, kid=kid, timestamp=NOW,
                       nonce=nonce or uuid.uuid4().hex)
    return dict(out.headers), out.body


async def post(stack: Stack, identity: str, path: str, headers: dict, body: bytes):
    async with stack.session(identity) as client, client.post(
            stack.url + path, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def send_finding(stack: Stack, identity: str, fp: str) -> None:
    status, payload = await post(stack, identity, TELEMETRY_PATH,
                                 *signed(identity, critical_finding(fp)))
    assert status == 202, payload


def decided(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """The adjustments, once the answer's signature verified (PyNaCl) under the vector
    feedback key, whether the gateway signed with the PEM file or through the token."""
    message = feedback_signing_input(TENANT, payload["signed_at"], payload["nonce"],
                                     payload["schema_version"], payload["kid"],
                                     payload["data"])
    assert payload["kid"] == "vv-fb-2026"
    assert verify(FEEDBACK_PUBLIC, base64.b64decode(payload["signature"]), message)
    return [(a["execution_fingerprint"], a["action"]) for a in payload["data"]]


# -- 1. an unusable stored record is skipped, counted and audited --------------------------

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _old_finding(record_id: str, **changes: Any) -> bytes:
    """A finding record as a v1.0 gateway stored it, for the querying identity's own
    anchored execution, with ``changes`` applied (``None`` drops a member)."""
    body = critical_finding(FP_A)
    record = {
        "finding_id": record_id, "request_id": record_id, "received_at": NOW,
        "identity": IDENTITY, "tenant_id": TENANT, "operator_id": "op-001",
        "execution_fingerprint": FP_A, "attestation_measurement_hash": ATT[FP_A],
        "body_b64": _b64(dumps({**body, "timestamp": NOW, "nonce": "old-nonce-1"})),
        **changes,
    }
    return dumps({k: v for k, v in record.items() if v is not None})


def _big_int_body() -> str:
    """The signed body the review found: a 309-digit integer in a free member."""
    body = critical_finding(FP_A)
    body["payload"]["attributes"]["free"] = int("9" * 309)
    return _b64(dumps({**body, "timestamp": NOW, "nonce": "old-nonce-1"}))


# name → (kind, build the stored bytes of record "old-1", reason counted)
BAD_RECORDS: dict[str, tuple[str, Any, str]] = {
    "body_with_309_digit_integer": (
        "finding", lambda: _old_finding("old-1", body_b64=_big_int_body()), "unreadable_body"),
    "record_with_u64_integer": ("finding", lambda: _old_finding("old-1", extra=2**64 - 1),
                                "unreadable_record"),
    "record_torn": ("finding", lambda: _old_finding("old-1")[:40], "unreadable_record"),
    "record_without_identity": ("finding", lambda: _old_finding("old-1", identity=None),
                                "bad_member"),
    "body_b64_not_base64": ("finding", lambda: _old_finding("old-1", body_b64="%%%"),
                            "unreadable_body"),
    # strict JSON, evidence members fine, but not the telemetry schema's shape: the
    # policy raised TypeError reading it (500)
    "body_severity_a_list": (
        "finding", lambda: _old_finding("old-1", body_b64=_b64(dumps({
            **critical_finding(FP_A), "timestamp": NOW, "nonce": "old-nonce-1",
            "payload": {**critical_finding(FP_A)["payload"], "severity": ["critical"]}}))),
        "unreadable_body"),
    "graph_body_not_an_object": (
        "graph", lambda: _old_finding("old-1", finding_id=None, graph_id="old-1",
                                      body_b64=_b64(b"[1,2]")), "unreadable_body"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
async def test_unusable_stored_record_is_skipped_not_a_500(tmp_path, store_url, name,
                                                            feedback_hsm):
    kind, build, reason = BAD_RECORDS[name]
    stack = PolicyStack(tmp_path, store_url, hsm=feedback_hsm)
    async with stack.running(clock=lambda: NOW):
        await send_finding(stack, IDENTITY, FP_A)
        store = open_store(store_url)  # a second, independent client of the same store
        await store.open()
        try:
            # listed under the querying identity (as the upgrade's back-fill, or an older
            # version's commit, lists it), so the query reads it
            await store.put_record(Record(kind, "old-1", TENANT, FP_A, build(),
                                          identity=IDENTITY), NOW)
        finally:
            await store.close()
        query = signed(IDENTITY, body_for(QUERY_PATH), nonce="query-nonce-0001")
        status, payload = await post(stack, IDENTITY, QUERY_PATH, *query)
        assert status == 200, payload  # v1.0: 500 internal_error, for every identity
        assert decided(payload) == [(FP_A, "isolate")]
        again, replayed = await post(stack, IDENTITY, QUERY_PATH, *query)
        assert (again, replayed["error"]) == (409, "replayed_nonce")
        async with stack.session() as client, client.get(stack.url + "/metrics") as resp:
            metrics = await resp.text()
    # the replay is refused before its answer is computed (§4.13 v1.1): one read, one skip
    assert value(metrics, "fedgate_feedback_records_skipped_total", reason=reason) == 1
    events = [json.loads(line) for line in stack.audit_path.read_text().splitlines()]
    skipped = [e for e in events if e["event.action"] == "feedback.records_skipped"]
    assert [(e["request_id"], e["http.response.status_code"]) for e in skipped] == [
        (payload["request_id"], 200)]
    assert all(f"{reason}=1" in e["message"] and f"{kind} " in e["message"]
               for e in skipped)
    assert verify_file(stack.audit_path).ok


# -- 2. an answer carries only the querying identity's executions ---------------------------

async def test_answer_carries_only_the_querying_identitys_executions(tmp_path, store_url,
                                                                   feedback_hsm):
    stack = PolicyStack(tmp_path, store_url, hsm=feedback_hsm)
    async with stack.running(clock=lambda: NOW):
        await send_finding(stack, IDENTITY, FP_A)
        await send_finding(stack, OTHER, FP_B)
        answers = {}
        for identity in (IDENTITY, OTHER):
            status, payload = await post(stack, identity, QUERY_PATH,
                                         *signed(identity, body_for(QUERY_PATH)))
            assert status == 200, payload
            answers[identity] = decided(payload)
    assert answers == {IDENTITY: [(FP_A, "isolate")], OTHER: [(FP_B, "isolate")]}


# -- 3. another identity's records cannot crowd the querying identity's out ----------------

async def test_another_identity_cannot_crowd_out_the_answer(tmp_path, store_url,
                                                            feedback_hsm):
    """The policy reads at most 16 MiB of records per kind; it used to spend that budget
    on every record of the tenant before keeping the querying identity's, so OTHER's 17
    accepted ~1 MiB findings (newer than IDENTITY's one) erased IDENTITY's ``isolate``.
    Only IDENTITY's own records are read now (the store's per-identity index)."""
    stack = PolicyStack(tmp_path, store_url, hsm=feedback_hsm)
    big = copy.deepcopy(critical_finding(FP_B))
    big["payload"]["description"] = "x" * (1024 * 1024 - 4000)
    async with stack.running(clock=lambda: NOW):
        await send_finding(stack, IDENTITY, FP_A)
        for _ in range(17):
            status, payload = await post(stack, OTHER, TELEMETRY_PATH, *signed(OTHER, big))
            assert status == 202, payload
        answers = {}
        for identity in (IDENTITY, OTHER):
            status, payload = await post(stack, identity, QUERY_PATH,
                                         *signed(identity, body_for(QUERY_PATH)))
            assert status == 200, payload
            answers[identity] = decided(payload)
    assert answers == {IDENTITY: [(FP_A, "isolate")], OTHER: [(FP_B, "isolate")]}
