"""The running gateway over real mTLS sockets, on both stores (issue 3).

Each §4 code is asserted on the wire (status, ``error``, ``X-Request-Id``) together with
its audit event; identity spoofing and a replay race are driven through real TLS
sessions with the project's own dev PKI.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from lab import IDENTITY, NOW, TENANT, Lab, body_for
from stack import Stack

from audit import verify_file
from gateway.routes import GRAPH_PATH, QUERY_PATH, TELEMETRY_PATH


@pytest.fixture
async def stack(tmp_path, store_url):
    st = Stack(tmp_path, store_url)
    runner = await st.start(clock=lambda: NOW)
    yield st
    await runner.cleanup()


def audit_events(stack: Stack) -> list[dict]:
    lines = stack.audit_path.read_text().splitlines()
    return [json.loads(line) for line in lines]


async def post(client, stack: Stack, path: str, headers: dict, body: bytes):
    async with client.post(stack.url + path, data=body, headers=headers) as resp:
        return resp.status, resp.headers, await resp.json()


LAB = Lab(None)

# name → (build() → (path, headers, body), status, code)
WIRE_ROWS = {
    "accepted": (lambda: (TELEMETRY_PATH, *LAB.signed()), 202, None),
    "graph_accepted": (lambda: (GRAPH_PATH, *LAB.signed(GRAPH_PATH)), 202, None),
    "unsupported_media_type": (
        lambda: (TELEMETRY_PATH, {**LAB.signed()[0], "Content-Type": "text/plain"},
                 LAB.signed()[1]), 415, "unsupported_media_type"),
    "empty_body": (lambda: (TELEMETRY_PATH, LAB.signed()[0], b""), 422, "empty_body"),
    "malformed_signature_headers": (
        lambda: (TELEMETRY_PATH, {**LAB.signed()[0], "X-Telemetry-Signature": "AAAA"},
                 LAB.signed()[1]), 401, "malformed_signature_headers"),
    "timestamp_out_of_window": (
        lambda: (TELEMETRY_PATH, *LAB.signed(ts=NOW - 31)), 401, "timestamp_out_of_window"),
    "unknown_kid": (lambda: (TELEMETRY_PATH, *LAB.signed(kid="nope")), 401, "unknown_kid"),
    "invalid_signature": (
        lambda: (TELEMETRY_PATH, LAB.signed()[0],
                 LAB.signed()[1].replace(b"ws-17", b"ws-18")), 401, "invalid_signature"),
    "schema_violation": (
        lambda: (TELEMETRY_PATH, *LAB.signed(body=body_for(TELEMETRY_PATH, extra=1))), 422,
        "schema_violation"),
    "mapping_violation": (
        lambda: (TELEMETRY_PATH, *LAB.signed(body=body_for(
            TELEMETRY_PATH, operator_id="op-002",
            signed_metadata={"campaign_id": "cmp-001", "operator_id": "op-002",
                             "tenant_id": TENANT}))), 403, "mapping_violation"),
    "query_without_policy_answers_signed_empty": (
        lambda: (QUERY_PATH, *LAB.signed(QUERY_PATH)), 200, None),
}


@pytest.mark.parametrize("name", list(WIRE_ROWS))
async def test_wire_status_code_and_audit(stack, name):
    build, status, code = WIRE_ROWS[name]
    path, headers, body = build()
    async with stack.session() as client:
        got, resp_headers, payload = await post(client, stack, path, headers, body)
    assert got == status
    assert payload.get("error") == code
    request_id = resp_headers["X-Request-Id"]
    assert payload["request_id"] == request_id
    events = audit_events(stack)
    assert len(events) == 1
    assert events[0]["request_id"] == request_id
    assert events[0]["http.response.status_code"] == status
    assert events[0].get("event.reason") == code
    assert events[0]["tls.client.hash.sha256"] == stack.pin()
    if code in ("malformed_signature_headers", "unknown_kid", "invalid_signature"):
        assert events[0]["event.category"] == ["authentication"]
    assert verify_file(stack.audit_path).ok


async def test_request_id_is_echoed(stack):
    headers, body = LAB.signed()
    async with stack.session() as client:
        _, resp_headers, payload = await post(
            client, stack, TELEMETRY_PATH, {**headers, "X-Request-Id": "trace-42"}, body)
    assert resp_headers["X-Request-Id"] == payload["request_id"] == "trace-42"


async def test_cert_of_identity_a_claiming_identity_b_is_rejected(stack):
    """spectrastrike-other's certificate, X-Service-Identity of the producer: 401."""
    headers, body = LAB.signed()
    async with stack.session("spectrastrike-other") as client:
        status, _, payload = await post(client, stack, TELEMETRY_PATH, headers, body)
    assert (status, payload["error"]) == (401, "identity_rejected")
    assert audit_events(stack)[0]["tls.client.hash.sha256"] == stack.pin("spectrastrike-other")


