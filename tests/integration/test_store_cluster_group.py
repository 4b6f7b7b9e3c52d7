"""Group commit on the Redis Cluster store (issue 9 on issue 11's store), on real 3 + 3
clusters: a group's commits go to their slots' masters, one pipelined round trip per
master (in parallel), each ended by ONE ``WAIT`` when ``min_replicas_acked``; MOVED, ASK
and TRYAGAIN followed (bounded), nothing that may have run resent. Each master counts
for itself: ``INFO stats`` ``total_reads_processed`` (reads of client sockets: one per
round trip that fits one read) and ``INFO commandstats`` (EVALSHAs run, EVALSHAs
rejected before running, WAITs). The group-commit contract
(test_store_group_commit.py) runs on the cluster too (``any_store``).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from dataclasses import replace

import pytest

from gateway.store import Outcome, StoreError
from gateway.store.batcher import CommitBatcher
from tests.integration.test_store_redis_cluster import a_commit, opened, tenant_on

pytestmark = pytest.mark.redis

K = 12  # commits per master in a group


class MasterCounts:
    """Per master (by port) what the master itself counted, over one connection each
    kept open (one read per look)."""

    def __init__(self, cluster) -> None:
        self.clients = {m.port: m.client() for m in cluster.masters()}
        for client in self.clients.values():
            client.ping()

    def __call__(self) -> dict[int, Counter]:
        out = {}
        for port, client in self.clients.items():
            info = client.info("all")
            evalsha = info.get("cmdstat_evalsha", {})
            out[port] = Counter(reads=info["total_reads_processed"],
                                evalsha=evalsha.get("calls", 0),
                                rejected=evalsha.get("rejected_calls", 0),
                                wait=info.get("cmdstat_wait", {}).get("calls", 0))
        return out

    def since(self, before: dict[int, Counter]) -> dict[int, Counter]:
        now = self()
        return {port: now[port] - before[port] for port in now}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def outcomes(results) -> list:
    return [(r.stage, r.detail) if isinstance(r, StoreError) else r.outcome
            for r in results]


async def warmed(url: str, tenants, **options):
    """A store holding every tenant's epoch (no epoch sync inside the group measured)."""
    store = await opened(url, **options)
    for tenant in tenants:
        assert (await store.commit(a_commit(tenant))).outcome is Outcome.ACCEPTED
    return store


async def on_every_master(url: str, cluster, **options):
    """(one tenant per master, a store warmed for them)."""
    tenants = [tenant_on(cluster, m) for m in cluster.masters()]
    return tenants, await warmed(url, tenants, **options)


@pytest.mark.parametrize("acked", [0, 1])
async def test_a_group_is_one_round_trip_and_one_wait_per_master(
        redis_cluster_url, redis_cluster_servers, acked) -> None:
    """K commits per master, interleaved, in one commit_many: each master runs its K
    commits (one tenant: one slot) in ONE call of the group script from one round trip,
    followed by exactly one WAIT (min_replicas_acked = 1); one at a time it was K round
    trips and K WAITs per master."""
    cluster = redis_cluster_servers
    tenants, store = await on_every_master(redis_cluster_url, cluster, min_replicas_acked=acked)
    group = [a_commit(tenant) for _ in range(K) for tenant in tenants]
    counts = MasterCounts(cluster)
    try:
        before = counts()
        results = await store.commit_many(group)
        delta = counts.since(before)
    finally:
        counts.close()
        await store.close()
    assert outcomes(results) == [Outcome.ACCEPTED] * len(group)
    assert len(delta) == 3
    for port, d in delta.items():
        assert (d["evalsha"], d["rejected"], d["wait"]) == (1, 0, acked), port
        # the pipeline's read(s), the INFO after it, a replica's REPLCONF ACK (once a
        # second, and once more answering WAIT's GETACK)
        assert d["reads"] <= 5 < K, (port, d)


