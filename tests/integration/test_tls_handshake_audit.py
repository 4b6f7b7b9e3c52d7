"""Issue 8 point 5, through a real gateway (in-process ``start_gateway``) and real failed
handshakes over loopback: every refused TLS handshake is counted by reason in
``fedgate_tls_handshake_failures_total``, logged at WARNING (rate-limited) and written as
a ``tls.handshake_failed`` event to the chained audit log (rate-limited per source IP,
the held-back failures counted in ``fedgate.suppressed``).

Each kind of failure comes from its own source address (Linux routes all of 127/8 to
loopback, so a client can bind 127.0.0.N) so that each gets its own first event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import Counter

import pytest
from promtext import by_label
from stack import IDENTITIES, Stack

from audit import verify_file
from common.tls import client_context
from fedgate.pki import init_pki
from schemas.validate import Validators

SERVER = {"handshake_timeout_s": 1, "header_timeout_s": 1}
GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
PARTIAL_HELLO = b"\x16\x03\x01\x00\xff\x01"  # a ClientHello record that never completes
FLOOD = 200


async def attempt(port: int, src: str, ctx: ssl.SSLContext | None = None,
                  send: bytes = GET) -> int | None:
    """One connection from ``src`` that the gateway must refuse: no HTTP ever comes back.
    Returns the client's port when the connection was made."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       local_addr=(src, 0))
    except (ssl.SSLError, OSError):  # refused during the client's own handshake
        return None
    local_port = writer.get_extra_info("sockname")[1]
    try:
        writer.write(send)
        data = await asyncio.wait_for(reader.read(64), 10)  # TLS 1.3: refusal on read
    except (ssl.SSLError, ConnectionResetError):
        data = b""
    finally:
        writer.close()
    assert data == b"", data
    return local_port


async def failures(stack: Stack) -> dict[str, int]:
    async with stack.session() as client, client.get(stack.url + "/metrics") as resp:
        text = await resp.text()
    return {reason: int(n) for reason, n in by_label(
        text, "fedgate_tls_handshake_failures_total", "reason").items()}


async def wait_for_counts(stack: Stack, want: dict[str, int]) -> dict[str, int]:
    """Poll /metrics until it shows ``want`` (the server may see a client's close a loop
    turn after the client moved on); a functional deadline, not a timing assertion."""
    deadline = time.monotonic() + 15
    while (got := await failures(stack)) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return got


def handshake_events(stack: Stack) -> list[dict]:
    lines = stack.audit_path.read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e["event.action"] == "tls.handshake_failed"]


@pytest.fixture
def stack(tmp_path, sqlite_url) -> Stack:
    return Stack(tmp_path, sqlite_url, server=SERVER)


async def test_each_refusal_is_counted_logged_and_audited(stack, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedgate.tls")
    rogue = init_pki(tmp_path / "rogue", IDENTITIES)  # same names, another CA
    own, foreign = stack.pki.identities[IDENTITIES[0]], rogue.identities[IDENTITIES[0]]
    tls12 = stack.ssl()
    tls12.minimum_version = tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    ports: dict[str, int | None] = {}
    async with stack.running():
        port = stack.port
        ports["127.0.0.2"] = await attempt(port, "127.0.0.2", stack.ssl(None))
        ports["127.0.0.3"] = await attempt(port, "127.0.0.3", client_context(
            stack.pki.ca.cert, foreign.cert, foreign.key))
        ports["127.0.0.4"] = await attempt(port, "127.0.0.4", client_context(  # serverAuth only
            stack.pki.ca.cert, stack.pki.gateway.cert, stack.pki.gateway.key))
        ports["127.0.0.5"] = await attempt(port, "127.0.0.5", tls12)
        ports["127.0.0.6"] = await attempt(port, "127.0.0.6")  # plain HTTP to the TLS port
        ports["127.0.0.7"] = await attempt(port, "127.0.0.7", send=PARTIAL_HELLO)  # times out
        ports["127.0.0.8"] = await attempt(port, "127.0.0.8", client_context(  # distrusts us
            rogue.ca.cert, own.cert, own.key))
        counts = await wait_for_counts(stack, dict.fromkeys(EXPECTED.values(), 1))
        async with stack.session() as client, client.get(stack.url + "/healthz") as resp:
            assert resp.status == 200  # a good client is unaffected and not counted
        assert await failures(stack) == counts
    assert counts == dict.fromkeys(EXPECTED.values(), 1)

    events = {e["source.ip"]: e for e in handshake_events(stack)}
    assert {ip: e["event.reason"] for ip, e in events.items()} == EXPECTED
    validators = Validators()
    for ip, event in events.items():
        validators.validate("audit_event", event)
        assert event["event.category"] == ["network", "authentication"]
        assert event["event.outcome"] == "failure"
        assert event["fedgate.suppressed"] == 0
        assert isinstance(event["source.port"], int)
        if ports[ip] is not None:
            assert event["source.port"] == ports[ip]
        assert event.get("tls.version") == ("1.3" if ip in ("127.0.0.2", "127.0.0.3",
                                                              "127.0.0.4") else None)
    assert "unsuitable certificate purpose" in events["127.0.0.4"]["message"]
    assert events["127.0.0.2"]["message"] == ("PEER_DID_NOT_RETURN_A_CERTIFICATE: "
                                              "peer did not return a certificate")
    assert verify_file(stack.audit_path).ok

    logged = [r.getMessage() for r in caplog.records if r.name == "fedgate.tls"]
    for ip, reason in EXPECTED.items():
        assert sum(f"TLS handshake refused from {ip}:" in m and reason in m
                   for m in logged) == 1, (ip, logged)


EXPECTED = {"127.0.0.2": "no_client_certificate", "127.0.0.3": "untrusted_chain",
            "127.0.0.4": "certificate_unknown", "127.0.0.5": "protocol_version",
            "127.0.0.6": "not_tls", "127.0.0.7": "timeout", "127.0.0.8": "client_aborted"}


async def test_a_flood_from_one_source_writes_few_events_that_count_every_failure(
        stack, caplog):
    caplog.set_level(logging.WARNING, logger="fedgate.tls")
    src = "127.0.0.9"
    async with stack.running():
        for _ in range(FLOOD // 20):
            await asyncio.gather(*(attempt(stack.port, src, stack.ssl(None))
                                   for _ in range(20)))
        counts = await wait_for_counts(stack, {"no_client_certificate": FLOOD})
    assert counts == {"no_client_certificate": FLOOD}

    events = [e for e in handshake_events(stack) if e["source.ip"] == src]
    assert 2 <= len(events) <= 5, len(events)  # the first, then the held-back ones
    assert len(events) + sum(e["fedgate.suppressed"] for e in events) == FLOOD
    reasons = Counter()
    for event in events:
        assert event["event.reason"] == "no_client_certificate"
        reasons.update(event.get("fedgate.suppressed_reasons", {}))
    assert reasons == {"no_client_certificate": FLOOD - len(events)}
    assert verify_file(stack.audit_path).ok

    lines = [r for r in caplog.records if r.name == "fedgate.tls"
             and f"TLS handshake refused from {src}:" in r.getMessage()]
    assert lines and all(r.levelno == logging.WARNING for r in lines)
    assert len(lines) == len(events)  # one line per event written, not per failure
