"""What every signed route does with a request before and after the pipeline: read the
body within its size and time limits (§4.2), count it against its identity's share of
the connection cap, and log a store failure's cause (throttled). Shared by the single
routes (gateway/http/app.py) and the batch route (gateway/http/batch.py): each decided in
its own shielded task, and refused at once while the audit log is down."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.pipeline import errors as E
from gateway.pipeline.request import Context
from gateway.store import StoreError

from .appkeys import AUDIT_REFUSALS, DECISIONS, READY, SETTINGS, STORE_FAILURES
from .conn import CONN, GUARD
from .probes import json_response


async def shielded(request: web.Request, decide) -> web.Response:
    """``decide(request)`` in its own task, shielded: cancelling the handler (the shutdown
    deadline, gateway/http/server.py) never stops it between the store commit and its
    audit event; ``resources`` waits for it before closing the store and the audit log.
    The client whose handler was cancelled gets no answer (its decision still stands)."""
    app = request.app
    task = asyncio.ensure_future(decide(request))
    app[DECISIONS].add(task)
    task.add_done_callback(app[DECISIONS].discard)
    return await asyncio.shield(task)


def audit_down(app: web.Application, ctx: Context) -> web.Response | None:
    """Fail closed: while an earlier append failed, no decision (503), logged throttled."""
    if app[READY]["audit"]:
        return None
    app[AUDIT_REFUSALS].failed("an earlier append failed (restart the gateway)",
                               request_id=ctx.request_id)
    err = E.AuditUnavailable("the audit log is unavailable")
    return json_response(err.body(ctx.request_id), err.status)


async def read_body(request: web.Request, limit: int, timeout_s: float,
                    limit_name: str = "max_body_bytes") -> bytes:
    """§4.2 while streaming (the headers were judged by ``check_head``): at most ``limit``
    bytes, all of them within ``timeout_s`` (else 408: a slow sender cannot hold a worker).
    A connection lost before the end (the client left, or the guard shed it) is a
    ``ClientDisconnected``; a body whose framing breaks (bad chunks) a ``BadRequest``."""
    chunks, size, content = [], 0, request.content
    try:
        if content.is_eof():  # the whole body came with the headers: no timer, no wait
            chunks.append(content.read_nowait(-1))
            size = len(chunks[0])
        else:
            async with asyncio.timeout(timeout_s):
                async for chunk in content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > limit:
                        break
                    chunks.append(chunk)
        if size > limit:
            raise E.BodyTooLarge(f"body exceeds {limit_name} ({limit})")
    except TimeoutError:
        raise E.RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None
    except ConnectionError:
        conn = request.get(CONN)
        by = f"shed by the gateway ({conn.shed_reason})" if conn and conn.shed_reason else (
            "by the client")
        raise E.ClientDisconnected(f"the connection was closed {by} before the whole body "
                                   f"arrived ({size} bytes)") from None
    except RequestPayloadError:
        raise E.BadRequest("the body's framing is malformed") from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this task itself is cancelled
        # the shutdown deadline passed: aiohttp ends the body read (gateway/http/server.py)
        raise E.ClientDisconnected(f"the gateway stopped before the whole body arrived "
                                   f"({size} bytes)") from None
    return b"".join(chunks)


def body_timeout(app: web.Application) -> float:
    """At most clock_skew_s (bounded to 1-30 s): a body slower than that could not pass
    the timestamp window anyway."""
    return float(min(30, max(1, app[SETTINGS].security.clock_skew_s)))


def start_body(request: web.Request, identity: str) -> float:
    """The headers passed (``check_head``): count the request in its identity's share of
    the connection cap and return how long its body may take (gateway/http/conn.py)."""
    cap_s = body_timeout(request.app)
    guard, conn = request.app.get(GUARD), request.get(CONN)
    if guard is None or conn is None:
        return cap_s
    if not guard.claim(conn, identity):
        raise E.RateLimited("too many requests in progress for this service identity",
                            retry_after=1)
    return guard.limits.body_seconds(request.content_length, cap_s)


def note_store(app: web.Application, ctx: Context, route_kind: str,
               exc: E.GatewayError | None) -> None:
    """A 503 for a store failure logs its cause (throttled); a success after, the recovery."""
    if exc is None:
        app[STORE_FAILURES].recovered()
    elif isinstance(exc.__cause__, StoreError):
        app[STORE_FAILURES].failed(exc.__cause__, stage=exc.__cause__.stage, status=exc.status,
                                   error=exc.error, route=route_kind,
                                   request_id=ctx.request_id)


def respond(payload: dict, status: int, exc: E.GatewayError | None,
            body_in: bool) -> web.Response:
    """The JSON answer; ``Retry-After`` for a 429; the connection closed when the body
    was not read (an unread body must not be parsed as the next request)."""
    response = json_response(payload, status)
    if isinstance(exc, E.RateLimited):
        response.headers["Retry-After"] = str(exc.extra["retry_after"])
    if not body_in:
        response.force_close()
    return response
