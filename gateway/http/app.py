"""The aiohttp application: routes of PROTOCOL.md §5, one error→HTTP mapping, audit.

Resources (store, keys, validators, audit log, pipeline) are built once at start-up in
``resources`` (aiohttp ``cleanup_ctx``) and reached through typed ``web.AppKey``s; a
handler never opens a connection. Every answer carries ``X-Request-Id``; every signed
request produces exactly one decision event, accepted or rejected (a feedback query whose
answer left unusable stored records out adds one `feedback.records_skipped` event).
An accepted decision's events are written by the store commit itself (the audit outbox,
gateway/http/outbox.py) and appended to the chain before the answer is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from audit import AuditSink
from audit.writer import GroupWriter
from common.ids import uuid4_text
from gateway import logs
from gateway.config.settings import GatewaySettings
from gateway.feedback.issuer import FeedbackIssuer, RulePolicy, no_adjustments
from gateway.feedback.policy import load_rules
from gateway.pipeline import errors as E
from gateway.pipeline.pipeline import Context, Pipeline, SignedRequest, check_head
from gateway.pipeline.records import accepted_body
from gateway.pipeline.request import AuditOutbox
from gateway.selftest import run_startup
from gateway.store import open_store
from keyring import Keyring, PrivateKey
from schemas.routes import BATCH_PATH, SIGNED_ROUTES, Route
from schemas.validate import Validators

from .appkeys import (  # noqa: F401  (re-exported: app.SETTINGS, app.ISSUER, … for callers)
    AUDIT,
    AUDIT_EXECUTOR,
    AUDIT_REFUSALS,
    AUDIT_WRITER,
    CLOCK,
    DECISIONS,
    DRAINING,
    ECHO,
    HANDSHAKES,
    ISSUER,
    KEYS,
    METRICS,
    OTHER_HTTP_CODE,
    OUTBOX_ACKS,
    OWNER,
    PIPELINE,
    READY,
    REQUEST_ID,
    REQUEST_ID_RE,
    ROUTER_CODES,
    SETTINGS,
    STORE,
    STORE_FAILURES,
    WORKER,
)
from .audit_checkpoints import checkpointer, tick_forever
from .auditing import (  # noqa: F401
    accept_events,
    audit,
    audit_skipped,
    audit_unrouted,
    chain_accepted,
    emit_audit,
    recover_outbox,
)
from .batch import handle_batch
from .conn import CONN, GUARD, peer_pins, track_requests
from .intake import (  # noqa: F401
    audit_down,
    body_timeout,
    note_store,
    read_body,
    respond,
    shielded,
    start_body,
)
from .killswitch import RevocationWatcher
from .metrics import Metrics
from .outbox import OutboxAcks, owner_name
from .probes import (  # noqa: F401
    handle_healthz,
    handle_metrics,
    handle_readyz,
    json_response,
    readiness,
)
from .tlsaudit import HandshakeAudit

log = logging.getLogger("fedgate.gateway")

# the typed keys live in appkeys (imported here too: app.SETTINGS etc. keep working)


class _Quiet:
    """An audit echo that says nothing (the demo shows its own progress)."""

    def debug(self, *args: Any, **kwargs: Any) -> None:
        return None


def make_app(settings: GatewaySettings, keys: tuple[Keyring, PrivateKey], *,
             clock: Callable[[], float] = time.time, echo: bool = True,
             worker: tuple[int, int] = (0, 1)) -> web.Application:
    """The gateway application; ``keys`` were loaded and checked by the caller.

    ``worker``: (this worker's index, the worker count): ``fedgate serve`` is (0, 1),
    ``--workers N`` runs (1, N) … (N, N); it names the audit outbox's owner.

    ``echo``: also log a one-line summary of every audit event (``fedgate.audit``, at
    debug: only when that logger is enabled for debug at start-up, ``--log-level debug``).
    A store failure is logged with its cause (``fedgate.store``, warning, throttled); so
    is a refusal for want of an audit log.
    """
    app = web.Application(client_max_size=settings.security.max_body_bytes + 1,
                          middlewares=[track_requests, request_id_middleware])
    app[SETTINGS], app[KEYS], app[CLOCK] = settings, keys, clock
    app[WORKER], app[OWNER] = worker, owner_name(settings.server.node_name, worker[0])
    app[METRICS] = Metrics()
    app[HANDSHAKES] = HandshakeAudit(app[METRICS], lambda event: emit_audit(app, event),
                                     node=settings.server.node_name or None)
    app.on_shutdown.append(app[HANDSHAKES].flush)  # before the audit log closes
    app[READY], app[ECHO] = {"self_test": False, "audit": True}, echo
    app[DECISIONS], app[DRAINING] = set(), False
    app[STORE_FAILURES] = logs.Throttle(logs.get_logger("fedgate.store"), "store unavailable")
    app[AUDIT_REFUSALS] = logs.Throttle(logs.get_logger("fedgate.audit"),
                                        "refusing signed requests: the audit log is unusable",
                                        level=logging.ERROR)
    app.cleanup_ctx.append(resources)
    app.on_response_prepare.append(hide_server_version)
    for path in SIGNED_ROUTES:
        app.router.add_post(path, handle_signed)
    if settings.server.batch_route:
        app.router.add_post(BATCH_PATH, handle_batch)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    return app


async def resources(app: web.Application) -> AsyncIterator[None]:
    """Start-up: self-test, validators, store, audit log, pipeline. Shutdown: close
    (the feedback signer too: its PKCS#11 session)."""
    settings = app[SETTINGS]
    keyring, feedback_key = app[KEYS]
    validators = Validators()  # compiled once, shared by the pipeline and the policy
    try:  # the known answers (gateway/selftest.py), the feedback key's through its token
        run_startup(feedback_key, validators)
    except BaseException:
        _close_signer(feedback_key)
        raise
    app[READY]["self_test"] = True
    policy = (RulePolicy(load_rules(settings.policy_rules), validators=validators)
              if settings.policy_rules is not None else no_adjustments)
    store = open_store(settings.store_url, **settings.store_options)
    store.on_amnesia = app[METRICS].store_amnesia.inc
    await store.open()
    try:  # the revoked keys before serving (the kill switch): unreadable → no start
        revoked = await store.revoked_keys()
    except BaseException:
        await store.close()
        raise
    app[STORE] = store
    checkpoints = checkpointer(settings)
    # a decision line per request only when asked for at start-up (--log-level debug):
    # otherwise not even built and dropped per request (issue 9; docs/LOGGING.md)
    echo = app[ECHO] and logging.getLogger("fedgate.audit").isEnabledFor(logging.DEBUG)
    app[AUDIT] = AuditSink(settings.audit_path, level="debug", checkpoints=checkpoints,
                           logger=logs.get_logger("fedgate.audit") if echo else _Quiet())
    app[AUDIT_EXECUTOR] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedgate-audit")
    app[AUDIT_WRITER] = GroupWriter(app[AUDIT].emit_many, app[AUDIT_EXECUTOR],
                                    observe=app[METRICS].audit_batch.observe)
    await recover_outbox(app)  # before serving: what a previous run left in the outbox
    app[OUTBOX_ACKS] = OutboxAcks(store)
    app[OUTBOX_ACKS].start()
    ticker = None if checkpoints is None else asyncio.create_task(
        tick_forever(checkpoints, app[AUDIT].log, app[AUDIT_EXECUTOR]))
    app[ISSUER] = FeedbackIssuer(store, feedback_key, settings.feedback_kid, policy=policy)
    app[PIPELINE] = Pipeline(settings.security, keyring, validators, store,
                             store_timer=app[METRICS].store.observe,
                             group_observe=app[METRICS].store_batch.observe,
                             respond=app[ISSUER].respond)
    watcher = RevocationWatcher(store, app[PIPELINE], settings.server.revocation_refresh_s,
                                on_count=app[METRICS].revoked_keys)
    watcher.apply(revoked, at_start=True)
    watcher.start()
    try:
        yield
    finally:
        await watcher.close()
        if (guard := app.get(GUARD)) is not None:
            await guard.close()  # a body still arriving fails now (a rejection, no write)
        await finish_decisions(app)  # no commit without its audit event, none cut short
        if ticker is not None:
            ticker.cancel()
        await app[OUTBOX_ACKS].close()
        await store.close()
        app[AUDIT_EXECUTOR].shutdown(wait=True)
        app[AUDIT].close()
        _close_signer(feedback_key)


def _close_signer(signer: Any) -> None:
    close = getattr(signer, "close", None)  # a plain PrivateKey (tests) has nothing to close
    if close is not None:
        close()


async def hide_server_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "fedgate"  # no library or Python version to fingerprint
    if request.app[DRAINING]:
        response.force_close()  # stopping: no next request on this connection


async def finish_decisions(app: web.Application) -> None:
    """Wait for every signed request still being handled (the shutdown deadline passed
    and aiohttp cancelled its handler): its commit and audit event complete together."""
    pending = list(app[DECISIONS])
    if pending:
        log.warning("finishing %d signed request(s) before closing the store", len(pending))
        await asyncio.gather(*pending, return_exceptions=True)


@web.middleware
async def request_id_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Echo a well-formed X-Request-Id or make one; never leak internals on a 500."""
    request_id = request.headers.get("X-Request-Id", "")
    if not REQUEST_ID_RE.fullmatch(request_id):
        request_id = uuid4_text()
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # 404 / 405 from the router (§4 step 1)
        if exc.status < 400:
            raise
        code = ROUTER_CODES.get(exc.status, OTHER_HTTP_CODE)
        response = json_response(E.error_body(request_id, code, exc.reason), exc.status)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "POST")
        await audit_unrouted(request, request_id, exc.status, code)
    except Exception:
        log.exception("unhandled error (request %s)", request_id)
        err = E.InternalError("internal error")
        response = json_response(err.body(request_id), err.status)
        await audit_unrouted(request, request_id, err.status, err.error)
    response.headers["X-Request-Id"] = request_id
    return response


async def handle_signed(request: web.Request) -> web.Response:
    return await shielded(request, decide_signed)  # intake.shielded: why


async def decide_signed(request: web.Request) -> web.Response:
    app = request.app
    route: Route = SIGNED_ROUTES[request.path]
    ctx = Context(request[REQUEST_ID])
    if (refused := audit_down(app, ctx)) is not None:
        return refused
    peer, peer_spki = peer_pins(request)  # once per connection
    trust = app[PIPELINE].trust  # read once: a SIGHUP or a revocation swaps it whole
    security = trust.config
    accept_status, accept_action = accepted(route)
    ctx.outbox = AuditOutbox(app[OWNER], lambda c: accept_events(
        request, c, peer, accept_action, accept_status))
    started, now, exc, body_in = time.perf_counter(), None, None, False
    try:
        # §4.2-3 on the headers alone: no body is read for a client that fails them
        ctx.identity = check_head(security, request.headers, request.content_length,
                                  peer, peer_spki)
        body = await read_body(request, security.max_body_bytes,
                               start_body(request, ctx.identity))
        body_in = True
        if (guard := app.get(GUARD)) is not None and (conn := request.get(CONN)) is not None:
            guard.deciding(conn)
        # "now" is captured once, when the whole body is in (a slow body cannot stretch
        # the timestamp window or outlive a claim), and passed down
        now = int(app[CLOCK]())
        req = SignedRequest(route, request.headers, body, peer, ctx.request_id, peer_spki)
        await app[PIPELINE].process(req, now, ctx, trust, ctx.identity)
        status, payload, action = answer(route, ctx)
    except E.GatewayError as error:
        exc = error
        status, payload, action = exc.status, exc.body(ctx.request_id), f"{route.kind}.rejected"
    finally:
        app[METRICS].pipeline.observe(time.perf_counter() - started)
    note_store(app, ctx, route.kind, exc)
    if exc is None and ctx.outbox.events is not None:
        # accepted: the events are durably in the store's outbox; chained now, or at the
        # next start if the audit log fails (the answer is true either way)
        await chain_accepted(app, ctx)
    else:
        if not await audit(request, ctx, peer, action, status, exc):
            err = E.AuditUnavailable("the decision could not be audited")
            status, payload = err.status, err.body(ctx.request_id)
        if ctx.skipped_records and not await audit_skipped(request, ctx, peer, status):
            err = E.AuditUnavailable("the decision could not be audited")
            status, payload = err.status, err.body(ctx.request_id)
    app[METRICS].count(route.kind, status, exc.error if exc else None)
    return respond(payload, status, exc, body_in)


def accepted(route: Route) -> tuple[int, str]:
    """The status and audit action of an accepted request on ``route``."""
    if route.kind == "query":
        return 200, "feedback.issued"
    return 202, f"{route.kind}.accepted"


def answer(route: Route, ctx: Context) -> tuple[int, dict[str, Any], str]:
    status, action = accepted(route)
    return status, ctx.response if route.kind == "query" else accepted_body(route, ctx), action