def two_tenants_in_one_slot() -> tuple[str, str]:
    """Two tenant ids whose keys hash to the same slot (found by trying)."""
    from redis.crc import key_slot
    seen: dict[int, str] = {}
    while True:
        tenant = str(uuid.uuid4())
        slot = key_slot(f"fedgate:{{{tenant}}}:epoch".encode())
        if slot in seen:
            return seen[slot], tenant
        seen[slot] = tenant


async def test_a_commit_that_errors_in_a_group_call_fails_alone(redis_cluster_url,
                                                                redis_cluster_servers) -> None:
    """Two tenants of one slot: their commits share one group call on that master. The
    one whose tenant's index holds a string (WRONGTYPE when its script runs) gets that
    error; the other tenant's commits of the same call are accepted."""
    cluster = redis_cluster_servers
    good, bad = two_tenants_in_one_slot()
    store = await warmed(redis_cluster_url, [good, bad])
    node = cluster.node_of(f"fedgate:{{{bad}}}:epoch")
    with node.client() as r:
        r.delete(f"fedgate:{{{bad}}}:i:finding")
        r.set(f"fedgate:{{{bad}}}:i:finding", "not a list")
    counts = MasterCounts(cluster)
    try:
        before = counts()
        results = await store.commit_many([a_commit(good), a_commit(bad), a_commit(good)])
        delta = counts.since(before)
    finally:
        counts.close()
        await store.close()
    assert delta[node.port]["evalsha"] == 1  # one group call for the three
    assert outcomes(results[0::2]) == [Outcome.ACCEPTED] * 2
    assert isinstance(results[1], StoreError) and results[1].stage == "write"
    assert "WRONGTYPE" in str(results[1])


async def test_conflicts_inside_a_group_spanning_masters_first_wins(
        redis_cluster_url, redis_cluster_servers) -> None:
    """The same nonce three times on one master (the first wins, the others are told it
    is a duplicate), a replay with other bytes, and unrelated commits on the other two:
    the conflicting ones run in later rounds, each exactly once, in order."""
    cluster = redis_cluster_servers
    a, b, c = (tenant_on(cluster, m) for m in cluster.masters())
    store = await warmed(redis_cluster_url, [a, b, c])
    first = a_commit(a, nonce="same-nonce-0001")
    again = [replace(first, request_id=f"req-again-{i}", record=replace(
        first.record, record_id=str(uuid.uuid4()))) for i in range(2)]
    other_bytes = replace(again[0], body_digest="e" * 64, request_id="req-other")
    group = [first, a_commit(b), *again, a_commit(c), other_bytes, a_commit(b)]
    counts = MasterCounts(cluster)
    try:
        before = counts()
        results = await store.commit_many(group)
        delta = counts.since(before)
        master_a = cluster.node_of(f"fedgate:{{{a}}}:epoch").port
    finally:
        counts.close()
        await store.close()
    assert outcomes(results) == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.REPLAYED,
                                 Outcome.REPLAYED, Outcome.ACCEPTED, Outcome.REPLAYED,
                                 Outcome.ACCEPTED]
    assert [r.duplicate_of for r in results[2:4]] == [first.request_id] * 2
    assert results[5].duplicate_of is None  # other bytes: not a retry
    assert delta[master_a]["evalsha"] == 4  # each once: four rounds on A's master
    # B's two commits (one slot) in one group call, C's one: six calls for seven commits
    assert sum(d["evalsha"] for d in delta.values()) == 6


