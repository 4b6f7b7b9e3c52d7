"""Whole-gateway throughput over mTLS: `fedgate serve` processes under a signed load.

    .venv/bin/python bench/http_bench.py [--requests 3000] [--concurrency 64]

For each store (SQLite file; redis-server with AOF fsync always) and each worker count
(1, 2), a fresh gateway process is started and the load generator (this process, on the
same machine: it competes for the same CPUs) posts distinct signed telemetry requests
over keep-alive mTLS connections. Every answer must be 202. Prints requests/s and the
p50/p99 latency per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
from lab import Lab  # noqa: E402
from stack import Stack  # noqa: E402

from schemas.routes import TELEMETRY_PATH  # noqa: E402

LAB = Lab(None)


async def load(stack: Stack, requests: int, concurrency: int) -> tuple[float, list[float]]:
    signed = [LAB.signed(ts=int(time.time()), nonce=uuid.uuid4().hex) for _ in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in signed:
        queue.put_nowait(item)
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(ssl=stack.ssl(), limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:
        async def worker() -> None:
            while not queue.empty():
                headers, body = queue.get_nowait()
                t0 = time.perf_counter()
                async with client.post(stack.url + TELEMETRY_PATH, data=body,
                                       headers=headers) as resp:
                    await resp.read()
                    if resp.status != 202:
                        raise RuntimeError(f"got {resp.status}: {await resp.text()}")
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return requests / elapsed, latencies


async def one(store: str, workers: int, args, redis_url: str | None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        url = redis_url if store == "Redis" else f"sqlite:///{tmp}/state/fedgate.db"
        stack = Stack(Path(tmp), url)
        stack.spawn("--workers", str(workers))
        try:
            await stack.wait_ready(timeout=30)
            await load(stack, min(200, args.requests), args.concurrency)  # warm-up
            rate, lat = await load(stack, args.requests, args.concurrency)
        finally:
            stack.kill_all()
    lat.sort()
    p99 = lat[int(len(lat) * 0.99) - 1]
    return (f"| {store}, {workers} worker{'s' if workers > 1 else ''}, "
            f"{args.concurrency} in flight | {rate:,.0f} | "
            f"{statistics.median(lat) * 1000:.1f} | {p99 * 1000:.1f} |")


async def main_async(args) -> list[str]:
    from conftest import RedisServer
    rows = ["| gateway (mTLS, `fedgate serve`) | requests/s | p50 ms | p99 ms |",
            "|---|---:|---:|---:|"]
    for workers in (1, 2):
        rows.append(await one("SQLite", workers, args, None))
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        try:
            for workers in (1, 2):
                redis.flushall()
                redis.provision()  # a new, empty store (docs/STORES.md "Store amnesia")
                rows.append(await one("Redis", workers, args, redis.url))
        finally:
            redis.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--append", type=Path, help="also append the table to this file")
    args = parser.parse_args()
    table = "\n".join(asyncio.run(main_async(args)))
    print(table)
    if args.append:
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Whole gateway over mTLS\n\n`.venv/bin/python bench/http_bench.py "
                     f"--requests {args.requests} --concurrency {args.concurrency}`: "
                     "distinct signed telemetry requests (the 2 KB lab body) on keep-alive "
                     "mTLS connections; the load generator runs on the same 2 CPUs, so "
                     "these are lower bounds for the gateway alone. Every answer was 202; "
                     "each includes its fsynced audit event.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
