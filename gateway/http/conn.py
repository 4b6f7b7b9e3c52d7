"""The connection guard: every socket a worker accepts is bounded in time and in number.

Issue 7 point 3: without it, 1,100 raw TCP connections (or ~1,000 idle mTLS ones) starved
legitimate producers and ran the process out of file descriptors. Each accepted socket is
one ``Conn`` (the asyncio TLS protocol of that socket, so it is tracked from ``accept``,
before the handshake) in one of five states:

* **silent** — accepted, nothing received yet. Closed ``handshake_timeout_s`` after accept
  (asyncio also bounds the whole TLS handshake by ``handshake_timeout_s``).
* **waiting** — bytes are arriving (the TLS handshake, or the next request on a kept-alive
  connection) and the request's headers are not complete yet. Closed ``header_timeout_s``
  after its first byte, however slowly the rest trickles in.
* **reading** — a request is in the application (its headers are complete) and its body
  is not all in yet. The application judges the headers first (content type, size,
  identity pinned to the TLS session) and only then reads the body, within
  ``Limits.body_seconds`` (scaled to its Content-Length, a 408 after). Sheddable.
* **active** — the whole body is in and the request is being decided. Never shed.
* **idle** — keep-alive between requests; closed ``idle_timeout_s`` after the response.

**The cap** (``max_connections`` per worker, lowered to fit the open-files limit): when a
new socket would exceed it, the guard sheds the oldest silent connection, else the one
that has made no progress for the longest time (oldest state change among waiting and
idle ones), else the oldest reading one. A flood of sockets that never complete a
request therefore churns among itself, while a producer, whose connection goes from
accept to a complete body in milliseconds, is the newest one and gets through. Only
when every connection is being decided is the new one refused.

**The identity share** (``identity_share`` of the cap, at least 1): one service identity
(pinned, ``claim``) holds at most that many requests reading or being decided; its next
one sheds its own oldest reading request (reason ``identity_share``), or is refused if
all of them are being decided. A connection whose certificate is pinned to no identity
never reaches the body (refused 401 on its headers), so it holds nothing but headers.

Closing is ``abort()`` of the socket transport: the descriptor is freed at once, with no
TLS close_notify to wait for. Closes are counted in ``fedgate_connections_closed_total``
by reason and summarised in one warning at most every ``SUMMARY_EVERY_S``.

A handshake that does not complete (an SSL error, the client giving up mid-handshake, or
no handshake within its timeout; not a socket closed before sending anything, nor one
shed at the cap) is reported to ``HandshakeAudit`` (gateway/http/tlsaudit.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web

from common import tls

from .conn_limits import Limits, fit_limits, raise_fd_limit
from .metrics import Metrics
from .tlsaudit import HandshakeAudit

__all__ = ["GUARD", "CONN", "Conn", "ConnectionGuard", "Limits", "fit_limits",
           "peer_pins", "raise_fd_limit", "track_requests"]

log = logging.getLogger("fedgate.conn")

SUMMARY_EVERY_S = 10.0
SILENT, WAITING, READING, ACTIVE, IDLE = "silent", "waiting", "reading", "active", "idle"


class Conn(sslproto.SSLProtocol):
    """asyncio's own TLS protocol for one accepted socket, reporting to the guard."""

    def __init__(self, guard: ConnectionGuard, handler: Any, ctx: ssl.SSLContext) -> None:
        limits = guard.limits
        super().__init__(asyncio.get_running_loop(), handler, ctx, None, server_side=True,
                         ssl_handshake_timeout=limits.handshake_timeout_s,
                         ssl_shutdown_timeout=limits.handshake_timeout_s)
        self.guard, self.handler = guard, handler
        self.raw: asyncio.BaseTransport | None = None
        self.state, self.since, self.doomed = SILENT, 0.0, False
        self.peer: Any = None  # the TCP peer (ip, port, ...)
        self.handshaken = False
        self.tls_version: str | None = None  # the negotiated version ("TLSv1.3"), for audit
        self.identity: str | None = None  # set by ``claim`` while a request holds it
        self.shed_reason: str | None = None  # why the guard closed it, if it did
        #: the peer leaf's (sha256 hex, spki pin), read once per connection (peer_pins)
        self.pins: tuple[str | None, str | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        self.peer = transport.get_extra_info("peername")
        if self.doomed:  # shed or refused before asyncio handed us the socket
            transport.abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.lost(self, exc)
        super().connection_lost(exc)

    def _on_handshake_complete(self, handshake_exc: Any) -> None:
        self.handshaken = handshake_exc is None  # a failure reaches connection_lost
        super()._on_handshake_complete(handshake_exc)
        if self.handshaken:  # kept: the audit event may be written after the socket closed
            sslobj = self._get_extra_info("ssl_object")
            self.tls_version = sslobj.version() if sslobj is not None else None

    def buffer_updated(self, nbytes: int) -> None:
        if self.state is SILENT or self.state is IDLE:  # a handshake or request begins:
            self.guard.move(self, WAITING)             # its headers are now due
        super().buffer_updated(nbytes)

    def abort(self) -> None:
        if self.raw is None:
            self.doomed = True
        else:
            self.raw.abort()


class ConnectionGuard:
    """One per worker, made at start-up; see the module docstring."""

    def __init__(self, limits: Limits, metrics: Metrics,
                 handshakes: HandshakeAudit | None = None) -> None:
        self.limits, self.metrics, self.handshakes = limits, metrics, handshakes
        # state → its connections, oldest state change first (so also earliest deadline)
        self._table: dict[str, OrderedDict[Conn, None]] = {
            SILENT: OrderedDict(), WAITING: OrderedDict(), READING: OrderedDict(),
            IDLE: OrderedDict()}
        # identity → its connections holding a request (reading or active), oldest first
        self._held: dict[str, OrderedDict[Conn, None]] = {}
        self._open: set[Conn] = set()
        self._by_handler: dict[Any, Conn] = {}
        self._recent: Counter[str] = Counter()
        self._sweeper: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.connections_max = limits.max_connections

    def protocol_factory(self, server: Callable[[], Any],
                         ctx: ssl.SSLContext) -> Callable[[], Conn]:
        """For ``loop.create_server`` (without ``ssl=``: each ``Conn`` does the TLS)."""
        def accept() -> Conn:
            conn = Conn(self, server(), ctx)
            self._admit(conn)
            return conn
        return accept

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sweeper = asyncio.create_task(self._sweep(), name="fedgate-conn-guard")

    async def close(self, *_: Any) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._open):
            conn.abort()

    # -- shutdown (gateway/http/server.py ``stop_gateway``) ------------------------------
    def close_unused(self) -> None:
        """Close the connections with no request in them: those that have sent nothing
        yet (at once), and kept-alive idle ones (their HTTP handler closes cleanly, TLS
        close_notify included). Not aiohttp's ``pre_shutdown``: it closes busy handlers
        too, and a closed handler drops the rest of a body still arriving."""
        for conn in list(self._table[SILENT]):
            self._shed(conn, "shutdown")
        for conn in self._table[IDLE]:
            close = getattr(conn.handler, "close", None)
            if close is not None:
                close()

    def busy(self) -> int:
        """Connections with a request (or a handshake) in progress: waiting for their
        headers, reading their body or being decided."""
        return len(self._open) - len(self._table[SILENT]) - len(self._table[IDLE])

    # -- state changes ---------------------------------------------------------------
    def _admit(self, conn: Conn) -> None:
        while len(self._open) >= self.limits.max_connections:
            victim = self._oldest()
            if victim is None:  # every connection is serving a request: refuse this one
                self._count("refused")
                conn.doomed = True
                return
            self._shed(victim, "shed")
        self._open.add(conn)
        self._by_handler[conn.handler] = conn
        self.move(conn, SILENT)

    def move(self, conn: Conn, state: str) -> None:
        if conn not in self._open:
            return
        self._table.get(conn.state, {}).pop(conn, None)
        conn.state, conn.since = state, self._now()
        if state is not ACTIVE:
            self._table[state][conn] = None
        if state is IDLE:
            self._release(conn)
        self.metrics.connections_open = len(self._open)

    def request_started(self, handler: Any) -> Conn | None:
        conn = self._by_handler.get(handler)
        if conn is not None:
            self.move(conn, READING)
        return conn

    def claim(self, conn: Conn, identity: str) -> bool:
        """The request on ``conn`` is ``identity``'s (its headers passed): count it in that
        identity's share, shedding the identity's oldest reading request if it is full.
        False: the share is full of requests being decided (refuse this one)."""
        if conn not in self._open:
            return True  # already closed: its body read fails on its own
        held = self._held.setdefault(identity, OrderedDict())
        if len(held) >= self.limits.per_identity:
            victim = next((c for c in held if c.state is READING and c is not conn), None)
            if victim is None:
                self._count("identity_refused")
                return False
            self._shed(victim, "identity_share")
        conn.identity = identity
        held[conn] = None
        return True

    def deciding(self, conn: Conn) -> None:
        """The whole body is in: the request is decided now, never shed."""
        self.move(conn, ACTIVE)

    def _release(self, conn: Conn) -> None:
        if conn.identity is not None:
            held = self._held.get(conn.identity)
            if held is not None:
                held.pop(conn, None)
                if not held:
                    del self._held[conn.identity]
            conn.identity = None

    def lost(self, conn: Conn, exc: BaseException | None) -> None:
        if conn not in self._open:
            return
        if conn.state is SILENT or conn.state is WAITING:
            if isinstance(exc, ConnectionAbortedError):  # asyncio's ssl_handshake_timeout
                self._count("handshake_timeout")
            elif isinstance(exc, ssl.SSLError):
                self._count("handshake_failed")
            # bytes came, or asyncio's handshake timeout: a handshake was attempted
            if exc is not None and (conn.state is WAITING or isinstance(
                    exc, ConnectionAbortedError)):
                self._handshake_failed(conn, exc)
        self._forget(conn)

    def _handshake_failed(self, conn: Conn, exc: BaseException) -> None:
        if self.handshakes is not None and not conn.handshaken:
            self.handshakes.failed(conn.peer, exc)

    def _shed(self, conn: Conn, reason: str) -> None:
        self._count(reason)
        conn.shed_reason = reason
        self._forget(conn)
        conn.abort()

    def _forget(self, conn: Conn) -> None:
        self._open.discard(conn)
        self._table.get(conn.state, {}).pop(conn, None)
        self._by_handler.pop(conn.handler, None)
        self._release(conn)
        self.metrics.connections_open = len(self._open)

    def _oldest(self) -> Conn | None:
        """The connection to shed: the oldest silent one, else the oldest waiting or idle,
        else the oldest reading one (never one being decided)."""
        if self._table[SILENT]:
            return next(iter(self._table[SILENT]))
        firsts = [next(iter(self._table[s])) for s in (WAITING, IDLE) if self._table[s]]
        if firsts:
            return min(firsts, key=lambda c: c.since)
        return next(iter(self._table[READING]), None)

    def _count(self, reason: str) -> None:
        self.metrics.connections_closed[reason] += 1
        self._recent[reason] += 1

    def _now(self) -> float:
        return (self._loop or asyncio.get_running_loop()).time()

    # -- the sweeper -------------------------------------------------------------------
    async def _sweep(self) -> None:
        limits = self.limits
        tick = min(1.0, max(0.05, min(limits.handshake_timeout_s, limits.header_timeout_s,
                                       limits.idle_timeout_s) / 4))
        last_summary = self._now()
        while True:
            await asyncio.sleep(tick)
            now = self._now()
            self._expire(SILENT, now - limits.handshake_timeout_s, "handshake_timeout")
            self._expire(WAITING, now - limits.header_timeout_s, "header_timeout")
            self._expire(IDLE, now - limits.idle_timeout_s, "idle_timeout")
            if now - last_summary >= SUMMARY_EVERY_S:
                last_summary = now
                self._summary()
                if self.handshakes is not None:
                    self.handshakes.tick(SUMMARY_EVERY_S)

    def _expire(self, state: str, cutoff: float, reason: str) -> None:
        table = self._table[state]
        while table:
            conn = next(iter(table))
            if conn.since > cutoff:
                return
            if state is SILENT or state is WAITING:
                self._handshake_failed(conn, TimeoutError(
                    f"no complete TLS handshake within {self._now() - conn.since:.1f} s"))
            self._shed(conn, reason)

    def _summary(self) -> None:
        if self._recent:
            what = ", ".join(f"{n} {reason}" for reason, n in sorted(self._recent.items()))
            log.warning("connections closed early in the last %.0f s: %s (%d open, cap %d)",
                        SUMMARY_EVERY_S, what, len(self._open), self.limits.max_connections)
            self._recent.clear()


GUARD = web.AppKey("conn_guard", ConnectionGuard)
CONN = web.RequestKey("conn", Conn)


def peer_pins(request: web.Request) -> tuple[str | None, str | None]:
    """(sha256 hex, ``spki:`` pin) of the peer's leaf certificate: its DER read and hashed
    once per connection, not per request (issue 9). TLS 1.3 only (common/tls.py): no
    renegotiation, so the certificate of a connection never changes."""
    conn = request.get(CONN)
    if conn is not None and conn.pins is not None:
        return conn.pins
    transport = request.transport
    pins = tls.peer_cert_pins(transport.get_extra_info("ssl_object") if transport else None)
    if conn is not None:
        conn.pins = pins
    return pins


@web.middleware
async def track_requests(request: web.Request, handler) -> web.StreamResponse:
    """Outermost middleware: headers complete → reading; the handler done → idle. The
    handler moves it to active (``deciding``) once the whole body is in."""
    guard = request.app.get(GUARD)
    conn = guard.request_started(request.protocol) if guard is not None else None
    if conn is not None:
        request[CONN] = conn
    try:
        return await handler(request)
    finally:
        if conn is not None:
            guard.move(conn, IDLE)
