"""A burst of concurrent requests against the Redis store, through the real gateway.

redis-py's default asyncio pool refuses a command past its 100 connections ("Too many
connections"): 150 valid requests in flight at once got 50 × 503
``replay_store_unavailable``. The store's pool now blocks (up to ``socket_timeout``) for
a free connection, so a burst waits instead of failing, and ``/readyz`` pings on a
connection of its own, so the burst cannot starve it. Functional checks only: every
request is accepted and the probe answers ready; no timing is asserted.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from lab import IDENTITY, PRODUCER, TELEMETRY_BODY
from stack import Stack

from emitter.signing import sign_request
from schemas.routes import TELEMETRY_PATH

BURST = 200


async def held_request(stack: Stack, now: int, path: str = TELEMETRY_PATH):
    """A TLS connection carrying a signed request's head but its last byte → (reader,
    writer, the rest): released together, the requests reach the pipeline at once. The
    head is held, not the body: a body is due within ~10 s of its head (408), and on a
    loaded machine opening the burst's 200 TLS connections took longer; the head is
    due within ``header_timeout_s`` (set long in the test)."""
    s = sign_request(PRODUCER, TELEMETRY_BODY, identity=IDENTITY, kid="lab-2026",
                     timestamp=now, nonce=uuid.uuid4().hex)
    head = (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len(s.body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in s.headers.items()) + "\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port, ssl=stack.ssl(),
                                                   server_hostname="localhost")
    writer.write(head[:-1])
    await writer.drain()
    return reader, writer, head[-1:] + s.body


async def readyz(stack: Stack) -> int:
    async with stack.session() as client, client.get(stack.url + "/readyz") as resp:
        return resp.status


@pytest.mark.parametrize("pool", [None, 4], ids=["default_pool", "pool_of_4"])
async def test_a_burst_of_concurrent_requests_is_all_accepted(tmp_path, redis_url, pool):
    stack = Stack(tmp_path, redis_url, server={"header_timeout_s": 120})
    if pool is not None:  # [store] max_connections: a small pool, the burst must queue
        text = stack.config_path.read_text()
        stack.config_path.write_text(text.replace("\n[store]\n",
                                                  f"\n[store]\nmax_connections = {pool}\n"))
    now = int(time.time())
    async with stack.running(clock=lambda: now):
        held = [await held_request(stack, now) for _ in range(BURST)]
        for _, writer, last in held:
            writer.write(last)
        probe = asyncio.ensure_future(readyz(stack))  # while the burst holds the pool
        lines = await asyncio.gather(*(reader.readline() for reader, _, _ in held))
        for _, writer, _ in held:
            writer.close()
        ready = await probe
    statuses = sorted({line.decode().split(" ", 2)[1] for line in lines})
    assert statuses == ["202"], [line for line in lines if b" 202 " not in line][:3]
    assert ready == 200
