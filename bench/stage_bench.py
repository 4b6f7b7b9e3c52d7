"""Where an event's CPU goes, stage by stage, in one process (issue 9's stage budget).

    .venv/bin/python bench/stage_bench.py [--batches 20]

The gateway's own functions, called in the order a request runs them, on the lab's 2 KB
telemetry body and a real redis-server (AOF, fsync always): each stage is timed alone as
CPU of this thread (``time.thread_time``: Redis's CPU and waits not counted), per event,
for a batch of 100 items (the batch route) and for a commit group of one (the single
route at one request in flight). Figures: µs per event, the median over the rounds (each
round's remainders computed within the round).

Stages: the envelope's parse (batch only); Ed25519 verify; strict parse + canonical check +
JSON Schema; the rest of ``Pipeline.prepare`` (headers, window, keys, binding, mapping);
the record (``build_commit``: evidence, its canonical bytes, the facts fold) and the
accept's audit event, each alone; the store group's client side: the commit script's
arguments and the RESP bytes (``_prepare``, ``pack``), then the rest of the round trip
(reading and judging the replies, asyncio); the audit chain's append (seal, hash, line,
write; the fsync is not CPU). ``baseline_bench.py`` sets these beside the measured CPU
per event of the whole server, the difference being HTTP, TLS and the hops between them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from conftest import RedisServer  # noqa: E402
from lab import IDENTITY, NOW, PIN, PRODUCER, Lab  # noqa: E402
from multidict import CIMultiDict  # noqa: E402

from audit import AuditLog, request_event  # noqa: E402
from gateway.pipeline.batch import item_request_id, parse_envelope  # noqa: E402
from gateway.pipeline.records import build_commit  # noqa: E402
from gateway.pipeline.request import AuditOutbox, Context, SignedRequest  # noqa: E402
from gateway.store import open_store  # noqa: E402
from gateway.store.redis_group import group_command  # noqa: E402
from gateway.store.resp import pack  # noqa: E402
from keyring import verify  # noqa: E402
from schemas.routes import TELEMETRY, TELEMETRY_PATH  # noqa: E402
from schemas.signing import request_signing_input  # noqa: E402

BATCH = 100
STAGES = ("envelope parse (batch only)", "Ed25519 verify",
          "strict parse + canonical check + schema", "other checks of prepare",
          "record: evidence, canonical bytes, facts fold", "accept audit event",
          "store group, client side: script arguments + RESP bytes",
          "store group, client side: the rest of the round trip",
          "audit chain append (seal, hash, line, write)")


def accept_event(ctx: Context) -> list[dict]:
    """What ``gateway.http.auditing.accept_events`` builds for an accepted request."""
    return [request_event(
        action="telemetry.accepted", outcome="success", category=["web"], status=202,
        request_id=ctx.request_id, identity=ctx.identity, peer_sha256=PIN,
        tenant_id=ctx.tenant_id, kid=ctx.kid, execution_fingerprint=ctx.execution_fingerprint,
        attestation_hash=ctx.attestation_hash, now=time.time(), source_ip="127.0.0.1",
        source_port=50000, method="POST", path=TELEMETRY_PATH, tls_version="1.3",
        node=None)]


def envelope(lab: Lab, n: int) -> bytes:
    items = []
    for _ in range(n):
        h, b = lab.signed(nonce=uuid.uuid4().hex)
        items.append({"timestamp": h["X-Telemetry-Timestamp"], "nonce": h["X-Telemetry-Nonce"],
                      "kid": h["X-Telemetry-Key-Id"], "signature": h["X-Telemetry-Signature"],
                      "body_b64": base64.b64encode(b).decode()})
    return json.dumps({"items": items}).encode()


def cpu_us(fn, n: int) -> float:
    """Thread CPU µs per event of ``fn()`` covering ``n`` events."""
    t0 = time.thread_time_ns()
    fn()
    return (time.thread_time_ns() - t0) / 1000 / n


async def acpu_us(coro, n: int) -> float:
    t0 = time.thread_time_ns()
    await coro
    return (time.thread_time_ns() - t0) / 1000 / n


async def one_round(lab: Lab, store, log: AuditLog, tag: str) -> dict[str, dict[str, float]]:
    """Thread CPU µs per event of each stage over one envelope of BATCH items: the
    per-event stages once (both routes run them alike), the store and the audit chain
    as the batch route (one group of BATCH) and as the single route at one request in
    flight (BATCH groups of one)."""
    pipeline, raw = lab.pipeline, envelope(lab, BATCH)
    parse = cpu_us(lambda: parse_envelope(raw, 1000), BATCH)
    items = parse_envelope(raw, 1000)
    headers = [("Content-Type", "application/json"), ("X-Service-Identity", IDENTITY)]
    reqs = [SignedRequest(TELEMETRY, CIMultiDict([
        *headers, ("X-Telemetry-Timestamp", it.timestamp), ("X-Telemetry-Nonce", it.nonce),
        ("X-Telemetry-Signature", it.signature), ("X-Telemetry-Key-Id", it.kid)]),
        it.body, PIN, item_request_id(tag, i)) for i, it in enumerate(items)]
    signed = [(base64.b64decode(it.signature),
               request_signing_input(it.timestamp, it.nonce, it.body)) for it in items]
    common = {STAGES[1]: cpu_us(lambda: [verify(PRODUCER.public, s, m) for s, m in signed],
                                BATCH),
              STAGES[2]: cpu_us(lambda: [pipeline.parse_body(TELEMETRY, it.body)
                                         for it in items], BATCH)}
    ctxs = [Context(r.request_id) for r in reqs]
    for ctx in ctxs:
        ctx.outbox = AuditOutbox("bench/0", accept_event)
    commits: list = []

    async def prepare_all() -> None:
        for req, ctx in zip(reqs, ctxs, strict=True):
            commits.append(await pipeline.prepare(req, NOW, ctx, identity=IDENTITY))

    common["prepare"] = await acpu_us(prepare_all(), BATCH)
    common[STAGES[5]] = cpu_us(lambda: [accept_event(ctx) for ctx in ctxs], BATCH)
    bare = [Context(c.request_id, identity=c.identity, kid=c.kid, tenant_id=c.tenant_id,
                    operator_id=c.operator_id, execution_fingerprint=c.execution_fingerprint,
                    attestation_hash=c.attestation_hash) for c in ctxs]
    common[STAGES[4]] = cpu_us(lambda: [
        build_commit(r, c.body, b, NOW, lab.config, s) for r, c, b, (s, _) in
        zip(reqs, ctxs, bare, signed, strict=True)], BATCH)
    epoch = store._held_epoch(commits[0].tenant_id)
    events = [e for ctx in ctxs for e in ctx.outbox.events]
    out = {}
    for route, group in (("batch", BATCH), ("single", 1)):
        out[route] = {**common, STAGES[0]: parse if group > 1 else 0.0,
                      **await store_stages(store, log, commits, events, group, epoch)}
        commits = [replace(c, nonce=uuid.uuid4().hex, record=replace(
            c.record, record_id=str(uuid.uuid4()))) for c in commits]  # commit them again
    return out


async def store_stages(store, log: AuditLog, commits: list, events: list, group: int,
                       epoch: str) -> dict[str, float]:
    """The store group's client side and the audit append, ``group`` events at a time."""
    chunks = [commits[i:i + group] for i in range(0, len(commits), group)]

    def arguments() -> None:
        for chunk in chunks:
            calls = [[*args, epoch, c.audit or b"", *tail] for c, (_, args, tail) in
                     zip(chunk, [store._prepare(c) for c in chunk], strict=True)]
            pack(group_command(store._group_sha, calls))

    row = {STAGES[6]: cpu_us(arguments, len(commits))}
    results: list = []

    async def commit_all() -> None:
        for chunk in chunks:
            results.extend(await store.commit_many(chunk))

    row["commit"] = await acpu_us(commit_all(), len(commits))
    if any(getattr(r, "outbox_ref", None) is None for r in results):
        raise RuntimeError(f"a commit was not accepted: {results[:2]}")
    row[STAGES[8]] = cpu_us(lambda: [log.append_many(events[i:i + group])
                                     for i in range(0, len(events), group)], len(events))
    return row


