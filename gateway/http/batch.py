"""``POST /internal/v1/telemetry/batch`` → 200 (PROTOCOL.md §5, v1.1; docs/PROTOCOL.md).

Checks 2-3 (content type, size against ``max_batch_bytes``, identity) run once for the
whole request, then the strict envelope (gateway/pipeline/batch.py): a failure there is
the usual error body and status for the whole request, nothing stored, one audit event
(``telemetry_batch.rejected``). Otherwise every item is decided on its own, exactly as a
single ``POST /internal/v1/telemetry`` would be, and gets one audit event of its own
(``telemetry.accepted`` / ``telemetry.rejected``, in item order); the answer lists the
items' results in order. Served unless ``[server] batch_route = false`` (then 404, and
emitters fall back to single requests).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from gateway.pipeline import errors as E
from gateway.pipeline.batch import ItemOutcome, parse_envelope, run_batch
from gateway.pipeline.pipeline import check_head
from gateway.pipeline.request import AuditOutbox, Context

from .appkeys import (
    CLOCK,
    METRICS,
    OWNER,
    PIPELINE,
    REQUEST_ID,
    SETTINGS,
)
from .auditing import accept_events, audit, chain_decisions, decision_event, http_facts
from .conn import CONN, GUARD, peer_pins
from .intake import audit_down, note_store, read_body, respond, shielded, start_body
from .probes import json_response

KIND = "telemetry_batch"  # the route label of fedgate_requests_total, the audit prefix


async def handle_batch(request: web.Request) -> web.Response:
    return await shielded(request, decide_batch)  # as app.handle_signed


async def decide_batch(request: web.Request) -> web.Response:
    app = request.app
    ctx = Context(request[REQUEST_ID])
    if (refused := audit_down(app, ctx)) is not None:
        return refused
    peer, peer_spki = peer_pins(request)  # once per connection
    settings = app[SETTINGS]
    trust = app[PIPELINE].trust  # read once: a SIGHUP or a revocation swaps it whole
    security, server = trust.config, settings.server
    started, body_in = time.perf_counter(), False
    try:
        ctx.identity = check_head(security, request.headers, request.content_length,
                                  peer, peer_spki, max_bytes=server.max_batch_bytes)
        body = await read_body(request, server.max_batch_bytes,
                               start_body(request, ctx.identity), "max_batch_bytes")
        body_in = True
        if (guard := app.get(GUARD)) is not None and (conn := request.get(CONN)) is not None:
            guard.deciding(conn)
        if not body:
            raise E.EmptyBody("the request body is empty")
        items = parse_envelope(body, server.max_batch_items)
        now = int(app[CLOCK]())  # once for the whole batch, when its body is in
        facts = http_facts(request)  # the request's peer, TLS and path: one read
        outcomes = await run_batch(app[PIPELINE], items, request.headers, peer, peer_spki,
                                   ctx.request_id, now, trust, outbox=lambda: AuditOutbox(
                                       app[OWNER], lambda c: accept_events(
                                           request, c, peer, "telemetry.accepted", 202,
                                           facts)), identity=ctx.identity)
    except E.GatewayError as exc:
        app[METRICS].pipeline.observe(time.perf_counter() - started)
        return await refuse(request, ctx, peer, exc, body_in)
    app[METRICS].pipeline.observe(time.perf_counter() - started)
    return await answer(request, ctx, peer, outcomes, facts)


async def refuse(request: web.Request, ctx: Context, peer: str | None,
                 exc: E.GatewayError, body_in: bool) -> web.Response:
    """The whole request refused (checks 2-3 or the envelope): one audit event."""
    app = request.app
    note_store(app, ctx, KIND, exc)
    status, payload = exc.status, exc.body(ctx.request_id)
    if not await audit(request, ctx, peer, f"{KIND}.rejected", status, exc):
        err = E.AuditUnavailable("the decision could not be audited")
        status, payload = err.status, err.body(ctx.request_id)
    app[METRICS].count(KIND, status, exc.error)
    return respond(payload, status, exc, body_in)


async def answer(request: web.Request, ctx: Context, peer: str | None,
                 outcomes: list[ItemOutcome], facts: dict[str, Any]) -> web.Response:
    """One audit event per item (appended in item order, one group commit), then the 200
    answer."""
    app = request.app
    for outcome in outcomes:
        note_store(app, outcome.ctx, "telemetry", outcome.error)
    audited = await chain_decisions(app, [
        # accepted: its event is durably in the store's outbox (chained now, or at the next
        # start if the audit log fails: the 202 stands); refused: appended directly
        (o.ctx, None) if o.error is None and o.ctx.outbox is not None
        and o.ctx.outbox.events is not None
        else (o.ctx, [decision_event(request, o.ctx, peer, "telemetry.rejected", o.status,
                                     o.error, facts)])
        for o in outcomes])
    for outcome, ok in zip(outcomes, audited, strict=True):
        if not ok and outcome.error is not None:  # as a single request: the refusal
            # stands, the answer says 503
            outcome.error = E.AuditUnavailable("the decision could not be audited")
        app[METRICS].batch_items(outcome.status, outcome.error.error if outcome.error
                                 else None)
    accepted = sum(o.error is None for o in outcomes)
    app[METRICS].count(KIND, 200, None)
    payload: dict[str, Any] = {
        "request_id": ctx.request_id, "status": "completed", "accepted": accepted,
        "rejected": len(outcomes) - accepted, "results": [o.result() for o in outcomes]}
    return json_response(payload, 200)
