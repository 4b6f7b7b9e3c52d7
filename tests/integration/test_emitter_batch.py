"""The emitter's outbox sent in batches (``--batch N``; PROTOCOL.md §5 v1.1) against real
gateways: one with the batch route (SQLite and Redis), one with ``[server] batch_route =
false`` (404: the emitter falls back to single requests for the rest of its run), a
Redis that stops mid-run (per-item 503: kept and retried later) and a TCP proxy that
loses the batch's 200 (the resend's items are 409 ``duplicate_of``: delivered once)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from promtext import value
from stack import Stack
from test_emitter_client import (
    LossyProxy,
    findings,
    foreign_telemetry,
    run_cli,
    telemetry,
    write_config,
)

from emitter.batching import envelope
from emitter.outbox import OutboxItem


async def metrics(stack: Stack) -> str:
    async with stack.session() as client, client.get(stack.url + "/metrics") as resp:
        return await resp.text()


def states(stack: Stack) -> list[tuple[str, int | None]]:
    path = stack.root / "emitter" / "state" / "outbox.db"
    with sqlite3.connect(path) as db:
        return db.execute("SELECT state, status FROM outbox ORDER BY id").fetchall()


def write_input(tmp_path, bodies: list[dict], name: str = "in.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(b) for b in bodies) + "\n")
    return str(path)


@pytest.fixture
async def gateway(tmp_path, store_url):
    st = Stack(tmp_path, store_url)
    runner = await st.start()
    yield st
    await runner.cleanup()


async def test_emit_sends_batches_each_item_judged_alone(gateway, capsys, tmp_path):
    bodies = [telemetry() for _ in range(230)]
    bodies[117] = foreign_telemetry()  # 403 for that item only
    cfg = str(write_config(gateway))
    code, lines, err = await run_cli(capsys, "emit", "--config", cfg,
                                     write_input(tmp_path, bodies))
    assert code == 1  # a rejection
    assert len(lines) == 230
    assert lines[117] == ("rejected 403 mapping_violation: the operator is not mapped to "
                          "this tenant")
    assert all(line.startswith("accepted ") and " finding " in line
               for n, line in enumerate(lines) if n != 117)
    assert err.endswith("fedgate: sent 229 of 230\n")
    text = await metrics(gateway)  # 100 + 100 + 30 items: three requests, no single one
    assert value(text, "fedgate_requests_total", route="telemetry_batch", code="200",
                 error="") == 3
    assert value(text, "fedgate_requests_total", route="telemetry", code="202",
                 error="") is None
    assert value(text, "fedgate_batch_items_total", code="202", error="") == 229
    assert len(await findings(gateway)) == 229
    rows = states(gateway)
    assert rows[117] == ("rejected", 403)
    assert {r for n, r in enumerate(rows) if n != 117} == {("delivered", 202)}


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_batch_1_sends_single_requests(gateway, capsys, tmp_path):
    cfg = str(write_config(gateway))
    code, lines, _ = await run_cli(capsys, "emit", "--config", cfg, "--batch", "1",
                                   write_input(tmp_path, [telemetry() for _ in range(3)]))
    assert code == 0 and len(lines) == 3
    text = await metrics(gateway)
    assert value(text, "fedgate_requests_total", route="telemetry", code="202", error="") == 3
    assert value(text, "fedgate_requests_total", route="telemetry_batch", code="200",
                 error="") is None


async def test_gateway_without_the_route_gets_single_requests_after_one_404(
        tmp_path, sqlite_url, capsys):
    stack = Stack(tmp_path, sqlite_url, server={"batch_route": False})
    async with stack.running():
        cfg = str(write_config(stack))
        code, lines, _ = await run_cli(capsys, "emit", "--config", cfg, "--batch", "2",
                                       write_input(tmp_path, [telemetry() for _ in range(7)]))
        text = await metrics(stack)
    assert code == 0 and len(lines) == 7
    assert all(line.startswith("accepted ") for line in lines), lines
    # one 404 (the first batch of two), then the fallback is remembered for the run
    assert value(text, "fedgate_requests_total", route="none", code="404",
                 error="not_found") == 1
    assert value(text, "fedgate_requests_total", route="telemetry", code="202", error="") == 7
    assert len(await findings(stack)) == 7
    assert set(states(stack)) == {("delivered", 202)}


async def test_store_down_items_stay_pending_then_flush_delivers_them(
        tmp_path, make_redis, capsys):
    redis = make_redis()
    stack = Stack(tmp_path, redis.url)
    async with stack.running():
        cfg = str(write_config(stack))
        redis.stop()
        code, lines, err = await run_cli(capsys, "emit", "--config", cfg,
                                         write_input(tmp_path, [telemetry() for _ in range(4)]))
        assert code == 0  # queued is not a failure
        assert lines == ["queued (gateway up, its store is unavailable (503 "
                         "replay_store_unavailable); will retry)"] * 4
        assert "stopped: gateway up, its store is unavailable" in err
        assert set(states(stack)) == {("pending", None)}
        redis.start()
        code, lines, _ = await run_cli(capsys, "outbox", "flush", "--config", cfg)
    assert code == 0 and len(lines) == 4
    assert all(line.startswith("accepted ") for line in lines), lines
    assert len(await findings(stack)) == 4


async def test_lost_batch_answer_resent_items_are_delivered_duplicates(
        tmp_path, sqlite_url, capsys):
    stack = Stack(tmp_path, sqlite_url)
    async with stack.running(), LossyProxy(stack.port, drop=1) as proxy:
        cfg = str(write_config(stack, url=proxy.url))
        code, lines, _ = await run_cli(capsys, "emit", "--config", cfg,
                                       write_input(tmp_path, [telemetry() for _ in range(5)]))
    assert proxy.dropped == 1
    assert code == 0
    assert all(line.startswith("delivered (duplicate of ") for line in lines), lines
    assert len(await findings(stack)) == 5  # each stored once
    assert set(states(stack)) == {("delivered", 409)}


def test_envelope_carries_each_rows_own_signature_and_bytes():
    rows = [OutboxItem(n, "/internal/v1/telemetry", {
        "X-Telemetry-Timestamp": "1", "X-Telemetry-Nonce": f"nonce-{n:04}",
        "X-Telemetry-Signature": "sig", **({"X-Telemetry-Key-Id": "k"} if n else {})},
        b'{"a":%d}' % n, 1, f"nonce-{n:04}", 0.0) for n in range(2)]
    assert json.loads(envelope(rows)) == {"items": [
        {"timestamp": "1", "nonce": "nonce-0000", "signature": "sig", "body_b64": "eyJhIjowfQ=="},
        {"timestamp": "1", "nonce": "nonce-0001", "signature": "sig", "kid": "k",
         "body_b64": "eyJhIjoxfQ=="}]}


def test_batch_option_is_checked(capsys):
    from emitter.cli import main
    assert main(["outbox", "flush", "--config", "x.toml", "--batch", "0"]) == 2
    assert "--batch: must be an integer in [1, 1000]" in capsys.readouterr().err

