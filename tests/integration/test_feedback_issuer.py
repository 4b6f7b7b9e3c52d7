"""Rule policy and feedback issuer over both real stores, fed through the real pipeline.

Four executions go in as signed telemetry and graphs (the lab's pipeline, real store):
a big graph, a critical credential-access finding, a quiet one, and one sent with
anchoring off (so no anchor exists). The default rules must give exactly the expected
adjustments, each carrying the anchored hash, none for the un-anchored execution. The
issuer's answer must verify over §6's input and be bound to the query nonce; the pipeline
stores it with the query's nonce claim, so a store that cannot record it makes the query
fail (503) without consuming the nonce.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import load_vectors
from lab import IDENTITY, NOW, TELEMETRY_BODY, TENANT, TENANT_B, Lab, body_for

from gateway.feedback.issuer import FeedbackIssuer, RulePolicy
from gateway.feedback.policy import DEFAULT_RULES_FILE, load_rules
from gateway.pipeline import errors as E
from gateway.store import Record
from keyring import Key, Keyring, KeyStatus
from keyring.ed25519 import PrivateKey, verify
from keyring.keys import parse_jwks
from schemas.canonical import dumps, loads
from schemas.routes import GRAPH_PATH, QUERY_PATH, TELEMETRY_PATH
from schemas.signing import feedback_signing_input
from schemas.validate import Validators

ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules(DEFAULT_RULES_FILE)
VECTORS = load_vectors("feedback_v1.json")
SEEDS = VECTORS["feedback_private_key_seed_hex"]
RING = parse_jwks(VECTORS["keyring"])
KID_A, KID_B = "vv-fb-2026", "vv-fb-2027"
KEY_A = PrivateKey(bytes.fromhex(SEEDS[KID_A]))

FP_GRAPH, FP_CRIT, FP_QUIET, FP_UNANCHORED = ("a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32)
ATT = {fp: hashlib.sha256(f"attestation {fp}".encode()).hexdigest()
       for fp in (FP_GRAPH, FP_CRIT, FP_QUIET, FP_UNANCHORED)}
QUERY_NONCE = "query-nonce-0001"


def telemetry(fp: str, **payload: Any) -> dict[str, Any]:
    body = copy.deepcopy(TELEMETRY_BODY)
    body["execution_hash"] = fp
    attributes = {**body["payload"]["attributes"], "execution_fingerprint": fp,
                  "attestation_measurement_hash": ATT[fp], **payload.pop("attributes", {})}
    body["payload"].update(payload, attributes=attributes)
    return body


def graph(fp: str, nodes: int, target: str) -> dict[str, Any]:
    g = {"nodes": [{"id": f"n{i}"} for i in range(nodes)],
         "edges": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(nodes - 1)],
         "target_urn": target}
    return body_for(GRAPH_PATH, execution_fingerprint=fp, attestation_measurement_hash=ATT[fp],
                    graph=g)


async def post(lab: Lab, path: str, body: dict[str, Any]):
    headers, raw = lab.signed(path, body)
    status, error, ctx = await lab.send(headers, raw, path)
    assert (status, error) == (202, None), ctx
    return ctx


async def decide(policy: RulePolicy, store, tenant: str, limit: int,
                 identity: str = IDENTITY) -> list[dict[str, Any]]:
    """The adjustments for ``identity``'s query; no record of ``feed`` is skipped."""
    decision = await policy(store, tenant, limit, NOW, identity=identity)
    assert not decision.skipped, decision.skipped.summary()
    return decision.adjustments


