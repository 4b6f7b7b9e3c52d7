"""The kill switch through real `fedgate serve` processes over real mTLS (issue 11,
PROTOCOL.md §8 v1.1): `fedgate keys revoke` on a store shared by every worker of a
gateway and by two gateway processes, a lost pub/sub message, a restart. The
revocation-to-refusal times are measured and printed (docs/SCALING.md "Kill switch");
the only bound asserted is a polling deadline, not a performance figure."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime

import pytest
from lab import PRODUCER, PRODUCER_B, Lab
from stack import ROOT, Stack, free_port

from gateway.store import open_store
from schemas.routes import TELEMETRY_PATH

LAB = Lab(None)
KID = "lab-2026"
REVOKED_LINE = "key revoked: refusing it from now on"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


async def send(stack: Stack, kid: str | None = KID, session=None) -> tuple[int, str | None]:
    """One fresh signed telemetry request (its own nonce) → (status, error code)."""
    key = PRODUCER_B if kid == "lab-b-2026" else PRODUCER
    headers, body = LAB.signed(ts=int(time.time()), kid=kid, key=key)
    own = session is None
    session = session or stack.session()
    try:
        async with session.post(stack.url + TELEMETRY_PATH, data=body,
                                headers=headers) as resp:
            return resp.status, (await resp.json()).get("error")
    finally:
        if own:
            await session.close()


async def time_to_refusal(stack: Stack, t0: float, deadline_s: float) -> float:
    """Seconds from ``t0`` (monotonic) to the first 401 key_not_valid, each try on a new
    connection; fails if a request gets anything but 202 or that refusal, or if none is
    refused within ``deadline_s`` from now (a polling deadline for a loaded machine)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        status, error = await send(stack)
        if (status, error) == (401, "key_not_valid"):
            return time.monotonic() - t0
        assert status == 202, (status, error)
        await asyncio.sleep(0.005)
    raise AssertionError(f"{stack.url} still accepts the revoked key after {deadline_s} s")


def second_replica(stack: Stack, name: str) -> Stack:
    """Another gateway process on its own port, audit file and node name, sharing the
    store, the PKI and the keys (a copy of the first one's config)."""
    other = copy.copy(stack)
    other.port = free_port()
    other.root = stack.root / name
    other.root.mkdir()
    other.config_path = stack.root / f"{name}.toml"
    text = stack.config_path.read_text()
    text = text.replace(f"port = {stack.port}\n", f"port = {other.port}\n")
    text = text.replace(str(stack.audit_path), str(other.root / "audit.jsonl"))
    text = text.replace('node_name = "replica-a"', f'node_name = "{name}"')
    other.config_path.write_text(text)
    return other  # shares stack.procs: kill_all stops both


