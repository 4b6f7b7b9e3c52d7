"""The `fedgate serve` process model through real processes (issue 8.2): one socket bound
by the supervisor, workers that die with it, a port in use is one line, a dead worker is
named; /metrics summing every worker (issue 8.3). Bounds below are generous deadlines
for polling, not performance assertions."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
from lab import Lab
from prometheus_client.parser import text_string_to_metric_families
from promtext import by_label, value
from stack import ROOT, Stack

from fedgate.cli import package_version
from schemas.routes import TELEMETRY_PATH

SERVING = re.compile(r"fedgate: worker (\d+) \(pid (\d+)\) serving")


@pytest.fixture
def stack(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url)
    yield st
    st.kill_all(signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead (its parent has not reaped it)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def poll(check, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def worker_pids(stack: Stack, n: int) -> dict[int, int]:
    log = stack.root / "serve.log"
    assert poll(lambda: len(SERVING.findall(log.read_text())) == n), log.read_text()
    return {int(i): int(pid) for i, pid in SERVING.findall(log.read_text())}


def worker_children(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "-P", str(parent), "spawn_main"],
                         capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out]


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def serve(stack: Stack, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgate.cli", "serve", "--config",
                           str(stack.config_path), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def test_kill_9_of_the_supervisor_takes_its_workers_and_the_port_with_it(stack):
    parent = stack.spawn("--workers", "2")
    await stack.wait_ready()
    pids = worker_children(parent.pid)
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    try:
        assert poll(lambda: not any(alive(pid) for pid in pids)), pids
        assert refuses(stack.port)
    finally:  # stale workers (the old process model) must not outlive the test
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
async def test_a_second_serve_on_a_bound_port_is_one_line(stack, workers):
    stack.spawn("--workers", "2")
    await stack.wait_ready()
    result = serve(stack, *workers)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        f"fedgate: error: 127.0.0.1:{stack.port} address already in use"]
    await stack.wait_ready()  # the first one still serves, alone


async def test_a_killed_worker_is_named_and_the_supervisor_stops_the_rest(stack):
    parent = stack.spawn("--workers", "2")
    await stack.wait_ready()
    pids = worker_pids(stack, 2)
    os.kill(pids[2], signal.SIGKILL)
    assert parent.wait(timeout=60) != 0
    log = (stack.root / "serve.log").read_text()
    assert f"fedgate: worker 2 (pid {pids[2]}) killed by SIGKILL" in log.splitlines()
    assert not alive(pids[1])
    assert refuses(stack.port)


async def test_a_worker_exit_status_is_named(stack):
    parent = stack.spawn("--workers", "2")
    await stack.wait_ready()
    pids = worker_pids(stack, 2)
    # SIGTERM to one worker alone: it leaves cleanly (status 0) while nobody asked the
    # service to stop, which the supervisor treats as a failure like any other exit
    os.kill(pids[1], signal.SIGTERM)
    assert parent.wait(timeout=60) != 0
    log = (stack.root / "serve.log").read_text()
    assert f"fedgate: worker 1 (pid {pids[1]}) exited with status 0" in log.splitlines()
    assert not alive(pids[2])


# -- /metrics: one view of every worker (issue 8.3) ------------------------------------

LAB = Lab(None)


async def scrape(stack: Stack) -> str:
    """A fresh connection each time (any worker may answer)."""
    connector = aiohttp.TCPConnector(ssl=stack.ssl(), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client, \
            client.get(stack.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return await resp.text()


async def send(stack: Stack, n: int) -> None:
    connector = aiohttp.TCPConnector(ssl=stack.ssl(), force_close=True, limit=8)
    async with aiohttp.ClientSession(connector=connector) as client:
        async def one() -> int:
            headers, body = LAB.signed(ts=int(time.time()))
            async with client.post(stack.url + TELEMETRY_PATH, data=body,
                                   headers=headers) as resp:
                return resp.status
        assert await asyncio.gather(*(one() for _ in range(n))) == [202] * n


async def test_metrics_count_every_worker_and_only_go_up(stack):
    parent = stack.spawn("--workers", "2")
    await stack.wait_ready()
    pids = worker_children(parent.pid)
    sent, last = 0, 0.0
    for batch in (12, 7, 20):
        await send(stack, batch)
        sent += batch
        for _ in range(4):  # several scrapes, each possibly answered by another worker
            text = await scrape(stack)
            accepted = value(text, "fedgate_requests_total", route="telemetry", code="202",
                             error="")
            assert accepted == sent  # the sum over both workers, whoever answers
            assert accepted >= last
            last = accepted
            assert value(text, "fedgate_pipeline_seconds_count") == sent
            assert value(text, "fedgate_store_commit_seconds_count") == sent
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["fedgate_requests"].type == "counter"
    assert families["fedgate_pipeline_seconds"].type == "histogram"
    assert value(text, "fedgate_connections_max") == 4096
    assert value(text, "fedgate_build_info", version=package_version()) == 1
    cpu = by_label(text, "process_cpu_seconds_total", "process")
    assert set(cpu) == {"supervisor", "worker-1", "worker-2"}
    fds = by_label(text, "process_open_fds", "process")
    assert set(fds) == set(cpu) and all(n > 0 for n in fds.values())
    assert parent.poll() is None and all(alive(pid) for pid in pids)
