"""What a test was waiting on, printed shortly before pytest-timeout kills it.

A test that hangs with an idle event loop is killed by pytest-timeout after 120 s with
only the threads' stacks (the main thread in ``select``): nothing says which future the
loop's tasks wait on. One watchdog thread per pytest process (started by the first test;
tests/conftest.py arms it around each test's setup, call and teardown) sleeps until
``DUMP_MARGIN_S`` before the test's timeout and, only if the test is still running then,
writes to the process's real stderr (past pytest's capture: under xdist the worker's
stderr is the CI log):

- every asyncio event loop still open (found through ``gc``): running or not, its ready
  callbacks and timers (the next one's due time), then each unfinished task: its repr
  (what it waits for) and its coroutine stack;
- every thread's stack (``faulthandler``);
- this process's child processes and every ``redis-server`` on the machine (pid, state,
  command line), and this process's TCP sockets (ports, state, bytes queued each way).

Nothing runs while no test nears its timeout (one ``Condition.wait`` per test); the dump
itself swallows every error (it must never fail or hang a test) and never touches the
loop (it reads, from its own thread, what the GIL lets it read).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import io
import os
import threading
import time
import traceback

DUMP_MARGIN_S = 10.0  # before the test's timeout (half the timeout when that is shorter)

__all__ = ["Watchdog", "dump", "real_stderr_fd"]


def real_stderr_fd(config) -> int:
    """A descriptor of the stderr pytest started with (its capture saved it), else of fd 2."""
    try:
        capman = config.pluginmanager.getplugin("capturemanager")
        saved = capman._global_capturing.err.targetfd_save  # pytest's own dup of fd 2
        return os.dup(saved)
    except Exception:
        return os.dup(2)


def item_timeout(item) -> float | None:
    """The test's pytest-timeout (its marker, --timeout or the ini's), None if none."""
    try:
        import pytest_timeout

        timeout = pytest_timeout._get_item_settings(item).timeout
    except Exception:
        try:
            timeout = float(item.config.getini("timeout") or 0)
        except Exception:
            return None
    return timeout if timeout and timeout > 0 else None


class Watchdog:
    """One daemon thread: ``arm`` before a test, ``disarm`` after; a dump at most once
    per test, when it is still armed ``DUMP_MARGIN_S`` before the test's timeout."""

    def __init__(self, fd: int, write=None) -> None:
        self.fd = fd
        self.write = write or dump  # (fd, what): the dump
        self._cond = threading.Condition()
        self._due: float | None = None  # monotonic time of the dump
        self._what = ""
        self._thread: threading.Thread | None = None

    def arm(self, nodeid: str, timeout: float | None) -> None:
        if timeout is None:
            return
        margin = min(DUMP_MARGIN_S, timeout / 2)
        with self._cond:
            self._due = time.monotonic() + timeout - margin
            self._what = f"{nodeid} (timeout {timeout:g} s, dump {margin:g} s before it)"
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hangdump", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._due = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._due is None or time.monotonic() < self._due:
                    wait = None if self._due is None else self._due - time.monotonic()
                    self._cond.wait(wait)
                what, self._due = self._what, None
            with contextlib.suppress(Exception):
                self.write(self.fd, what)


def _write(fd: int, text: str) -> None:
    with contextlib.suppress(Exception):
        os.write(fd, text.encode("utf-8", "replace"))


def dump(fd: int, what: str) -> None:
    """Loops and tasks, threads, processes and sockets, to ``fd``; never raises."""
    _write(fd, f"\n===== hangdump: {what} still running at {time.strftime('%H:%M:%S')} "
               f"(pid {os.getpid()}) =====\n")
    for part in (_loops, _processes, _sockets):
        try:
            _write(fd, part())
        except Exception:
            _write(fd, f"hangdump: {part.__name__} failed:\n{traceback.format_exc()}")
    _write(fd, "----- threads -----\n")
    try:
        faulthandler.dump_traceback(fd, all_threads=True)
    except Exception:
        _write(fd, f"hangdump: threads failed:\n{traceback.format_exc()}")
    _write(fd, "===== hangdump end =====\n")


def _loops() -> str:
    out = io.StringIO()
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
    loops = [lp for lp in loops if not lp.is_closed()]
    out.write(f"----- asyncio: {len(loops)} open event loop(s) -----\n")
    for loop in loops:
        try:
            timers = sorted(h.when() for h in list(getattr(loop, "_scheduled", ()))
                            if not h.cancelled())
            nxt = f", next in {timers[0] - loop.time():.3f} s" if timers else ""
            out.write(f"loop {loop!r}: running={loop.is_running()}, "
                      f"{len(getattr(loop, '_ready', ()))} ready callback(s), "
                      f"{len(timers)} timer(s){nxt}\n")
            tasks = asyncio.all_tasks(loop)
        except Exception:
            out.write(f"loop {loop!r}: {traceback.format_exc()}")
            continue
        out.write(f"  {len(tasks)} unfinished task(s)\n")
        for task in sorted(tasks, key=lambda t: t.get_name()):
            try:
                out.write(f"  {task!r}\n")
                buf = io.StringIO()
                task.print_stack(file=buf)
                out.write("".join(f"    {line}\n" for line in buf.getvalue().splitlines()))
            except Exception:
                out.write(f"    (stack unreadable: {traceback.format_exc()})\n")
    return out.getvalue()


def _proc(pid: str) -> tuple[int, str, str]:
    """(parent pid, state, command line) of /proc/<pid>."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read().decode(errors="replace")
    fields = stat[stat.rindex(")") + 2:].split()
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return int(fields[1]), fields[0], cmd


def _processes() -> str:
    me = os.getpid()
    children, redis = [], []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            ppid, state, cmd = _proc(pid)
        except Exception:
            continue  # gone meanwhile
        line = f"  pid {pid} ppid {ppid} state {state}: {cmd[:300]}\n"
        if ppid == me:
            children.append(line)
        elif "redis-server" in cmd:
            redis.append(line)
    return (f"----- processes: {len(children)} child(ren) of pid {me} -----\n"
            + "".join(children)
            + f"----- other redis-server processes: {len(redis)} -----\n" + "".join(redis))


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
               "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
               "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def _sockets() -> str:
    """This process's TCP sockets: local and remote port, state, send and receive queues
    (a reply left unread shows as a receive queue that is not 0)."""
    inodes = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes[target[8:-1]] = fd
    lines = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[9] in inodes:
                tx, rx = (int(x, 16) for x in cols[4].split(":"))
                lines.append(f"  fd {inodes[cols[9]]}: port {int(cols[1].split(':')[1], 16)}"
                             f" → {int(cols[2].split(':')[1], 16)} "
                             f"{_TCP_STATES.get(cols[3], cols[3])} tx_queue {tx} rx_queue {rx}\n")
    return f"----- TCP sockets of this process: {len(lines)} -----\n" + "".join(sorted(lines))