def log_lines(stack: Stack) -> list[dict]:
    out = []
    for line in (stack.root / "serve.log").read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def poll(check, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture
def redis_stack(tmp_path, make_redis):
    redis = make_redis()
    st = Stack(tmp_path, redis.url, server={"node_name": "replica-a"})
    st.redis = redis
    yield st
    st.kill_all(signal.SIGKILL)


async def test_two_replicas_refuse_a_revoked_key_within_a_second(redis_stack):
    a = redis_stack
    b = second_replica(a, "replica-b")
    a.spawn("--log-format", "json")
    b.spawn("--log-format", "json")
    await a.wait_ready(30)
    await b.wait_ready(30)
    for replica in (a, b):
        assert await send(replica) == (202, None)
    store = open_store(a.store_url)
    await store.open()
    try:
        t0 = time.monotonic()
        await store.revoke_key(KID, "test", int(time.time()))
        took = await asyncio.gather(*(time_to_refusal(r, t0, 10) for r in (a, b)))
    finally:
        await store.close()
    print(f"\nrevocation → refusal, two replicas on one Redis (revocation_refresh_s = 5): "
          f"A {took[0] * 1000:.0f} ms, B {took[1] * 1000:.0f} ms")
    # without an explicit kid (§4 step 5) the revoked key is not even tried: only the
    # identity's other valid key is, and it does not verify this signature
    for replica in (a, b):
        assert await send(replica, kid=None) == (401, "invalid_signature")


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
async def test_every_worker_refuses_and_the_cli_revokes(tmp_path, make_redis, backend):
    url = make_redis().url if backend == "redis" else f"sqlite:///{tmp_path / 'fedgate.db'}"
    st = Stack(tmp_path, url)
    try:
        st.spawn("--workers", "2", "--log-format", "json")
        await st.wait_ready(60)
        assert poll(lambda: (st.root / "serve.log").read_text().count(") serving ") == 2, 60)
        assert await send(st) == (202, None)
        store = open_store(st.store_url)
        await store.open()
        try:
            t0_wall, t0 = time.time(), time.monotonic()
            await store.revoke_key(KID, "laptop stolen", int(t0_wall))
            refused = await time_to_refusal(st, t0, 10)
        finally:
            await store.close()
        # every worker says it refuses the key: one line each, with its pid
        assert poll(lambda: len({r["pid"] for r in log_lines(st)
                                 if r.get("message", "").startswith(REVOKED_LINE)}) == 2), (
            (st.root / "serve.log").read_text())
        lines = [r for r in log_lines(st) if r.get("message", "").startswith(REVOKED_LINE)]
        assert {(r["kid"], r["reason"], r["in_keyring"]) for r in lines} == {
            (KID, "laptop stolen", True)}
        per_worker = sorted(datetime.fromisoformat(r["timestamp"]).timestamp() - t0_wall
                            for r in lines)
        print(f"\nrevocation → refusal, --workers 2, {backend}: first refused request "
              f"{refused * 1000:.0f} ms; the workers applied it after "
              f"{', '.join(f'{s * 1000:.0f} ms' for s in per_worker)}")
        for _ in range(6):  # fresh connections land on either worker: all refuse
            assert await send(st) == (401, "key_not_valid")
        # the operator's command: one line, then refused (lab-b-2026 is for tenant B:
        # before, this body is a mapping_violation; after, the key itself is refused)
        assert await send(st, kid="lab-b-2026") == (403, "mapping_violation")
        done = await asyncio.to_thread(cli, "keys", "revoke", "lab-b-2026", "--config",
                                       str(st.config_path), "--reason", "rotated out")
        assert done.returncode == 0 and done.stdout == "", done
        assert done.stderr.startswith("fedgate: revoked lab-b-2026 at ")
        assert done.stderr.count("\n") == 1
        assert poll(lambda: len([r for r in log_lines(st) if r.get("kid") == "lab-b-2026"
                                 and r["message"].startswith(REVOKED_LINE)]) == 2)
        assert await send(st, kid="lab-b-2026") == (401, "key_not_valid")
        again = cli("keys", "revoke", KID, "--config", str(st.config_path))
        assert again.returncode == 0 and "was already revoked" in again.stderr
        listed = cli("keys", "revoked", "--config", str(st.config_path))
        assert listed.returncode == 0
        assert [line.split("\t")[::2] for line in listed.stdout.splitlines()] == [
            [KID, "laptop stolen"], ["lab-b-2026", "rotated out"]]
        typo = cli("keys", "revoke", "lab-2062", "--config", str(st.config_path))
        assert typo.returncode == 2 and typo.stderr.startswith("fedgate: error: kid "
                                                               "'lab-2062' is not in ")
        # each refusal is one rejected decision in the audit trail
        events = [json.loads(x) for x in st.audit_path.read_text().splitlines()]
        refusals = [e for e in events if e.get("event.reason") == "key_not_valid"]
        assert len(refusals) == 8 and all(e["event.outcome"] == "failure" for e in refusals)
    finally:
        st.kill_all(signal.SIGKILL)


def redis_cmd(port: int, *args: str) -> bytes:
    cmd = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(cmd.encode())
        return s.recv(256)


def subscribers(port: int) -> int:
    reply = redis_cmd(port, "PUBSUB", "NUMSUB", "fedgate:revocations")
    return int(reply.split(b"\r\n")[-2].lstrip(b":"))


def kill_subscribers(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"CLIENT KILL TYPE pubsub\r\n")
        reply = s.recv(64)
    assert reply.startswith(b":"), reply
    return int(reply[1:].split(b"\r")[0])


async def test_a_lost_message_is_made_good_by_the_periodic_re_read(tmp_path, make_redis):
    """The subscriber connection is killed just before the revocation (its message is
    lost), and then a revocation is written with no message at all: both are refused
    within the re-read period ([server] revocation_refresh_s = 2)."""
    redis = make_redis()
    st = Stack(tmp_path, redis.url, server={"revocation_refresh_s": 2})
    try:
        st.spawn("--log-format", "json")
        await st.wait_ready(30)
        assert await send(st) == (202, None)
        assert poll(lambda: subscribers(redis.port) == 1)
        store = open_store(st.store_url)
        await store.open()
        try:
            assert kill_subscribers(redis.port) == 1  # the gateway's subscriber connection
            t0 = time.monotonic()
            await store.revoke_key(KID, "lost message", int(time.time()))
            killed = await time_to_refusal(st, t0, 10)
            # no message at all: written straight into the hash (a PUBLISH nobody got)
            assert await send(st, kid="lab-b-2026") == (403, "mapping_violation")
            t1 = time.monotonic()
            await store._call(lambda r: r.hset(store._revocations_key(), "lab-b-2026",
                                               '{"revoked_at": 1, "reason": "silent"}'))
            while await send(st, kid="lab-b-2026") != (401, "key_not_valid"):
                assert time.monotonic() - t1 < 10, "never refused: no periodic re-read"
                await asyncio.sleep(0.01)
            silent = time.monotonic() - t1
        finally:
            await store.close()
        print(f"\nsubscriber killed before the revocation: refused after "
              f"{killed * 1000:.0f} ms; no message at all: refused after "
              f"{silent * 1000:.0f} ms (revocation_refresh_s = 2)")
    finally:
        st.kill_all(signal.SIGKILL)


async def test_a_restarted_gateway_refuses_before_serving(tmp_path, sqlite_url):
    """Revoked while no gateway runs (SQLite, one host): the first request after start-up
    is already refused."""
    st = Stack(tmp_path, sqlite_url)
    try:
        done = cli("keys", "revoke", KID, "--config", str(st.config_path))
        assert done.returncode == 0, done.stderr
        st.spawn("--log-format", "json")
        await st.wait_ready(30)
        assert await send(st) == (401, "key_not_valid")
        started = [r for r in log_lines(st) if r.get("message") == "revoked keys read from "
                   "the store"]
        assert [(r["count"], r["in_keyring"]) for r in started] == [(1, 1)]
    finally:
        st.kill_all(signal.SIGKILL)


def test_an_unreadable_revocation_set_stops_start_up(tmp_path, make_redis):
    """Fail closed: a gateway that cannot know what is revoked does not serve."""
    redis = make_redis()
    st = Stack(tmp_path, redis.url)
    assert redis_cmd(redis.port, "SET", "fedgate:{revocations}", "not a hash") == b"+OK\r\n"
    proc = subprocess.run([sys.executable, "-m", "fedgate.cli", "serve", "--config",
                           str(st.config_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fedgate: error: store unavailable: Redis refused the "
                                "command: WRONGTYPE"), proc.stderr
