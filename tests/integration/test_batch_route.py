"""``POST /internal/v1/telemetry/batch`` (PROTOCOL.md §5 v1.1) over real mTLS, both stores.

The envelope's refusals answer the whole request (nothing stored, one audit event); each
item is then decided exactly as a single ``POST /internal/v1/telemetry`` would be: its own
§4 code, its own audit event, its own stored evidence that re-verifies offline.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json

import pytest
from lab import ATT_OTHER, KEYS, NOW, PRODUCER, TENANT, Lab, body_for, raw_signed
from promtext import value
from stack import Stack

from audit import verify_file
from gateway.http.appkeys import STORE
from keyring import verify
from schemas.canonical import dumps
from schemas.routes import BATCH_PATH, TELEMETRY_PATH
from schemas.signing import request_signing_input

LAB = Lab(None)
MAX_ITEMS = 50


@pytest.fixture
async def stack(tmp_path, store_url):
    st = Stack(tmp_path, store_url, max_body_bytes=4096,
               server={"max_batch_items": MAX_ITEMS, "max_batch_bytes": 256 * 1024})
    runner = await st.start(clock=lambda: NOW)
    st.runner = runner
    yield st
    await runner.cleanup()


def item(headers: dict, body: bytes, **override) -> dict:
    out = {"timestamp": headers["X-Telemetry-Timestamp"], "nonce": headers["X-Telemetry-Nonce"],
           "signature": headers["X-Telemetry-Signature"],
           "body_b64": base64.b64encode(body).decode()}
    if "X-Telemetry-Key-Id" in headers:
        out["kid"] = headers["X-Telemetry-Key-Id"]
    out.update(override)
    return {k: v for k, v in out.items() if v is not None}


def envelope(*items: dict) -> bytes:
    return json.dumps({"items": list(items)}).encode()


HEADERS = {"Content-Type": "application/json", "X-Service-Identity": "spectrastrike-producer"}


async def post(stack: Stack, body, headers: dict | None = None, path: str = BATCH_PATH):
    async with stack.session() as client, client.post(
            stack.url + path, data=body, headers=headers or HEADERS) as resp:
        return resp.status, resp.headers, await resp.json()


def events(stack: Stack) -> list[dict]:
    return [json.loads(line) for line in stack.audit_path.read_text().splitlines()]


async def findings(stack: Stack) -> list[dict]:
    rows = await stack.runner.app[STORE].list_records("finding", TENANT)
    return [json.loads(r) for r in rows]


def signed(**changes) -> tuple[dict, bytes]:
    return LAB.signed(body=body_for(TELEMETRY_PATH, **changes) if changes else None)


# -- the whole request refused --------------------------------------------------------
GOOD = item(*signed())
ENVELOPE_ROWS = {
    # name → (headers, body, status, code, pointer)
    "content_type": ({**HEADERS, "Content-Type": "text/plain"}, envelope(GOOD), 415,
                     "unsupported_media_type", None),
    "empty": (HEADERS, b"", 422, "empty_body", None),
    "unknown_identity": ({**HEADERS, "X-Service-Identity": "nobody"}, envelope(GOOD), 401,
                         "identity_rejected", None),
    "too_large": (HEADERS, b'{"items": [' + b" " * 300_000 + b"]}", 413, "body_too_large",
                  None),
    "not_json": (HEADERS, b'{"items": [}', 422, "malformed_json", None),
    "duplicate_key": (HEADERS, b'{"items": [], "items": []}', 422, "malformed_json", None),
    "not_object": (HEADERS, b"[]", 422, "malformed_json", None),
    "no_items": (HEADERS, b"{}", 422, "schema_violation", ""),
    "items_not_array": (HEADERS, b'{"items": {}}', 422, "schema_violation", "/items"),
    "zero_items": (HEADERS, envelope(), 422, "schema_violation", "/items"),
    "too_many_items": (HEADERS, envelope(*[GOOD] * (MAX_ITEMS + 1)), 422, "schema_violation",
                       "/items"),
    "unknown_member": (HEADERS, json.dumps({"items": [GOOD], "x": 1}).encode(), 422,
                       "schema_violation", "/x"),
    "item_not_object": (HEADERS, envelope(GOOD, "x"), 422, "schema_violation", "/items/1"),
    "item_missing_member": (HEADERS, envelope(GOOD, item(*signed(), nonce=None)), 422,
                            "schema_violation", "/items/1"),
    "item_unknown_member": (HEADERS, envelope(GOOD, {**GOOD, "body": "x"}), 422,
                            "schema_violation", "/items/1/body"),
    "item_wrong_type": (HEADERS, envelope(GOOD, {**GOOD, "timestamp": NOW}), 422,
                        "schema_violation", "/items/1/timestamp"),
    "item_kid_wrong_type": (HEADERS, envelope(GOOD, {**GOOD, "kid": None}), 422,
                            "schema_violation", "/items/1/kid"),
    "item_bad_base64": (HEADERS, envelope(GOOD, {**GOOD, "body_b64": "e30"}), 422,
                        "schema_violation", "/items/1/body_b64"),
}


@pytest.mark.parametrize("name", list(ENVELOPE_ROWS))
async def test_envelope_refusal_answers_the_whole_request(stack, name):
    headers, body, status, code, pointer = ENVELOPE_ROWS[name]
    got, resp_headers, payload = await post(stack, body, headers)
    assert (got, payload["error"], payload["errors"][0]["code"]) == (status, code, code)
    assert payload.get("pointer") == pointer
    assert payload["request_id"] == resp_headers["X-Request-Id"]
    [event] = events(stack)  # exactly one audit event, for the request
    assert event["event.action"] == "telemetry_batch.rejected"
    assert (event["event.reason"], event["request_id"]) == (code, payload["request_id"])
    assert await findings(stack) == []
    # nothing stored: the good item's nonce is still free
    status, _, payload = await post(stack, envelope(GOOD))
    assert (status, payload["results"][0]["status"]) == (200, 202)


async def test_envelope_too_large_while_streaming(stack):
    """No Content-Length (chunked): max_batch_bytes still holds while reading."""
    async def chunks():
        yield b'{"items": ['
        for _ in range(10):
            yield b" " * 65536

    status, _, payload = await post(stack, chunks())
    assert (status, payload["error"]) == (413, "body_too_large")
    assert "max_batch_bytes" in payload["detail"]


# -- every item on its own ------------------------------------------------------------
def _oversized() -> tuple[dict, bytes]:
    body = body_for(TELEMETRY_PATH)
    body["payload"]["description"] = "x" * 5000  # over max_body_bytes (4096) alone
    return LAB.signed(body=body)


def _other_attestation() -> tuple[dict, bytes]:
    body = copy.deepcopy(body_for(TELEMETRY_PATH))
    body["payload"]["attributes"]["attestation_measurement_hash"] = ATT_OTHER
    return LAB.signed(body=body)


def _replayed_later() -> tuple[dict, bytes]:
    return LAB.signed(nonce="nonce-used-by-a-single-request")


ITEM_ROWS = {
    # name → (build() → item, status, code)
    "accepted": (lambda: item(*signed()), 202, None),
    "malformed_signature_headers": (lambda: item(*signed(), signature="AAAA"), 401,
                                    "malformed_signature_headers"),
    "malformed_nonce": (lambda: item(*signed(), nonce="bad nonce\r\nX-A: b"), 401,
                        "malformed_signature_headers"),
    "timestamp_out_of_window": (lambda: item(*LAB.signed(ts=NOW - 31)), 401,
                                "timestamp_out_of_window"),
    "unknown_kid": (lambda: item(*LAB.signed(kid="nope")), 401, "unknown_kid"),
    "key_not_valid": (lambda: item(*LAB.signed(kid="lab-revoked")), 401, "key_not_valid"),
    "invalid_signature": (lambda: item(signed()[0], signed()[1].replace(b"ws-17", b"ws-18")),
                          401, "invalid_signature"),
    "empty_body": (lambda: item(signed()[0], b""), 422, "empty_body"),
    "body_too_large": (lambda: item(*_oversized()), 413, "body_too_large"),
    "malformed_json": (lambda: item(*raw_signed(b'{"a":1,"a":2}', "nonce-raw-dup")), 422,
                       "malformed_json"),
    "non_canonical_body": (lambda: item(*raw_signed(b'{"b":1, "a":2}', "nonce-raw-ws")), 422,
                           "non_canonical_body"),
    "schema_violation": (lambda: item(*signed(extra=1)), 422, "schema_violation"),
    "header_body_mismatch": (lambda: item(*raw_signed(dumps({
        **body_for(TELEMETRY_PATH), "timestamp": NOW - 1, "nonce": "nonce-raw-0001"}))), 401,
        "header_body_mismatch"),
    "mapping_violation": (lambda: item(*signed(
        operator_id="op-002", signed_metadata={"campaign_id": "cmp-001",
                                               "operator_id": "op-002", "tenant_id": TENANT})),
        403, "mapping_violation"),
    "schema_version_not_allowed": (lambda: item(*_version("9.9")), 422,
                                   "schema_version_not_allowed"),
    "attestation_mismatch": (lambda: item(*_other_attestation()), 403, "attestation_mismatch"),
    "replayed_nonce": (lambda: item(*_replayed_later()), 409, "replayed_nonce"),
}


def _version(version: str) -> tuple[dict, bytes]:
    body = copy.deepcopy(body_for(TELEMETRY_PATH))
    body["payload"]["attributes"]["schema_version"] = version
    return LAB.signed(body=body)


async def test_each_item_gets_the_code_a_single_request_would(stack):
    # anchors the execution (ATT) and uses the nonce the "replayed_nonce" item reuses
    headers, body = LAB.signed(nonce="nonce-used-by-a-single-request")
    async with stack.session() as client, client.post(
            stack.url + TELEMETRY_PATH, data=body, headers=headers) as resp:
        assert resp.status == 202
        single_id = resp.headers["X-Request-Id"]
    names = list(ITEM_ROWS)
    items = [ITEM_ROWS[name][0]() for name in names]
    status, resp_headers, payload = await post(stack, envelope(*items),
                                               {**HEADERS, "X-Request-Id": "batch-7"})
    assert status == 200
    assert (payload["request_id"], payload["status"]) == ("batch-7", "completed")
    assert (payload["accepted"], payload["rejected"]) == (1, len(names) - 1)
    results = payload["results"]
    assert [r["index"] for r in results] == list(range(len(names)))
    got = {name: (r["status"], r.get("error")) for name, r in zip(names, results, strict=True)}
    assert got == {name: (row[1], row[2]) for name, row in ITEM_ROWS.items()}
    assert results[names.index("schema_violation")]["pointer"] == ""
    # the same bytes as the single request: a retry, told apart from an attack
    assert results[names.index("replayed_nonce")]["duplicate_of"] == single_id
    # one audit event per item, in item order, named by the item's request id
    item_events = events(stack)[1:]
    assert [e["request_id"] for e in item_events] == [f"batch-7.{i}" for i in range(len(names))]
    assert [(e["http.response.status_code"], e.get("event.reason")) for e in item_events] == [
        (row[1], row[2]) for row in ITEM_ROWS.values()]
    assert item_events[0]["event.action"] == "telemetry.accepted"
    assert {e["event.action"] for e in item_events[1:]} == {"telemetry.rejected"}
    assert item_events[names.index("invalid_signature")]["event.category"] == ["authentication"]
    assert verify_file(stack.audit_path).ok
    assert len(await findings(stack)) == 2  # the single request's and item 0's


async def test_accepted_items_are_stored_alone_and_reverify_offline(stack):
    items, bodies = [], []
    for n in range(20):
        headers, body = signed(campaign_id=f"cmp-{n:03}", signed_metadata={
            "campaign_id": f"cmp-{n:03}", "operator_id": "op-001", "tenant_id": TENANT})
        items.append(item(headers, body))
        bodies.append(body)
    status, _, payload = await post(stack, envelope(*items))
    assert status == 200 and payload["accepted"] == 20
    stored = {f["finding_id"]: f for f in await findings(stack)}
    assert set(stored) == {r["finding_id"] for r in payload["results"]}
    public = KEYS["lab-2026"].public
    for result, sent, body in zip(payload["results"], items, bodies, strict=True):
        evidence = stored[result["finding_id"]]
        raw = base64.b64decode(evidence["body_b64"])
        assert raw == body  # the exact signed bytes of that item, not the envelope
        assert evidence["body_sha256"] == hashlib.sha256(raw).hexdigest()
        assert evidence["request_id"] == result["request_id"]
        assert evidence["signature"] == sent["signature"]
        assert evidence["peer_cert_sha256"] == stack.pin()
        message = request_signing_input(str(evidence["timestamp"]), evidence["nonce"], raw)
        assert verify(public, base64.b64decode(evidence["signature"]), message)
    assert PRODUCER.public == public


async def test_duplicate_nonce_in_one_batch_the_first_wins(stack):
    """Pairs sharing a nonce (same bytes, then other bytes): the first of each pair is
    accepted and the second refused, whatever the timing of the concurrent commits."""
    items = []
    for n in range(15):
        headers, body = LAB.signed(nonce=f"pair-nonce-{n:04}")
        items += [item(headers, body), item(headers, body)]
    other_headers, other_body = signed(campaign_id="cmp-x", signed_metadata={
        "campaign_id": "cmp-x", "operator_id": "op-001", "tenant_id": TENANT})
    first = item(*LAB.signed(nonce="shared-nonce-9999"))
    second = item(*LAB.signed(body=json.loads(other_body), nonce="shared-nonce-9999"))
    items += [first, second]
    status, _, payload = await post(stack, envelope(*items), {**HEADERS, "X-Request-Id": "b"})
    assert status == 200
    results = payload["results"]
    for n in range(15):
        winner, loser = results[2 * n], results[2 * n + 1]
        assert winner["status"] == 202, winner
        assert (loser["status"], loser["error"]) == (409, "replayed_nonce")
        assert loser["duplicate_of"] == winner["request_id"] == f"b.{2 * n}"
    assert results[30]["status"] == 202
    assert (results[31]["status"], results[31]["error"]) == (409, "replayed_nonce")
    assert "duplicate_of" not in results[31]  # other bytes: not a retry, an attack
    assert len(await findings(stack)) == 16


async def test_two_attestations_for_one_execution_the_first_anchors(stack):
    items = [item(*_other_attestation()), item(*signed()), item(*_other_attestation())]
    status, _, payload = await post(stack, envelope(*items))
    assert [(r["status"], r.get("error")) for r in payload["results"]] == [
        (202, None), (403, "attestation_mismatch"), (202, None)]


async def test_max_items_is_accepted(stack):
    items = [item(*signed()) for _ in range(MAX_ITEMS)]
    status, _, payload = await post(stack, envelope(*items))
    assert (status, payload["accepted"]) == (200, MAX_ITEMS)
    assert len(events(stack)) == MAX_ITEMS  # one audit event per item, none for the batch
    assert verify_file(stack.audit_path).lines == MAX_ITEMS


async def test_items_are_counted_by_status(stack):
    items = [item(*signed()), item(*signed()), item(*LAB.signed(kid="nope"))]
    await post(stack, envelope(*items))
    await post(stack, b"[]")
    async with stack.session() as client, client.get(stack.url + "/metrics") as resp:
        text = await resp.text()
    assert value(text, "fedgate_batch_items_total", code="202", error="") == 2
    assert value(text, "fedgate_batch_items_total", code="401", error="unknown_kid") == 1
    assert value(text, "fedgate_requests_total", route="telemetry_batch", code="200",
                 error="") == 1
    assert value(text, "fedgate_requests_total", route="telemetry_batch", code="422",
                 error="malformed_json") == 1


async def test_batch_route_can_be_switched_off(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url, server={"batch_route": False})
    async with st.running(clock=lambda: NOW):
        status, _, payload = await post(st, envelope(item(*signed())))
    assert (status, payload["error"]) == (404, "not_found")


async def test_an_audit_file_that_breaks_mid_batch_keeps_accepts_and_refuses_the_rest(
        stack, store_url):
    """The audit path replaced by a directory: the batch's one group append fails for
    real. Accepted items stand (202: record and event are in the store's audit outbox,
    chained at the next start), a refused item answers 503 ``audit_unavailable`` (its
    refusal cannot be audited), and the gateway turns not ready."""
    from traffic import outbox_events

    assert (await post(stack, envelope(item(*signed()))))[0] == 200  # the file exists
    aside = stack.audit_path.with_name("aside.jsonl")
    stack.audit_path.rename(aside)
    stack.audit_path.mkdir()
    good = [item(*signed()) for _ in range(2)]
    status, _, answer = await post(stack, envelope(good[0], item(*signed(),
                                   signature="AAAA"), good[1]))
    assert status == 200
    assert [(r["status"], r.get("error")) for r in answer["results"]] == [
        (202, None), (503, "audit_unavailable"), (202, None)]
    in_outbox = {e["http.request.id"] for e in await outbox_events(store_url)}
    assert {answer["results"][0]["request_id"], answer["results"][2]["request_id"]} <= in_outbox
    assert answer["results"][1]["request_id"] not in in_outbox
    assert answer["results"][0]["request_id"] not in aside.read_text()
    async with stack.session() as client, client.get(stack.url + "/readyz") as resp:
        assert resp.status == 503
