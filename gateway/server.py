"""Run the gateway: TLS context, listening socket, worker processes, signals.

``serve`` runs one process; ``serve_workers`` starts N processes that each bind the same
port with ``SO_REUSEPORT`` (the kernel spreads connections) and share one store. The
parent only supervises: SIGTERM/SIGINT reach every worker, and if one worker dies the
others are stopped too (fail closed, let the supervisor restart the whole service).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from . import logs
from .app import METRICS, make_app
from .conn import GUARD, ConnectionGuard, fit_limits, raise_fd_limit
from .http_errors import handler_factory
from .settings import GatewaySettings, load_keys, load_settings
from .tls import server_context

log = logs.get_logger("fedgate.server")


class GuardedSite(web.BaseSite):
    """A TCP listener whose every accepted socket goes through the ``ConnectionGuard``
    (which does the TLS itself, so it sees sockets before their handshake)."""

    __slots__ = ("_host", "_port", "_reuse_port", "_guard", "_handler_args")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 ssl_context, guard: ConnectionGuard, reuse_port: bool,
                 handler_args: dict | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=guard.limits.backlog)
        self._host, self._port, self._reuse_port, self._guard = host, port, reuse_port, guard
        self._handler_args = handler_args or {}

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        handlers = handler_factory(self._runner.server, self._runner.app,
                                   **self._handler_args)  # aiohttp's 400s as fedgate's
        factory = self._guard.protocol_factory(handlers, self._ssl_context)
        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port)
        self._guard.start()


async def start_gateway(config: Path | GatewaySettings, *, clock=time.time, echo: bool = True,
                        reuse_port: bool = False, access_log: bool = False) -> web.AppRunner:
    """Load keys, build the TLS context and the app, run start-up, listen. The caller
    stops it with ``await runner.cleanup()`` (used by serve, the demo and the tests).
    ``access_log``: one ``fedgate.access`` line per HTTP request (gateway/logs.py)."""
    settings = config if isinstance(config, GatewaySettings) else load_settings(config)
    keys = load_keys(settings)
    ssl_ctx = server_context(settings.server.tls_cert, settings.server.tls_key,
                             settings.server.client_ca)
    limits = fit_limits(settings.server, raise_fd_limit())
    app = make_app(settings, keys, clock=clock, echo=echo)
    app[GUARD] = guard = ConnectionGuard(limits, app[METRICS])
    app.on_cleanup.append(guard.close)
    access = dict(access_log=logging.getLogger(logs.ACCESS_LOGGER),
                  access_log_class=logs.AccessLogger) if access_log else dict(access_log=None)
    handler_args = dict(**access, keepalive_timeout=limits.idle_timeout_s + 1)  # guard's first
    runner = web.AppRunner(app, handle_signals=False, **handler_args)
    await runner.setup()  # runs cleanup_ctx start-up: self-test, store, audit
    site = GuardedSite(runner, settings.server.host, settings.server.port,
                       ssl_context=ssl_ctx, guard=guard, reuse_port=reuse_port,
                       handler_args=handler_args)
    await site.start()
    return runner


async def _run(settings: GatewaySettings, *, reuse_port: bool, ready=None,
               access_log: bool = False) -> None:
    runner = await start_gateway(settings, reuse_port=reuse_port, access_log=access_log)
    log.info(f"serving https://{settings.server.host}:{settings.server.port}",
             store=settings.store_url.split("://")[0], access_log=access_log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
        log.info("stopped")


def warn_if_no_policy(settings: GatewaySettings) -> None:
    """One start-up line when no rules are configured: every feedback answer is empty."""
    if settings.policy_rules is None:
        log.warning(f"{settings.path}: no [policy] rules configured: every feedback answer "
                    "will carry no adjustments")


def load_and_log(config: Path, log_overrides: Mapping | None) -> GatewaySettings:
    """The settings, and this process's logging set up from ``[log]`` + the flags."""
    settings = load_settings(config)
    logs.configure(settings.log.merged(log_overrides),
                   secrets=logs.url_secrets(settings.store_url))
    return settings


def serve(config: Path, *, reuse_port: bool = False, ready=None, warn: bool = True,
          log_overrides: Mapping | None = None) -> None:
    settings = load_and_log(config, log_overrides)
    if warn:
        warn_if_no_policy(settings)
    asyncio.run(_run(settings, reuse_port=reuse_port, ready=ready,
                     access_log=settings.log.merged(log_overrides).access))


def _worker(config: str, ready, log_overrides: Mapping | None = None) -> None:
    serve(Path(config), reuse_port=True, ready=ready, warn=False,  # the parent warned
          log_overrides=log_overrides)


def serve_workers(config: Path, workers: int, *, log_overrides: Mapping | None = None) -> int:
    """N worker processes on one port; returns the exit code."""
    # fail fast, once, with the config error (or the warning) on this terminal
    warn_if_no_policy(load_and_log(config, log_overrides))
    ctx = multiprocessing.get_context("spawn")
    events = [ctx.Event() for _ in range(workers)]
    procs = [ctx.Process(target=_worker, args=(str(config), ev, dict(log_overrides or {})),
                         name=f"fedgate-worker-{i}")
             for i, ev in enumerate(events)]
    for proc in procs:
        proc.start()

    def stop_all(*_: object) -> None:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    code = 0
    try:
        while procs:
            for proc in list(procs):
                proc.join(timeout=0.2)
                if proc.exitcode is not None:
                    procs.remove(proc)
                    if proc.exitcode not in (0, -signal.SIGTERM):
                        code = 1
                        stop_all()
    finally:
        stop_all()
    return code
