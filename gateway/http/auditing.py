"""The gateway's audit events (PROTOCOL.md §7): one per decision on a signed request, one
per refused unrouted request, one per feedback query that left unusable records out; each
appended to the hash chain off the event loop in group commits (audit/writer.py), and
the gateway fails closed (503, /readyz false) when an append fails: no decision without
its audit event.

An accepted decision's events are built before the store commit and written by it into
the audit outbox (gateway/http/outbox.py): :func:`accept_events` builds them,
:func:`chain_accepted` appends them after the commit. A refusal writes nothing to the
store: its event is appended directly (:func:`audit`).

[v1.1] ECS: :func:`http_facts` reads the request's TCP peer, TLS version, method, path and
the replica's name as plain values for the builders (audit/events.py never sees a
request)."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from audit import request_event
from audit.ecs import tls_version
from gateway.pipeline import errors as E
from gateway.pipeline.request import Context
from schemas.routes import SIGNED_ROUTES

from .appkeys import (
    AUDIT_EXECUTOR,
    AUDIT_WRITER,
    METRICS,
    OUTBOX_ACKS,
    READY,
    SETTINGS,
    STORE,
    WORKER,
)
from .conn import CONN
from .outbox import owners_to_recover, recover

log = logging.getLogger("fedgate.gateway")


async def emit_audit(app: web.Application, event: dict[str, Any]) -> bool:
    """Append one chained event off the event loop (in the next group commit). On failure
    the gateway stops taking signed requests (503) and /readyz turns 503: no decision
    without its audit event."""
    if AUDIT_WRITER not in app or not app[READY]["audit"]:
        return False
    try:
        await app[AUDIT_WRITER].write(event)
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


def decision_event(request: web.Request, ctx: Context, peer: str | None, action: str,
                   status: int, exc: E.GatewayError | None,
                   facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one audit event of a decision on a signed request (``facts``: the request's
    :func:`http_facts`, when the caller read them once for many decisions)."""
    return request_event(
        action=action, outcome="failure" if exc else "success",
        category=[exc.category if exc else "web"], status=status,
        request_id=ctx.request_id, reason=exc.error if exc else None,
        identity=ctx.identity, peer_sha256=peer, tenant_id=ctx.tenant_id, kid=ctx.kid,
        execution_fingerprint=ctx.execution_fingerprint, attestation_hash=ctx.attestation_hash,
        detail=exc.detail if exc else None, now=time.time(),
        **(facts if facts is not None else http_facts(request)),
    )


def skipped_event(request: web.Request, ctx: Context, peer: str | None,
                  status: int) -> dict[str, Any]:
    """Stored records a feedback answer left out (gateway/feedback/evidence.py): one event
    per query naming how many and the first few record ids (bounded)."""
    return request_event(
        action="feedback.records_skipped", outcome="failure", category=["database"],
        status=status, request_id=ctx.request_id, reason="stored_record_unusable",
        identity=ctx.identity, peer_sha256=peer, tenant_id=ctx.tenant_id, kid=ctx.kid,
        detail=ctx.skipped_records.summary(), now=time.time(), **http_facts(request))


async def audit(request: web.Request, ctx: Context, peer: str | None, action: str,
                status: int, exc: E.GatewayError | None) -> bool:
    """The one audit event of a decision, appended directly (a refusal)."""
    return await emit_audit(request.app,
                            decision_event(request, ctx, peer, action, status, exc))


async def audit_skipped(request: web.Request, ctx: Context, peer: str | None,
                        status: int) -> bool:
    """Stored records a feedback answer left out: counted by reason, and one event."""
    request.app[METRICS].records_skipped.update(ctx.skipped_records.counts)
    return await emit_audit(request.app, skipped_event(request, ctx, peer, status))


def accept_events(request: web.Request, ctx: Context, peer: str | None, action: str,
                  status: int, facts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """An accepted decision's events, for the store's audit outbox (built once every
    check passed, just before the commit): the decision, and the skipped records."""
    events = [decision_event(request, ctx, peer, action, status, None, facts)]
    if ctx.skipped_records:
        events.append(skipped_event(request, ctx, peer, status))
    return events


async def chain_accepted(app: web.Application, ctx: Context) -> bool:
    """Append an accepted commit's outbox events to the chain, then queue the entry's
    acknowledgement. If that fails the decision stands (its events are durably in the
    outbox and are chained at the next start), but the gateway turns not ready and
    refuses later signed requests (503 ``audit_unavailable``), as for any failed append."""
    outbox = ctx.outbox
    if ctx.skipped_records:
        app[METRICS].records_skipped.update(ctx.skipped_records.counts)
    if not app[READY]["audit"]:
        return False
    try:
        await app[AUDIT_WRITER].write_all(outbox.events)
    except Exception as exc:
        log.error("audit log append failed after an accepted commit (request %s): its "
                  "events stay in the store's audit outbox and are chained at the next "
                  "start; refusing signed requests until restart: %s", ctx.request_id, exc)
        app[READY]["audit"] = False
        return False
    if outbox.ref is not None:
        app[OUTBOX_ACKS].add(outbox.ref)
    return True


async def chain_decisions(app: web.Application,
                          decisions: list[tuple[Context, list[dict[str, Any]] | None]]
                          ) -> list[bool]:
    """Many decisions' events in one group commit, in order (the batch route): for each
    ``(ctx, events)``, ``events`` None means an accepted commit's outbox events
    (``ctx.outbox``: acknowledged once chained, as :func:`chain_accepted`), else a
    refusal's events (appended directly, as :func:`audit`). → per decision, whether all
    its events are in the chain; a failure turns the gateway not ready, as theirs do."""
    if AUDIT_WRITER not in app or not app[READY]["audit"]:
        return [False] * len(decisions)
    flat: list[dict[str, Any]] = []
    for ctx, events in decisions:
        flat += ctx.outbox.events if events is None else events
    results = iter(await app[AUDIT_WRITER].write_each(flat))
    out = []
    for ctx, events in decisions:
        mine = [next(results) for _ in (ctx.outbox.events if events is None else events)]
        failed = next((r for r in mine if isinstance(r, Exception)), None)
        if events is None and ctx.skipped_records:
            app[METRICS].records_skipped.update(ctx.skipped_records.counts)
        if failed is None:
            if events is None and ctx.outbox.ref is not None:
                app[OUTBOX_ACKS].add(ctx.outbox.ref)
        elif app[READY]["audit"]:  # logged once: the rest are refused as not ready
            log.error("audit log append failed (request %s)%s; refusing signed requests "
                      "until restart: %s", ctx.request_id,
                      ": its events stay in the store's audit outbox and are chained at "
                      "the next start" if events is None else "", failed)
            app[READY]["audit"] = False
        out.append(failed is None)
    return out


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


async def recover_outbox(app: web.Application) -> None:
    """Start-up recovery of the audit outbox (gateway/http/outbox.py): one line when
    there was anything; a failure stops the start (fail closed)."""
    index, workers = app[WORKER]
    node = app[SETTINGS].server.node_name
    pending = await app[STORE].outbox_owners(node) if index == (1 if workers > 1 else 0) \
        else set()
    owners = owners_to_recover(node, index, workers, pending)
    appended, present = await recover(app[STORE], app[AUDIT_WRITER], app[SETTINGS].audit_path,
                                      owners, app[AUDIT_EXECUTOR])
    if appended or present:
        log.warning("audit outbox of %s: %d event(s) chained at start-up, %d already in "
                    "the chain", ", ".join(owners), appended, present)
