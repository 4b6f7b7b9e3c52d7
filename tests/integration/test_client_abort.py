"""A client that leaves in the middle of its body (review finding, LOW), through the real
server over real TLS: no 500, no traceback, one audit event ``client_disconnected``
(status 499, never on the wire), counted in ``fedgate_requests_total``, nothing stored —
the same signed request sent whole afterwards is accepted (its nonce was not claimed).
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from lab import NOW, Lab
from promtext import value
from stack import Stack

from schemas.routes import TELEMETRY_PATH

LAB = Lab(None)


def events(stack: Stack) -> list[dict]:
    # only whole lines: the gateway may be appending a batch while we read
    text = stack.audit_path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


async def wait_for_events(stack: Stack, n: int) -> list[dict]:
    for _ in range(100):
        if stack.audit_path.exists() and len(found := events(stack)) >= n:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} audit events")


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_leaving_mid_body_is_a_client_abort(tmp_path, sqlite_url, caplog, how):
    caplog.set_level(logging.DEBUG)
    stack = Stack(tmp_path, sqlite_url)
    headers, body = LAB.signed(ts=NOW)
    head = (f"POST {TELEMETRY_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    async with stack.running(clock=lambda: NOW):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", stack.port, ssl=stack.ssl(), server_hostname="localhost")
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler is reading the body
        if how == "reset":
            writer.transport.abort()
        else:
            writer.close()
        [event] = await wait_for_events(stack, 1)
        async with stack.session() as client:
            async with client.post(stack.url + TELEMETRY_PATH, data=body,
                                   headers=headers) as resp:
                again = resp.status, await resp.text()
            async with client.get(stack.url + "/metrics") as resp:
                metrics = await resp.text()
    assert event["event.action"] == "telemetry.rejected"
    assert event["event.reason"] == "client_disconnected"
    assert event["http.response.status_code"] == 499
    assert event["event.outcome"] == "failure"
    assert again[0] == 202, again  # nothing was stored, the nonce is still free
    assert value(metrics, "fedgate_requests_total", route="telemetry", code="499",
                 error="client_disconnected") == 1
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("fedgate"))
