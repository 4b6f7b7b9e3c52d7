"""Graceful shutdown (issue 10): SIGTERM to ``fedgate serve`` under load.

Real ``fedgate serve`` processes (one, and a supervisor with two workers) on a real
SQLite file or redis-server; clients keep sending signed telemetry (each request with its
own nonce) while SIGTERM arrives. The gateway stops listening at once, drains what is in
progress within ``[server] shutdown_timeout_s`` and exits 0; restarted on the same store
and audit log, every 202 is there and refused on replay, every unanswered request is
either fully there (record + exactly one audit event) or absent (tests/traffic.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time

import aiohttp
import pytest
from stack import Stack
from traffic import (
    Sent,
    Traffic,
    accepted_ids,
    audit_events,
    check_nothing_lost,
    exited,
    post,
    signed_now,
)


def sigterm(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, like systemd's KillMode


async def log_says(stack: Stack, text: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (stack.root / "serve.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} never logged"
        await asyncio.sleep(0.02)


@pytest.fixture
def stack(tmp_path, store_url):
    st = Stack(tmp_path, store_url, server={"shutdown_timeout_s": 5})
    yield st
    st.kill_all(signal.SIGKILL)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_loses_nothing_and_half_writes_nothing(stack, workers):
    extra = ("--workers", "2") if workers == 2 else ()
    proc = stack.spawn(*extra)
    await stack.wait_ready()
    traffic = Traffic(stack, clients=6)
    traffic.start()
    await traffic.until(lambda t: len(t.with_status(202)) >= 60)
    sigterm(proc)
    assert await exited(proc) == 0
    await traffic.until(lambda t: t.sent[-1].status is None)  # the port is closed
    await traffic.stop()
    assert set(traffic.counts()) <= {202, "no answer"}, traffic.counts()
    stack.procs.clear()
    stack.spawn(*extra)  # the same store and audit log
    await stack.wait_ready()
    figures = await check_nothing_lost(stack, traffic, [stack.audit_path])
    print("shutdown figures", stack.store_url.split(":")[0], workers, figures)
    assert figures["lost"] == figures["half_written"] == 0


async def test_stop_listening_at_once_and_finish_the_request_in_progress(stack):
    """A body half sent when SIGTERM arrives is still answered 202; a new connection
    made after it is refused, and the kept-alive idle connection is closed."""
    proc = stack.spawn()
    await stack.wait_ready()
    headers, body = signed_now()
    arrived = asyncio.Event()

    async def slow_body():
        yield body[:20]
        await arrived.wait()
        yield body[20:]

    async with stack.session() as slow, stack.session() as idle:
        first = await post(idle, stack, Sent(*signed_now()))  # now kept alive and idle
        assert first.status == 202
        request = asyncio.create_task(post(slow, stack, Sent(headers, slow_body())))
        await asyncio.sleep(0.3)  # its headers are in, the gateway reads its body
        sigterm(proc)
        await log_says(stack, "draining")
        with pytest.raises((aiohttp.ClientConnectorError, OSError)):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=stack.ssl())) as fresh:
                await fresh.get(stack.url + "/healthz")
        arrived.set()
        done = await request
        assert (done.status, done.answer.get("accepted")) == (202, True)
        late = await post(idle, stack, Sent(*signed_now()))  # its connection was closed
        assert late.status is None
    assert await exited(proc) == 0


async def test_a_stalled_request_does_not_hold_the_shutdown_past_its_deadline(tmp_path,
                                                                              sqlite_url):
    """shutdown_timeout_s = 1 while a client never finishes its body (its own bound is
    30 s): the gateway exits 0 well before that, the request audited, nothing stored."""
    stack = Stack(tmp_path, sqlite_url, clock_skew_s=120, nonce_ttl_s=300,
                  server={"shutdown_timeout_s": 1})
    try:
        proc = stack.spawn()
        await stack.wait_ready()
        headers, body = signed_now()
        forever = asyncio.Event()

        async def stalled():
            yield body[:20]
            await forever.wait()

        async with stack.session() as client:
            request = asyncio.create_task(post(client, stack, Sent(headers, stalled())))
            await asyncio.sleep(0.3)
            sigterm(proc)
            assert await exited(proc, timeout_s=10) == 0  # the body's own bound: 30 s
            # cut at the deadline: its refusal may reach it before the socket closes
            assert (await request).status in (None, 499)
        events = audit_events(stack.audit_path)
        assert [e["event.reason"] for e in events
                if e["event.action"] == "telemetry.rejected"] == ["client_disconnected"]
        assert not accepted_ids(events)
    finally:
        stack.kill_all(signal.SIGKILL)


async def test_a_commit_under_way_at_the_deadline_completes_with_its_audit_event(
        tmp_path, sqlite_url):
    """The store commit waits on a lock past the deadline: the client is cut off, but the
    decision finishes (record + its one event) before the store and audit log close."""
    stack = Stack(tmp_path, sqlite_url, server={"shutdown_timeout_s": 1})
    stack.config_path.write_text(stack.config_path.read_text().replace(
        f"url = {json.dumps(sqlite_url)}", f"url = {json.dumps(sqlite_url)}\n"
        "busy_timeout_ms = 20000"))
    try:
        proc = stack.spawn()
        await stack.wait_ready()
        blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        sent = Sent(*signed_now())
        async with stack.session() as client:
            request = asyncio.create_task(post(client, stack, sent))
            await asyncio.sleep(0.3)
            sigterm(proc)
            await log_says(stack, "finishing 1 signed request(s) before closing the store")
            assert (await request).status is None  # cancelled at the deadline
            blocker.execute("ROLLBACK")  # the commit may proceed now
            blocker.close()
            assert await exited(proc) == 0
        events = audit_events(stack.audit_path)
        accepted = accepted_ids(events)
        assert list(accepted.values()) == [1]
        stack.procs.clear()
        stack.spawn()
        await stack.wait_ready()
        async with stack.session() as client:
            again = await post(client, stack, Sent(sent.headers, sent.body))
        assert (again.status, again.answer.get("duplicate_of")) == (409, *accepted)
    finally:
        stack.kill_all(signal.SIGKILL)