async def test_a_stopped_replica_refuses_its_masters_commits_never_202(
        redis_cluster_url, redis_cluster_servers) -> None:
    """min_replicas_acked = 1 and the replica of A's master stopped (SIGSTOP): that
    master's WAIT times out with 0 acknowledgements → every commit of A in the group is
    StoreError("write") (503 store_unavailable), the other master's are accepted. The
    records are on A's master: the retries are told they are duplicates."""
    cluster = redis_cluster_servers
    master_a, master_b = cluster.masters()[:2]
    a, b = tenant_on(cluster, master_a), tenant_on(cluster, master_b)
    replica = next(n for n in cluster.nodes if n.proc and
                   n.client().info("replication").get("master_port") == master_a.port)
    store = await warmed(redis_cluster_url, [a, b], min_replicas_acked=1,
                         socket_timeout=1.0)
    group = [a_commit(a), a_commit(b), a_commit(a), a_commit(b)]
    replica.proc.send_signal(signal.SIGSTOP)
    try:
        results = await store.commit_many(group)
    finally:
        replica.proc.send_signal(signal.SIGCONT)
    try:
        assert {(r.stage, r.detail.split(" within")[0]) for r in results[0::2]} == {
            ("write", "only 0 of min_replicas_acked = 1 replicas acknowledged the commit")}
        assert outcomes(results[1::2]) == [Outcome.ACCEPTED] * 2
        retries = await store.commit_many(group[0::2])
        assert [(r.outcome, r.duplicate_of) for r in retries] == [
            (Outcome.REPLAYED, c.request_id) for c in group[0::2]]
    finally:
        await store.close()


async def test_a_script_flush_on_every_master_is_followed_by_the_group(
        redis_cluster_url, redis_cluster_servers) -> None:
    tenants, store = await on_every_master(redis_cluster_url, redis_cluster_servers)
    for master in redis_cluster_servers.masters():
        with master.client() as r:
            r.script_flush()
    try:
        results = await store.commit_many([a_commit(t) for t in tenants * 3])
        assert outcomes(results) == [Outcome.ACCEPTED] * 9
    finally:
        await store.close()


async def test_the_batcher_coalesces_concurrent_commits_into_one_wait_per_master(
        redis_cluster_url, redis_cluster_servers) -> None:
    """The single route's commits (CommitBatcher: the cluster store groups commits now)."""
    cluster = redis_cluster_servers
    tenants, store = await on_every_master(redis_cluster_url, cluster, min_replicas_acked=1)
    assert store.groups_commits
    batcher = CommitBatcher(store, observe=(sizes := []).append)
    counts = MasterCounts(cluster)
    try:
        before = counts()
        results = await asyncio.gather(*(batcher.commit(a_commit(t))
                                         for t in tenants * K))
        delta = counts.since(before)
    finally:
        counts.close()
        await store.close()
    assert outcomes(results) == [Outcome.ACCEPTED] * 3 * K
    assert sizes == [3 * K]
    assert [d["wait"] for d in delta.values()] == [1, 1, 1]


# -- topology changes: clusters of the test's own ---------------------------------------

def move_slot_keys(cluster, key: str) -> tuple[int, object, object]:
    """Start moving ``key``'s slot to another master (MIGRATING/IMPORTING) and MIGRATE
    all its keys, but do not give the slot away yet. → (slot, source, target)."""
    with cluster.client() as rc:
        slot = rc.keyslot(key)
    src = cluster.node_of(key)
    dst = next(m for m in cluster.masters() if m.port != src.port)
    with src.client() as s, dst.client() as d:
        d.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", s.execute_command("CLUSTER MYID"))
        s.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", d.execute_command("CLUSTER MYID"))
        while keys := s.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
    return slot, src, dst


def give_slot(cluster, slot: int, dst) -> None:
    """Every master: the slot is ``dst``'s now (SETSLOT NODE), as a reshard ends."""
    with dst.client() as d:
        dst_id = d.execute_command("CLUSTER MYID")
    for master in [dst, *(m for m in cluster.masters() if m.port != dst.port)]:
        with master.client() as m:
            m.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)


