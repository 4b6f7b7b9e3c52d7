"""The admin listener (PROTOCOL.md §8 v1.1, issue 8.4): plain HTTP, no client
certificate, for orchestrator probes and Prometheus.

``GET /healthz`` (the process answers), ``GET /readyz`` (200 only when **every** worker is
ready: store reachable, keys loaded, self-test passed, audit log usable), ``GET /metrics``
(every worker together, gateway/http/metrics.py). Nothing else: no signed route, no key
material, pins or tenant data. Off unless ``[admin] port`` is set; ``[admin] host``
defaults to 127.0.0.1 and any other, non-loopback, host is allowed with one start-up
warning. With ``--workers N`` it runs in the supervisor (which asks each worker for its
readiness over their control socket, gateway/http/workers.py); in one-process mode it runs
beside the gateway in the same event loop.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from gateway.config.settings import GatewaySettings

from .listen import bind_listeners, is_loopback
from .metrics import CONTENT_TYPE

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
ADMIN_BACKLOG = 64
READINESS = web.AppKey("readiness", object)
REGISTRY = web.AppKey("registry", CollectorRegistry)


def bind_admin(settings: GatewaySettings) -> list[socket.socket]:
    """The admin sockets (none without ``[admin] port``), bound at start-up like the
    gateway's, so a port in use is the same one line; warns on a non-loopback host."""
    admin = settings.admin
    if admin.port is None:
        return []
    socks = bind_listeners(admin.host, admin.port, ADMIN_BACKLOG)
    if not is_loopback(admin.host):
        print(f"fedgate: warning: {settings.path}: admin.host {admin.host!r} is not a "
              "loopback address: /healthz, /readyz and /metrics are served there over plain "
              "HTTP to anyone who can reach it", file=sys.stderr, flush=True)
    return socks


def make_admin_app(readiness: Readiness, registry: CollectorRegistry) -> web.Application:
    app = web.Application(client_max_size=1024)
    app[READINESS], app[REGISTRY] = readiness, registry
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.on_response_prepare.append(_headers)
    return app


async def start_admin(socks: list[socket.socket], readiness: Readiness,
                      registry: CollectorRegistry) -> web.AppRunner | None:
    """Serve the admin app on ``socks``; stop it with ``await runner.cleanup()``."""
    if not socks:
        return None
    runner = web.AppRunner(make_admin_app(readiness, registry), access_log=None,
                           handle_signals=False)
    await runner.setup()
    for sock in socks:
        await web.SockSite(runner, sock).start()
    host, port = socks[0].getsockname()[:2]
    print(f"fedgate: admin listener http://{host}:{port} (/healthz /readyz /metrics)",
          file=sys.stderr, flush=True)
    return runner


def _json(body: Any, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"}, 200)


async def _readyz(request: web.Request) -> web.Response:
    ready, detail = await request.app[READINESS]()
    return _json({"status": "ready" if ready else "not_ready", **detail},
                 200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY]),
                        headers={"Content-Type": CONTENT_TYPE})


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "fedgate"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
