"""SIGHUP through real `fedgate serve` processes over real mTLS (issue 11, PROTOCOL.md §8
v1.1): the producer keyring, identities, pins and operator map are re-read from the files
without dropping a connection; a broken file keeps the old configuration (one log line);
with --workers N the supervisor forwards the signal to every worker."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import aiohttp
import pytest
from lab import IDENTITY, TENANT, Lab
from promtext import by_label
from stack import Stack

from keyring import Key, PrivateKey
from keyring.keys import add_to_jwks
from schemas.routes import TELEMETRY_PATH

LAB = Lab(None)
NEW = PrivateKey(hashlib.sha256(b"reload test key").digest())
NEW_KEY = Key("lab-new", NEW.public, identity=IDENTITY, tenants=frozenset({TENANT}))


def signed(kid: str = "lab-2026", key: PrivateKey | None = None) -> tuple[dict, bytes]:
    return LAB.signed(ts=int(time.time()), kid=kid, **({"key": key} if key else {}))


class Counted:
    """One keep-alive client (at most one connection) that counts the connections it
    opens and the requests sent on a connection it reused."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.opened, self.reused = stack, 0, 0
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._opened)
        trace.on_connection_reuseconn.append(self._reused)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=stack.ssl(), limit=1), trace_configs=[trace])

    async def _opened(self, *_):
        self.opened += 1

    async def _reused(self, *_):
        self.reused += 1

    async def send(self, kid: str = "lab-2026", key: PrivateKey | None = None):
        headers, body = signed(kid, key)
        async with self.session.post(self.stack.url + TELEMETRY_PATH, data=body,
                                     headers=headers) as resp:
            return resp.status, (await resp.json()).get("error")


def logged(stack: Stack, logger: str = "fedgate.reload") -> list[dict]:
    return [json.loads(line) for line in (stack.root / "serve.log").read_text().splitlines()
            if line.startswith("{") and json.loads(line).get("logger") == logger]


def wait_for(check, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    raise AssertionError("timed out")


async def reloads(stack: Stack) -> dict[str, float]:
    async with stack.session() as client, client.get(stack.url + "/metrics") as resp:
        text = await resp.text()
    return by_label(text, "fedgate_config_reloads_total", "result")


@pytest.fixture
def stack(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url)
    yield st
    st.kill_all(signal.SIGKILL)


async def test_a_new_key_is_accepted_after_sighup_on_the_same_connection(stack):
    proc = stack.spawn("--log-format", "json")
    await stack.wait_ready(30)
    client = Counted(stack)
    try:
        assert await client.send() == (202, None)
        assert await client.send("lab-new", NEW) == (401, "unknown_kid")
        add_to_jwks(stack.root / "keys" / "producers.jwks.json", NEW_KEY)
        os.kill(proc.pid, signal.SIGHUP)
        line = wait_for(lambda: logged(stack))[0]
        assert line["message"].startswith("reloaded") and line["keys"] == 4, line
        assert "not_reloaded_restart_to_apply" not in line
        assert await client.send("lab-new", NEW) == (202, None)
        assert await client.send() == (202, None)  # the old keys too
        assert (client.opened, client.reused) == (1, 3)  # never reconnected
    finally:
        await client.session.close()
    assert proc.poll() is None
    assert await reloads(stack) == {"ok": 1.0}


async def test_a_broken_keyring_keeps_the_old_one(stack):
    proc = stack.spawn("--log-format", "json")
    await stack.wait_ready(30)
    client = Counted(stack)
    try:
        assert await client.send() == (202, None)
        (stack.root / "keys" / "producers.jwks.json").write_text('{"keys": [{"kid": ')
        os.kill(proc.pid, signal.SIGHUP)
        lines = wait_for(lambda: logged(stack))
        time.sleep(0.5)
        lines = logged(stack)
        assert len(lines) == 1 and lines[0]["level"] == "error", lines
        assert lines[0]["message"].startswith("reload failed, the previous configuration "
                                              "stays in force: ")
        assert "producer_keyring" in lines[0]["message"]
        assert await client.send() == (202, None)  # still served, with the old keyring
        assert (client.opened, client.reused) == (1, 1)
    finally:
        await client.session.close()
    assert proc.poll() is None
    assert await reloads(stack) == {"error": 1.0}


async def test_a_pin_removed_by_sighup_refuses_that_client(stack):
    proc = stack.spawn("--log-format", "json")
    await stack.wait_ready(30)
    client = Counted(stack)
    try:
        assert await client.send() == (202, None)
        text = stack.config_path.read_text()
        pin = stack.pin(IDENTITY)
        assert text.count(pin) == 1
        stack.config_path.write_text(text.replace(pin, hashlib.sha256(b"x").hexdigest()))
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: logged(stack))
        # the same connection, already through the TLS handshake: refused now
        assert await client.send() == (401, "identity_rejected")
    finally:
        await client.session.close()
    async with stack.session() as fresh:  # and a new connection alike
        headers, body = signed()
        async with fresh.post(stack.url + TELEMETRY_PATH, data=body, headers=headers) as r:
            assert (r.status, (await r.json())["error"]) == (401, "identity_rejected")


async def test_the_supervisor_forwards_sighup_to_every_worker(stack):
    proc = stack.spawn("--workers", "2", "--log-format", "json")
    await stack.wait_ready(60)
    wait_for(lambda: (stack.root / "serve.log").read_text().count(") serving ") == 2, 60)
    add_to_jwks(stack.root / "keys" / "producers.jwks.json", NEW_KEY)
    text = stack.config_path.read_text()  # and a setting that needs a restart
    stack.config_path.write_text(text.replace("[server]\n", "[server]\nidle_timeout_s = 7\n"))
    os.kill(proc.pid, signal.SIGHUP)
    lines = wait_for(lambda: (got := logged(stack)) and len(got) == 2 and got)
    assert len({line["pid"] for line in lines}) == 2  # one line per worker
    for line in lines:
        assert line["not_reloaded_restart_to_apply"] == "server.idle_timeout_s", line
    assert await reloads(stack) == {"ok": 2.0}
    for _ in range(6):  # fresh connections, either worker
        async with stack.session() as fresh:
            headers, body = signed("lab-new", NEW)
            async with fresh.post(stack.url + TELEMETRY_PATH, data=body,
                                  headers=headers) as r:
                assert r.status == 202, await r.text()
    assert proc.poll() is None
