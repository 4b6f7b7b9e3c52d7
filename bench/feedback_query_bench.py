"""Feedback query latency for a tenant with many findings: facts vs records (issue 9).

    .venv/bin/python bench/feedback_query_bench.py [--findings 100000] [--executions 1000]
        [--queries 200] [--old-queries 5]

One identity's findings (valid signed-body records, spread over ``--executions``
anchored executions, 1 graph each) are written straight into a real store as a
version without facts stored them (SQLite file; a redis-server started here on a free
port), then the store is opened: the upgrade back-fills the facts (timed). Then the
same policy answers ``--queries`` queries from the facts (the gateway's path; its answer
checked equal to the reference's: ExecutionFacts built per execution, then ranked) and
``--old-queries`` from the records (newest 10,000 per kind, the path before the facts):
p50/p99 in ms and their ratio, per store, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import redis  # noqa: E402
from lab import GRAPH_BODY, IDENTITY, NOW, TELEMETRY_BODY, TENANT  # noqa: E402

from gateway.feedback.evidence import SkipReport  # noqa: E402
from gateway.feedback.issuer import MAX_RECORDS_PER_KIND, RulePolicy  # noqa: E402
from gateway.feedback.policy import DEFAULT_RULES_FILE, load_rules  # noqa: E402
from gateway.store import open_store  # noqa: E402
from schemas.canonical import dumps  # noqa: E402

RULES = load_rules(DEFAULT_RULES_FILE)
SEVERITIES = ("info", "low", "medium", "high", "critical")


def records(findings: int, executions: int):
    """(kind, record id, fp, attestation hash, stored bytes) in store order."""
    fps = [hashlib.sha256(f"bench execution {i}".encode()).hexdigest() for i in range(executions)]
    att = {fp: hashlib.sha256(fp.encode()).hexdigest() for fp in fps}
    for i, fp in enumerate(fps):
        graph = copy.deepcopy(GRAPH_BODY)
        graph.update(execution_fingerprint=fp, attestation_measurement_hash=att[fp])
        yield "graph", f"g-{i}", fp, att[fp], _stored("graph", f"g-{i}", fp, att[fp], graph, i)
    for i in range(findings):
        fp = fps[i % executions]
        body = copy.deepcopy(TELEMETRY_BODY)
        body["execution_hash"] = fp
        body["payload"]["severity"] = SEVERITIES[i % 5 if i % 7 else 2]
        body["payload"]["attributes"].update(execution_fingerprint=fp,
                                             attestation_measurement_hash=att[fp],
                                             asset_ref=f"host-{i % 13}")
        yield "finding", f"f-{i}", fp, att[fp], _stored("finding", f"f-{i}", fp, att[fp],
                                                         body, i)


def _stored(kind: str, rid: str, fp: str, att: str, body: dict, i: int) -> bytes:
    return dumps({f"{kind}_id": rid, "request_id": rid, "received_at": NOW - 86400 + i % 86400,
                  "identity": IDENTITY, "tenant_id": TENANT, "operator_id": "op-001",
                  "execution_fingerprint": fp, "attestation_measurement_hash": att,
                  "body_b64": base64.b64encode(dumps({**body, "timestamp": NOW,
                                                      "nonce": f"nonce-{rid}"})).decode()})


async def load_sqlite(url: str, findings: int, executions: int) -> None:
    store = open_store(url)
    await store.open()  # the current schema
    await store.close()
    db = sqlite3.connect(url.removeprefix("sqlite:///"))
    with db:
        for kind, rid, fp, att, data in records(findings, executions):
            db.execute("INSERT INTO records (kind, record_id, tenant_id, execution_fingerprint,"
                       " created_at, data, identity) VALUES (?,?,?,?,?,?,?)",
                       (kind, rid, TENANT, fp, NOW, data, IDENTITY))
            db.execute("INSERT OR IGNORE INTO anchors VALUES (?,?,?,?,?)",
                       (TENANT, fp, att, NOW, IDENTITY))
        db.execute("PRAGMA user_version = 3")  # as written before the facts
    db.close()


async def load_redis(url: str, findings: int, executions: int) -> None:
    store = open_store(url)
    await store.open()
    prefix = store.prefix
    await store.close()
    r = redis.Redis.from_url(url)
    t = f"{prefix}:{{{TENANT}}}"
    pipe, position = r.pipeline(transaction=False), {"finding": 0, "graph": 0}
    for n, (kind, rid, fp, att, data) in enumerate(records(findings, executions), 1):
        position[kind] += 1
        pipe.set(f"{t}:r:{kind}:{rid}", data)
        pipe.rpush(f"{t}:i:{kind}", rid)
        pipe.zadd(f"{t}:i:{kind}:{IDENTITY}", {rid: position[kind]})
        pipe.set(f"{t}:a:{fp}", att)
        pipe.set(f"{t}:o:{fp}", IDENTITY)
        if n % 2000 == 0:
            pipe.execute()
    pipe.hdel(f"{prefix}:schema", "facts")  # as written before the facts
    pipe.execute()
    r.close()


async def measure(url: str, label: str, args) -> list[str]:
    t0 = time.perf_counter()
    store = open_store(url)
    await store.open()  # back-fills the facts
    backfill = time.perf_counter() - t0
    try:
        facts, old = RulePolicy(RULES), RulePolicy(RULES, max_records=MAX_RECORDS_PER_KIND)
        a = await facts(store, TENANT, 100, NOW, identity=IDENTITY)
        reference = await facts.facts_from_store(store, TENANT, IDENTITY, SkipReport())
        assert a.adjustments == facts.answer(reference, 100, NOW), "not the reference's answer"
        new_ms = await latencies(facts, store, args.queries)
        old_ms = await latencies(old, store, args.old_queries)
        assert a.adjustments, "the rules decided nothing: the data exercises nothing"
    finally:
        await store.close()
    p = {name: (statistics.median(ms), quantile(ms, 0.99)) for name, ms in
         (("new", new_ms), ("old", old_ms))}
    return [f"| {label} | facts ({args.queries} queries) | {p['new'][0]:.2f} | "
            f"{p['new'][1]:.2f} | back-fill at open {backfill:.1f} s |",
            f"| {label} | records ({args.old_queries} queries) | {p['old'][0]:.1f} | "
            f"{p['old'][1]:.1f} | p50 ratio old/new {p['old'][0] / p['new'][0]:.0f}× |"]


async def latencies(policy: RulePolicy, store, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await policy(store, TENANT, 100, NOW, identity=IDENTITY)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main_async(args) -> str:
    lines = [f"Feedback query, one identity: {args.findings} findings over {args.executions} "
             "executions (+1 graph each); ms per query",
             "", "| store | path | p50 ms | p99 ms | note |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        await load_sqlite(url, args.findings, args.executions)
        lines += await measure(url, "SQLite", args)
    if shutil.which("redis-server"):
        from pipeline_bench import TempRedis
        with TempRedis() as url:
            await load_redis(url, args.findings, args.executions)
            lines += await measure(url, "Redis", args)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--findings", type=int, default=100_000)
    parser.add_argument("--executions", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200, help="facts-path queries")
    parser.add_argument("--old-queries", type=int, default=5, help="records-path queries")
    parser.add_argument("--append", type=Path, metavar="MD",
                        help="also append the report to this Markdown file")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print(report)
    if args.append is not None:
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write("\n## Feedback query: per-execution facts vs re-reading the records\n\n"
                     f"`{' '.join(['python', *sys.argv])}`\n\n{report}\n")


if __name__ == "__main__":
    main()