def settle(got: dict[str, float]) -> dict[str, float]:
    """One round's reported stages: the two remainders are differences within the round
    (never below zero)."""
    row = {stage: got.get(stage, 0.0) for stage in STAGES}
    row[STAGES[3]] = max(0.0, got["prepare"] - sum(row[STAGES[k]] for k in (1, 2, 4, 5)))
    row[STAGES[7]] = max(0.0, got["commit"] - row[STAGES[6]])
    return row


async def measure(url: str, tmp: Path, rounds: int) -> dict[str, dict[str, float]]:
    """→ {"single": {stage: µs}, "batch": {stage: µs}}: medians over ``rounds``."""
    store = open_store(url)
    await store.open()
    try:
        lab = Lab(store)
        assert (await lab.send(*lab.signed(nonce=uuid.uuid4().hex)))[0] == 202  # the epoch
        log = AuditLog(tmp / "stage-audit.jsonl", fsync=False)
        seen: dict[str, list[dict[str, float]]] = {"single": [], "batch": []}
        for n in range(rounds):
            for route, got in (await one_round(lab, store, log, f"bench-{n}")).items():
                seen[route].append(settle(got))
        return {route: {stage: statistics.median(r[stage] for r in rows) for stage in STAGES}
                for route, rows in seen.items()}
    finally:
        await store.close()


async def run(rounds: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        redis.provision()
        try:
            return await measure(redis.url, Path(tmp), rounds)
        finally:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20,
                        help=f"rounds: envelopes of {BATCH} items (default 20)")
    args = parser.parse_args()
    best = asyncio.run(run(args.batches))
    print("| stage (thread CPU µs per event) | single route | batch route |")
    print("|---|---:|---:|")
    for stage in STAGES:
        print(f"| {stage} | {best['single'][stage]:,.1f} | {best['batch'][stage]:,.1f} |")
    print(f"| sum | {sum(best['single'].values()):,.1f} | {sum(best['batch'].values()):,.1f} |")


if __name__ == "__main__":
    main()
