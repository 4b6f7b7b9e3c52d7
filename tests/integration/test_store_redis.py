"""Redis-specific behaviour of RedisStore, against real redis-server processes."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from gateway.store import Anchor, Commit, Outcome, Record, StoreError
from gateway.store.redis import RedisStore

pytestmark = pytest.mark.redis

TENANT = "7758e414-233a-5ea0-575b-cf0c26f5259a"
IDENTITY = "spectrastrike-producer"
FP = "ab" * 32
HASH = "cd" * 32
DIGEST = "ef" * 32


def make_commit(*, nonce: str | None = None, anchor: bool = True, ttl: int = 120,
                digest: str = DIGEST, attestation: str = HASH, fp: str = FP) -> Commit:
    record_id = str(uuid.uuid4())
    return Commit(
        identity=IDENTITY, nonce=nonce or uuid.uuid4().hex, body_digest=digest,
        request_id=f"req-{record_id}", now=1_700_000_000, nonce_ttl_s=ttl,
        record=Record("finding", record_id, TENANT, fp, b'{"finding":"%s"}' % record_id.encode()),
        anchor=Anchor(TENANT, fp, attestation) if anchor else None,
    )


def raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url)
    await s.open()
    yield s
    await s.close()


async def test_commit_outcomes_and_reads(store: RedisStore) -> None:
    first = make_commit()
    assert (await store.commit(first)).outcome is Outcome.ACCEPTED
    assert await store.get_record("finding", first.record.record_id, TENANT) == first.record.data
    assert await store.get_anchor(TENANT, FP) == HASH
    assert await store.is_claimed(IDENTITY, TENANT, first.nonce, first.now) is True
    assert await store.is_claimed(IDENTITY, TENANT, "never-used-nonce", first.now) is False
    again = await store.commit(make_commit(nonce=first.nonce))
    assert again.outcome is Outcome.REPLAYED and again.duplicate_of == first.request_id
    other = await store.commit(make_commit(nonce=first.nonce, digest="00" * 32))
    assert other.outcome is Outcome.REPLAYED and other.duplicate_of is None
    bad = await store.commit(make_commit(attestation="11" * 32))
    assert bad.outcome is Outcome.ATTESTATION_MISMATCH and bad.anchored_hash == HASH
    assert [await store.list_records("finding", TENANT)] == [[first.record.data]]


async def test_record_id_conflict_writes_nothing(store: RedisStore) -> None:
    first = make_commit()
    await store.commit(first)
    clash = replace(make_commit(anchor=False), record=first.record)
    with pytest.raises(StoreError) as err:
        await store.commit(clash)
    assert err.value.stage == "write"
    assert await store.is_claimed(IDENTITY, TENANT, clash.nonce, clash.now) is False
    assert await store.list_records("finding", TENANT) == [first.record.data]


async def test_expired_claim_is_replaced(store: RedisStore) -> None:
    first = make_commit(ttl=60)
    await store.commit(first)
    assert await store.is_claimed(IDENTITY, TENANT, first.nonce, first.now + 59) is True
    assert await store.is_claimed(IDENTITY, TENANT, first.nonce, first.now + 60) is False
    early = replace(make_commit(nonce=first.nonce), now=first.now + 59)
    assert (await store.commit(early)).outcome is Outcome.REPLAYED
    late = replace(make_commit(nonce=first.nonce), now=first.now + 60)
    assert (await store.commit(late)).outcome is Outcome.ACCEPTED
    again = await store.commit(replace(make_commit(nonce=first.nonce), now=first.now + 61))
    assert again.outcome is Outcome.REPLAYED and again.duplicate_of == late.request_id


async def test_list_records_oldest_first_and_limit(store: RedisStore) -> None:
    commits = [make_commit(anchor=False) for _ in range(5)]
    for c in commits:
        assert (await store.commit(c)).outcome is Outcome.ACCEPTED
    data = [c.record.data for c in commits]
    assert await store.list_records("finding", TENANT) == data
    assert await store.list_records("finding", TENANT, limit=2) == data[:2]
    assert await store.list_records("graph", TENANT) == []


@pytest.mark.parametrize("change", [
    {"identity": "a{b}"}, {"identity": "id:x"}, {"nonce": "abcd:efgh"}, {"nonce": "abcd}efgh"},
    {"record": Record("finding", "x1", "{" + TENANT[1:], None, b"{}")},
    {"record": Record("finding", "x{1}", TENANT, None, b"{}")},
    {"anchor": Anchor(TENANT, FP[:-1] + "}", HASH)},
])
async def test_invalid_key_parts_are_refused(store: RedisStore, redis_url: str, change) -> None:
    with pytest.raises(ValueError):
        await store.commit(replace(make_commit(), **change))
    assert list(raw(redis_url).scan_iter(match="fedgate:{*")) == []


async def test_keys_are_prefixed_and_tenant_tagged(store: RedisStore, redis_url: str) -> None:
    c = make_commit()
    await store.commit(c)
    keys = sorted(k.decode() for k in raw(redis_url).scan_iter(match="*"))
    rid, tagged = c.record.record_id, f"fedgate:{{{TENANT}}}:"
    assert keys == sorted([
        f"{tagged}n:{IDENTITY}:{c.nonce}", f"{tagged}a:{FP}", f"{tagged}o:{FP}",
        f"{tagged}i:finding", f"{tagged}i:finding:{IDENTITY}", f"{tagged}r:finding:{rid}",
        f"{tagged}epoch", "fedgate:schema",
    ])


async def test_ttls(store: RedisStore, redis_url: str) -> None:
    c = make_commit(ttl=4321)
    await store.commit(c)
    r, tagged = raw(redis_url), f"fedgate:{{{TENANT}}}:"
    assert r.ttl(f"{tagged}n:{IDENTITY}:{c.nonce}") == 4321
    for key in (f"{tagged}a:{FP}", f"{tagged}o:{FP}", f"{tagged}r:finding:{c.record.record_id}",
                f"{tagged}i:finding", f"{tagged}epoch"):
        assert r.ttl(key) == -1, key


async def test_script_flush_is_recovered(store: RedisStore, redis_url: str) -> None:
    assert (await store.commit(make_commit())).outcome is Outcome.ACCEPTED
    raw(redis_url).script_flush()
    assert (await store.commit(make_commit())).outcome is Outcome.ACCEPTED
    assert (await store.commit(make_commit())).outcome is Outcome.ACCEPTED


async def test_server_down_then_back(store: RedisStore, redis_server) -> None:
    assert (await store.commit(make_commit())).outcome is Outcome.ACCEPTED
    redis_server.stop()
    try:
        with pytest.raises(StoreError) as err:
            await store.commit(make_commit())
        assert err.value.stage == "claim"
        assert await store.ping() is False
    finally:
        redis_server.start()
    assert await store.ping() is True
    assert (await store.commit(make_commit())).outcome is Outcome.ACCEPTED


async def test_unreachable_on_open(tmp_path: Path, redis_server) -> None:
    s = RedisStore(type(redis_server)(tmp_path).url, socket_timeout=0.5)  # nothing listens
    with pytest.raises(StoreError) as err:
        await s.open()
    assert err.value.stage == "claim"
    assert await s.ping() is False
    await s.close()


@pytest.mark.parametrize(("args", "setting"), [
    (("--appendonly", "no"), "appendonly yes"),
    (("--appendfsync", "everysec"), "appendfsync always"),
])
async def test_require_durable_refuses(make_redis, args, setting) -> None:
    server = make_redis(*args)
    s = RedisStore(server.url)
    with pytest.raises(StoreError) as err:
        await s.open()
    assert err.value.stage == "claim" and setting in err.value.detail
    await s.close()
    relaxed = RedisStore(server.url, require_durable=False)
    await relaxed.open()
    assert (await relaxed.commit(make_commit())).outcome is Outcome.ACCEPTED
    await relaxed.close()


async def test_config_not_permitted(make_redis) -> None:
    server = make_redis("--rename-command", "CONFIG", "")
    s = RedisStore(server.url)
    with pytest.raises(StoreError) as err:
        await s.open()
    assert "require_durable=false" in err.value.detail
    await s.close()


async def test_out_of_memory_writes_nothing(make_redis) -> None:
    server = make_redis("--maxmemory-policy", "noeviction")
    s = RedisStore(server.url)
    await s.open()  # writes its layout version: done before memory runs out
    r = raw(server.url)
    r.config_set("maxmemory", "1mb")
    with contextlib.suppress(redis.exceptions.OutOfMemoryError):  # already over the limit
        r.set("filler", b"x" * (2 * 1024 * 1024))
    assert r.info("memory")["used_memory"] > 1024 * 1024
    c = make_commit()
    with pytest.raises(StoreError) as err:
        await s.commit(c)
    assert err.value.stage == "write" and "maxmemory" in err.value.detail
    # refused before the script ran (flagged write script), not by its first write
    assert r.info("commandstats")["cmdstat_evalsha"]["rejected_calls"] == 1
    assert [k for k in r.scan_iter(match="fedgate:{*")] == []
    r.config_set("maxmemory", 0)
    assert (await s.commit(c)).outcome is Outcome.ACCEPTED  # the nonce was not consumed
    await s.close()
