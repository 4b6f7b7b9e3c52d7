"""``fedgate serve --workers N``: one supervisor, N worker processes, one listening socket.

The supervisor (issue 8.2) checks the config and keys, **binds the port once** (no
``SO_REUSEPORT``: a second gateway on the port stops with one line) and hands the bound
socket to N spawned workers, which all accept on it. Each worker also gets one end of a
control socket pair: the supervisor asks it for its readiness there (the admin
listener's ``/readyz``, gateway/http/admin.py), and the worker stops when the supervisor's end
closes. Workers never outlive the supervisor: on Linux the kernel sends them SIGTERM when
it dies (``PR_SET_PDEATHSIG``), and everywhere the end of the control socket stops them.

Metrics (issue 8.3): the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a private
temporary directory (removed when it exits) before spawning; see gateway/http/metrics.py.

SIGTERM/SIGINT to the supervisor stop every worker; SIGHUP is forwarded to every worker,
which reloads keyring, identities, pins and operator map itself (gateway/http/reload.py).
A worker that exits on its own is named with its exit status (``fedgate: worker 2 (pid N)
exited with status 3`` / ``killed by SIGKILL``), the others are stopped, and the
supervisor exits non-zero (fail closed: let the service manager restart the whole
service).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from gateway.config.server_config import SHUTDOWN_TIMEOUT_MAX_S
from gateway.config.settings import GatewaySettings, load_keys
from gateway.selftest import run_startup

from .admin import start_admin
from .metrics import MULTIPROC_ENV, PROCESSES_FILE, exposition

PR_SET_PDEATHSIG = 1
# SIGTERM'd workers get this long to finish before SIGKILL: their drain
# ([server] shutdown_timeout_s, at most SHUTDOWN_TIMEOUT_MAX_S) plus closing the store
STOP_GRACE_S = 30.0
assert STOP_GRACE_S >= SHUTDOWN_TIMEOUT_MAX_S + 10, "the drain must fit in the grace"
ASK_TIMEOUT_S = 2.0  # a worker that does not say it is ready within this is not


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the control socket's end still stops the worker
    if os.getppid() != parent:
        os._exit(1)


def _worker(config: str, socks: list[socket.socket], control: socket.socket, index: int,
            parent: int, log_overrides: Mapping | None = None, workers: int = 1) -> None:
    """A worker process's entry point (spawned: a fresh interpreter)."""
    from .reload import SighupLatch

    hup = SighupLatch()  # first: a SIGHUP forwarded while starting is kept, never fatal
    die_with_parent(parent)
    from gateway.exits import one_line  # the CLI's own one-line error reporting

    from .server import load_and_log

    try:
        settings = load_and_log(Path(config), log_overrides)
        asyncio.run(_serve(settings, socks, control, index, workers,
                           access_log=settings.log.merged(log_overrides).access, hup=hup))
    except Exception as exc:
        reported = one_line(exc)
        if reported is None:
            raise
        code, line = reported
        print(line.replace("fedgate: ", f"fedgate: worker {index}: ", 1), file=sys.stderr,
              flush=True)
        sys.exit(code)


async def _serve(settings: GatewaySettings, socks: list[socket.socket],
                 control: socket.socket, index: int, workers: int, *,
                 access_log: bool = False, hup=None) -> None:
    from .probes import readiness
    from .reload import reload_trust
    from .server import start_gateway, stop_gateway

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader, writer = await asyncio.open_connection(sock=control)
    apps: list = []

    async def answer_supervisor() -> None:
        """Readiness questions until the supervisor's end closes (then stop)."""
        while line := await reader.readline():
            ready, checks = (await readiness(apps[0]) if apps
                             else (False, {"started": False}))
            writer.write(json.dumps({"id": line.decode().strip(), "ready": ready,
                                     "checks": checks}).encode() + b"\n")
            await writer.drain()
        stop.set()

    watch = asyncio.create_task(answer_supervisor())
    runner = await start_gateway(settings, socks=socks, access_log=access_log,
                                 worker=(index, workers))  # names its audit outbox
    apps.append(runner.app)
    if hup is not None:  # SIGHUP (forwarded by the supervisor): reload.py
        hup.attach(loop, lambda: reload_trust(runner.app))
    print(f"fedgate: worker {index} (pid {os.getpid()}) serving "
          f"https://{settings.server.host}:{settings.server.port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        watch.cancel()
        await stop_gateway(runner)


def describe_exit(index: int, proc: multiprocessing.process.BaseProcess) -> str:
    code = proc.exitcode
    how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
           else f"exited with status {code}")
    return f"fedgate: worker {index} (pid {proc.pid}) {how}"


