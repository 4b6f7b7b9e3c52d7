"""Latency of the single route, measured against the trivial handler in the same run (issue 9).

    .venv/bin/python bench/latency_bench.py [--rounds 3] [--requests 2000]
        [--seconds 10] [--fractions 0.1,0.25,0.5] [--append docs/BENCHMARKS.md]

Per round, for each store (SQLite file, redis-server with AOF + fsync always) behind
``fedgate serve --workers 2``, and for the trivial aiohttp mTLS handler
(bench/trivial_server.py) as the baseline:

1. **maximum rate**: ``--requests`` distinct signed requests, 64 keep-alive mTLS
   connections, as fast as they are answered → requests/s;
2. **one connection**: 300 requests one after another on one keep-alive connection →
   p50 / p99 ms (issue 9's target: p50 ≤ 1.5 ms);
3. **half the maximum rate**: open loop, requests started on a fixed schedule at half of
   (1)'s rate for ``--seconds`` (a late answer does not slow the schedule down), each
   request timed from its scheduled start → p50 / p99 ms (target: p99 ≤ 10 ms); the
   same at each of ``--fractions`` of (1)'s rate: the rate up to which a p99 holds.

The load generator is bench/lean_http.py (keep-alive mTLS HTTP/1.1, a small fraction of
aiohttp's client CPU per request: it shares the two cores with the servers). Requests
are signed before the clock starts. Every answer must be 202 (the trivial
handler's too), else the run stops. The report gives min / median / max over the rounds,
SQLite's maximum rate as a ratio of Redis's in the same round (target: within 25 %), and
the one-connection p50 as a ratio of the trivial handler's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from conftest import RedisServer  # noqa: E402
from lab import Lab  # noqa: E402
from lean_http import LeanPool  # noqa: E402
from stack import Stack, free_port  # noqa: E402

from schemas.routes import TELEMETRY_PATH  # noqa: E402

LAB = Lab(None)
CONCURRENCY, ONE_CONN_REQUESTS, WORKERS = 64, 300, 2


def signed(n: int) -> list[tuple[dict, bytes]]:
    return [LAB.signed(ts=int(time.time()), nonce=uuid.uuid4().hex) for _ in range(n)]


async def post(pool: LeanPool, raw: bytes) -> None:
    status, data = await pool.send(raw)
    if status != 202:
        raise RuntimeError(f"{pool.url}: got {status}: {data[:300]!r}")


async def max_rate(url: str, ssl, items: list[tuple[dict, bytes]]) -> float:
    async with LeanPool(url, ssl, CONCURRENCY) as pool:
        queue = [pool.request(h, b) for h, b in reversed(items)]

        async def worker() -> None:
            while queue:
                await post(pool, queue.pop())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return len(items) / (time.perf_counter() - t0)


async def one_connection(url: str, ssl, items: list[tuple[dict, bytes]]) -> list[float]:
    latencies = []
    async with LeanPool(url, ssl, 1) as pool:
        raws = [pool.request(h, b) for h, b in items]
        await post(pool, raws[0])  # the handshake is not part of the figure
        for raw in raws[1:]:
            t0 = time.perf_counter()
            await post(pool, raw)
            latencies.append(time.perf_counter() - t0)
    return latencies


async def open_loop(url: str, ssl, rate: float, items: list[tuple[dict, bytes]]
                    ) -> list[float]:
    """Each request starts at its scheduled time (i / rate s after the start) and is timed
    from that time, so a stall shows as latency instead of a slower schedule."""
    latencies: list[float] = []
    async with LeanPool(url, ssl, CONCURRENCY) as pool:
        raws = [pool.request(h, b) for h, b in items]
        for raw in raws[:CONCURRENCY]:  # one request on each connection before the clock
            await post(pool, raw)
        t0 = time.perf_counter()

        async def one(due: float, raw: bytes) -> None:
            await post(pool, raw)
            latencies.append(time.perf_counter() - due)

        tasks = []
        for i, raw in enumerate(raws[CONCURRENCY:]):
            due = t0 + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(due, raw)))
        await asyncio.gather(*tasks)
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q) - 1)] * 1000


async def measure(url: str, ssl, args) -> dict[str, float]:
    rate = await max_rate(url, ssl, signed(args.requests))
    one = await one_connection(url, ssl, signed(ONE_CONN_REQUESTS + 1))
    out = {"rate": rate, "one_p50": pct(one, 0.5), "one_p99": pct(one, 0.99)}
    for frac in sorted({0.5, *args.fractions}):
        lat = await open_loop(url, ssl, rate * frac,
                              signed(CONCURRENCY + int(rate * frac * args.seconds)))
        out[f"p50@{frac:g}"], out[f"p99@{frac:g}"] = pct(lat, 0.5), pct(lat, 0.99)
    out["half_p50"], out["half_p99"] = out["p50@0.5"], out["p99@0.5"]
    return out


async def run(args, tmp: Path) -> dict[str, list[dict[str, float]]]:
    redis = RedisServer(tmp / "redis")
    redis.start()
    redis.provision()
    stacks = {"Redis": Stack(tmp / "redis-gw", redis.url),
              "SQLite": Stack(tmp / "sqlite-gw", f"sqlite:///{tmp}/state/fedgate.db")}
    pki = stacks["Redis"].pki
    port = free_port()
    trivial = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "trivial_server.py"), "--port", str(port),
         "--cert", str(pki.gateway.cert), "--key", str(pki.gateway.key),
         "--ca", str(pki.ca.cert), "--workers", str(WORKERS)])
    out: dict[str, list[dict[str, float]]] = {"trivial": [], "Redis": [], "SQLite": []}
    try:
        for stack in stacks.values():
            stack.spawn("--workers", str(WORKERS))
        for stack in stacks.values():
            await stack.wait_ready(timeout=30)
        ssl = {"trivial": stacks["Redis"].ssl(),  # the trivial server has Redis's PKI
               **{name: st.ssl() for name, st in stacks.items()}}
        targets = {"trivial": f"https://127.0.0.1:{port}{TELEMETRY_PATH}",
                   **{name: st.url + TELEMETRY_PATH for name, st in stacks.items()}}
        for name, url in targets.items():  # warm-up
            await max_rate(url, ssl[name], signed(200))
        for n in range(args.rounds):
            for name, url in targets.items():
                out[name].append(await measure(url, ssl[name], args))
                print(f"round {n + 1} {name}: " + ", ".join(
                    f"{k} {v:,.1f}" for k, v in out[name][-1].items()), file=sys.stderr)
    finally:
        trivial.terminate()
        trivial.wait(timeout=10)
        for stack in stacks.values():
            stack.kill_all()
        redis.stop()
    return out


def spread(values: list[float], digits: int = 1) -> str:
    return " / ".join(f"{v:,.{digits}f}" for v in
                      (min(values), statistics.median(values), max(values)))


def report(args, out: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "## Latency of the single route (issue 9)", "",
        f"`.venv/bin/python bench/latency_bench.py --rounds {args.rounds} --requests "
        f"{args.requests} --seconds {args.seconds:g} --fractions "
        f"{','.join(f'{f:g}' for f in args.fractions)}`: {args.rounds} rounds; in each, the "
        f"trivial handler and `fedgate serve --workers {WORKERS}` on each store measured "
        "back to back on the same 2 CPUs with the same load generator. Half rate: an open "
        "loop at half of that round's maximum, each request timed from its scheduled start."
        " Figures: min / median / max over the rounds.", "",
        "| server | max requests/s (64 conns) | one connection p50 ms | one connection "
        "p99 ms | half rate p50 ms | half rate p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("trivial", "Redis", "SQLite"):
        rows = out[name]
        label = "trivial aiohttp mTLS handler" if name == "trivial" else f"fedgate, {name}"
        lines.append(f"| {label} | {spread([r['rate'] for r in rows], 0)} | "
                     + " | ".join(spread([r[k] for r in rows]) for k in
                                  ("one_p50", "one_p99", "half_p50", "half_p99")) + " |")
    fracs = sorted({0.5, *args.fractions})
    lines += [
        "", f"Open loop at fractions of each server's own maximum rate ({args.seconds:g} s "
        "each): p50 / p99 ms, medians over the rounds.", "",
        "| server | " + " | ".join(f"{f:g} × max" for f in fracs) + " |",
        "|---|" + "---:|" * len(fracs)]
    for name in ("trivial", "Redis", "SQLite"):
        rows = out[name]
        label = "trivial aiohttp mTLS handler" if name == "trivial" else f"fedgate, {name}"
        lines.append(f"| {label} | " + " | ".join(
            f"{statistics.median(r[f'p50@{f:g}'] for r in rows):,.1f} / "
            f"{statistics.median(r[f'p99@{f:g}'] for r in rows):,.1f}" for f in fracs) + " |")
    sqlite_ratio = [s["rate"] / r["rate"] for s, r in zip(out["SQLite"], out["Redis"],
                                                          strict=True)]
    one_ratio = [r["one_p50"] / t["one_p50"] for r, t in zip(out["Redis"], out["trivial"],
                                                              strict=True)]
    lines += [
        "", "| ratio, same round | min / median / max | target |", "|---|---:|---|",
        f"| SQLite ÷ Redis, max rate | {spread(sqlite_ratio, 2)} | ≥ 0.75 |",
        f"| fedgate Redis ÷ trivial, one-connection p50 | {spread(one_ratio, 2)} | "
        "(p50 ≤ 1.5 ms) |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests of the maximum-rate step (default 2000)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of each open-loop step (default 10)")
    parser.add_argument("--fractions", type=lambda v: [float(x) for x in v.split(",")],
                        default=[0.1, 0.25, 0.5],
                        help="open-loop rates as fractions of the maximum (default "
                             "0.1,0.25,0.5; 0.5 is always run)")
    parser.add_argument("--append", type=Path, help="also append the report to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = report(args, asyncio.run(run(args, Path(tmp))))
    print(text)
    if args.append:
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
