"""aiohttp's own refusals, as fedgate error bodies (review finding: they leaked the server
version and echoed the offending input).

HTTP that aiohttp's parser cannot read (request line, header too long or malformed, too
many headers, bad chunked framing, Transfer-Encoding with Content-Length, bad version,
bad Content-Length) never reaches the application: aiohttp answers it from
``RequestHandler.handle_error``. ``GatewayRequestHandler`` overrides that one method to
answer the v1.1 error body (``errors.error_body``, code ``bad_request``) with
``Server: fedgate`` and a fresh ``X-Request-Id``, a fixed detail per kind of error
(never the input), a debug log line, the ``fedgate_requests_total`` counter
(``route="none"``) and one audit event ``http.rejected`` — rate-limited
(``AUDIT_BURST`` at once, then ``AUDIT_PER_S``; the next event written says how many
were left out) so that a flood of garbage cannot fill the disk. The connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import orjson
from aiohttp import http_exceptions as H
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from audit import request_event
from gateway.pipeline import errors as E

from .appkeys import METRICS
from .auditing import connection_facts, emit_audit

log = logging.getLogger("fedgate.http")

AUDIT_BURST, AUDIT_PER_S = 20, 1.0
# most specific first; the detail never carries the request's own bytes
DETAILS: tuple[tuple[type[BaseException], str], ...] = (
    (H.LineTooLong, "the request line or a header is too long"),
    (H.BadHttpMethod, "the request method is malformed"),
    (H.BadStatusLine, "the request line is malformed"),
    (H.InvalidURLError, "the request target is malformed"),
    (H.InvalidHeader, "a header is malformed"),
    (H.TransferEncodingError, "the chunked transfer encoding is malformed"),
    (H.PayloadEncodingError, "the body's framing is malformed"),
)
DEFAULT_DETAIL = "the request is not valid HTTP/1.1"


def detail_of(exc: BaseException | None) -> str:
    return next((text for kind, text in DETAILS if isinstance(exc, kind)), DEFAULT_DETAIL)


class AuditBudget:
    """A token bucket for the audit events of unparseable requests (per worker)."""

    def __init__(self, burst: int = AUDIT_BURST, per_s: float = AUDIT_PER_S) -> None:
        self.burst, self.per_s = burst, per_s
        self.tokens, self.at, self.suppressed = float(burst), time.monotonic(), 0

    def take(self) -> int | None:
        """None: leave this event out; else how many were left out before it."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens < 1:
            self.suppressed += 1
            return None
        self.tokens -= 1
        left_out, self.suppressed = self.suppressed, 0
        return left_out


class GatewayRequestHandler(RequestHandler):
    """aiohttp's per-connection HTTP protocol, answering its own refusals as fedgate does."""

    def __init__(self, manager: web.Server, *, app: web.Application, budget: AuditBudget,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.fedgate_app, self.audit_budget = app, budget

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("response already sent, cannot send an error response")
        request_id = str(uuid.uuid4())
        if status >= 500:  # an exception escaped the application (not expected)
            log.error("unhandled error (request %s)", request_id, exc_info=exc)
            err: E.GatewayError = E.InternalError("internal error")
        else:
            log.debug("bad request (request %s, %s)", request_id, type(exc).__name__)
            err = E.BadRequest(detail_of(exc))
        status = err.status if status >= 500 or status < 400 else status
        self._record(request_id, status, err)
        response = web.Response(body=orjson.dumps(err.body(request_id)), status=status,
                                content_type="application/json",
                                headers={"Server": "fedgate", "X-Request-Id": request_id})
        response.force_close()
        return response

    def _record(self, request_id: str, status: int, err: E.GatewayError) -> None:
        app = self.fedgate_app
        app[METRICS].count("none", status, err.error)
        left_out = self.audit_budget.take()
        if left_out is None:
            return
        detail = err.detail + (f" ({left_out} more not audited before this one)"
                               if left_out else "")
        # no method nor path: the request line could not be read (aiohttp's stand-in
        # request says UNKNOWN /); the peer, TLS version and replica are known
        event = request_event(action="http.rejected", outcome="failure", category=["web"],
                              status=status, request_id=request_id, reason=err.error,
                              detail=detail, now=time.time(),
                              **connection_facts(app, None, self.transport))
        task = asyncio.get_running_loop().create_task(emit_audit(app, event))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)


_PENDING: set[asyncio.Task] = set()  # strong references to the audit appends in flight


def handler_factory(server: web.Server, app: web.Application,
                    **kwargs: Any) -> Any:
    """For the connection guard: one ``GatewayRequestHandler`` per accepted socket, with
    the keyword arguments the ``AppRunner`` was given (access log, keep-alive)."""
    budget, loop = AuditBudget(), asyncio.get_running_loop()
    return lambda: GatewayRequestHandler(server, app=app, budget=budget, loop=loop, **kwargs)
