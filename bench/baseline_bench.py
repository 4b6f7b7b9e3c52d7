"""fedgate against its own baselines, measured in the same run (issue 9).

    .venv/bin/python bench/baseline_bench.py [--rounds 3] [--requests 3000]
        [--batches 40] [--append docs/BENCHMARKS.md]

Each round, on this machine's cores, with the same load generator (this process:
keep-alive mTLS connections, 64 in flight, the 2 KB lab telemetry body, fresh signature
and nonce per event):

1. **trivial**: aiohttp behind the gateway's own TLS context, 2 processes on one port,
   answering 202 with a small JSON (bench/trivial_server.py) → requests/s;
2. **fedgate single**: ``fedgate serve --workers 2`` on Redis (AOF, fsync always),
   ``POST /internal/v1/telemetry`` → requests/s, every answer 202;
3. **fedgate batch**: the same gateway, ``POST /internal/v1/telemetry/batch`` with 100
   events per request, 8 requests in flight → events/s, every item 202;
4. **pure verify**: PyNaCl Ed25519 verify of the same signing input in a loop, in 2
   processes for 1 s → verifies/s.

The report gives min / median / max over the rounds and the two ratios of issue 9's
targets (fedgate single ÷ trivial; batch events ÷ pure verify), then a CPU budget per
event by stage (µs): the CPU the server processes used per event (from /proc), the
trivial handler's as the TLS/HTTP floor, and the gateway's stages timed alone in one
process (bench/stage_bench.py), the rest being what they leave; then what Redis and the
load generator used per event, and the store commit and audit append as wall time of
the call alone (which includes waiting for Redis / the fsync).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import aiohttp  # noqa: E402
import stage_bench  # noqa: E402
from conftest import RedisServer  # noqa: E402
from lab import PRODUCER, Lab  # noqa: E402
from stack import Stack, free_port  # noqa: E402
from stage_bench import STAGES  # noqa: E402

from audit import AuditSink, request_event  # noqa: E402
from keyring import verify  # noqa: E402
from schemas.routes import BATCH_PATH, TELEMETRY_PATH  # noqa: E402
from schemas.signing import request_signing_input  # noqa: E402

LAB = Lab(None)
CONCURRENCY, BATCH_SIZE, BATCH_CONCURRENCY, VERIFY_S, CORES = 64, 100, 8, 1.0, 2
STAGE_ROUNDS = 4  # bench/stage_bench.py rounds of the stage budget, after each round
#: per round: bench/stage_bench.measure's {"single": {stage: µs}, "batch": {stage: µs}}
STAGE_RUNS: list[dict[str, dict[str, float]]] = []


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its children (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1]: ppid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def post_all(url: str, ssl, path: str, bodies: list[tuple[dict, bytes]],
                   concurrency: int, check) -> float:
    """Post every (headers, body) with ``concurrency`` in flight → seconds taken."""
    queue = list(reversed(bodies))
    connector = aiohttp.TCPConnector(ssl=ssl, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:
        async def worker() -> None:
            while queue:
                headers, body = queue.pop()
                async with client.post(url + path, data=body, headers=headers) as resp:
                    check(resp.status, await resp.read())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0


def single_bodies(n: int) -> list[tuple[dict, bytes]]:
    return [LAB.signed(ts=int(time.time()), nonce=uuid.uuid4().hex) for _ in range(n)]


def batch_bodies(n: int) -> list[tuple[dict, bytes]]:
    headers = {"Content-Type": "application/json",
               "X-Service-Identity": "spectrastrike-producer"}
    out = []
    for _ in range(n):
        items = []
        for h, b in single_bodies(BATCH_SIZE):
            items.append({"timestamp": h["X-Telemetry-Timestamp"],
                          "nonce": h["X-Telemetry-Nonce"], "kid": h["X-Telemetry-Key-Id"],
                          "signature": h["X-Telemetry-Signature"],
                          "body_b64": base64.b64encode(b).decode()})
        out.append((headers, json.dumps({"items": items}).encode()))
    return out


def expect(status: int):
    def check(got: int, raw: bytes) -> None:
        if got != status:
            raise RuntimeError(f"got {got}: {raw[:300]!r}")
    return check


def all_items_accepted(got: int, raw: bytes) -> None:
    expect(200)(got, raw)
    answer = json.loads(raw)
    if answer["accepted"] != BATCH_SIZE:
        raise RuntimeError(f"batch: {answer['rejected']} rejected: {answer['results'][:2]}")


def _verify_loop(seconds: float) -> int:
    msg = request_signing_input("1795000000", "nonce-bench-0001", b"x" * 2066)
    sig, pub = PRODUCER.sign(msg), PRODUCER.public
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            verify(pub, sig, msg)
        n += 100
    return n


def verify_rate() -> float:
    with multiprocessing.get_context("fork").Pool(CORES) as pool:
        return sum(pool.map(_verify_loop, [VERIFY_S] * CORES)) / VERIFY_S


def own_cpu() -> float:
    """CPU seconds of this process (the load generator)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(server_pid: int, url: str, ssl, path: str, bodies, concurrency: int,
                  check, events_per_body: int = 1, redis_pid: int | None = None
                  ) -> tuple[float, float]:
    """→ (events/s, server CPU µs per event); with ``redis_pid`` also the CPU µs per
    event of Redis and of this load generator (in ``SHARES``: where the cores went)."""
    cpu0, own0 = tree_cpu(server_pid), own_cpu()
    redis0 = tree_cpu(redis_pid) if redis_pid else 0.0
    elapsed = await post_all(url, ssl, path, bodies, concurrency, check)
    cpu = tree_cpu(server_pid) - cpu0
    events = len(bodies) * events_per_body
    if redis_pid:
        SHARES.setdefault(path, {"redis": [], "client": []})
        SHARES[path]["redis"].append((tree_cpu(redis_pid) - redis0) * 1e6 / events)
        SHARES[path]["client"].append((own_cpu() - own0) * 1e6 / events)
    return events / elapsed, cpu * 1e6 / events


