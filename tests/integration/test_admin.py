"""The admin listener (issue 8.4, PROTOCOL §8 v1.1) on the real `fedgate serve`: plain
HTTP without any certificate, /readyz for every worker together, /metrics of all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import aiohttp
import pytest
from lab import Lab
from promtext import by_label, value
from stack import Stack, free_port

from schemas.routes import TELEMETRY_PATH

LAB = Lab(None)


@pytest.fixture
def stack(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url)
    yield st
    st.kill_all()


def with_admin(stack: Stack, host: str = "127.0.0.1") -> str:
    port = free_port()
    text = stack.config_path.read_text()
    stack.config_path.write_text(text + f'\n[admin]\nhost = "{host}"\nport = {port}\n')
    return f"http://127.0.0.1:{port}"


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with client.get(url) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def until(client: aiohttp.ClientSession, url: str, status: int,
                seconds: float = 20.0) -> str:
    """Poll ``url`` until it answers ``status`` (a deadline, not a performance bound)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            got, _, text = await get(client, url)
            if got == status:
                return text
        except aiohttp.ClientError:
            got, text = None, ""
        assert time.monotonic() < deadline, (got, text)
        await asyncio.sleep(0.1)


async def send(stack: Stack, n: int) -> None:
    async with stack.session() as client:
        for _ in range(n):
            headers, body = LAB.signed(ts=int(time.time()))
            async with client.post(stack.url + TELEMETRY_PATH, data=body,
                                   headers=headers) as resp:
                assert resp.status == 202


async def test_admin_listener_with_two_workers(stack):
    admin = with_admin(stack)
    stack.spawn("--workers", "2")
    async with aiohttp.ClientSession() as client:  # no TLS, no client certificate
        await until(client, admin + "/readyz", 200)
        status, _, body = await get(client, admin + "/healthz")
        assert status == 200
        text = await until(client, admin + "/readyz", 200)
        assert set(json.loads(text)["workers"]) == {"worker-1", "worker-2"}
        await send(stack, 9)
        status, ctype, text = await get(client, admin + "/metrics")
        assert (status, ctype) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert value(text, "fedgate_requests_total", route="telemetry", code="202",
                     error="") == 9
        assert set(by_label(text, "process_resident_memory_bytes", "process")) == {
            "supervisor", "worker-1", "worker-2"}
        status, _, _ = await get(client, admin + TELEMETRY_PATH)
        assert status == 404  # only the three probes live here
        # one worker that cannot answer (stopped) makes the whole gateway not ready
        worker = await worker_pid(stack)
        os.kill(worker, signal.SIGSTOP)
        try:
            text = await until(client, admin + "/readyz", 503)
            answers = json.loads(text)["workers"]
            assert sorted(a["ready"] for a in answers.values()) == [False, True]
        finally:
            os.kill(worker, signal.SIGCONT)
        await until(client, admin + "/readyz", 200)


async def worker_pid(stack: Stack) -> int:
    out = subprocess.run(["pgrep", "-f", "-P", str(stack.procs[0].pid), "spawn_main"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0])


async def test_admin_listener_in_one_process_warns_when_not_loopback(stack):
    admin = with_admin(stack, host="0.0.0.0")
    stack.spawn()
    async with aiohttp.ClientSession() as client:
        text = await until(client, admin + "/readyz", 200)
        assert json.loads(text)["checks"] == {
            "store": True, "keys": True, "self_test": True, "audit": True}
        await send(stack, 3)
        _, _, text = await get(client, admin + "/metrics")
        assert value(text, "fedgate_requests_total", route="telemetry", code="202",
                     error="") == 3
    log = (stack.root / "serve.log").read_text()
    assert [line for line in log.splitlines() if "admin.host" in line] == [
        f"fedgate: warning: {stack.config_path}: admin.host '0.0.0.0' is not a loopback "
        "address: /healthz, /readyz and /metrics are served there over plain HTTP to "
        "anyone who can reach it"]
