"""gateway.http.tlsaudit's limiter against an IP-spraying flood, writing to a real chained
audit file: the table of sources stays bounded, the events stay under the global cap,
and after the shutdown flush every failure is an event or counted in one."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from promtext import by_label

from audit import AuditLog, verify_file
from gateway.http.metrics import Metrics
from gateway.http.tlsaudit import HandshakeAudit, classify

SOURCES, ROUNDS, TABLE, CAP = 500, 2, 16, 10


async def test_spraying_sources_is_bounded_and_every_failure_is_accounted(tmp_path):
    path = tmp_path / "audit.jsonl"
    metrics = Metrics()
    with AuditLog(path, fsync=False) as chain:
        async def emit(event):
            chain.append(event)

        limiter = HandshakeAudit(metrics, emit, max_sources=TABLE, global_events=CAP)
        for n in range(SOURCES * ROUNDS):
            exc = ConnectionResetError() if n % 2 else TimeoutError("slow")
            limiter.failed((f"10.0.{n % SOURCES // 250}.{n % SOURCES % 250}", 40000 + n), exc)
            assert len(limiter._sources) <= TABLE
        await asyncio.sleep(0)  # the emit tasks run
        before = len(path.read_text().splitlines())
        await limiter.flush()
    events = [json.loads(line) for line in path.read_text().splitlines()]

    assert before == CAP  # the global cap held during the flood
    assert len(events) <= CAP + TABLE + 1  # the flush: one per remembered source, + the rest
    total = len(events) + sum(e["fedgate.suppressed"] + e.get("fedgate.suppressed_other_sources", 0)
                              for e in events)
    assert total == SOURCES * ROUNDS
    reasons = Counter(e["event.reason"] for e in events)
    for event in events:
        reasons.update(event.get("fedgate.suppressed_reasons", {}))
        reasons.update(event.get("fedgate.suppressed_other_reasons", {}))
    counted = by_label(metrics.render().decode(), "fedgate_tls_handshake_failures_total",
                       "reason")
    assert reasons == counted == {
        "client_aborted": SOURCES * ROUNDS // 2, "timeout": SOURCES * ROUNDS // 2}
    assert any(e.get("fedgate.suppressed_other_sources") for e in events)
    assert verify_file(path).ok


def test_classify_non_ssl_outcomes():
    assert classify(TimeoutError("x"))[0] == "timeout"
    assert classify(ConnectionAbortedError("SSL handshake is taking longer"))[0] == "timeout"
    assert classify(ConnectionResetError())[0] == "client_aborted"
    assert classify(ValueError("?"))[0] == "other"
