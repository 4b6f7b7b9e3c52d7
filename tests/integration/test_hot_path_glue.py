"""The hot path's per-request glue (issue 9), over real mTLS on an in-process gateway:
the peer certificate's pins are read once per TLS connection, and single requests'
commits go through the store's group commit (``CommitBatcher``)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import pytest
from lab import NOW, Lab
from promtext import value
from stack import Stack

import common.tls
from schemas.routes import BATCH_PATH, TELEMETRY_PATH

LAB = Lab(None)


@pytest.fixture
def counted_pins(monkeypatch):
    """Every call of ``peer_cert_pins`` counted (a pass-through wrapper: it counts, the
    real function still reads the real TLS session); also where a module bound the name."""
    calls = []
    real = common.tls.peer_cert_pins

    def counting(ssl_object):
        calls.append(ssl_object)
        return real(ssl_object)

    monkeypatch.setattr(common.tls, "peer_cert_pins", counting)
    for module in ("gateway.http.app", "gateway.http.batch"):
        monkeypatch.setattr(f"{module}.peer_cert_pins", counting, raising=False)
    return calls


def batch_of(*signed) -> bytes:
    return json.dumps({"items": [
        {"timestamp": h["X-Telemetry-Timestamp"], "nonce": h["X-Telemetry-Nonce"],
         "signature": h["X-Telemetry-Signature"], "kid": h["X-Telemetry-Key-Id"],
         "body_b64": base64.b64encode(b).decode()} for h, b in signed]}).encode()


async def test_certificate_pins_are_read_once_per_connection(tmp_path, sqlite_url,
                                                             counted_pins):
    st = Stack(tmp_path, sqlite_url)
    async with st.running(clock=lambda: NOW):
        async with st.session() as client:  # one keep-alive connection
            for _ in range(4):
                headers, body = LAB.signed()
                async with client.post(st.url + TELEMETRY_PATH, data=body,
                                       headers=headers) as resp:
                    assert resp.status == 202, await resp.text()
            batch_headers = {"Content-Type": "application/json",
                             "X-Service-Identity": "spectrastrike-producer"}
            async with client.post(st.url + BATCH_PATH, data=batch_of(LAB.signed()),
                                   headers=batch_headers) as resp:
                assert resp.status == 200, await resp.text()
        assert len(counted_pins) == 1
        async with st.session() as client:  # a new connection: read once more
            headers, body = LAB.signed()
            async with client.post(st.url + TELEMETRY_PATH, data=body,
                                   headers=headers) as resp:
                assert resp.status == 202
        assert len(counted_pins) == 2


async def test_single_requests_commit_through_the_group_commit(tmp_path, store_url):
    st = Stack(tmp_path, store_url)
    async with st.running(clock=lambda: NOW), st.session() as client:
        async def send(headers, body):
            async with client.post(st.url + TELEMETRY_PATH, data=body,
                                   headers=headers) as resp:
                return resp.status
        signed = [LAB.signed() for _ in range(12)]
        statuses = await asyncio.gather(*(send(h, b) for h, b in signed))
        assert statuses == [202] * 12
        assert await send(*signed[0]) == 409  # the replay: decided by a group, too
        async with client.get(st.url + "/metrics") as resp:
            metrics = await resp.text()
    # every commit of a single request went through CommitBatcher (sum = commits)
    assert value(metrics, "fedgate_store_commit_batch_commits_sum") == 13


async def test_no_decision_lines_unless_debug_at_start(tmp_path, sqlite_url, caplog):
    st = Stack(tmp_path, sqlite_url)
    with caplog.at_level(logging.INFO, logger="fedgate.audit"):
        async with st.running(clock=lambda: NOW), st.session() as client:
            headers, body = LAB.signed()
            async with client.post(st.url + TELEMETRY_PATH, data=body,
                                   headers=headers) as resp:
                assert resp.status == 202
    assert not any("telemetry.accepted" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.DEBUG, logger="fedgate.audit"):
        async with st.running(clock=lambda: NOW), st.session() as client:
            headers, body = LAB.signed()
            async with client.post(st.url + TELEMETRY_PATH, data=body,
                                   headers=headers) as resp:
                assert resp.status == 202
    assert any(r.name == "fedgate.audit" and "telemetry.accepted" in r.getMessage()
               for r in caplog.records)