async def feed(store) -> None:
    lab = Lab(store)
    await post(lab, GRAPH_PATH, graph(FP_GRAPH, 10, "urn:target:db-01"))
    await post(lab, TELEMETRY_PATH, telemetry(FP_GRAPH, severity="medium",
                                              mitre_techniques=["T1046"],
                                              mitre_tactics=["TA0007"]))
    await post(lab, TELEMETRY_PATH, telemetry(
        FP_CRIT, severity="critical", mitre_techniques=["T1003.001"], mitre_tactics=["TA0006"],
        attributes={"asset_ref": "dc-01"}))
    await post(lab, GRAPH_PATH, graph(FP_QUIET, 2, "urn:target:ws-17"))
    await post(lab, TELEMETRY_PATH, telemetry(FP_QUIET, severity="low"))
    unanchored = Lab(store, anchor_attestation=False)
    await post(unanchored, TELEMETRY_PATH, telemetry(
        FP_UNANCHORED, severity="critical", mitre_tactics=["TA0006"]))
    await post(unanchored, GRAPH_PATH, graph(FP_UNANCHORED, 12, "urn:target:x"))


def adjustment(fp: str, target: str, action: str, confidence: float, control: str,
               ttl: int, rationale: str) -> dict[str, Any]:
    return {"tenant_id": TENANT, "execution_fingerprint": fp, "target_urn": target,
            "action": action, "confidence": confidence, "rationale": rationale,
            "control": control, "ttl_seconds": ttl, "timestamp": NOW,
            "schema_version": "feedback.adjustment.v1", "attestation_measurement_hash": ATT[fp]}


EXPECTED = [  # strongest action first, then by fingerprint
    adjustment(FP_CRIT, "urn:target:dc-01", "isolate", 0.9, "network", 3600,
               "critical credential-access finding"),
    adjustment(FP_GRAPH, "urn:target:db-01", "tighten", 0.82, "execution", 1800,
               "high-complexity execution graph"),
    adjustment(FP_QUIET, "urn:target:ws-17", "observe", 0.55, "execution", 1800,
               "graph telemetry received; monitoring baseline adjustments"),
]


async def test_rule_policy_gives_expected_adjustments(store) -> None:
    await feed(store)
    assert await store.get_anchor(TENANT, FP_UNANCHORED) is None
    got = await decide(RulePolicy(RULES), store, TENANT, 100)
    assert got == EXPECTED
    for adj in got:  # the anchored hash, as the store holds it
        assert adj["attestation_measurement_hash"] == await store.get_anchor(
            TENANT, adj["execution_fingerprint"])
    assert FP_UNANCHORED not in {a["execution_fingerprint"] for a in got}


LIMIT_ROWS = {"1": (1, EXPECTED[:1]), "2": (2, EXPECTED[:2]), "1000": (1000, EXPECTED)}


@pytest.mark.parametrize("limit, expected", LIMIT_ROWS.values(), ids=LIMIT_ROWS)
async def test_rule_policy_limit_keeps_strongest(store, limit: int, expected: list) -> None:
    await feed(store)
    assert await decide(RulePolicy(RULES), store, TENANT, limit) == expected


async def test_rule_policy_other_tenant_sees_nothing(store) -> None:
    await feed(store)
    assert await decide(RulePolicy(RULES), store, TENANT_B, 100) == []


async def test_rule_policy_ignores_records_for_executions_another_identity_owns(
        store) -> None:
    """A finding stored before v1.1 from another identity of the tenant, for an execution
    IDENTITY anchored (so owns), gives that identity no adjustment for it (§5 v1.1)."""
    await feed(store)
    other = "spectrastrike-other"
    for raw in await store.list_records("finding", TENANT):
        evidence = loads(raw)
        if evidence["execution_fingerprint"] == FP_CRIT:
            evidence.update(identity=other, finding_id="legacy-" + evidence["finding_id"])
            await store.put_record(Record("finding", evidence["finding_id"], TENANT, FP_CRIT,
                                          dumps(evidence), identity=other), NOW)
    assert await store.get_anchor_owner(TENANT, FP_CRIT) == IDENTITY
    assert await decide(RulePolicy(RULES), store, TENANT, 100, identity=other) == []
    assert await decide(RulePolicy(RULES), store, TENANT, 100) == EXPECTED


