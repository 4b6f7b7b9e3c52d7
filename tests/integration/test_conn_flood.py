"""Issue 7.3, through a real ``fedgate serve`` and real loopback sockets: a connection
flood without credentials must not starve producers, and half-sent requests are closed.

The gateway starts with a soft open-files limit of 1024 (a common default; the finding's
EMFILE) and small timeouts. An attacker process holds 2,000 raw TCP connections
(re-opening each as soon as it is closed); this process adds 200 half-sent requests
(mTLS with a certificate of the CA, then half the headers). Meanwhile a producer sends
signed requests, each on a new connection, retrying a refused connection as an emitter
would. Functional bounds only (a deadline), no performance assertion; the figures are
printed (``-s``) and recorded in docs/TLS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import aiohttp
import pytest
from flood import half_sent, lifetime
from lab import Lab
from promtext import by_label
from stack import ROOT, Stack

from schemas.routes import TELEMETRY_PATH

RAW, HALF, PRODUCER_REQUESTS = 2000, 200, 10
SERVER = {"handshake_timeout_s": 1.5, "header_timeout_s": 1.5, "idle_timeout_s": 5,
          "max_connections": 500}
DEADLINE_S = 20.0  # every producer request must have its 202 by then
CLOSE_WITHIN_S = 10.0  # a half-sent connection must be closed by the server by then
LAB = Lab(None)

pytestmark = pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] < RAW + HALF + 512,
    reason="needs a hard open-files limit above the flood size")


async def produce(stack: Stack, deadline: float) -> tuple[list[float], int]:
    """Signed requests, each on a new connection → (seconds to each 202, attempts)."""
    latencies, attempts = [], 0
    connector = aiohttp.TCPConnector(ssl=stack.ssl(), force_close=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        for _ in range(PRODUCER_REQUESTS):
            headers, body = LAB.signed(ts=int(time.time()))
            t0 = time.monotonic()
            while True:
                attempts += 1
                try:
                    async with client.post(stack.url + TELEMETRY_PATH, data=body,
                                           headers=headers) as resp:
                        assert resp.status == 202, await resp.text()
                        break
                except (aiohttp.ClientError, OSError, TimeoutError):
                    assert time.monotonic() < deadline, "the producer was starved"
                    await asyncio.sleep(0.1)
            latencies.append(time.monotonic() - t0)
            await asyncio.sleep(0.2)
    return latencies, attempts


async def sample_fds(pid: int, stop: asyncio.Event) -> int:
    """The most descriptors the gateway process held (Linux /proc; 0 elsewhere)."""
    most = 0
    while not stop.is_set() and os.path.isdir(f"/proc/{pid}/fd"):
        most = max(most, len(os.listdir(f"/proc/{pid}/fd")))
        await asyncio.sleep(0.1)
    return most


async def closed_counts(stack: Stack) -> dict[str, int]:
    async with stack.session() as client, client.get(stack.url + "/metrics") as resp:
        text = await resp.text()
    return {reason: int(n) for reason, n in
            by_label(text, "fedgate_connections_closed_total", "reason").items()}


async def test_flood_does_not_starve_producers_and_half_sent_requests_are_closed(
        tmp_path, sqlite_url):
    stack = Stack(tmp_path, sqlite_url, server=SERVER)
    stack.spawn(fd_soft_limit=1024)
    flood = None
    try:
        await stack.wait_ready()
        flood = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "flood.py"), "--port", str(stack.port),
             "--raw", str(RAW), "--seconds", "25"], stdout=subprocess.PIPE, text=True)
        await asyncio.sleep(1.5)  # the attacker's sockets are open
        start = time.monotonic()
        deadline = start + DEADLINE_S
        stop = asyncio.Event()
        fds = asyncio.create_task(sample_fds(stack.procs[0].pid, stop))
        half = asyncio.gather(*(half_sent("127.0.0.1", stack.port, stack.ssl(),
                                          deadline=deadline, wait_s=CLOSE_WITHIN_S)
                                for _ in range(HALF)))
        latencies, attempts = await produce(stack, deadline)
        lifetimes = await half
        counts = await closed_counts(stack)
        stop.set()
        most_fds = await fds
    finally:
        if flood is not None:
            flood.terminate()
            flood.wait(timeout=10)
        stack.kill_all()
    closed = sorted(x for x in lifetimes if x is not None)
    print(json.dumps({
        "producer_202_s": [round(x, 3) for x in latencies], "producer_attempts": attempts,
        "half_sent_closed": len(closed), "half_sent_lived_s": {
            "min": round(closed[0], 2), "median": round(statistics.median(closed), 2),
            "max": round(closed[-1], 2)} if closed else None,
        "gateway_max_fds": most_fds, "closed_early": counts,
        "flood": flood.stdout.read().strip() if flood.stdout else "",
    }))
    assert len(latencies) == PRODUCER_REQUESTS  # every signed request got its 202
    assert None not in lifetimes, "a half-sent request was still connected"
    assert counts.get("header_timeout", 0) + counts.get("shed", 0) >= HALF



async def test_silent_and_idle_connections_are_closed(tmp_path, sqlite_url):
    """A socket that never speaks goes after handshake_timeout_s; a kept-alive one after
    idle_timeout_s (and not before: its response arrived and it stayed open meanwhile)."""
    stack = Stack(tmp_path, sqlite_url, server={"handshake_timeout_s": 1, "idle_timeout_s": 2})
    async with stack.running():
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", stack.port)
        kept_r, kept_w = await asyncio.open_connection("127.0.0.1", stack.port, ssl=stack.ssl())
        kept_w.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await kept_r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        silent, idle = await asyncio.gather(lifetime(silent_r), lifetime(kept_r))
        silent_w.close()
        kept_w.close()
        counts = await closed_counts(stack)
    assert silent is not None and idle is not None, "a connection outlived its timeout"
    assert idle >= 1.0  # closed by the idle timeout, not right after the response
    assert counts["handshake_timeout"] == 1 and counts["idle_timeout"] == 1
