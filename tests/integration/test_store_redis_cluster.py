"""Redis Cluster specifics of the store (``[store] cluster = true``), on a real 3 + 3
cluster: per-slot amnesia, no legacy layout, every node checked, ``min_replicas_acked``."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from gateway.store import Commit, Outcome, Record, StoreError, open_store
from gateway.store.redis_cluster import RedisClusterStore
from gateway.store.redis_cluster_epoch import SCHEMA_CHECK_S

pytestmark = pytest.mark.redis

NOW = 1_795_000_000
SKEW = 30
SCHEMA = "fedgate:schema"


def a_commit(tenant: str, now: int = NOW, nonce: str | None = None) -> Commit:
    """As the pipeline builds it: valid_from = timestamp (= now) - clock_skew_s."""
    rid = str(uuid.uuid4())
    return Commit(identity="spectrastrike-producer", nonce=nonce or uuid.uuid4().hex,
                  body_digest="d" * 64, request_id=f"req-{rid}", now=now, nonce_ttl_s=120,
                  record=Record("finding", rid, tenant, None, b"{}"), anchor=None,
                  valid_from=now - SKEW)


def tenant_on(cluster, master) -> str:
    """A new tenant id whose slot is served by ``master``."""
    while True:
        tenant = str(uuid.uuid4())
        if cluster.node_of(f"fedgate:{{{tenant}}}:epoch").port == master.port:
            return tenant


def lose_data(node) -> None:
    """The master forgets everything (as one restarted without its data would), and its
    replica follows."""
    with node.client() as r:
        r.flushall()
        r.execute_command("WAIT", 1, 2000)


async def opened(url: str, **options) -> RedisClusterStore:
    store = open_store(url, cluster=True, **options)
    await store.open()
    return store


def three_masters(cluster):
    """(the master of P:schema, two others)."""
    schema = cluster.node_of(SCHEMA)
    others = [m for m in cluster.masters() if m.port != schema.port]
    return schema, others[0], others[1]


async def test_a_commit_stays_in_its_tenants_slot_and_registers_the_tenant(
        redis_cluster_url, redis_cluster_servers) -> None:
    store = await opened(redis_cluster_url)
    tenant = str(uuid.uuid4())
    assert (await store.commit(a_commit(tenant))).outcome is Outcome.ACCEPTED
    await store.close()
    master = redis_cluster_servers.node_of(f"fedgate:{{{tenant}}}:epoch")
    with master.client() as r:
        keys = {k.decode() for k in r.scan_iter(match=f"fedgate:{{{tenant}}}:*")}
    assert len(keys) == 5  # claim, record, index, identity index, epoch: all on one master
    with redis_cluster_servers.client() as rc:
        assert rc.hget(SCHEMA, f"tenant:{tenant}") == b"1"


async def test_a_master_that_lost_its_data_refuses_replays_of_its_tenants_only(
        redis_cluster_url, redis_cluster_servers) -> None:
    """Tenant A's master loses its data; P:schema (another master) keeps its epoch. A
    replay of A's accepted request is refused — also by a gateway started afterwards,
    which can only tell "lost" from "new" through the known tenants; B (on a third master)
    is untouched, and a tenant never seen before on A's master is not refused."""
    cluster = redis_cluster_servers
    _, master_a, master_b = three_masters(cluster)
    tenant_a, tenant_b = tenant_on(cluster, master_a), tenant_on(cluster, master_b)
    store = await opened(redis_cluster_url)
    ca, cb = a_commit(tenant_a), a_commit(tenant_b)
    assert (await store.commit(ca)).outcome is Outcome.ACCEPTED
    assert (await store.commit(cb)).outcome is Outcome.ACCEPTED
    lose_data(master_a)
    later = await opened(redis_cluster_url)  # a gateway started after the loss
    try:
        assert (await later.commit(ca)).outcome is Outcome.BEFORE_EPOCH
        assert (await store.commit(ca)).outcome is Outcome.BEFORE_EPOCH
        assert (later.amnesia_count, store.amnesia_count) == (1, 1)
        assert (await store.commit(cb)).outcome is Outcome.REPLAYED
        new_tenant = tenant_on(cluster, master_a)
        assert (await later.commit(a_commit(new_tenant))).outcome is Outcome.ACCEPTED
        fresh = a_commit(tenant_a, now=NOW + 2 * SKEW + 1)
        assert (await later.commit(fresh)).outcome is Outcome.ACCEPTED
        assert (store.amnesia_count, later.amnesia_count) == (1, 1)
    finally:
        await store.close()
        await later.close()


