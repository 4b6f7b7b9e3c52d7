"""The running gateway over real mTLS sockets, on both stores (issue 3).

Each §4 code is asserted on the wire (status, ``error``, ``X-Request-Id``) together with
its audit event; identity spoofing and a replay race are driven through real TLS
sessions with the project's own dev PKI.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl

import pytest
from lab import IDENTITY, NOW, TENANT, Lab, body_for, raw_signed
from promtext import value
from stack import Stack
from traffic import outbox_events

from audit import verify_file
from fedgate.cli import package_version
from schemas.routes import GRAPH_PATH, QUERY_PATH, TELEMETRY_PATH


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


def canonical(obj) -> bytes:
    from schemas.canonical import dumps
    return dumps(obj)


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
    "key_not_valid": (lambda: (TELEMETRY_PATH, *LAB.signed(kid="lab-revoked")), 401,
                      "key_not_valid"),
    "malformed_json": (
        lambda: (TELEMETRY_PATH, *raw_signed(b'{"a":1,"a":2}')), 422, "malformed_json"),
    "non_canonical_body": (
        lambda: (TELEMETRY_PATH, *raw_signed(b'{"b":1, "a":2}')), 422, "non_canonical_body"),
    "header_body_mismatch": (
        lambda: (TELEMETRY_PATH, *raw_signed(canonical({
            **body_for(TELEMETRY_PATH), "timestamp": NOW - 1, "nonce": "nonce-raw-0001"}))),
        401, "header_body_mismatch"),
    "schema_version_not_allowed": (
        lambda: (GRAPH_PATH, *LAB.signed(GRAPH_PATH, body=body_for(
            GRAPH_PATH, schema_version="execution.graph.v9"))), 422,
        "schema_version_not_allowed"),
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


async def test_body_too_large_when_it_came_whole_with_the_headers(tmp_path, store_url):
    """A chunked body over the limit that arrived in the same write as its headers (the
    read takes it from the buffer at once, with no timer): still a 413, nothing stored."""
    small = Stack(tmp_path, store_url, max_body_bytes=2048)
    headers, _ = LAB.signed()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {TELEMETRY_PATH} HTTP/1.1\r\nHost: x\r\n{head}"
               "Transfer-Encoding: chunked\r\n\r\n").encode()
    request += b"801\r\n" + b"x" * 2049 + b"\r\n0\r\n\r\n"  # 0x801 = 2049 bytes
    async with small.running(clock=lambda: NOW):
        reader, writer = await asyncio.open_connection("127.0.0.1", small.port,
                                                       ssl=small.ssl())
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"body_too_large"' in answer
    assert audit_events(small)[-1]["event.reason"] == "body_too_large"


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
                                                     "self_test": True, "audit": True}
        async with client.get(stack.url + "/metrics") as resp:
            text = await resp.text()
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert value(text, "fedgate_requests_total", route="telemetry", code="202", error="") == 1
    assert value(text, "fedgate_pipeline_seconds_count") == 1
    assert value(text, "fedgate_store_commit_seconds_count") == 1
    assert value(text, "fedgate_connections_open") >= 1
    assert value(text, "fedgate_build_info", version=package_version()) == 1
    assert value(text, "process_open_fds", process="main") > 0
    for secret in (stack.pin(), TENANT, IDENTITY):
        assert secret not in text


async def test_feedback_answer_is_signed_and_bound_to_the_query(stack):

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


async def test_attestation_mismatch_on_the_wire(stack):
    from lab import ATT_OTHER
    async with stack.session() as client:
        assert (await post(client, stack, TELEMETRY_PATH, *LAB.signed()))[0] == 202
        graph = body_for(GRAPH_PATH, attestation_measurement_hash=ATT_OTHER)
        status, _, payload = await post(client, stack, GRAPH_PATH,
                                        *LAB.signed(GRAPH_PATH, body=graph))
    assert (status, payload["error"]) == (403, "attestation_mismatch")
    assert audit_events(stack)[-1]["event.reason"] == "attestation_mismatch"


async def test_rate_limited_on_the_wire_with_retry_after(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url, rate_limit_per_minute=1)
    async with st.running(clock=lambda: NOW), st.session() as client:
        assert (await post(client, st, TELEMETRY_PATH, *LAB.signed()))[0] == 202
        headers, body = LAB.signed()
        async with client.post(st.url + TELEMETRY_PATH, data=body, headers=headers) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"] == "rate_limited"
            assert 0 < int(resp.headers["Retry-After"]) <= 60


async def test_store_full_is_503_store_unavailable_on_the_wire(tmp_path, sqlite_url):
    """A real SQLITE_FULL inside the gateway's own store: 503, nonce not consumed."""
    from gateway.http.app import STORE
    st = Stack(tmp_path, sqlite_url)
    async with st.running(clock=lambda: NOW) as runner:
        store = runner.app[STORE]
        async with st.session() as client:
            assert (await post(client, st, TELEMETRY_PATH, *LAB.signed()))[0] == 202
            pages = store._db.execute("PRAGMA page_count").fetchone()[0]
            store._db.execute(f"PRAGMA max_page_count = {pages}")
            big = body_for(TELEMETRY_PATH)
            big["payload"] = {**big["payload"], "description": "x" * 20000}
            headers, body = LAB.signed(body=big)
            status, _, payload = await post(client, st, TELEMETRY_PATH, headers, body)
            assert (status, payload["error"]) == (503, "store_unavailable")
            store._db.execute("PRAGMA max_page_count = 1073741823")
            status, _, payload = await post(client, st, TELEMETRY_PATH, headers, body)
            assert status == 202, payload


