"""The gateway's audit events (PROTOCOL.md §7): one per decision on a signed request, one
per refused unrouted request, one per feedback query that left unusable records out; each
appended to the hash chain off the event loop, and the gateway fails closed (503, /readyz
false) when an append fails: no decision without its audit event.

[v1.1] ECS: :func:`http_facts` reads the request's TCP peer, TLS version, method, path and
the replica's name as plain values for the builders (audit/events.py never sees a
request)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from audit import request_event
from audit.ecs import tls_version
from gateway.pipeline import errors as E
from gateway.pipeline.request import Context
from schemas.routes import SIGNED_ROUTES

from .appkeys import AUDIT, AUDIT_EXECUTOR, METRICS, READY, SETTINGS
from .conn import CONN

log = logging.getLogger("fedgate.gateway")


async def emit_audit(app: web.Application, event: dict[str, Any]) -> bool:
    """Append one chained event off the event loop. On failure the gateway stops taking
    signed requests (503) and /readyz turns 503: no decision without its audit event."""
    if AUDIT not in app or not app[READY]["audit"]:
        return False
    try:
        await asyncio.get_running_loop().run_in_executor(
            app[AUDIT_EXECUTOR], app[AUDIT].emit, event)
    except Exception:
        log.exception("audit log append failed; refusing signed requests until restart")
        app[READY]["audit"] = False
        return False
    return True


def connection_facts(app: web.Application, conn: Any, transport: Any) -> dict[str, Any]:
    """``source_ip``, ``source_port``, ``tls_version`` and ``node`` for a builder: from the
    connection guard's ``Conn`` (kept after the socket closed), else from the transport."""
    peer, version = (conn.peer, conn.tls_version) if conn is not None else (None, None)
    if conn is None and transport is not None:
        peer = transport.get_extra_info("peername")
        sslobj = transport.get_extra_info("ssl_object")
        version = sslobj.version() if sslobj is not None else None
    ip, port = peer[:2] if isinstance(peer, tuple) and len(peer) >= 2 else (None, None)
    return {"source_ip": ip, "source_port": port, "tls_version": tls_version(version),
            "node": app[SETTINGS].server.node_name or None}


def http_facts(request: web.BaseRequest) -> dict[str, Any]:
    """:func:`connection_facts` plus the request line (``method``, encoded ``path``)."""
    return {**connection_facts(request.app, request.get(CONN), request.transport),
            "method": request.method, "path": request.rel_url.raw_path}


async def audit(request: web.Request, ctx: Context, peer: str | None, action: str,
                status: int, exc: E.GatewayError | None) -> bool:
    """The one audit event of a decision on a signed request."""
    app = request.app
    return await emit_audit(app, request_event(
        action=action, outcome="failure" if exc else "success",
        category=[exc.category if exc else "web"], status=status,
        request_id=ctx.request_id, reason=exc.error if exc else None,
        identity=ctx.identity, peer_sha256=peer, tenant_id=ctx.tenant_id, kid=ctx.kid,
        execution_fingerprint=ctx.execution_fingerprint, attestation_hash=ctx.attestation_hash,
        detail=exc.detail if exc else None, now=time.time(), **http_facts(request),
    ))


async def audit_skipped(request: web.Request, ctx: Context, peer: str | None,
                        status: int) -> bool:
    """Stored records a feedback answer left out (gateway/feedback/evidence.py): counted by reason,
    and one event per query naming how many and the first few record ids (bounded)."""
    app, report = request.app, ctx.skipped_records
    app[METRICS].records_skipped.update(report.counts)
    return await emit_audit(app, request_event(
        action="feedback.records_skipped", outcome="failure", category=["database"],
        status=status, request_id=ctx.request_id, reason="stored_record_unusable",
        identity=ctx.identity, peer_sha256=peer, tenant_id=ctx.tenant_id, kid=ctx.kid,
        detail=report.summary(), now=time.time(), **http_facts(request)))


async def audit_unrouted(request: web.Request, request_id: str, status: int,
                         code: str) -> None:
    """A request for no route (scans, probes) or an unexpected failure: one event too."""
    route = SIGNED_ROUTES.get(request.path)
    request.app[METRICS].count(route.kind if route else "none", status, code)
    await emit_audit(request.app, request_event(
        action=f"{route.kind if route else 'http'}.rejected", outcome="failure",
        category=["web"], status=status, request_id=request_id, reason=code,
        detail=f"{request.method} {request.path[:200]}", now=time.time(),
        **http_facts(request)))