#: route → {"redis": [µs per event per round], "client": [...]}
SHARES: dict[str, dict[str, list[float]]] = {}


async def run(args, tmp: Path) -> dict[str, list[float]]:
    redis = RedisServer(tmp / "redis")
    redis.start()
    redis.provision()
    stack = Stack(tmp / "gw", redis.url)
    trivial_port = free_port()
    pki = stack.pki
    trivial = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "trivial_server.py"), "--port",
         str(trivial_port), "--cert", str(pki.gateway.cert), "--key", str(pki.gateway.key),
         "--ca", str(pki.ca.cert), "--workers", str(CORES)])
    gateway = stack.spawn("--workers", str(CORES))
    out: dict[str, list[float]] = {k: [] for k in (
        "trivial", "trivial_cpu", "single", "single_cpu", "batch", "batch_cpu", "verify")}
    try:
        await stack.wait_ready(timeout=30)
        ssl, trivial_url = stack.ssl(), f"https://127.0.0.1:{trivial_port}"
        await post_all(trivial_url, ssl, TELEMETRY_PATH, single_bodies(200), CONCURRENCY,
                       expect(202))  # warm-up of both
        await post_all(stack.url, ssl, TELEMETRY_PATH, single_bodies(200), CONCURRENCY,
                       expect(202))
        for n in range(args.rounds):
            rate, cpu = await measure(trivial.pid, trivial_url, ssl, TELEMETRY_PATH,
                                      single_bodies(args.requests), CONCURRENCY, expect(202))
            out["trivial"].append(rate)
            out["trivial_cpu"].append(cpu)
            rate, cpu = await measure(gateway.pid, stack.url, ssl, TELEMETRY_PATH,
                                      single_bodies(args.requests), CONCURRENCY, expect(202),
                                      redis_pid=redis.proc.pid)
            out["single"].append(rate)
            out["single_cpu"].append(cpu)
            rate, cpu = await measure(gateway.pid, stack.url, ssl, BATCH_PATH,
                                      batch_bodies(args.batches), BATCH_CONCURRENCY,
                                      all_items_accepted, BATCH_SIZE,
                                      redis_pid=redis.proc.pid)
            out["batch"].append(rate)
            out["batch_cpu"].append(cpu)
            out["verify"].append(verify_rate())
            # the stages in the same minutes (this VM's speed drifts between phases)
            STAGE_RUNS.append(await stage_bench.measure(redis.url, tmp, STAGE_ROUNDS))
            print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in out.items()),
                  file=sys.stderr)
        from pipeline_bench import store_rows
        out["store"] = [dict(await store_rows(redis.url, "Redis", 300))[
            "store commit: Redis (one at a time)"]]
    finally:
        trivial.terminate()
        trivial.wait(timeout=10)
        stack.kill_all()
        redis.stop()
    return out


class _Quiet:
    def debug(self, *args, **kwargs) -> None:
        return None

    info = debug


def audit_append_us(tmp: Path, n: int = 300) -> float:
    event = request_event(action="telemetry.accepted", outcome="success", category=["web"],
                          status=202, request_id=str(uuid.uuid4()), identity="x",
                          peer_sha256="0" * 64, tenant_id="t", kid="k", now=time.time())
    samples = []
    with AuditSink(tmp / "audit.jsonl", logger=_Quiet()) as sink:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            sink.emit(dict(event))
            samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def spread(values: list[float]) -> str:
    return (f"{min(values):,.0f} / {statistics.median(values):,.0f} / "
            f"{max(values):,.0f}")