async def test_internal_error_never_leaks(stack, monkeypatch):
    """FAKE FAULT (cannot be produced for real): the pipeline raises an unexpected error."""
    from gateway.pipeline.pipeline import Pipeline

    async def boom(self, req, now, ctx):
        raise RuntimeError("secret /etc/fedgate/keys/feedback.pem")

    monkeypatch.setattr(Pipeline, "process", boom)
    async with stack.session() as client, client.post(
            stack.url + TELEMETRY_PATH, data=LAB.signed()[1], headers=LAB.signed()[0]) as resp:
        text = await resp.text()
        assert resp.status == 500
        assert resp.headers["X-Request-Id"]
    assert json.loads(text)["error"] == "internal_error"
    assert "secret" not in text and "Traceback" not in text and "feedback.pem" not in text
    (event,) = audit_events(stack)
    assert (event["event.reason"], event["http.response.status_code"]) == ("internal_error", 500)
    assert "feedback.pem" not in stack.audit_path.read_text()


def refused_contexts(stack, tmp_path):
    """Clients the gateway must never answer: no cert, a foreign CA's cert, TLS 1.2."""
    from common.tls import client_context
    from fedgate.pki import init_pki
    foreign = init_pki(tmp_path / "foreign", [IDENTITY])
    no_cert = client_context(stack.pki.ca.cert)
    other_ca = client_context(stack.pki.ca.cert, foreign.identities[IDENTITY].cert,
                              foreign.identities[IDENTITY].key)
    tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls12.load_verify_locations(stack.pki.ca.cert)
    certs = stack.pki.identities[IDENTITY]
    tls12.load_cert_chain(certs.cert, certs.key)
    tls12.minimum_version = tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    return {"no_client_cert": no_cert, "foreign_ca": other_ca, "tls12_only": tls12}


async def test_tls_refusals_get_no_http_answer(stack, tmp_path):
    import aiohttp
    for name, ctx in refused_contexts(stack, tmp_path).items():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as client:
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                async with client.post(stack.url + TELEMETRY_PATH, data=LAB.signed()[1],
                                       headers=LAB.signed()[0]) as resp:
                    pytest.fail(f"{name}: got an HTTP answer {resp.status}")
    # no request was decided; the refusals themselves are (rate-limited) v1.1 §7
    # tls.handshake_failed events (tests/integration/test_tls_handshake_audit.py)
    assert {e["event.action"] for e in audit_events(stack)} <= {"tls.handshake_failed"}


# -- hardening found in review: each test fails on the code before its fix ---------------

