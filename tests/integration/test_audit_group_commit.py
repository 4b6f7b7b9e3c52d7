"""Group commit of the audit chain (issue 9): two real processes, each with many
concurrent submitters, append to one audit file through ``audit.writer.GroupWriter``.
The chain is valid, holds every event once, and took far fewer fsyncs than events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from audit import verify_file

ROOT = Path(__file__).resolve().parents[2]
PROCS, EACH = 2, 600

CHILD = textwrap.dedent("""
    import asyncio, json, os, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from audit import AuditLog, request_event
    from audit.writer import GroupWriter
    path, name, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    async def main():
        log = AuditLog(path)
        writer = GroupWriter(log.append_many, ThreadPoolExecutor(max_workers=1))
        while not os.path.exists(go):
            await asyncio.sleep(0.001)

        async def submitter(k):
            for i in range(k, n, 50):  # 50 concurrent submitters, one event at a time
                await writer.write(request_event(
                    action="telemetry.accepted", outcome="success", category=["web"],
                    status=202, request_id=f"{name}-{i}", now=time.time()))

        await asyncio.gather(*(submitter(k) for k in range(50)))
        print(json.dumps({"fsyncs": log.fsyncs, "events": log.events,
                          "batches": log.batches}))
        log.close()

    asyncio.run(main())
""")


def test_two_processes_group_commit_one_valid_chain_with_fewer_fsyncs(tmp_path):
    path, go = tmp_path / "audit.jsonl", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(path), f"p{p}", str(EACH),
                               str(go)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for p in range(PROCS)]
    time.sleep(0.5)  # both interpreters up (not a timing assertion: they wait for "go")
    go.touch()
    stats = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        stats.append(json.loads(out))
    result = verify_file(path)
    assert result.ok and result.lines == PROCS * EACH, str(result)
    events = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert sorted(e["request_id"] for e in events) == sorted(
        f"p{p}-{i}" for p in range(PROCS) for i in range(EACH))
    assert sum(s["events"] for s in stats) == PROCS * EACH
    fsyncs = sum(s["fsyncs"] for s in stats)
    assert fsyncs == sum(s["batches"] for s in stats)  # one fsync per batch
    assert fsyncs < PROCS * EACH / 4, stats  # 50 submitters per process share each fsync
    print(f"\ngroup commit: {PROCS * EACH} events, {fsyncs} fsyncs")