def serve_workers(config: Path, workers: int, *, log_overrides: Mapping | None = None) -> int:
    """N worker processes on one socket; returns the exit code."""
    from .reload import SighupLatch
    from .server import bind_ports, load_and_log

    hup = SighupLatch()  # a SIGHUP while starting is forwarded once the workers run
    settings = load_and_log(config, log_overrides)  # fail fast, once, on this terminal
    _, signer = load_keys(settings)
    try:  # a missing, locked or wrong token: one line here, before any worker starts
        run_startup(signer)
    finally:
        signer.close()  # each worker opens its own session (one per process)
    socks, admin_socks = bind_ports(settings)
    # every worker records its metrics here; any scrape sums them (gateway/http/metrics.py)
    with tempfile.TemporaryDirectory(prefix="fedgate-metrics-") as metrics_dir:
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned workers
        try:
            return asyncio.run(Supervisor(settings, workers, Path(metrics_dir),
                                          dict(log_overrides or {}), hup=hup
                                          ).run(socks, admin_socks))
        finally:
            os.environ.pop(MULTIPROC_ENV, None)


class Supervisor:
    def __init__(self, settings: GatewaySettings, workers: int, metrics_dir: Path,
                 log_overrides: Mapping | None = None, hup=None) -> None:
        self.hup = hup  # SIGHUP: forwarded to every worker (forward_hup)
        self.settings, self.n, self.metrics_dir = settings, workers, metrics_dir
        self.log_overrides = dict(log_overrides or {})
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self.channels: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.locks: dict[int, asyncio.Lock] = {}
        self.stopping, self.code, self.asked = False, 0, 0
        self.done = asyncio.Event()

    async def run(self, socks: list[socket.socket], admin_socks: list[socket.socket]) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        ctx = multiprocessing.get_context("spawn")
        try:
            for index in range(1, self.n + 1):
                if self.stopping:
                    break
                ours, theirs = socket.socketpair()
                proc = ctx.Process(target=_worker, name=f"fedgate-worker-{index}",
                                   args=(str(self.settings.path), socks, theirs, index,
                                         os.getpid(), self.log_overrides, self.n))
                proc.start()
                theirs.close()
                self.procs[index] = proc
                self.channels[index] = await asyncio.open_connection(sock=ours)
                loop.add_reader(proc.sentinel, self.exited, index)
        finally:
            for sock in socks:  # the workers hold it now; the port dies with the last one
                sock.close()
        self.write_processes()
        if self.hup is not None:
            self.hup.attach(loop, self.forward_hup)
        if self.stopping:  # a signal while spawning: stop the late ones too
            self.stopping = False
            self.stop()
        admin = await start_admin(admin_socks, self.readiness,
                                  exposition(self.metrics_dir, processes=self.processes))
        try:
            await self.done.wait()
        finally:
            if admin is not None:
                await admin.cleanup()
            for _, writer in self.channels.values():
                writer.close()
        return self.code

    async def readiness(self) -> tuple[bool, dict]:
        """Every worker's own readiness, asked over its control socket (admin /readyz)."""
        names = sorted(self.procs)
        answers = await asyncio.gather(*(self.ask(i) for i in names))
        ready = (not self.stopping and len(answers) == self.n
                 and all(a["ready"] for a in answers))
        return ready, {"workers": {f"worker-{i}": a for i, a in zip(names, answers,
                                                                    strict=True)}}

    async def ask(self, index: int) -> dict:
        reader, writer = self.channels[index]
        async with self.locks.setdefault(index, asyncio.Lock()):
            self.asked += 1
            question = str(self.asked)
            try:
                writer.write(question.encode() + b"\n")
                async with asyncio.timeout(ASK_TIMEOUT_S):
                    while line := await reader.readline():
                        answer = json.loads(line)
                        if answer.get("id") == question:  # not a late answer to an old one
                            return {"ready": bool(answer["ready"]), "checks": answer["checks"]}
            except (OSError, TimeoutError, ValueError, KeyError):
                pass
            return {"ready": False, "checks": {"answering": False}}

    def processes(self) -> dict[str, int]:
        """The processes whose ``process_*`` metrics are shown, by name."""
        return {"supervisor": os.getpid(),
                **{f"worker-{i}": p.pid for i, p in self.procs.items() if p.is_alive()}}

    def write_processes(self) -> None:
        path = self.metrics_dir / PROCESSES_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.processes()), encoding="utf-8")
        tmp.replace(path)

    def forward_hup(self) -> None:
        """SIGHUP to every live worker: each reloads (and logs) for itself."""
        for proc in self.alive():
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGHUP)

    def alive(self) -> list[multiprocessing.process.BaseProcess]:
        return [proc for proc in self.procs.values() if proc.is_alive()]

    def exited(self, index: int) -> None:
        proc = self.procs[index]
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join()
        mark_process_dead(proc.pid, str(self.metrics_dir))  # its live gauges go
        self.write_processes()
        if not self.stopping or proc.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
            print(describe_exit(index, proc), file=sys.stderr, flush=True)
            self.code = 1
        self.stop()

    def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after STOP_GRACE_S)."""
        if not self.stopping:
            self.stopping = True
            for proc in self.alive():
                proc.terminate()
            asyncio.get_running_loop().call_later(STOP_GRACE_S, self.kill_rest)
        if not self.alive():
            self.done.set()

    def kill_rest(self) -> None:
        for proc in self.alive():
            proc.kill()