async def test_schema_lost_then_a_tenants_master_lost_is_still_refused(
        redis_cluster_url, redis_cluster_servers) -> None:
    """P:schema's master loses its data (the known tenants with it); the gateway notices
    within SCHEMA_CHECK_S and registers its tenants again, so when A's master loses its
    data long after (past GRACE_S), A's replay is still refused."""
    cluster = redis_cluster_servers
    master_s, master_a, _ = three_masters(cluster)
    tenant_a = tenant_on(cluster, master_a)
    store = await opened(redis_cluster_url)
    assert (await store.commit(a_commit(tenant_a))).outcome is Outcome.ACCEPTED
    lose_data(master_s)
    await asyncio.sleep(SCHEMA_CHECK_S)  # the next commit re-reads P:schema
    late = NOW + 3600
    accepted = a_commit(tenant_a, now=late)
    assert (await store.commit(accepted)).outcome is Outcome.ACCEPTED
    with cluster.client() as rc:
        assert rc.hget(SCHEMA, f"tenant:{tenant_a}") == b"1"
    lose_data(master_a)
    later = await opened(redis_cluster_url)
    try:
        assert (await later.commit(accepted)).outcome is Outcome.BEFORE_EPOCH
    finally:
        await store.close()
        await later.close()


async def test_a_layout_from_before_the_cluster_store_is_refused(
        redis_cluster_url, redis_cluster_servers) -> None:
    with redis_cluster_servers.client() as rc:
        rc.hset(SCHEMA, "version", "3")
    store = open_store(redis_cluster_url, cluster=True)
    with pytest.raises(StoreError, match="layout version 3; a cluster store starts at "
                                         "version 4"):
        await store.open()
    await store.close()


@pytest.mark.parametrize("setting, value, message", [
    ("appendfsync", "everysec", "'appendonly yes' and 'appendfsync always'"),
    ("maxmemory-policy", "volatile-lru", "maxmemory-policy noeviction"),
])
async def test_every_node_is_checked_replicas_too(
        redis_cluster_url, redis_cluster_servers, setting, value, message) -> None:
    replica = next(n for n in redis_cluster_servers.nodes
                   if n.client().info("replication")["role"] == "slave")
    with replica.client() as r:
        before = r.config_get(setting)[setting]
        r.config_set(setting, value)
        try:
            store = open_store(redis_cluster_url, cluster=True)
            with pytest.raises(StoreError, match=message) as exc:
                await store.open()
            assert f"127.0.0.1:{replica.port}" in str(exc.value)
            await store.close()
        finally:
            r.config_set(setting, before)


async def test_min_replicas_acked_waits_for_the_replica(
        redis_cluster_url, redis_cluster_servers) -> None:
    store = await opened(redis_cluster_url, min_replicas_acked=1)
    tenant = str(uuid.uuid4())
    commit = a_commit(tenant)
    try:
        assert (await store.commit(commit)).outcome is Outcome.ACCEPTED
    finally:
        await store.close()
    master = redis_cluster_servers.node_of(f"fedgate:{{{tenant}}}:epoch")
    replica = next(n for n in redis_cluster_servers.nodes if n.proc and n.port != master.port
                   and n.client().info("replication").get("master_port") == master.port)
    with replica.client() as r:  # WAIT answered: the replica has it already
        r.execute_command("READONLY")
        key = f"fedgate:{{{tenant}}}:n:spectrastrike-producer:{commit.nonce}"
        assert r.get(key) is not None


async def test_too_few_replica_acks_is_a_503_never_a_202(
        redis_cluster_url, redis_cluster_servers) -> None:
    """The replica of the tenant's master is stopped (SIGSTOP): WAIT times out with 0
    acks → StoreError("write") (503 store_unavailable). The record is on the master, so
    the producer's retry is told it is a duplicate."""
    tenant = str(uuid.uuid4())
    master = redis_cluster_servers.node_of(f"fedgate:{{{tenant}}}:epoch")
    replica = next(n for n in redis_cluster_servers.nodes if n.proc and
                   n.client().info("replication").get("master_port") == master.port)
    store = await opened(redis_cluster_url, min_replicas_acked=1, socket_timeout=1.0)
    commit = a_commit(tenant)
    replica.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StoreError, match="only 0 of min_replicas_acked = 1") as exc:
            await store.commit(commit)
        assert exc.value.stage == "write"
    finally:
        replica.proc.send_signal(signal.SIGCONT)
    try:
        retry = await store.commit(commit)
        assert (retry.outcome, retry.duplicate_of) == (Outcome.REPLAYED, commit.request_id)
    finally:
        await store.close()


def test_open_store_builds_the_cluster_store_only_when_asked() -> None:
    assert isinstance(open_store("redis://127.0.0.1:1/0", cluster=True), RedisClusterStore)
    assert not isinstance(open_store("redis://127.0.0.1:1/0", cluster=False),
                          RedisClusterStore)
    with pytest.raises(ValueError, match="min_replicas_acked"):
        open_store("redis://127.0.0.1:1/0", cluster=True, min_replicas_acked=-1)