async def test_forged_legacy_cert_header_is_rejected(stack):
    headers, body = LAB.signed()
    forged = {**headers, "X-Client-Cert-Sha256": stack.pin("spectrastrike-other")}
    async with stack.session() as client:
        status, _, payload = await post(client, stack, TELEMETRY_PATH, forged, body)
        assert (status, payload["error"]) == (401, "identity_rejected")
        honest = {**headers, "X-Client-Cert-Sha256": stack.pin()}
        status, _, payload = await post(client, stack, TELEMETRY_PATH, honest, body)
    assert status == 202, payload


async def test_replay_race_exactly_one_accepted(stack):
    """30 identical signed requests on 30 TLS connections at once: one 202, 29 × 409."""
    headers, body = LAB.signed()
    sessions = [stack.session() for _ in range(30)]
    try:
        results = await asyncio.gather(
            *(post(s, stack, TELEMETRY_PATH, headers, body) for s in sessions))
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    statuses = sorted(r[0] for r in results)
    assert statuses == [202] + [409] * 29
    winner = next(r[2]["request_id"] for r in results if r[0] == 202)
    assert {r[2]["duplicate_of"] for r in results if r[0] == 409} == {winner}


async def test_body_too_large_judged_from_content_length(stack):
    headers, _ = LAB.signed()
    big = b"x" * (1024 * 1024 + 1)
    async with stack.session() as client:
        status, _, payload = await post(client, stack, TELEMETRY_PATH, headers, big)
    assert (status, payload["error"]) == (413, "body_too_large")


async def test_body_too_large_enforced_while_streaming(stack):
    """No Content-Length (chunked): the limit still holds while reading."""
    headers, _ = LAB.signed()

    async def chunks():
        for _ in range(20):
            yield b"x" * 65536

    async with stack.session() as client, client.post(stack.url + TELEMETRY_PATH, data=chunks(),
                           headers=headers) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"


async def test_unknown_route_and_method(stack):
    async with stack.session() as client:
        async with client.get(stack.url + "/internal/v1/nothing") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"
            assert resp.headers["X-Request-Id"]
        async with client.get(stack.url + TELEMETRY_PATH) as resp:
            assert resp.status == 405
            assert (await resp.json())["error"] == "method_not_allowed"


async def test_health_ready_metrics_reveal_nothing_secret(stack):
    headers, body = LAB.signed()
    async with stack.session() as client:
        await post(client, stack, TELEMETRY_PATH, headers, body)
        async with client.get(stack.url + "/healthz") as resp:
            assert resp.status == 200
        async with client.get(stack.url + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["checks"] == {"store": True, "keys": True,
                                                     "self_test": True}
        async with client.get(stack.url + "/metrics") as resp:
            text = await resp.text()
    assert 'fedgate_requests_total{route="telemetry",status="202",error=""} 1' in text
    assert "fedgate_pipeline_seconds_count 1" in text
    assert "fedgate_store_commit_seconds_count 1" in text
    for secret in (stack.pin(), TENANT, IDENTITY):
        assert secret not in text


async def test_feedback_answer_is_signed_and_bound_to_the_query(stack):
    import base64

    from stack import FEEDBACK_SEED

    from keyring.ed25519 import PrivateKey, verify
    from schemas.signing import feedback_signing_input

    headers, body = LAB.signed(QUERY_PATH, nonce="query-nonce-0001")
    async with stack.session() as client:
        status, _, payload = await post(client, stack, QUERY_PATH, headers, body)
    assert status == 200
    assert payload["nonce"].startswith("query-nonce-0001.")
    assert len(payload["nonce"]) - len("query-nonce-0001.") >= 16
    message = feedback_signing_input(TENANT, payload["signed_at"], payload["nonce"],
                                     payload["schema_version"], payload["kid"], payload["data"])
    assert verify(PrivateKey(FEEDBACK_SEED).public, base64.b64decode(payload["signature"]),
                  message)