async def test_a_slot_moving_then_moved_nothing_runs_twice(make_cluster) -> None:
    """While the tenant's slot is split between two masters (keys migrated, slot not yet
    given away) a script can run on neither (ASK to the target, which answers TRYAGAIN
    for new keys): the group's commits fail closed after REDIRECTS redirections, and
    nothing was written. Once the slot is the target's, the store's slot map is stale:
    every commit is answered MOVED by the old master (rejected before it runs) and
    followed; the same commits are then accepted (they never ran), each run once."""
    cluster = make_cluster()
    tenant, other = str(uuid.uuid4()), None
    key = f"fedgate:{{{tenant}}}:epoch"
    store = await warmed(cluster.url, [tenant])
    try:
        other = tenant_on(cluster, next(m for m in cluster.masters()
                                        if m.port != cluster.node_of(key).port))
        assert (await store.commit(a_commit(other))).outcome is Outcome.ACCEPTED
        slot, src, dst = await asyncio.to_thread(move_slot_keys, cluster, key)
        group = [a_commit(tenant) for _ in range(4)]
        group.append(replace(group[0], request_id="req-again"))  # a conflict: round 2
        group.append(a_commit(other))
        results = await store.commit_many(group)
        assert outcomes(results[:5]) == [
            ("claim", "the commit's slot kept moving (MOVED/ASK/TRYAGAIN)")] * 5
        assert outcomes(results[5:]) == [Outcome.ACCEPTED]
        claims = {f"fedgate:{{{tenant}}}:n:{c.identity}:{c.nonce}".encode() for c in group}
        for node in (src, dst):
            with node.client() as r:
                assert not claims & set(r.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000))
        await asyncio.to_thread(give_slot, cluster, slot, dst)
        counts = MasterCounts(cluster)
        try:
            before = counts()
            results = await store.commit_many(group[:5])
            delta = counts.since(before)
        finally:
            counts.close()
        assert outcomes(results) == [Outcome.ACCEPTED] * 4 + [Outcome.REPLAYED]
        assert results[4].duplicate_of == group[0].request_id
        # the four commits' group call rejected whole by the old master (MOVED: none ran),
        # run once by the new one; the replay in a second round
        assert (delta[src.port]["evalsha"], delta[src.port]["rejected"]) == (0, 1)
        assert delta[dst.port]["evalsha"] == 2
    finally:
        await store.close()


async def test_a_master_that_stops_answering_fails_its_commits_closed_never_resent(
        make_cluster) -> None:
    """A's master is stopped (SIGSTOP; a long cluster-node-timeout: no failover) while a
    group spanning A and B is in flight: A's commits may have run, so they fail with
    StoreError("claim") and are never resent; B's are accepted. Once A's master runs
    again it has run each of them exactly once: the retries are told they are
    duplicates."""
    cluster = make_cluster(node_timeout_ms=20_000)
    master_a, master_b = cluster.masters()[:2]
    a, b = tenant_on(cluster, master_a), tenant_on(cluster, master_b)
    store = await warmed(cluster.url, [a, b], socket_timeout=0.5)
    counts = MasterCounts(cluster)
    try:
        group = [a_commit(a), a_commit(b), a_commit(a), a_commit(b)]
        before = counts()
        master_a.proc.send_signal(signal.SIGSTOP)
        try:
            results = await store.commit_many(group)
        finally:
            master_a.proc.send_signal(signal.SIGCONT)
        assert cluster.node_of(f"fedgate:{{{a}}}:epoch").port == master_a.port  # no failover
        assert {r.stage for r in results[0::2]} == {"claim"}
        assert all("Redis is unavailable" in r.detail for r in results[0::2])
        assert outcomes(results[1::2]) == [Outcome.ACCEPTED] * 2
        retries = await store.commit_many(group[0::2])
        delta = counts.since(before)
        assert [(r.outcome, r.duplicate_of) for r in retries] == [
            (Outcome.REPLAYED, c.request_id) for c in group[0::2]]
        assert delta[master_a.port]["evalsha"] == 2  # A's 2 in one call, once; the retries
    finally:
        counts.close()
        await store.close()
