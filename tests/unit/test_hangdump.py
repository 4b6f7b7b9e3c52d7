"""tests/hangdump.py: what a test nearing its pytest-timeout waits on, written to stderr."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading

from hangdump import Watchdog, dump


async def test_dump_names_each_pending_task_its_await_and_the_child_processes(tmp_path):
    fut = asyncio.get_running_loop().create_future()

    async def stuck_on_a_future() -> None:
        await fut  # nobody resolves it

    task = asyncio.create_task(stuck_on_a_future(), name="stuck-task")
    child = subprocess.Popen(["sleep", "60"])
    await asyncio.sleep(0)  # the task reaches its await
    try:
        with (tmp_path / "dump").open("wb") as f:
            dump(f.fileno(), "the test")
    finally:
        task.cancel()
        child.kill()
        child.wait()
    text = (tmp_path / "dump").read_text()
    assert "===== hangdump: the test still running" in text
    assert "name='stuck-task'" in text and "await fut  # nobody resolves it" in text
    assert f"pid {child.pid} ppid {os.getpid()}" in text and "sleep 60" in text
    assert "----- threads -----" in text and "===== hangdump end =====" in text


def test_watchdog_dumps_once_when_a_test_outlives_its_margin_and_not_when_disarmed(tmp_path):
    path = tmp_path / "dump"
    done = threading.Event()

    def dump_and_tell(fd: int, what: str) -> None:
        dump(fd, what)
        done.set()

    with path.open("wb") as f:
        watchdog = Watchdog(f.fileno(), dump_and_tell)
        watchdog.arm("quick", 3600.0)  # disarmed long before its dump
        watchdog.disarm()
        watchdog.arm("slow::test", 0.01)  # dump at 0.005 s: "still running"
        assert done.wait(60)
    text = path.read_text()
    assert text.count("===== hangdump:") == 1 and "slow::test (timeout 0.01 s" in text
    assert "quick" not in text
