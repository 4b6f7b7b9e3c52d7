"""audit.writer.GroupWriter: this tick's submitters share one batch; each learns its
own outcome; a real failure of the file fails the whole batch (nothing written)."""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from audit import AuditError, AuditLog, verify_file
from audit.writer import GroupWriter


def ev(i: int, **extra) -> dict:
    return {"event.action": "telemetry.accepted", "request_id": f"r{i}", **extra}


async def test_one_tick_of_submitters_is_one_batch(tmp_path: Path) -> None:
    sizes = []
    with AuditLog(tmp_path / "a.jsonl") as log:
        writer = GroupWriter(log.append_many, ThreadPoolExecutor(1), observe=sizes.append)
        bodies = await asyncio.gather(*(writer.write(ev(i)) for i in range(20)))
        assert sizes == [20] and log.fsyncs == 1
        assert [b["event.sequence"] for b in bodies] == list(range(1, 21))
        more = await writer.write_all([ev(20), ev(21)])
        assert [b["request_id"] for b in more] == ["r20", "r21"] and sizes == [20, 2]
    assert verify_file(tmp_path / "a.jsonl").lines == 22


async def test_submitters_during_a_write_form_the_next_batch(tmp_path: Path) -> None:
    sizes = []
    with AuditLog(tmp_path / "a.jsonl") as log:
        writer = GroupWriter(log.append_many, ThreadPoolExecutor(1), observe=sizes.append)
        first = asyncio.ensure_future(writer.write(ev(0)))
        await asyncio.sleep(0)  # the first batch (one event) is now in the executor
        rest = [asyncio.ensure_future(writer.write(ev(i))) for i in range(1, 10)]
        await asyncio.gather(first, *rest)
    assert sizes == [1, 9]


async def test_an_event_the_chain_refuses_fails_alone(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl") as log:
        writer = GroupWriter(log.append_many, ThreadPoolExecutor(1))
        out = await asyncio.gather(writer.write(ev(0)), writer.write(ev(1, n=1 << 70)),
                                   writer.write(ev(2)), return_exceptions=True)
    assert isinstance(out[1], AuditError) and out[2]["prev_hash"] == out[0]["hash"]


async def test_a_file_that_cannot_be_written_fails_the_whole_batch(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        writer = GroupWriter(log.append_many, ThreadPoolExecutor(1))
        await writer.write(ev(0))
        os.replace(path, tmp_path / "aside.jsonl")
        path.mkdir()  # the path names a directory now: the appender cannot follow it
        out = await asyncio.gather(*(writer.write(ev(i)) for i in range(1, 4)),
                                   return_exceptions=True)
        assert all(isinstance(o, OSError) for o in out), out
        with pytest.raises((OSError, AuditError)):
            await writer.write(ev(9))  # and the next batch too: never a silent drop
    lines = (tmp_path / "aside.jsonl").read_bytes().splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == ["r0"]


async def test_submissions_of_several_events_share_a_batch_and_keep_their_outcomes(
        tmp_path: Path) -> None:
    """One batch of three submissions: ``write_each`` gets every event's own outcome,
    ``write_all`` raises the first refusal of its own events only, a plain ``write``
    beside them is untouched; the events are chained in submission order."""
    sizes = []
    with AuditLog(tmp_path / "a.jsonl") as log:
        writer = GroupWriter(log.append_many, ThreadPoolExecutor(1), observe=sizes.append)
        each, all_, one = await asyncio.gather(
            writer.write_each([ev(0), ev(1, n=1 << 70), ev(2)]),
            writer.write_all([ev(3), ev(4, n=1 << 71), ev(5, s="\ud800")]),
            writer.write(ev(6)), return_exceptions=True)
    assert sizes == [7]
    assert [e["request_id"] if isinstance(e, dict) else "refused" for e in each] == [
        "r0", "refused", "r2"]
    assert isinstance(each[1], AuditError)
    assert isinstance(all_, AuditError) and "integer_out_of_range" in str(all_)
    assert one["request_id"] == "r6"
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_bytes().splitlines()]
    assert [x["request_id"] for x in lines] == ["r0", "r2", "r3", "r6"]
