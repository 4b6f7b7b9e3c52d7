"""Several real processes append to one audit file at once: the chain never forks.

Two ways workers come to share the file: separate interpreters that each open it
(``python -c``, like ``fedgate serve --workers N`` after spawn), and children forked
from a parent that opened it first (the descriptor, and its lock, are inherited).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from audit import AuditLog, request_event, verify_file

ROOT = Path(__file__).resolve().parents[2]
WORKERS, EACH = 4, 200

CHILD = textwrap.dedent("""
    import os, sys, time
    from audit import AuditLog, request_event
    path, worker, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    log = AuditLog(path)  # the file may not exist yet: every worker races to create it
    while not os.path.exists(go):
        time.sleep(0.001)
    for i in range(n):
        log.append(request_event(
            action="telemetry.accepted", outcome="success", category=["web"], status=202,
            request_id=f"{worker}-{i}", tenant_id="t", now=time.time()))
    log.close()
""")


def event(worker: str, i: int) -> dict:
    return request_event(action="telemetry.accepted", outcome="success", category=["web"],
                         status=202, request_id=f"{worker}-{i}", now=time.time())


def check_chain(path: Path) -> None:
    result = verify_file(path)
    assert result.ok, str(result)
    assert result.lines == WORKERS * EACH
    events = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert len(events) == WORKERS * EACH
    prev = "0" * 64
    for event_ in events:  # no fork: each line names exactly the line before it
        assert event_["prev_hash"] == prev
        prev = event_["hash"]
    assert len({e["prev_hash"] for e in events}) == len(events)
    ids = [e["request_id"] for e in events]
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(WORKERS) for i in range(EACH))
    writers = [i.split("-")[0] for i in ids]
    switches = sum(a != b for a, b in zip(writers, writers[1:], strict=False))
    assert switches > WORKERS, "the workers did not actually interleave"


def test_spawned_processes_share_one_chain(tmp_path: Path) -> None:
    path, go = tmp_path / "audit.jsonl", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(path), f"w{w}", str(EACH),
                               str(go)], cwd=ROOT, env=env, stderr=subprocess.PIPE)
             for w in range(WORKERS)]
    time.sleep(0.5)  # let every worker import and open the file before the start signal
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err.decode()
    check_chain(path)


def _forked_worker(log: AuditLog, worker: str, go: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.001)
    for i in range(EACH):
        log.append(event(worker, i))


def test_forked_children_of_one_opener_share_one_chain(tmp_path: Path) -> None:
    path, go = tmp_path / "audit.jsonl", tmp_path / "go"
    log = AuditLog(path)  # opened BEFORE the fork: children inherit the descriptor
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_forked_worker, args=(log, f"w{w}", str(go)))
             for w in range(WORKERS)]
    for proc in procs:
        proc.start()
    time.sleep(0.2)
    go.touch()
    for proc in procs:
        proc.join(timeout=90)
        assert proc.exitcode == 0
    log.close()
    check_chain(path)
