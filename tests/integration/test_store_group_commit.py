"""Group commit (issue 9) on every real store: ``Store.commit_many`` (one Redis round
trip, one SQLite transaction) and ``CommitBatcher`` (concurrent requests' commits
coalesced into groups). Round trips and transactions are counted for real: Redis's own
``INFO stats`` (``total_reads_processed``: reads of client sockets, one per pipeline
that fits one read) and ``INFO commandstats``; the SQLite store's count of COMMITs.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import redis

from gateway.store import Outcome, StoreError, open_store
from gateway.store.batcher import CommitBatcher
from tests.integration.test_store_contract import (
    FP,
    HASH_B,
    NOW,
    OTHER_TENANT,
    TENANT,
    audited,
    make_commit,
)

N = 20


@pytest.fixture
def store(any_store):
    """An open store of each kind: sqlite, redis, redis_cluster (conftest)."""
    return any_store


async def mixed_group(store):
    """Accepted, a replay of it, a mismatching attestation, a taken record id (taken by a
    commit before the group), another tenant, and a commit that conflicts with nothing:
    (commits, expected per commit)."""
    await store.commit(make_commit("nonce-0000", request_id="req-0", record_id="rec-0",
                                   fp=None))
    return [
        (audited(make_commit(), 0), Outcome.ACCEPTED),
        (audited(make_commit(request_id="req-2", record_id="rec-2"), 1), Outcome.REPLAYED),
        (audited(make_commit("nonce-0003", request_id="req-3", record_id="rec-3", att=HASH_B),
                 2), Outcome.ATTESTATION_MISMATCH),
        (audited(make_commit("nonce-0004", request_id="req-4", record_id="rec-0", fp=None),
                 3), "write"),
        (audited(make_commit("nonce-0005", request_id="req-5", record_id="rec-5",
                             tenant=OTHER_TENANT), 4), Outcome.ACCEPTED),
        (audited(make_commit("nonce-0006", request_id="req-6", record_id="rec-6"), 5),
         Outcome.ACCEPTED),
    ]


async def test_commit_many_each_commit_atomic_alone_results_in_order(store):
    group = await mixed_group(store)
    results = await store.commit_many([c for c, _ in group])
    got = [r.stage if isinstance(r, StoreError) else r.outcome for r in results]
    assert got == [want for _, want in group]
    assert results[1].duplicate_of == "req-1"
    # refusals and the failed commit left no trace: no claim, no record, no outbox entry
    for nonce in ("nonce-0003", "nonce-0004"):
        assert not await store.is_claimed("spectrastrike-producer", TENANT, nonce, NOW)
    assert await store.get_record("finding", "rec-1", TENANT) == b'{"record":"rec-1"}'
    for rec in ("rec-2", "rec-3"):
        assert await store.get_record("finding", rec, TENANT) is None
    assert await store.get_anchor(TENANT, FP) != HASH_B
    entries = await store.outbox_read("node-a/0")
    assert sorted(e.events for e in entries) == sorted(
        c.audit for (c, _), r in zip(group, results, strict=True)
        if not isinstance(r, StoreError) and r.outcome is Outcome.ACCEPTED)
    assert {e.ref for e in entries} == {r.outbox_ref for r in results
                                        if not isinstance(r, StoreError) and r.outbox_ref}


async def test_commit_many_conflicts_are_decided_in_order(store):
    same_nonce = [make_commit(digest=f"{i:064x}", request_id=f"req-{i}", record_id=f"rec-{i}",
                              fp=None) for i in range(8)]
    results = await store.commit_many(same_nonce)
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] + [Outcome.REPLAYED] * 7
    # the same execution, two attestations: the first in order anchors it
    racing = [make_commit(f"nonce-1{i:03d}", att=HASH_B if i % 2 else "a" * 64,
                          request_id=f"req-x{i}", record_id=f"rec-x{i}", tenant=OTHER_TENANT)
              for i in range(6)]
    results = await store.commit_many(racing)
    assert [r.outcome for r in results] == [Outcome.ACCEPTED, Outcome.ATTESTATION_MISMATCH] * 3
    assert await store.commit_many([]) == []


async def test_commit_many_a_bad_commit_is_refused_before_anything_is_written(store):
    bad = replace(make_commit("nonce-0009", record_id="rec-9"), nonce_ttl_s=0)
    if store.url.startswith("sqlite"):  # SQLite does not check the TTL; a bad owner it does
        bad = replace(make_commit("nonce-0009", record_id="rec-9"), audit=b"[]",
                      audit_owner="no owner")
    with pytest.raises(ValueError):
        await store.commit_many([make_commit(), bad])
    assert not await store.is_claimed("spectrastrike-producer", TENANT, "nonce-0001", NOW)


class RedisCounts:
    """Reads of client sockets (one per round trip that fits one read) and EVALSHA calls,
    from the server itself, over one connection kept open (one read per look)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.client.ping()  # connected before the first look

    def __call__(self) -> tuple[int, int]:
        info = self.client.info("all")
        return (info["total_reads_processed"],
                info.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
async def redis_store(redis_url):
    s = open_store(redis_url)
    await s.open()
    await s.commit(make_commit("warm-up-0", record_id="warm", fp=None))  # epoch synced
    yield s
    await s.close()


async def test_redis_commit_many_is_one_round_trip(redis_store, redis_url):
    commits = [make_commit(f"nonce-{i:04d}", request_id=f"req-{i}", record_id=f"rec-{i}")
               for i in range(N)]
    counts = RedisCounts(redis_url)
    reads, evalsha = counts()
    results = await redis_store.commit_many(commits)
    reads_after, evalsha_after = counts()
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * N
    assert evalsha_after - evalsha == 1  # the group's commits in one GROUP_LUA call
    # the pipeline's read(s) (TCP may split 20 commits' bytes) and the second INFO
    assert reads_after - reads <= 4 < N


async def test_redis_group_call_a_commit_that_errors_fails_alone(redis_store, redis_url):
    """300 commits: three GROUP_LUA calls (128 + 128 + 44) in one round trip; the one
    commit whose script hits a real Redis error (its tenant's index holds a string:
    WRONGTYPE) gets that error as a StoreError, every other commit of its call runs."""
    await redis_store.commit(make_commit("warm-up-1", record_id="warm-1", fp=None,
                                         tenant=OTHER_TENANT))  # its epoch marker
    with redis.Redis.from_url(redis_url) as r:
        r.set(f"fedgate:{{{OTHER_TENANT}}}:i:finding", "not a list")
    commits = [make_commit(f"nonce-{i:04d}", request_id=f"req-{i}", record_id=f"rec-{i}",
                           fp=None) for i in range(300)]
    commits[200] = make_commit("nonce-0200", request_id="req-200", record_id="rec-200",
                               fp=None, tenant=OTHER_TENANT)
    counts = RedisCounts(redis_url)
    _, evalsha = counts()
    results = await redis_store.commit_many(commits)
    assert counts()[1] - evalsha == 3
    failed = [i for i, r in enumerate(results) if isinstance(r, StoreError)]
    assert failed == [200] and results[200].stage == "write"
    assert "WRONGTYPE" in str(results[200])
    assert all(r.outcome is Outcome.ACCEPTED for i, r in enumerate(results) if i != 200)
    for i in (199, 201, 299):
        assert await redis_store.get_record("finding", f"rec-{i}", TENANT) is not None


async def test_redis_commit_many_survives_a_script_flush_and_a_new_tenant(redis_store,
                                                                          redis_url):
    with redis.Redis.from_url(redis_url) as r:
        r.script_flush()
    commits = [make_commit(f"nonce-{i:04d}", request_id=f"req-{i}", record_id=f"rec-{i}",
                           tenant=OTHER_TENANT) for i in range(5)]  # no epoch marker yet
    results = await redis_store.commit_many(commits)
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 5


async def test_redis_commit_many_after_amnesia_refuses_what_it_cannot_judge(redis_store,
                                                                            redis_server):
    redis_server.flushall()  # the store lost its state: a new epoch starts at NOW
    commits = [make_commit(f"nonce-{i:04d}", request_id=f"req-{i}", record_id=f"rec-{i}")
               for i in range(3)]
    results = await redis_store.commit_many(commits)
    assert [r.outcome for r in results] == [Outcome.BEFORE_EPOCH] * 3
    assert await redis_store.get_record("finding", "rec-0", TENANT) is None
    assert redis_store.amnesia_count == 1


async def test_redis_commit_many_unreachable_fails_every_commit_closed(make_redis):
    server = make_redis()
    s = open_store(server.url, socket_timeout=0.5)
    await s.open()
    try:
        await s.commit(make_commit("warm-up-0", record_id="warm", fp=None))
        server.stop()
        results = await s.commit_many([make_commit(f"nonce-{i:04d}", record_id=f"rec-{i}")
                                       for i in range(4)])
    finally:
        await s.close()
    assert [(type(r), r.stage) for r in results] == [(StoreError, "claim")] * 4


async def test_sqlite_commit_many_is_one_transaction(sqlite_url):
    s = open_store(sqlite_url)
    await s.open()
    try:
        group = await mixed_group(s)
        before = s.commit_transactions
        results = await s.commit_many([c for c, _ in group])
        assert s.commit_transactions - before == 1
        assert sum(not isinstance(r, StoreError) and r.outcome is Outcome.ACCEPTED
                   for r in results) == 3
    finally:
        await s.close()


# -- CommitBatcher: concurrent single commits coalesced ---------------------------------

async def test_batcher_coalesces_concurrent_commits_each_gets_its_own_result(store):
    batcher = CommitBatcher(store, observe=(sizes := []).append)
    await store.commit(make_commit("nonce-xxxx", request_id="req-x", record_id="rec-x", fp=None))
    commits = [make_commit(f"nonce-{i:04d}", request_id=f"req-{i}", record_id=f"rec-{i}")
               for i in range(N)]
    commits[5] = make_commit("nonce-0004", request_id="req-5", record_id="rec-5")  # replay
    commits[7] = make_commit("nonce-0007", request_id="req-7", record_id="rec-x")  # id taken
    commits[9] = make_commit("nonce-0009", request_id="req-9", record_id="rec-9",
                             att=HASH_B)  # the execution is anchored with HASH_A by req-0
    results = await asyncio.gather(*(batcher.commit(c) for c in commits),
                                   return_exceptions=True)
    assert isinstance(results[7], StoreError) and results[7].stage == "write"
    assert results[5].outcome is Outcome.REPLAYED and results[5].duplicate_of == "req-4"
    assert results[9].outcome is Outcome.ATTESTATION_MISMATCH
    assert [results[i].outcome for i in range(N) if i not in (5, 7, 9)] == (
        [Outcome.ACCEPTED] * (N - 3))
    assert sum(sizes) == N and len(sizes) < N


async def test_batcher_a_bad_commit_fails_alone(store):
    batcher = CommitBatcher(store)
    good = make_commit()
    bad = replace(make_commit("nonce-0002", record_id="rec-2"), audit=b"[]",
                  audit_owner="not an owner")
    results = await asyncio.gather(batcher.commit(good), batcher.commit(bad),
                                   return_exceptions=True)
    assert results[0].outcome is Outcome.ACCEPTED
    assert isinstance(results[1], ValueError)


async def test_batcher_sends_fewer_round_trips_than_commits(redis_store, redis_url):
    batcher = CommitBatcher(redis_store)
    commits = [make_commit(f"nonce-{i:04d}", request_id=f"req-{i}", record_id=f"rec-{i}",
                           fp=None) for i in range(N)]
    counts = RedisCounts(redis_url)
    reads, evalsha = counts()
    results = await asyncio.gather(*(batcher.commit(c) for c in commits))
    reads_after, evalsha_after = counts()
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * N
    assert evalsha_after - evalsha == 1  # one GROUP_LUA call for the 20 commits
    assert reads_after - reads <= 4 < N


async def test_sqlite_batcher_one_transaction_for_concurrent_commits(sqlite_url):
    s = open_store(sqlite_url)
    await s.open()
    try:
        batcher = CommitBatcher(s)
        before = s.commit_transactions
        results = await asyncio.gather(*(batcher.commit(make_commit(
            f"nonce-{i:04d}", request_id=f"req-{i}", record_id=f"rec-{i}", fp=None))
            for i in range(N)))
        assert [r.outcome for r in results] == [Outcome.ACCEPTED] * N
        assert s.commit_transactions - before == 1
    finally:
        await s.close()
