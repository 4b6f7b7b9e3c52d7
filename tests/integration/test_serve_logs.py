"""Operator logs of the real ``fedgate serve`` process (docs/LOGGING.md): formats, levels,
store failure causes (throttled, never the password), the access log. Everything real:
the process's own stderr in ``serve.log``, a real redis-server stopped under it."""

from __future__ import annotations

import json
import socket
import time

import pytest
from conftest import RedisServer
from lab import Lab
from stack import Stack

from schemas.routes import TELEMETRY_PATH

LAB = Lab(None)
PASSWORD = "Zq8-hunter2-xY"  # must appear in no log line
LEVELS = {"debug", "info", "warning", "error", "critical"}


def signed_now(**kw):
    return LAB.signed(ts=int(time.time()), **kw)


async def post(stack: Stack, headers: dict, body: bytes) -> tuple[int, str]:
    """The status and the X-Request-Id of one signed request."""
    async with stack.session() as client, client.post(
            stack.url + TELEMETRY_PATH, data=body, headers=headers) as resp:
        return resp.status, resp.headers["X-Request-Id"]


def log_text(stack: Stack) -> str:
    return (stack.root / "serve.log").read_text(encoding="utf-8")


def json_lines(stack: Stack) -> list[dict]:
    """Every line of serve.log as JSON (a line that is not JSON fails the test)."""
    records = [json.loads(line) for line in log_text(stack).splitlines()]
    for rec in records:
        assert {"timestamp", "level", "logger", "message"} <= set(rec), rec
        assert rec["level"] in LEVELS, rec
    return records


@pytest.fixture
def stack(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url)
    yield st
    st.kill_all()


async def test_json_lines_with_levels_and_decisions_only_at_debug(stack):
    stack.spawn("--log-format", "json", "--log-level", "debug")
    await stack.wait_ready()
    status, request_id = await post(stack, *signed_now())
    assert status == 202
    stack.kill_all()
    records = json_lines(stack)
    serving = [r for r in records if r["message"].startswith("serving https://")]
    assert [(r["level"], r["logger"], r["store"]) for r in serving] == [
        ("info", "fedgate.server", "sqlite")]
    decision, = [r for r in records if r.get("request_id") == request_id]
    assert (decision["level"], decision["logger"], decision["message"], decision["status"]) \
        == ("debug", "fedgate.audit", "telemetry.accepted", 202)
    assert [r["message"] for r in records if r["logger"] == "fedgate.server"][-1] == "stopped"


async def test_default_console_has_no_line_per_decision_and_no_python_quotes(stack):
    stack.spawn()
    await stack.wait_ready()
    status, request_id = await post(stack, *signed_now())
    assert status == 202
    stack.kill_all()
    text = log_text(stack)
    assert request_id not in text  # a decision per request is not an info line
    assert " info fedgate.server: serving https://" in text
    assert "='" not in text  # no Python repr


async def test_log_level_warning_hides_info_lines(stack):
    stack.spawn("--log-format", "json", "--log-level", "warning")
    await stack.wait_ready()
    assert (await post(stack, *signed_now()))[0] == 202
    stack.kill_all()
    records = json_lines(stack)
    assert {r["level"] for r in records} <= {"warning", "error", "critical"}
    # the stack configures no [policy] rules: that start-up warning is still there
    assert [r["logger"] for r in records if "no [policy] rules" in r["message"]] == [
        "fedgate.server"]


