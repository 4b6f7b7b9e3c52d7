"""The Redis Cluster store against the single Redis, in the same run (docs/SCALING.md).

    .venv/bin/python bench/cluster_bench.py [--commits 4000] [--requests 1500]

1. Store commits (no HTTP): ``--commits`` distinct commits, 64 in flight from this one
   process, on a single redis-server, on a 3 + 3 cluster with one tenant (one shard),
   with tenants spread over the three masters, and with ``min_replicas_acked = 1``.
   Redis's own CPU per commit is read from ``INFO commandstats`` (``usec_per_call`` of
   ``evalsha``): what one shard can take when the clients are elsewhere.
2. One gateway replica (``fedgate serve``, 1 worker, mTLS, 64 in flight) on each store:
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

from gateway.store import Commit, Outcome, Record, open_store  # noqa: E402

CONCURRENCY = 64


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
    print("\n".join(asyncio.run(main_async(parser.parse_args()))))


if __name__ == "__main__":
    main()