async def query_ctx(store, limit: int = 10):
    lab = Lab(store)
    headers, raw = lab.signed(QUERY_PATH, body_for(QUERY_PATH, limit=limit), nonce=QUERY_NONCE)
    status, error, ctx = await lab.send(headers, raw, QUERY_PATH)
    assert (status, error) == (202, None), ctx
    return ctx


def signing_input(response: dict[str, Any], tenant: str = TENANT) -> bytes:
    return feedback_signing_input(tenant, response["signed_at"], response["nonce"],
                                  response["schema_version"], response["kid"],
                                  response["data"])


async def test_respond_signs_and_binds(store, feedback_signer) -> None:
    """File key or PKCS#11 token (``feedback_signer``): the same bytes, the same signature."""
    await feed(store)
    ctx = await query_ctx(store)
    issuer = FeedbackIssuer(store, feedback_signer(KID_A), KID_A, policy=RulePolicy(RULES))
    response = await issuer.respond(ctx, NOW)
    Validators().validate("feedback_response", response)
    assert response["data"] == EXPECTED
    assert (response["kid"], response["signed_at"], response["request_id"]) == (
        KID_A, NOW, ctx.request_id)
    signature = base64.b64decode(response["signature"])
    assert verify(RING[KID_A].public, signature, signing_input(response))
    assert not verify(RING[KID_A].public, signature, signing_input(response, TENANT_B))
    assert signature == KEY_A.sign(signing_input(response))  # deterministic: the vector key
    assert re.fullmatch(re.escape(QUERY_NONCE) + r"\.[A-Za-z0-9_-]{16}", response["nonce"])
    again = await issuer.respond(ctx, NOW)
    assert again["nonce"] != response["nonce"]


async def test_query_stores_its_feedback_with_the_nonce_claim(store, feedback_signer) -> None:
    """Through the pipeline: the answer is recorded in the same atomic step as the claim."""
    await feed(store)
    lab = Lab(store)
    lab.pipeline.respond = FeedbackIssuer(store, feedback_signer(KID_A), KID_A,
                                          policy=RulePolicy(RULES)).respond
    headers, raw = lab.signed(QUERY_PATH, body_for(QUERY_PATH, limit=10), nonce=QUERY_NONCE)
    status, error, ctx = await lab.send(headers, raw, QUERY_PATH)
    assert (status, error) == (202, None)
    (stored,) = [loads(r) for r in await store.list_records("feedback", TENANT)]
    assert stored["response"] == ctx.response
    assert stored["request_id"] == ctx.request_id and stored["nonce"] == QUERY_NONCE
    assert ctx.response["data"] == EXPECTED


async def test_respond_without_policy_is_empty_but_signed(store, feedback_signer) -> None:
    await feed(store)
    response = await FeedbackIssuer(store, feedback_signer(KID_A), KID_A).respond(
        await query_ctx(store), NOW)
    assert response["data"] == []
    assert verify(RING[KID_A].public, base64.b64decode(response["signature"]),
                  signing_input(response))


async def test_respond_on_closed_store_is_503_without_detail_leak(store) -> None:
    await feed(store)
    ctx = await query_ctx(store)
    await store.close()
    issuer = FeedbackIssuer(store, KEY_A, KID_A, policy=RulePolicy(RULES))
    with pytest.raises(E.StoreUnavailable) as info:
        await issuer.respond(ctx, NOW)
    assert info.value.status == 503
    assert info.value.detail == "the store could not be read"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_failed_feedback_write_keeps_the_query_nonce(store, feedback_signer) -> None:
    """A real SQLITE_FULL when the answer is stored: 503, the query's nonce unclaimed, and
    the same signed query succeeds once the store can write again."""
    await feed(store)
    lab = Lab(store)
    lab.pipeline.respond = FeedbackIssuer(store, feedback_signer(KID_A), KID_A,
                                          policy=RulePolicy(RULES)).respond
    headers, raw = lab.signed(QUERY_PATH, body_for(QUERY_PATH, limit=10), nonce=QUERY_NONCE)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    status, error, _ = await lab.send(headers, raw, QUERY_PATH)
    assert (status, error) == (503, "store_unavailable")
    assert not await store.is_claimed("spectrastrike-producer", TENANT, QUERY_NONCE, NOW)
    assert await store.list_records("feedback", TENANT) == []
    store._db.execute("PRAGMA max_page_count = 1073741823")
    status, error, ctx = await lab.send(headers, raw, QUERY_PATH)
    assert (status, error) == (202, None)
    assert ctx.response["data"] == EXPECTED


