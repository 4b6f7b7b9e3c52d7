"""``fedgate serve`` as real processes: crash safety, workers, fail-closed store, CLI.

These use the wall clock (the server process has its own), so requests are signed with
``time.time()``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest
from lab import IDENTITY, TENANT, Lab
from stack import ROOT, Stack

from gateway.store import open_store
from schemas.routes import TELEMETRY_PATH

LAB = Lab(None)


def signed_now(**kw):
    return LAB.signed(ts=int(time.time()), **kw)


async def post(stack: Stack, headers: dict, body: bytes, client=None):
    own = client is None
    client = client or stack.session()
    try:
        async with client.post(stack.url + TELEMETRY_PATH, data=body, headers=headers) as r:
            return r.status, await r.json()
    finally:
        if own:
            await client.close()


@pytest.fixture
def stack(tmp_path, store_url):
    st = Stack(tmp_path, store_url)
    yield st
    st.kill_all()


async def test_kill_9_right_after_202_loses_nothing(stack):
    stack.spawn()
    await stack.wait_ready()
    headers, body = signed_now()
    status, payload = await post(stack, headers, body)
    assert status == 202
    stack.kill_all(signal.SIGKILL)  # no shutdown path runs
    stack.spawn()
    await stack.wait_ready()
    status, again = await post(stack, headers, body)
    assert (status, again["error"], again["duplicate_of"]) == (409, "replayed_nonce",
                                                               payload["request_id"])
    stack.kill_all()
    store = open_store(stack.store_url)
    await store.open()
    try:
        record = await store.get_record("finding", payload["finding_id"], TENANT)
    finally:
        await store.close()
    assert json.loads(record)["request_id"] == payload["request_id"]


async def test_two_workers_share_one_port_and_one_store(stack):
    stack.spawn("--workers", "2")
    await stack.wait_ready()
    sessions = [stack.session() for _ in range(8)]
    try:
        requests = [signed_now() for _ in range(40)]
        results = await asyncio.gather(*(post(stack, h, b, sessions[i % 8])
                                         for i, (h, b) in enumerate(requests)))
        assert [s for s, _ in results] == [202] * 40
        replays = await asyncio.gather(*(post(stack, h, b, sessions[(i + 3) % 8])
                                         for i, (h, b) in enumerate(requests)))
        assert [(s, p["error"]) for s, p in replays] == [(409, "replayed_nonce")] * 40
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    out = subprocess.run(["pgrep", "-f", "-P", str(stack.procs[0].pid), "spawn_main"],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 2  # two worker processes behind one supervisor


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
async def test_redis_stopped_fails_closed_then_recovers(stack, redis_server):
    stack.spawn()
    await stack.wait_ready()
    redis_server.stop()
    try:
        status, payload = await post(stack, *signed_now())
        assert (status, payload["error"]) == (503, "replay_store_unavailable")
        async with stack.session() as client, client.get(stack.url + "/readyz") as resp:
            assert resp.status == 503
    finally:
        redis_server.start()
    status, payload = await post(stack, *signed_now())
    assert status == 202, payload


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_unsafe_config_refuses_to_start_with_one_line(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url, clock_skew_s=30, nonce_ttl_s=60)
    result = run_cli("serve", "--config", str(st.config_path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nonce_ttl_s" in lines[0]


def test_audit_verify_cli_names_the_first_bad_line(tmp_path):
    from audit import AuditLog, request_event
    log_path = tmp_path / "a.jsonl"
    with AuditLog(log_path, fsync=False) as log:
        for i in range(3):
            log.append(request_event(action="telemetry.accepted", outcome="success",
                                     category=["web"], status=202, request_id=f"r{i}",
                                     identity=IDENTITY, now=1_795_000_000.0 + i))
    assert run_cli("audit", "verify", str(log_path)).returncode == 0
    lines = log_path.read_text().splitlines()
    lines[1] = lines[1].replace('"r1"', '"r9"')
    log_path.write_text("\n".join(lines) + "\n")
    result = run_cli("audit", "verify", str(log_path))
    assert result.returncode == 1
    assert "line 2" in result.stderr


def test_certs_init_and_keys_new_cli(tmp_path):
    result = run_cli("certs", "init", str(tmp_path / "pki"), "--identity", "ss-a")
    assert result.returncode == 0, result.stderr
    pins = json.loads(result.stdout)
    assert pins == json.loads((tmp_path / "pki" / "pins.json").read_text())
    assert set(pins["identities"]) == {"ss-a"}
    result = run_cli("keys", "new", "--kid", "k-1", "--out", str(tmp_path / "k"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k" / "k-1.pem").stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "k" / "k-1.jwk.json").read_text())["kid"] == "k-1"
    again = run_cli("keys", "new", "--kid", "k-1", "--out", str(tmp_path / "k"))
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr


@pytest.mark.parametrize("args", [[], ["serve"], ["certs", "init"], ["certs", "issue"],
                                  ["keys", "new"], ["audit", "verify"],
                                  ["bootstrap"], ["probe"], ["demo"], ["emit"], ["feedback"]])
def test_help_everywhere(args):
    result = run_cli(*args, "--help")
    assert result.returncode == 0 and "usage: fedgate" in result.stdout
