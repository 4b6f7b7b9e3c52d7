"""The Redis Cluster store against the single Redis, in the same run (docs/SCALING.md).

    .venv/bin/python bench/cluster_bench.py [--commits 4000] [--requests 1500]
                                            [--groups 40] [--group-size 100]

1. Store commits (no HTTP): ``--commits`` distinct commits, 64 in flight from this one
   process, on a single redis-server, on a 3 + 3 cluster with one tenant (one shard),
   with tenants spread over the three masters, and with ``min_replicas_acked = 1``.
   Redis's own CPU per commit is read from ``INFO commandstats`` (``usec_per_call`` of
   ``evalsha``): what one shard can take when the clients are elsewhere.
2. Batch-shaped commits (issue 9's group commit): ``--groups`` groups of
   ``--group-size`` commits through ``commit_many`` (what a batch request's items or the
   CommitBatcher's group make), 4 groups in flight, on the cluster: grouped (one round
   trip per master per round, one WAIT per master with ``min_replicas_acked``) against
   one commit per round trip (``Store.commit_many``'s default, what the cluster store did
   before it grouped), in the same run: commits/s and the ratio.
3. One gateway replica (``fedgate serve``, 1 worker, mTLS, 64 in flight) on each store:
   requests/s and the ratio cluster / single.

Every node runs AOF with ``appendfsync always``. The load generator shares the machine's
CPUs with everything else: the figures are lower bounds, and ratios are what carries over.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import redis  # noqa: E402
from conftest import RedisClusterServers, RedisServer  # noqa: E402
from http_bench import load  # noqa: E402
from stack import Stack  # noqa: E402

from gateway.store import Commit, Outcome, Record, Store, open_store  # noqa: E402

CONCURRENCY = 64
GROUP_LANES = 4  # groups in flight (batch requests being committed at once)


def commits(n: int, tenants: list[str]) -> list[Commit]:
    now = int(time.time())
    out = []
    for i in range(n):
        rid = str(uuid.uuid4())
        out.append(Commit(identity="spectrastrike-producer", nonce=uuid.uuid4().hex,
                          body_digest="d" * 64, request_id=rid, now=now, nonce_ttl_s=120,
                          record=Record("finding", rid, tenants[i % len(tenants)], None,
                                        b"x" * 2048), anchor=None))
    return out


async def store_rate(url: str, options: dict, batch: list[Commit]) -> float:
    store = open_store(url, max_connections=CONCURRENCY, socket_timeout=10.0, **options)
    await store.open()
    queue = list(reversed(batch))

    async def lane() -> None:
        while queue:
            result = await store.commit(queue.pop())
            assert result.outcome is Outcome.ACCEPTED, result

    try:
        await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))  # warm-up
        queue[:] = list(reversed(commits(len(batch), sorted({c.tenant_id for c in batch}))))
        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
        return len(batch) / (time.perf_counter() - t0)
    finally:
        await store.close()


async def group_rate(url: str, options: dict, tenants: list[str], groups: int, size: int,
                     one_by_one: bool) -> float:
    """Commits/s through ``commit_many`` in groups of ``size``; ``one_by_one``: the
    default ``Store.commit_many`` (each commit its own round trip, and WAIT)."""
    store = open_store(url, max_connections=CONCURRENCY, socket_timeout=10.0, **options)
    await store.open()
    many = (lambda g: Store.commit_many(store, g)) if one_by_one else store.commit_many

    async def lane(queue: list[list[Commit]]) -> None:
        while queue:
            results = await many(queue.pop())
            assert all(r.outcome is Outcome.ACCEPTED for r in results), results

    async def run(n: int) -> None:
        queue = [commits(size, tenants) for _ in range(n)]
        await asyncio.gather(*(lane(queue) for _ in range(GROUP_LANES)))

    try:
        await run(GROUP_LANES)  # warm-up: connections, epochs
        t0 = time.perf_counter()
        await run(groups)
        return groups * size / (time.perf_counter() - t0)
    finally:
        await store.close()


def usec_per_evalsha(ports: list[int]) -> float:
    stats = []
    for port in ports:
        info = redis.Redis(port=port).info("commandstats")
        if "cmdstat_evalsha" in info:
            stats.append(info["cmdstat_evalsha"]["usec_per_call"])
    return sum(stats) / len(stats)


def reset_stats(ports: list[int]) -> None:
    for port in ports:
        redis.Redis(port=port).config_resetstat()


def tenants_on_each_master(cluster: RedisClusterServers) -> list[str]:
    found: dict[int, str] = {}
    while len(found) < len(cluster.masters()):
        tenant = str(uuid.uuid4())
        found.setdefault(cluster.node_of(f"fedgate:{{{tenant}}}:epoch").port, tenant)
    return list(found.values())


async def gateway_rate(url: str, store: dict, requests: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), url, store=store)
        stack.spawn("--workers", "1")
        try:
            await stack.wait_ready(timeout=60)
            await load(stack, 200, CONCURRENCY)  # warm-up
            rate, _ = await load(stack, requests, CONCURRENCY)
        finally:
            stack.kill_all()
    return rate


async def main_async(args) -> list[str]:
    from lab import TENANT
    rows = ["| store | commits/s (one client process) | Redis µs per EVALSHA |",
            "|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        single = RedisServer(Path(tmp) / "single")
        cluster = RedisClusterServers(Path(tmp) / "cluster")
        single.start()
        cluster.start()
        try:
            single.provision()
            cluster.provision()
            masters = [m.port for m in cluster.masters()]
            spread = tenants_on_each_master(cluster)
            cases = [
                ("single Redis", single.url, {}, [TENANT], [single.port]),
                ("cluster, one tenant (one shard)", cluster.url, {"cluster": True}, [TENANT],
                 masters),
                ("cluster, 3 tenants on 3 shards", cluster.url, {"cluster": True}, spread,
                 masters),
                ("cluster, 3 shards, min_replicas_acked = 1", cluster.url,
                 {"cluster": True, "min_replicas_acked": 1}, spread, masters),
            ]
            for name, url, options, tenants, ports in cases:
                reset_stats(ports)
                rate = await store_rate(url, options, commits(args.commits, tenants))
                rows.append(f"| {name} | {rate:,.0f} | {usec_per_evalsha(ports):.1f} |")
            rows += ["", f"| {args.group_size}-commit groups through commit_many "
                     f"({GROUP_LANES} in flight) | one per round trip, commits/s | grouped, "
                     "commits/s | ratio |", "|---|---:|---:|---:|"]
            for name, url, options, tenants, _ in cases:
                rates = [await group_rate(url, options, tenants, args.groups,
                                          args.group_size, one_by_one)
                         for one_by_one in (True, False)]
                rows.append(f"| {name} | {rates[0]:,.0f} | {rates[1]:,.0f} | "
                            f"{rates[1] / rates[0]:.1f} |")
            if args.skip_gateway:
                return rows
            rows += ["", "| one gateway replica (1 worker, mTLS, 64 in flight) | "
                     "requests/s |", "|---|---:|"]
            single.flushall()
            single.provision()
            one = await gateway_rate(single.url, {}, args.requests)
            cluster.flushall()
            cluster.provision()
            other = await gateway_rate(cluster.url, {"cluster": True}, args.requests)
            rows += [f"| single Redis | {one:,.0f} |",
                     f"| Redis Cluster 3 + 3 | {other:,.0f} (ratio {other / one:.2f}) |"]
        finally:
            single.stop()
            cluster.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=4000)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--groups", type=int, default=40)
    parser.add_argument("--group-size", type=int, default=100)
    parser.add_argument("--skip-gateway", action="store_true",
                        help="store figures only (no fedgate serve runs)")
    print("\n".join(asyncio.run(main_async(parser.parse_args()))))


if __name__ == "__main__":
    main()