async def raw_exchange(stack: Stack, data: bytes) -> bytes:
    """Raw HTTP/1.1 bytes over mTLS (for headers aiohttp's client will not send)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", stack.port, ssl=stack.ssl(), server_hostname="127.0.0.1")
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


async def test_slow_body_is_judged_by_the_clock_when_it_has_arrived(tmp_path, sqlite_url):
    """'now' is read after the body: a body trickled in past the window is stale (401)."""
    clock = [NOW]
    st = Stack(tmp_path, sqlite_url)
    async with st.running(clock=lambda: clock[0]):
        headers, body = LAB.signed()

        async def trickle():
            yield body[:10]
            clock[0] = NOW + 31  # the sender stalls past clock_skew_s
            yield body[10:]

        async with st.session() as client, client.post(
                st.url + TELEMETRY_PATH, data=trickle(), headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "timestamp_out_of_window"


async def test_body_slower_than_the_skew_is_408(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url, clock_skew_s=1, nonce_ttl_s=3)
    async with st.running(clock=lambda: NOW):
        headers, body = LAB.signed()

        async def stall():
            yield body[:10]
            await asyncio.sleep(1.5)
            yield body[10:]

        async with st.session() as client, client.post(
                st.url + TELEMETRY_PATH, data=stall(), headers=headers) as resp:
            assert resp.status == 408
            assert (await resp.json())["error"] == "request_timeout"


async def test_compressed_body_is_refused(stack):
    import gzip
    headers, body = LAB.signed()
    async with stack.session() as client:
        status, _, payload = await post(client, stack, TELEMETRY_PATH,
                                        {**headers, "Content-Encoding": "gzip"},
                                        gzip.compress(body))
    assert (status, payload["error"]) == (415, "unsupported_media_type")


async def test_non_utf8_legacy_header_is_identity_rejected_not_500(stack):
    headers, body = LAB.signed()
    head = "\r\n".join([f"POST {TELEMETRY_PATH} HTTP/1.1", "Host: 127.0.0.1",
                        "Connection: close", f"Content-Length: {len(body)}",
                        *(f"{k}: {v}" for k, v in headers.items())]).encode()
    out = await raw_exchange(stack, head + b"\r\nX-Client-Cert-Sha256: \xff\xfe\r\n\r\n" + body)
    assert out.startswith(b"HTTP/1.1 401")
    assert b'"error":"identity_rejected"' in out


async def test_deeply_nested_body_is_422_not_500(stack):
    deep = b'{"x":' + b"[" * 300 + b"]" * 300 + b"}"
    async with stack.session() as client:
        status, _, payload = await post(client, stack, TELEMETRY_PATH, *raw_signed(deep))
    assert (status, payload["error"]) == (422, "malformed_json")


async def test_schema_violation_does_not_echo_the_body(stack):
    body = body_for(TELEMETRY_PATH, **{"secret-looking-member": 1})
    async with stack.session() as client:
        status, _, payload = await post(client, stack, TELEMETRY_PATH, *LAB.signed(body=body))
    assert (status, payload["error"]) == (422, "schema_violation")
    assert "secret-looking-member" not in json.dumps(payload)
    assert "secret-looking-member" not in stack.audit_path.read_text()


async def test_unusable_audit_log_stops_decisions(stack):
    """A torn audit tail: the gateway refuses (503) instead of deciding unaudited. The
    request whose append found it broken was already committed with its event in the
    store's audit outbox: its 202 stands (docs/AUDIT.md *Outbox*), the rest are 503."""
    async with stack.session() as client:
        assert (await post(client, stack, TELEMETRY_PATH, *LAB.signed()))[0] == 202
        with stack.audit_path.open("a") as fh:
            fh.write('{"partial')
        status, _, payload = await post(client, stack, TELEMETRY_PATH, *LAB.signed())
        assert status == 202
        outbox = await outbox_events(stack.store_url)
        assert payload["request_id"] in [e["request_id"] for e in outbox]  # (acks lag)
        assert payload["request_id"] not in stack.audit_path.read_text()
        status, _, payload = await post(client, stack, TELEMETRY_PATH, *LAB.signed())
        assert (status, payload["error"]) == (503, "audit_unavailable")
        async with client.get(stack.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"]["audit"] is False


async def test_gateway_refuses_to_start_when_the_self_test_fails(tmp_path, sqlite_url,
                                                               monkeypatch):
    """FAKE FAULT (a broken libsodium cannot be produced for real): verify accepts a
    tampered signature, so the power-on self-test must stop start-up."""
    import keyring.ed25519
    from keyring.ed25519 import SelfTestError
    st = Stack(tmp_path, sqlite_url)
    monkeypatch.setattr(keyring.ed25519, "verify", lambda public, signature, message: True)
    with pytest.raises(SelfTestError):
        await st.start(clock=lambda: NOW)
