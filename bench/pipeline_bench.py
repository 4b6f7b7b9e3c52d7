"""Micro-benchmark of the pipeline stages, per event (issue 2).

    .venv/bin/python bench/pipeline_bench.py [--n 2000] [--write docs/BENCHMARKS.md]

Stages on the real ~2 KB interop telemetry body: strict parse, canonical check, schema
validation (hot path and reference), Ed25519 verify, the store commit on SQLite and on
a real redis-server (started here on a free port when the binary exists), and the whole
pipeline per request on each store. Figures are medians of per-call timings (µs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import orjson  # noqa: E402
from lab import IDENTITY, PRODUCER, Lab  # noqa: E402

from gateway.pipeline.pipeline import MAX_DEPTH  # noqa: E402
from gateway.pipeline.records import build_commit  # noqa: E402
from gateway.pipeline.request import Context, SignedRequest  # noqa: E402
from gateway.store import open_store  # noqa: E402
from keyring import verify  # noqa: E402
from schemas.canonical import (  # noqa: E402
    dumps,
    dumps_reference,
    loads,
    parse_canonical,
    parse_canonical_bounded,
)
from schemas.routes import TELEMETRY  # noqa: E402
from schemas.signing import request_signing_input  # noqa: E402
from schemas.validate import ReferenceValidators, Validators  # noqa: E402

INTEROP = json.loads((ROOT / "tests/vectors/interop/telemetry_01.json").read_text())
BODY = base64.b64decode(INTEROP["request"]["body_b64"])


def timed(fn, n: int) -> float:
    """Median µs per call over n calls (after a short warm-up)."""
    for _ in range(min(50, n)):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


async def atimed(fn, n: int) -> float:
    for _ in range(min(20, n)):
        await fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def stage_rows(n: int) -> list[tuple[str, float]]:
    obj = orjson.loads(BODY)
    fast, ref = Validators(), ReferenceValidators()
    pub = PRODUCER.public
    msg = request_signing_input("1795000000", "nonce-bench-0001", BODY)
    sig = PRODUCER.sign(msg)
    return [
        ("parse: orjson.loads", timed(lambda: orjson.loads(BODY), n)),
        ("parse: strict reference (json + hooks)", timed(lambda: loads(BODY), n)),
        ("canonical: dumps (fast path)", timed(lambda: dumps(obj), n)),
        ("canonical: dumps_reference (json.dumps)", timed(lambda: dumps_reference(obj), n)),
        ("parse + canonical check (parse_canonical)", timed(lambda: parse_canonical(BODY), n)),
        ("parse + canonical + depth check (parse_canonical_bounded: the gateway's call)",
         timed(lambda: parse_canonical_bounded(BODY, MAX_DEPTH), n)),
        ("schema: jsonschema-rs (hot path)", timed(lambda: fast.validate("telemetry", obj), n)),
        ("schema: python-jsonschema (reference)",
         timed(lambda: ref.validate("telemetry", obj), max(50, n // 10))),
        ("Ed25519 verify (PyNaCl)", timed(lambda: verify(pub, sig, msg), n)),
    ]


class TempRedis:
    def __init__(self) -> None:
        from conftest import RedisServer
        self.dir = tempfile.mkdtemp(prefix="fedgate-bench-redis-")
        self.server = RedisServer(Path(self.dir))

    def __enter__(self) -> str:
        self.server.start()
        self.server.provision()  # a new, empty store (docs/STORES.md "Store amnesia")
        return self.server.url

    def __exit__(self, *exc) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def store_rows(url: str, label: str, n: int) -> list[tuple[str, float]]:
    store = open_store(url)
    await store.open()
    try:
        lab = Lab(store)
        # time the store call alone: build the commits up front, then commit them
        prepared = []
        for _ in range(n + 20):
            headers, raw = lab.signed(nonce=uuid.uuid4().hex)
            ctx = Context(str(uuid.uuid4()), identity=IDENTITY, kid="lab-2026",
                          tenant_id=lab.config.operator_tenants["op-001"], operator_id="op-001")
            body = orjson.loads(raw)
            ctx.execution_fingerprint = body["execution_hash"]
            ctx.attestation_hash = body["payload"]["attributes"]["attestation_measurement_hash"]
            req = SignedRequest(TELEMETRY, headers, raw, "0" * 64, ctx.request_id)
            prepared.append(build_commit(req, body, ctx, 1_795_000_000, lab.config, b"s" * 64))
        it = iter(prepared)
        commit_us = await atimed(lambda: store.commit(next(it)), n)
        requests = [lab.signed(nonce=uuid.uuid4().hex) for _ in range(n + 20)]
        rit = iter(requests)
        whole_us = await atimed(lambda: lab.send(*next(rit)), n)
        # concurrent throughput: 64 requests in flight
        batch = [lab.signed(nonce=uuid.uuid4().hex) for _ in range(n)]
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(64)

        async def one(h, b):
            async with sem:
                status, code, _ = await lab.send(h, b)
                assert status == 202, code
        await asyncio.gather(*(one(h, b) for h, b in batch))
        rate = n / (time.perf_counter() - t0)
    finally:
        await store.close()
    return [(f"store commit: {label} (one at a time)", commit_us),
            (f"whole pipeline: {label} (one at a time)", whole_us),
            (f"whole pipeline: {label}, 64 in flight → requests/s", rate)]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), "
            f"Python {platform.python_version()}")


def render(rows: list[tuple[str, float]], n: int) -> str:
    lines = [
        "# Benchmarks", "",
        "Measured, not asserted: no test depends on these numbers.", "",
        f"- machine: {machine()}",
        f"- date: {time.strftime('%Y-%m-%d')}",
        f"- command: `make bench` (= `.venv/bin/python bench/pipeline_bench.py --n {n} "
        "--write docs/BENCHMARKS.md`)",
        "- input: the real 2,066-byte SpectraStrike telemetry body of "
        "`tests/vectors/interop/telemetry_01.json`",
        "- figures: median µs per call unless the row says requests/s; the stores are real "
        "(SQLite file with WAL + synchronous=FULL; redis-server with appendonly yes + "
        "appendfsync always, started by the benchmark)", "",
        "| stage | figure |", "|---|---:|",
    ]
    for name, value in rows:
        lines.append(f"| {name} | {value:,.2f} |" if value < 10 else f"| {name} | {value:,.0f} |")
    return "\n".join(lines) + "\n"


async def main_async(args) -> str:
    rows = stage_rows(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        rows += await store_rows(f"sqlite:///{tmp}/bench.db", "SQLite", args.n)
    if shutil.which("redis-server"):
        with TempRedis() as url:
            rows += await store_rows(url, "Redis", args.n)
    from startup_bench import one_run
    starts = [await one_run() for _ in range(5)]
    rows.append(("`fedgate serve` → first /readyz 200, seconds (median of 5)",
                 statistics.median(starts)))
    return render(rows, args.n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per stage (default 2000)")
    parser.add_argument("--write", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print(report)
    if args.write:
        args.write.write_text(report, encoding="utf-8")
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
