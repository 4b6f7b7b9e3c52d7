"""Soak (issue 10, docs/RESILIENCE.md "soak"): a long steady load at half the maximum rate.

    .venv/bin/python bench/soak.py [--seconds 600] [--interval 30] [--workers 2]

A real redis-server (AOF, appendfsync always) and ``fedgate serve --workers 2`` over
mTLS. First the maximum rate is measured briefly with bench/http_bench.py's load
generator (64 in flight); then distinct signed telemetry requests are sent at half that
rate, paced, on keep-alive mTLS connections, for ``--seconds``. Every ``--interval`` s a
row records requests sent / 202 / errors by code, and the RSS and open fds (/proc) of
the supervisor and of each worker. At the end: zero unexpected errors (anything but
202), and per process RSS and fds flat within ±10 % between the first and last thirds of
the rows after the first (warm-up). Prints the table and ``soak: {...}``; exits 1 when a
check fails. Not part of `make test` (`make soak`, `make resilience`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import aiohttp  # noqa: E402
from conftest import RedisServer  # noqa: E402
from http_bench import LAB, load  # noqa: E402
from stack import Stack  # noqa: E402

from schemas.routes import TELEMETRY_PATH  # noqa: E402


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(out)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pid: int) -> dict[str, tuple[int, int]]:
    """name → (RSS KiB, open fds) for the supervisor and each worker."""
    procs = {"supervisor": pid}
    for c in children(pid):  # the workers, and multiprocessing's resource tracker
        cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        kind = "tracker" if b"resource_tracker" in cmd else "worker"
        procs[f"{kind}{sum(k.startswith(kind) for k in procs) + 1}"] = c
    return {name: (rss_kib(p), fds(p)) for name, p in procs.items()}


async def paced(stack: Stack, rate: float, seconds: float, interval: float,
                pid: int) -> tuple[list[dict], Counter]:
    counts: Counter = Counter()
    rows: list[dict] = []
    inflight = asyncio.Semaphore(256)
    connector = aiohttp.TCPConnector(ssl=stack.ssl(), limit=64)
    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(connector=connector) as client:
        async def one() -> None:
            try:
                headers, body = LAB.signed(ts=int(time.time()), nonce=uuid.uuid4().hex)
                async with client.post(stack.url + TELEMETRY_PATH, data=body,
                                       headers=headers) as resp:
                    data = await resp.read()
                    if resp.status == 202:
                        counts["202"] += 1
                    else:
                        try:
                            code = json.loads(data)["errors"][0]["code"]
                        except (ValueError, KeyError, IndexError, TypeError):
                            code = "?"
                        counts[f"{resp.status} {code}"] += 1
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                counts[f"client {type(exc).__name__}"] += 1
            finally:
                inflight.release()

        t0 = time.monotonic()
        sent, next_row = 0, t0 + interval
        while (now := time.monotonic()) < t0 + seconds:
            due = int((now - t0) * rate)
            while sent < due:
                await inflight.acquire()
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if now >= next_row:
                rows.append({"t": round(now - t0), "sent": sent, **dict(counts),
                             "procs": sample(pid)})
                next_row += interval
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        rows.append({"t": round(time.monotonic() - t0), "sent": sent, **dict(counts),
                     "procs": sample(pid)})
    counts["sent"] = sent
    return rows, counts


def with_workers_total(procs: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Adds "workers" = the sum over the workers: the kernel spreads the load generator's
    keep-alive connections over the workers, so one worker's fds move by whole
    connections while the total does not."""
    workers = [v for name, v in procs.items() if name.startswith("worker")]
    return {**procs, "workers": (sum(v[0] for v in workers), sum(v[1] for v in workers))}


def flat(rows: list[dict], tolerance: float = 0.10) -> dict[str, dict]:
    """Mean of the first and last thirds of the rows after the first (warm-up), and
    whether they are within ±tolerance of each other: RSS per process; open fds per
    process except the workers, whose fds are judged as their sum (``with_workers_total``)."""
    steady = rows[1:] if len(rows) > 3 else rows
    third = max(1, len(steady) // 3)
    out = {}
    for name in with_workers_total(steady[0]["procs"]):
        for k, label in ((0, "rss_kib"), (1, "fds")):
            one_worker = name.startswith("worker") and name != "workers"
            if (one_worker and label == "fds") or (name == "workers" and label == "rss_kib"):
                continue  # a worker's own fds: judged in the sum; the sum's RSS: per worker
            first = [with_workers_total(r["procs"])[name][k] for r in steady[:third]
                     if name in with_workers_total(r["procs"])]
            last = [with_workers_total(r["procs"])[name][k] for r in steady[-third:]
                    if name in with_workers_total(r["procs"])]
            a, b = sum(first) / len(first), sum(last) / len(last)
            change = (b - a) / a if a else 0.0
            out[f"{name} {label}"] = {"first": round(a), "last": round(b),
                                      "change": round(change, 4),
                                      "ok": abs(change) <= tolerance}
    return out


async def main_async(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        redis.provision()
        stack = Stack(Path(tmp), redis.url)
        proc = stack.spawn("--workers", str(args.workers))
        try:
            await stack.wait_ready(timeout=30)
            await load(stack, 200, 64)  # warm-up
            max_rate, _ = await load(stack, args.measure_requests, 64)
            rate = max_rate / 2
            print(f"max rate {max_rate:,.0f} requests/s; soak at {rate:,.0f}/s for "
                  f"{args.seconds:g} s", flush=True)
            rows, counts = await paced(stack, rate, args.seconds, args.interval, proc.pid)
        finally:
            stack.kill_all()
            redis.stop()
    names = list(rows[0]["procs"])
    print("| t s | sent | 202 | errors | " + " | ".join(
        f"{n} RSS MiB / fds" for n in names) + " |")
    print("|---:|---:|---:|---|" + "---:|" * len(names))
    for r in rows:
        errors = {k: v for k, v in r.items() if k not in ("t", "sent", "202", "procs")}
        print(f"| {r['t']} | {r['sent']:,} | {r.get('202', 0):,} | "
              f"{', '.join(f'{k}: {v}' for k, v in errors.items()) or 0} | " + " | ".join(
                  f"{r['procs'][n][0] / 1024:.1f} / {r['procs'][n][1]}" if n in r["procs"]
                  else "-" for n in names) + " |")
    unexpected = {k: v for k, v in counts.items() if k not in ("sent", "202")}
    flatness = flat(rows)
    summary = {"max_rate": round(max_rate), "rate": round(rate), "seconds": args.seconds,
               "workers": args.workers, "sent": counts["sent"],
               "accepted_202": counts["202"], "unexpected": unexpected,
               "flat_within_10pct": flatness}
    print(f"soak: {json.dumps(summary)}")
    ok = not unexpected and counts["202"] == counts["sent"] and all(
        v["ok"] for v in flatness.values())
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--interval", type=float, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--measure-requests", type=int, default=2000)
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
