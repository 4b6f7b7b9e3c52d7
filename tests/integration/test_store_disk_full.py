"""Disk full under load (issue 10): real small tmpfs file systems, real ENOSPC.

The SQLite file lives on an 8 MiB tmpfs (SQLite's WAL grows to ~4 MB before its first
autocheckpoint: on a smaller disk it alone fills it), the audit log on another 1 MiB one
(mounted by the
test: it needs root, as CI runs; skipped with the reason otherwise). A filler file takes
the free space while clients send signed telemetry:

* store full → 503 (``store_unavailable`` / ``replay_store_unavailable``), never a 202 for
  a request that was not stored; the filler removed → 202 again; every 202 is there,
  every 503 wrote nothing (sent again, it is accepted).
* audit full → 503 ``audit_unavailable`` (fail closed until restart); the chain has no
  torn line; restarted with space again → 202.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
from stack import Stack
from traffic import (
    Traffic,
    accepted_ids,
    audit_events,
    check_nothing_lost,
    stored_request_ids,
)


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here ({done.stderr.strip() or 'refused'});"
                    " this test needs root and a kernel that allows it")


@pytest.fixture
def small_disks(tmp_path):
    disks = {"db": tmp_path / "db", "audit": tmp_path / "audit"}
    mounted = []
    try:
        mount_tmpfs(disks["db"], "8m")  # > the 4 MB WAL before its autocheckpoint
        mounted.append(disks["db"])
        mount_tmpfs(disks["audit"], "1m")
        mounted.append(disks["audit"])
        yield disks
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """A file taking every free byte of ``disk`` (until ENOSPC)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 512, 1):  # down to the last partial block
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def gateway(tmp_path: Path, disks: dict[str, Path]) -> Stack:
    (tmp_path / "gw").mkdir()
    stack = Stack(tmp_path / "gw", f"sqlite:///{disks['db'] / 'fedgate.db'}")
    stack.audit_path = disks["audit"] / "gateway-audit.jsonl"
    stack.write_config()
    return stack


async def test_sqlite_disk_full_is_503_never_202_and_recovers(tmp_path, small_disks):
    stack = gateway(tmp_path, small_disks)
    stack.spawn()
    try:
        await stack.wait_ready()
        traffic = Traffic(stack, clients=4)
        traffic.start()
        await traffic.until(lambda t: len(t.with_status(202)) >= 20)
        filler = fill(small_disks["db"])
        full = time.monotonic()
        # the WAL may reuse its pages a while; once it must grow, every commit fails
        await traffic.until(lambda t: t.since(503, full) >= 10, timeout_s=25)
        last = traffic.sent[-8:]
        os.unlink(filler)
        freed = time.monotonic()
        await traffic.until(lambda t: t.since(202, freed) >= 20)
        await traffic.stop()
        assert set(traffic.counts()) <= {202, 503}, traffic.counts()
        assert {s.error for s in traffic.with_status(503)} <= {
            "store_unavailable", "replay_store_unavailable"}
        assert all(s.status == 503 for s in last if s.done <= freed)  # full: no 202 at all
        recovery = traffic.first(202, freed).done - freed
        figures = await check_nothing_lost(stack, traffic, [stack.audit_path])
        print("sqlite disk full:", figures,
              f"recovery (space freed -> first 202): {recovery:.3f} s")
    finally:
        stack.kill_all()


async def test_audit_disk_full_is_503_audit_unavailable_and_no_torn_line(tmp_path,
                                                                        small_disks):
    stack = gateway(tmp_path, small_disks)
    stack.spawn()
    try:
        await stack.wait_ready()
        traffic = Traffic(stack, clients=4)
        traffic.start()
        await traffic.until(lambda t: len(t.with_status(202)) >= 20)
        filler = fill(small_disks["audit"])
        full = time.monotonic()
        await traffic.until(lambda t: t.since(503, full) >= 10)
        await traffic.stop()
        assert set(traffic.counts()) <= {202, 503}, traffic.counts()
        assert {s.error for s in traffic.with_status(503)} == {"audit_unavailable"}
        events = audit_events(stack.audit_path)  # the whole chain verifies: no torn line
        os.unlink(filler)
        stack.kill_all()
        stack.spawn()  # fail closed until restart (docs/OPERATIONS.md)
        await stack.wait_ready()
        again = Traffic(stack, clients=2)
        again.start()
        await again.until(lambda t: len(t.with_status(202)) >= 5)
        await again.stop()
        after = audit_events(stack.audit_path)
        assert len(after) > len(events)
        stored, accepted = await stored_request_ids(stack.store_url), accepted_ids(after)
        unaudited = [rid for rid in stored if accepted[rid] != 1]  # the outbox recovered
        assert not unaudited and set(accepted) == set(stored)
        print("audit disk full:", dict(traffic.counts()), f"events kept: {len(events)}")
    finally:
        stack.kill_all()