async def test_access_log_only_when_enabled_by_flag_or_config_key(stack):
    headers, body = signed_now()
    stack.spawn("--log-format", "json")
    await stack.wait_ready()
    stack.kill_all()
    assert not [r for r in json_lines(stack) if r["logger"] == "fedgate.access"]

    for extra, key in ((("--log-format", "json", "--access-log"), ""),
                       ((), '\n[log]\nformat = "json"\naccess = true\n')):
        (stack.root / "serve.log").unlink()
        stack.write_config()
        if key:
            with stack.config_path.open("a", encoding="utf-8") as fh:
                fh.write(key)
        stack.spawn(*extra)
        await stack.wait_ready()
        headers, body = signed_now()
        status, request_id = await post(stack, {**headers, "X-Request-Id": "req-access-1"},
                                        body)
        assert (status, request_id) == (202, "req-access-1")
        stack.kill_all()
        access = [r for r in json_lines(stack) if r["logger"] == "fedgate.access"]
        assert all(r["level"] == "info" and r["message"] == "request" for r in access)
        line, = [r for r in access if r["method"] == "POST"]
        assert {k: line[k] for k in ("path", "status", "request_id", "peer")} == {
            "path": TELEMETRY_PATH, "status": 202, "request_id": "req-access-1",
            "peer": "127.0.0.1"}
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert {r["path"] for r in access} == {"/readyz", TELEMETRY_PATH}
        text = log_text(stack)
        assert headers["X-Telemetry-Signature"] not in text  # never a header ...
        assert headers["X-Telemetry-Nonce"] not in text  # ... nor the body


# -- store failures: the cause, once, without the password ---------------------------------

@pytest.fixture
def redis_with_password(tmp_path_factory):
    """A redis-server with an ACL user ``fedgate`` whose password is ``PASSWORD``."""
    server = RedisServer(tmp_path_factory.mktemp("redis-pw"), extra_args=(
        "--user", "fedgate", "on", f">{PASSWORD}", "~*", "&*", "+@all"))
    server.start()
    server.provision()  # a new, empty store: no amnesia window (docs/STORES.md)
    yield server
    server.stop()


def redis_command(server: RedisServer, *words: str) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(b"*%d\r\n" % len(words)
                  + b"".join(b"$%d\r\n%s\r\n" % (len(w), w.encode()) for w in words))
        return s.recv(256)


@pytest.fixture
def redis_stack(tmp_path, redis_with_password):
    url = f"redis://fedgate:{PASSWORD}@127.0.0.1:{redis_with_password.port}/0"
    st = Stack(tmp_path, url)
    yield st
    st.kill_all()


async def test_redis_stopped_logs_the_cause_once_without_the_password(
        redis_stack, redis_with_password):
    stack = redis_stack
    stack.spawn("--log-format", "json")
    await stack.wait_ready()
    redis_with_password.stop()
    try:
        for _ in range(3):
            assert (await post(stack, *signed_now()))[0] == 503
    finally:
        redis_with_password.start()
    assert (await post(stack, *signed_now()))[0] == 202
    stack.kill_all()
    assert PASSWORD not in log_text(stack)
    records = json_lines(stack)
    # the kill switch's subscriber says once that it lost its channel (not per retry)
    channel = [r for r in records if r["message"].startswith("revocation channel lost")]
    assert len(channel) <= 1, channel
    failure, = [r for r in records if r["level"] in ("warning", "error")
                and r["logger"] != "fedgate.server"  # (the no-[policy] start-up warning)
                and r not in channel]
    assert (failure["logger"], failure["message"], failure["status"], failure["error"]) == (
        "fedgate.store", "store unavailable", 503, "replay_store_unavailable")
    assert failure["cause"].startswith("Redis is unavailable (ConnectionError")
    assert failure["cause_type"] in ("ConnectionError", "ConnectionRefusedError")
    recovered, = [r for r in records if r["message"] == "store unavailable: recovered"]
    assert (recovered["level"], recovered["failures"]) == ("info", 3)


async def test_redis_refusing_a_write_logs_its_reply(redis_stack, redis_with_password):
    stack = redis_stack
    stack.spawn()  # console format
    await stack.wait_ready()
    assert redis_command(redis_with_password, "CONFIG", "SET", "maxmemory", "1") == b"+OK\r\n"
    try:
        assert (await post(stack, *signed_now()))[0] == 503
    finally:
        redis_command(redis_with_password, "CONFIG", "SET", "maxmemory", "0")
    stack.kill_all()
    text = log_text(stack)
    assert PASSWORD not in text
    line, = [ln for ln in text.splitlines() if " warning fedgate.store: " in ln]
    assert ('cause="Redis refused the command: command not allowed when used memory > '
            "'maxmemory'.\"") in line
    assert "cause_type=OutOfMemoryError" in line and "error=store_unavailable" in line