def report(args, out: dict[str, list[float]], stages: list[dict[str, dict[str, float]]],
           wall: dict[str, float]) -> str:
    med = {k: statistics.median(v) for k, v in out.items()}
    ratio1 = [s / t for s, t in zip(out["single"], out["trivial"], strict=True)]
    ratio2 = [b / v for b, v in zip(out["batch"], out["verify"], strict=True)]
    lines = [
        "## Baselines in the same run (issue 9)", "",
        f"`.venv/bin/python bench/baseline_bench.py --rounds {args.rounds} --requests "
        f"{args.requests} --batches {args.batches}`: {args.rounds} rounds, each measuring "
        "the four below back to back on the same 2 CPUs, with the same load generator "
        f"(this process, {CONCURRENCY} keep-alive mTLS connections; batches: "
        f"{BATCH_SIZE} events per request, {BATCH_CONCURRENCY} in flight). Gateway: "
        f"`fedgate serve --workers {CORES}`, Redis (AOF, fsync always). Ratios are per "
        "round (numerator and denominator of the same round).", "",
        "| measure | min / median / max |", "|---|---:|",
        f"| trivial aiohttp mTLS handler, requests/s | {spread(out['trivial'])} |",
        f"| fedgate single event per request, requests/s | {spread(out['single'])} |",
        f"| **fedgate single ÷ trivial** (target ≥ 0.35) | "
        f"{min(ratio1):.2f} / {statistics.median(ratio1):.2f} / {max(ratio1):.2f} |",
        f"| pure PyNaCl verify, {CORES} processes, verifies/s | {spread(out['verify'])} |",
        f"| fedgate batch route, events/s | {spread(out['batch'])} |",
        f"| **batch events ÷ pure verify** (target ≥ 0.40) | "
        f"{min(ratio2):.2f} / {statistics.median(ratio2):.2f} / {max(ratio2):.2f} |",
        "", "### Stage budget (µs of CPU per event)", "",
        "Server CPU per event under load comes from /proc (all server processes; the load "
        "generator is not counted). The stages are the gateway's own functions timed alone "
"in one process (`bench/stage_bench.py`: thread CPU per event, the median of "
        f"{STAGE_ROUNDS} rounds of 100 events run right after each round's load, then the "
        "median over the rounds; Redis's CPU and waits not counted): as the "
        "batch route runs them (one store group of 100 commits, one audit append of 100 "
        "events) and as one request at a time runs them (groups and appends of one: the "
        "single route at one connection; under load its groups hold several commits). "
        "\"The rest\" is what the measured total leaves after them: HTTP parsing and "
        "routing beyond the trivial handler, the hops between tasks and to the audit thread, "
        "the audit thread's GIL waits, metrics.", "",
        "| stage | batch route (groups of 100) | one request at a time (groups of one) |",
        "|---|---:|---:|",
        f"| server CPU per event, measured under load | {med['batch_cpu']:,.0f} | "
        f"(single route under load: {med['single_cpu']:,.0f}) |",
        f"| TLS/HTTP/asyncio (the trivial handler's CPU per request) | "
        f"{med['trivial_cpu'] / BATCH_SIZE:,.1f} | {med['trivial_cpu']:,.0f} |",
    ]
    for name in STAGES:
        lines.append(f"| {name} | {statistics.median(r['batch'][name] for r in stages):,.1f} "
                     f"| {statistics.median(r['single'][name] for r in stages):,.1f} |")
    rests = [cpu - trivial / BATCH_SIZE - sum(r["batch"].values()) for cpu, trivial, r in
             zip(out["batch_cpu"], out["trivial_cpu"], stages, strict=True)]
    lines.append("| the rest (the measured total − the rows above, per round) | "
                 f"{min(rests):,.0f} / {statistics.median(rests):,.0f} / {max(rests):,.0f} "
                 "(min / median / max) | |")
    single, batch = SHARES.get(TELEMETRY_PATH), SHARES.get(BATCH_PATH)
    if single and batch:
        lines += [
            "", "The same cores also ran Redis and the load generator (CPU µs per event, "
            "medians; the generator's signing happened before the clock started):", "",
            "| process | single route | batch route |", "|---|---:|---:|",
            f"| redis-server (Lua commit script, AOF write + fsync) | "
            f"{statistics.median(single['redis']):,.0f} | "
            f"{statistics.median(batch['redis']):,.0f} |",
            f"| load generator (TLS, HTTP client) | "
            f"{statistics.median(single['client']):,.0f} | "
            f"{statistics.median(batch['client']):,.0f} |"]
    lines += ["", "Timed alone, as wall time (the wait for Redis / the fsync included):", "",
              f"- store commit (Redis EVALSHA, one at a time): {wall['store']:,.0f} µs",
              f"- audit append (with its fsync): {wall['audit']:,.0f} µs"]
    return "\n".join(lines) + "\n"


async def main_async(args) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = await run(args, Path(tmp))
        wall = {"store": out.pop("store")[0], "audit": audit_append_us(Path(tmp))}
    return report(args, out, STAGE_RUNS, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000,
                        help="single requests per round per server (default 3000)")
    parser.add_argument("--batches", type=int, default=40,
                        help=f"batch requests of {BATCH_SIZE} events per round (default 40)")
    parser.add_argument("--append", type=Path, help="also append the report to this file")
    args = parser.parse_args()
    text = asyncio.run(main_async(args))
    print(text)
    if args.append:
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
