"""The gateway's audit events (PROTOCOL.md §7): one per decision on a signed request, one
per refused unrouted request, one per feedback query that left unusable records out; each
appended to the hash chain off the event loop, and the gateway fails closed (503, /readyz
false) when an append fails: no decision without its audit event."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from audit import request_event
from gateway.pipeline import errors as E
from gateway.pipeline.request import Context
from schemas.routes import SIGNED_ROUTES

from .appkeys import AUDIT, AUDIT_EXECUTOR, METRICS, READY

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


async def audit(app: web.Application, ctx: Context, peer: str | None, action: str,
                status: int, exc: E.GatewayError | None) -> bool:
    """The one audit event of a decision on a signed request."""
    return await emit_audit(app, request_event(
        action=action, outcome="failure" if exc else "success",
        category=[exc.category if exc else "web"], status=status,
        request_id=ctx.request_id, reason=exc.error if exc else None,
        identity=ctx.identity, peer_sha256=peer, tenant_id=ctx.tenant_id, kid=ctx.kid,
        execution_fingerprint=ctx.execution_fingerprint, attestation_hash=ctx.attestation_hash,
        detail=exc.detail if exc else None, now=time.time(),
    ))


async def audit_skipped(app: web.Application, ctx: Context, peer: str | None,
                        status: int) -> bool:
    """Stored records a feedback answer left out (gateway/feedback/evidence.py): counted by reason,
    and one event per query naming how many and the first few record ids (bounded)."""
    report = ctx.skipped_records
    app[METRICS].records_skipped.update(report.counts)
    return await emit_audit(app, request_event(
        action="feedback.records_skipped", outcome="failure", category=["database"],
        status=status, request_id=ctx.request_id, reason="stored_record_unusable",
        identity=ctx.identity, peer_sha256=peer, tenant_id=ctx.tenant_id, kid=ctx.kid,
        detail=report.summary(), now=time.time()))


async def audit_unrouted(request: web.Request, request_id: str, status: int,
                         code: str) -> None:
    """A request for no route (scans, probes) or an unexpected failure: one event too."""
    route = SIGNED_ROUTES.get(request.path)
    request.app[METRICS].count(route.kind if route else "none", status, code)
    await emit_audit(request.app, request_event(
        action=f"{route.kind if route else 'http'}.rejected", outcome="failure",
        category=["web"], status=status, request_id=request_id, reason=code,
        detail=f"{request.method} {request.path[:200]}", now=time.time()))
