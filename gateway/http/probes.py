"""``/healthz``, ``/readyz`` and ``/metrics`` (PROTOCOL.md §5): no signature, no key
material, pins or tenant data; served on the mTLS listener and, through ``readiness`` and
the metrics exposition, on the plain-HTTP admin listener (gateway/http/admin.py)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .appkeys import KEYS, METRICS, READY, STORE
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE


def json_response(body: Any, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def handle_healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"}, 200)


async def readiness(app: web.Application) -> tuple[bool, dict[str, bool]]:
    """(ready, checks) of this process's gateway: /readyz here and on the admin listener."""
    store_ok = STORE in app and await app[STORE].ping()
    checks = {"store": store_ok, "keys": bool(app[KEYS][0]),
              "self_test": app[READY]["self_test"], "audit": app[READY]["audit"]}
    return all(checks.values()), checks


async def handle_readyz(request: web.Request) -> web.Response:
    ready, checks = await readiness(request.app)
    return json_response({"status": "ready" if ready else "not_ready", "checks": checks},
                         200 if ready else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": METRICS_CONTENT_TYPE,
                                 "X-Content-Type-Options": "nosniff"})