# -- key rotation: the emitter's view (§6 step 3 and 4, keyring + signing input) -------------

def emitter_check(ring: Keyring, response: dict[str, Any], now: int = NOW) -> str:
    key = ring.get(response["kid"])
    if key is None or not key.valid_at(now):
        return "unknown_kid"
    if not verify(key.public, base64.b64decode(response["signature"]), signing_input(response)):
        return "invalid_signature"
    return "ok"


def retired(kid: str, not_after: int) -> Key:
    return Key(kid, RING[kid].public, status=KeyStatus.RETIRED, not_after=not_after)


# name → (the key that signs: its vector kid, the kid the gateway announces, the emitter's
# keyring, the emitter's verdict)
ROTATION_ROWS: dict[str, tuple[str, str, Keyring, str]] = {
    "before: A signs, emitter holds A": (KID_A, KID_A, Keyring([RING[KID_A]]), "ok"),
    "step 1: A signs, emitter holds A+B": (KID_A, KID_A, Keyring([RING[KID_A], RING[KID_B]]),
                                           "ok"),
    "step 2: B signs, emitter holds A+B": (KID_B, KID_B, Keyring([RING[KID_A], RING[KID_B]]),
                                           "ok"),
    "B too early: emitter holds only A": (KID_B, KID_B, Keyring([RING[KID_A]]), "unknown_kid"),
    "step 3: A retired, B signs": (KID_B, KID_B, Keyring([retired(KID_A, NOW - 1),
                                                          RING[KID_B]]), "ok"),
    "step 3: A retired, stale A answer": (KID_A, KID_A, Keyring([retired(KID_A, NOW - 1),
                                                                 RING[KID_B]]), "unknown_kid"),
    "half switch: new kid, old key": (KID_A, KID_B, Keyring([RING[KID_A], RING[KID_B]]),
                                      "invalid_signature"),
}


@pytest.mark.parametrize("key, kid, ring, expected", ROTATION_ROWS.values(), ids=ROTATION_ROWS)
async def test_key_rotation(store, feedback_signer, key: str, kid: str, ring: Keyring,
                            expected: str) -> None:
    await feed(store)
    issuer = FeedbackIssuer(store, feedback_signer(key), kid, policy=RulePolicy(RULES))
    response = await issuer.respond(await query_ctx(store), NOW)
    assert response["kid"] == kid
    assert emitter_check(ring, response) == expected


async def test_policy_reads_newest_records_within_its_budget(store) -> None:
    """A flood of old findings cannot hide a new execution, nor make a query read it all."""
    await feed(store)
    lab = Lab(store)  # the newest records: one more finding for FP_CRIT, a graph for FP_QUIET
    await post(lab, TELEMETRY_PATH, telemetry(FP_CRIT, severity="critical",
                                              mitre_tactics=["TA0006"]))
    await post(lab, GRAPH_PATH, graph(FP_QUIET, 2, "urn:target:ws-17"))
    everything = await decide(RulePolicy(RULES), store, TENANT, 100)
    small = RulePolicy(RULES, max_records=1)  # the newest finding and the newest graph only
    newest = await decide(small, store, TENANT, 100)
    assert {a["execution_fingerprint"] for a in everything} == {FP_GRAPH, FP_CRIT, FP_QUIET}
    assert {a["execution_fingerprint"] for a in newest} == {FP_CRIT, FP_QUIET}
    stingy = RulePolicy(RULES, max_bytes=1)  # one record per kind, then the budget is spent
    assert await decide(stingy, store, TENANT, 100) == newest
