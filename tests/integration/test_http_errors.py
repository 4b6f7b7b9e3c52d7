"""Requests aiohttp's parser refuses (review finding, MEDIUM), through the real server over
real TLS: each is answered the v1.1 error body ``bad_request`` with ``Server: fedgate``
and an ``X-Request-Id``, never echoing the input nor naming the library, audited once
(``http.rejected``), counted, and logged at debug only; the audit events of a flood of
them are capped (the count is not).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
from promtext import value
from stack import Stack

from gateway.http.http_errors import AUDIT_BURST

T = "/internal/v1/telemetry"
CASES = {  # name → (request bytes, a piece of it the answer must not echo)
    "bad_request_line": (b"GARBAGE<script>alert(1)</script>\r\n\r\n", b"script"),
    "long_header": (b"POST " + T.encode() + b" HTTP/1.1\r\nHost: x\r\nX-A: " + b"Z" * 9000
                    + b"\r\n\r\n", b"ZZZZ"),
    "long_url": (b"GET /" + b"Q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"QQQQ"),
    "bad_chunked": (b"POST " + T.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZZ<echo>\r\n"
                    b"abc\r\n0\r\n\r\n", b"echo"),
    "bad_header_name": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX<evil>: 1\r\n\r\n", b"evil"),
    "te_and_cl": (b"POST " + T.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"chunked"),
    "bad_version": (b"GET /healthz HTTP/9.9<x>\r\n\r\n", b"9.9"),
    "many_headers": (b"GET /healthz HTTP/1.1\r\n"
                     + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n", b"X-199"),
    "bad_content_length": (b"POST " + T.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: -1<x>\r\n\r\n", b"-1<x>"),
}


async def exchange(stack: Stack, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", stack.port, ssl=stack.ssl(), server_hostname="localhost")
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()  # the server closes after its answer
    finally:
        writer.close()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def audit_events(stack: Stack) -> list[dict]:
    if not stack.audit_path.exists():
        return []
    # only whole lines: the gateway may be appending a batch while we read
    text = stack.audit_path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


async def settled_events(stack: Stack, n: int) -> list[dict]:
    for _ in range(100):  # the appends run off the event loop
        if len(events := audit_events(stack)) >= n:
            return events
        await asyncio.sleep(0.05)
    return audit_events(stack)


async def bad_request_count(stack: Stack) -> int:
    async with stack.session() as client, client.get(stack.url + "/metrics") as resp:
        text = await resp.text()
    found = value(text, "fedgate_requests_total", route="none", code="400",
                  error="bad_request")
    return int(found or 0)


async def test_unparseable_requests_get_the_error_body(tmp_path, sqlite_url, caplog):
    caplog.set_level(logging.DEBUG)
    stack = Stack(tmp_path, sqlite_url)
    answers = {}
    async with stack.running():
        for name, (data, _) in CASES.items():
            answers[name] = await exchange(stack, data)
        events = await settled_events(stack, len(CASES))
        counted = await bad_request_count(stack)
    for name, (_, echo) in CASES.items():
        raw = answers[name]
        status, headers, body = parse(raw)
        assert status == 400, (name, raw[:200])
        assert headers["server"] == "fedgate", name
        assert headers["content-type"].startswith("application/json"), name
        payload = json.loads(body)
        assert payload["request_id"] == headers["x-request-id"], name
        assert (payload["accepted"], payload["status"], payload["error"]) == (
            False, "rejected", "bad_request"), name
        assert payload["errors"] == [{"code": "bad_request", "message": payload["detail"]}]
        assert echo not in raw, f"{name}: the answer echoes the request"
        assert b"aiohttp" not in raw.lower() and b"python" not in raw.lower(), name
    assert [e["event.action"] for e in events] == ["http.rejected"] * len(CASES)
    assert {e["event.reason"] for e in events} == {"bad_request"}
    assert {e["request_id"] for e in events} == {
        json.loads(parse(raw)[2])["request_id"] for raw in answers.values()}
    assert counted == len(CASES)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("extra", [25])
async def test_a_flood_of_unparseable_requests_has_its_audit_events_capped(
        tmp_path, sqlite_url, extra):
    stack = Stack(tmp_path, sqlite_url)
    sent = AUDIT_BURST + extra
    async with stack.running():
        answers = await asyncio.gather(*(exchange(stack, CASES["bad_request_line"][0])
                                         for _ in range(sent)))
        events = await settled_events(stack, AUDIT_BURST)
        await asyncio.sleep(1.5)  # the budget refills: the next one is audited
        await exchange(stack, CASES["bad_request_line"][0])
        final = await settled_events(stack, len(events) + 1)
        counted = await bad_request_count(stack)
    assert all(parse(raw)[0] == 400 for raw in answers)
    assert AUDIT_BURST <= len(events) < sent  # a few refill while the flood is sent
    assert counted == sent + 1  # every one is counted
    assert len(final) == len(events) + 1
    assert re.search(r"\((\d+) more not audited before this one\)", final[-1]["message"])
