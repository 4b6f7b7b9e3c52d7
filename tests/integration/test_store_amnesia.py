"""Store amnesia (issue 10): a Redis that lost its state must not let a replay in, and
a Redis that may evict keys is refused. Real redis-servers, a real gateway over mTLS."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid

import pytest
import redis
from lab import NOW, TENANT, Lab
from promtext import value
from stack import ROOT, Stack

from gateway.store import Commit, Outcome, Record, StoreError
from gateway.store.redis import RedisStore
from schemas.routes import TELEMETRY_PATH

pytestmark = pytest.mark.redis

LAB = Lab(None)
SKEW = 30  # the lab configuration's clock_skew_s (the default)


def a_commit(now: int = NOW) -> Commit:
    """A commit as the pipeline builds it: valid_from = timestamp (= now) - clock_skew_s."""
    rid = str(uuid.uuid4())
    return Commit(identity="spectrastrike-producer", nonce=uuid.uuid4().hex,
                  body_digest="d" * 64, request_id=f"req-{rid}", now=now, nonce_ttl_s=120,
                  record=Record("finding", rid, TENANT, None, b"{}"), anchor=None,
                  valid_from=now - SKEW)


async def post(st: Stack, headers: dict, body: bytes, path: str = TELEMETRY_PATH):
    async with st.session() as client, client.post(st.url + path, data=body,
                                                   headers=headers) as resp:
        return resp.status, await resp.json()


async def get(st: Stack, path: str):
    async with st.session() as client, client.get(st.url + path) as resp:
        return resp.status, await resp.text()


def wipe_while_running(server) -> None:
    server.flushall()


def restart_empty(server) -> None:
    """Kill redis-server and start it again, same port, in a new empty directory."""
    server.stop()
    server.workdir = server.workdir.with_name(server.workdir.name + "-empty")
    server.start()


@pytest.mark.parametrize("lose_state", [wipe_while_running, restart_empty])
async def test_replay_after_the_store_lost_its_state_is_refused(
        tmp_path, make_redis, lose_state, caplog):
    server = make_redis()
    clock = [NOW]
    st = Stack(tmp_path, server.url)
    async with st.running(clock=lambda: clock[0]):
        captured = LAB.signed(ts=NOW)
        status, accepted = await post(st, *captured)
        assert status == 202, accepted
        lose_state(server)
        with caplog.at_level(logging.WARNING, logger="fedgate.store"):
            for now in (NOW, NOW + SKEW):  # the whole time the capture is in the window
                clock[0] = now
                status, payload = await post(st, *captured)
                assert (status, payload["error"]) == (503, "replay_store_unavailable"), now
            # a restarted server leaves the pool's connections stale: each fails its
            # commit once (503 too, fail closed) before one reaches the store and begins
            # its epoch; the replay stays refused all along
            for _ in range(8):
                if any("new epoch" in r.getMessage() for r in caplog.records):
                    break
                status, payload = await post(st, *captured)
                assert (status, payload["error"]) == (503, "replay_store_unavailable")
        epoch_lines = [r for r in caplog.records if "new epoch" in r.getMessage()]
        assert len(epoch_lines) == 1 and epoch_lines[0].levelno == logging.WARNING
        _, metrics = await get(st, "/metrics")
        assert value(metrics, "fedgate_store_amnesia_total") == 1
        # the epoch began at the first commit that reached the store (<= NOW + SKEW: a
        # restarted server drops the pool's connections first); a request signed more than
        # clock_skew_s after it is judged as usual
        clock[0] = NOW + 2 * SKEW + 1
        fresh = LAB.signed(ts=clock[0])
        status, payload = await post(st, *fresh)
        assert status == 202, payload
        status, payload = await post(st, *fresh)
        assert (status, payload["error"]) == (409, "replayed_nonce")


async def test_gateway_started_on_a_wiped_store_refuses_the_replay(make_redis) -> None:
    """The store was wiped while no gateway ran: the next one cannot tell it from a new
    store, starts an epoch at its first commit and refuses what may have been claimed."""
    server = make_redis()
    first = RedisStore(server.url)
    await first.open()
    commit = a_commit()
    assert (await first.commit(commit)).outcome is Outcome.ACCEPTED
    await first.close()
    server.flushall()
    second = RedisStore(server.url)
    await second.open()
    assert (await second.commit(commit)).outcome is Outcome.BEFORE_EPOCH
    assert second.amnesia_count == 1
    later = a_commit(now=NOW + 2 * SKEW + 1)
    assert (await second.commit(later)).outcome is Outcome.ACCEPTED
    await second.close()


async def test_known_epoch_upgrade_and_new_tenant_are_not_refused(make_redis) -> None:
    """Guards (they pass on the old code too): a store upgraded from layout version 2
    kept its state (epoch 0), and a tenant new to a known epoch is not amnesia."""
    server = make_redis(provision=False)
    redis.Redis.from_url(server.url).hset("fedgate:schema", mapping={
        "version": "2", "legacy_nonces_until": "0"})
    store = RedisStore(server.url)
    await store.open()
    assert (await store.commit(a_commit())).outcome is Outcome.ACCEPTED
    assert store.amnesia_count == 0
    await store.close()


@pytest.mark.parametrize("durable", [True, False])
async def test_eviction_policy_refused_at_open(make_redis, durable) -> None:
    server = make_redis("--maxmemory-policy", "volatile-lru")
    store = RedisStore(server.url, require_durable=durable)
    with pytest.raises(StoreError) as err:
        await store.open()
    assert "maxmemory-policy noeviction" in err.value.detail
    assert "volatile-lru" in err.value.detail
    await store.close()


def test_gateway_refuses_to_start_on_volatile_lru_with_one_line(tmp_path, make_redis):
    server = make_redis("--maxmemory-policy", "volatile-lru")
    st = Stack(tmp_path, server.url)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fedgate.cli", "serve", "--config", str(st.config_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:  # the old code started and served
        pytest.fail("the gateway started on a Redis that evicts keys")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedgate: error")]
    assert len(errors) == 1 and "maxmemory-policy noeviction" in errors[0], result.stderr


async def test_eviction_policy_changed_at_run_time_turns_readyz_and_commits_off(
        tmp_path, make_redis):
    server = make_redis()
    st = Stack(tmp_path, server.url)
    r = redis.Redis.from_url(server.url)
    async with st.running(clock=lambda: NOW):
        assert (await get(st, "/readyz"))[0] == 200
        r.config_set("maxmemory-policy", "allkeys-lru")
        status, body = await get(st, "/readyz")
        assert status == 503 and '"store":false' in body.replace(" ", "")
        status, payload = await post(st, *LAB.signed())
        assert (status, payload["error"]) == (503, "replay_store_unavailable")
        r.config_set("maxmemory-policy", "noeviction")
        assert (await get(st, "/readyz"))[0] == 200
        status, payload = await post(st, *LAB.signed())
        assert status == 202, payload
