"""Run the gateway in one process: TLS context, listening socket, signals.

``serve`` binds the port first (gateway/listen.py: one line if it is in use) and then
starts the gateway on it; ``fedgate serve --workers N`` is gateway/workers.py (one
supervisor binds, N workers accept on the same socket).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from common.tls import server_context
from gateway import logs
from gateway.config.settings import GatewaySettings, load_keys, load_settings

from .admin import bind_admin, start_admin
from .app import make_app
from .appkeys import DRAINING, HANDSHAKES, METRICS, SETTINGS
from .conn import GUARD, ConnectionGuard, fit_limits, raise_fd_limit
from .http_errors import handler_factory
from .listen import bind_listeners
from .probes import readiness
from .reload import SighupLatch, reload_trust

log = logs.get_logger("fedgate.server")

DRAIN_TICK_S = 0.05
FINAL_GRACE_S = 1.0  # aiohttp's own wait for a request still running after the deadline


class GuardedSite(web.BaseSite):
    """A TCP listener on an already bound socket whose every accepted socket goes through
    the ``ConnectionGuard`` (which does the TLS itself, so it sees sockets before their
    handshake)."""

    __slots__ = ("_sock", "_guard", "_name", "_handler_args")

    def __init__(self, runner: web.AppRunner, sock: socket.socket, *,
                 ssl_context, guard: ConnectionGuard, handler_args: dict | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=guard.limits.backlog)
        self._sock, self._guard = sock, guard
        self._handler_args = handler_args or {}
        host, port = sock.getsockname()[:2]
        self._name = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        handlers = handler_factory(self._runner.server, self._runner.app,
                                   **self._handler_args)  # aiohttp's 400s as fedgate's
        factory = self._guard.protocol_factory(handlers, self._ssl_context)
        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, backlog=self._backlog)


async def start_gateway(config: Path | GatewaySettings, *, clock=time.time, echo: bool = True,
                        socks: list[socket.socket] | None = None,
                        access_log: bool = False,
                        worker: tuple[int, int] = (0, 1)) -> web.AppRunner:
    """Load keys, build the TLS context and the app, run start-up, listen on ``socks``
    (bound by the caller: ``serve`` and the workers' supervisor) or on sockets bound here
    (the demo, the tests). The caller stops it with ``await runner.cleanup()``.
    ``access_log``: one ``fedgate.access`` line per HTTP request (gateway/logs.py).
    ``worker``: (index, count), see ``make_app`` (the audit outbox's owner)."""
    settings = config if isinstance(config, GatewaySettings) else load_settings(config)
    keys = load_keys(settings)
    ssl_ctx = server_context(settings.server.tls_cert, settings.server.tls_key,
                             settings.server.client_ca)
    limits = fit_limits(settings.server, raise_fd_limit())
    if socks is None:
        socks = bind_listeners(settings.server.host, settings.server.port, limits.backlog)
    app = make_app(settings, keys, clock=clock, echo=echo, worker=worker)
    app[GUARD] = guard = ConnectionGuard(limits, app[METRICS], app[HANDSHAKES])
    app.on_cleanup.append(guard.close)
    access = dict(access_log=logging.getLogger(logs.ACCESS_LOGGER),
                  access_log_class=logs.AccessLogger) if access_log else dict(access_log=None)
    handler_args = dict(**access, keepalive_timeout=limits.idle_timeout_s + 1)  # guard's first
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=FINAL_GRACE_S,
                           **handler_args)
    try:
        await runner.setup()  # runs cleanup_ctx start-up: self-test, store, audit
        for sock in socks:
            await GuardedSite(runner, sock, ssl_context=ssl_ctx, guard=guard,
                              handler_args=handler_args).start()
    except BaseException:
        for sock in socks:
            sock.close()
        await runner.cleanup()
        raise
    guard.start()
    return runner


async def stop_gateway(runner: web.AppRunner) -> None:
    """Graceful stop (SIGTERM; docs/OPERATIONS.md "Stopping"): stop listening at once,
    close idle keep-alive connections, let requests in progress (body still arriving,
    or being decided) finish within
    ``[server] shutdown_timeout_s``, then ``runner.cleanup()``: a request still running
    is cancelled, but a decision already under way (store commit + its audit event) is
    finished first (gateway/http/app.py ``decide``), then the audit log and the store close.
    """
    app = runner.app
    guard: ConnectionGuard = app[GUARD]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + app[SETTINGS].server.shutdown_timeout_s
    for site in list(runner.sites):
        await site.stop()  # the listening socket closes: new connections are refused
    app[DRAINING] = True  # every later response says Connection: close
    busy = guard.busy()
    log.info("draining", in_progress=busy)
    while True:
        guard.close_unused()  # a busy connection closes after its answer (DRAINING)
        busy = guard.busy()
        if busy == 0 or loop.time() >= deadline:
            break
        await asyncio.sleep(DRAIN_TICK_S)
    if busy:
        log.warning("shutdown_timeout_s reached: cancelling the requests still in progress",
                    in_progress=busy)
    await runner.cleanup()


async def _run(settings: GatewaySettings, socks: list[socket.socket],
               admin_socks: list[socket.socket], *, access_log: bool = False,
               hup: SighupLatch | None = None) -> None:
    try:
        runner = await start_gateway(settings, socks=socks, access_log=access_log)
    except BaseException:
        for sock in admin_socks:
            sock.close()
        raise
    app = runner.app
    log.info(f"serving https://{settings.server.host}:{settings.server.port}",
             store=settings.store_url.split("://")[0], access_log=access_log)
    admin = await start_admin(admin_socks, lambda: _checks(app), app[METRICS].exposition)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if hup is not None:  # SIGHUP: keyring, identities, pins, operator map (reload.py)
        hup.attach(loop, lambda: reload_trust(app))
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        if admin is not None:
            await admin.cleanup()
        await stop_gateway(runner)
        log.info("stopped")


async def _checks(app: web.Application) -> tuple[bool, dict]:
    ready, checks = await readiness(app)
    return ready, {"checks": checks}


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


def bind_ports(settings: GatewaySettings) -> tuple[list[socket.socket], list[socket.socket]]:
    """Bind the mTLS port and the [admin] port once, before anything else starts (a port
    in use is one line), then say so if no policy is configured."""
    limits = fit_limits(settings.server, raise_fd_limit())
    socks = bind_listeners(settings.server.host, settings.server.port, limits.backlog)
    try:
        admin_socks = bind_admin(settings)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    warn_if_no_policy(settings)
    return socks, admin_socks


def serve(config: Path, *, log_overrides: Mapping | None = None) -> None:
    """``fedgate serve`` in one process."""
    hup = SighupLatch()  # a SIGHUP while starting is kept for later, never fatal
    settings = load_and_log(config, log_overrides)
    socks, admin_socks = bind_ports(settings)
    asyncio.run(_run(settings, socks, admin_socks,
                     access_log=settings.log.merged(log_overrides).access, hup=hup))
