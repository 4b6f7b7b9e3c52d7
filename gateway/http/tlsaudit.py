"""Refused TLS handshakes made visible (issue 8 point 5; PROTOCOL.md §7 v1.1).

The connection guard (gateway/http/conn.py) reports every handshake that did not complete:
an ``ssl.SSLError`` from the handshake, the client closing or resetting mid-handshake,
or a socket that did not complete its handshake in time. Each one is

* **classified** (:func:`classify`) from the real error: ``no_client_certificate``,
  ``untrusted_chain`` (the chain does not lead to ``client_ca``), ``certificate_unknown``
  (a chain to the CA but an unusable certificate: wrong purpose, expired...),
  ``protocol_version`` (TLS < 1.3), ``not_tls`` (plain HTTP or other bytes on the TLS
  port), ``client_aborted`` (the client closed, reset or sent an alert: it typically
  refused the gateway's certificate), ``timeout``, ``other``;
* **counted**, every one, in ``fedgate_tls_handshake_failures_total{reason}``;
* **audited** as a ``tls.handshake_failed`` event through the chained audit log, rate
  limited: at most one event per source IP per ``per_source_s``; the failures held back
  meanwhile are counted (by reason) in that source's next event, ``fedgate.suppressed``.
  A source with held-back failures gets that next event when its window has passed (the
  guard's 10 s sweep) or at shutdown, describing its latest failure. So for every
  failure there is either an event or a count in one: failures = events +
  Σ ``fedgate.suppressed`` + Σ ``fedgate.suppressed_other_sources``.
  The table of sources is an LRU of at most ``max_sources`` entries (an IP-spraying
  flood cannot grow memory); a forgotten source's held-back failures move to one shared
  entry, written as ``fedgate.suppressed_other_sources``. All sources together get at
  most ``global_events`` events per ``global_window_s`` (the shared entry: one more per
  sweep at most; the shutdown flush: one per held-back source at most);
* **logged** at WARNING with each event written (so rate-limited the same way), plus a
  summary of all failures every 10 s while there are any.

Per worker process: with ``--workers N`` each worker limits its own events.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from audit.events import handshake_event

from .metrics import Metrics

log = logging.getLogger("fedgate.tls")

PER_SOURCE_S = 60.0
MAX_SOURCES = 1024
GLOBAL_EVENTS = 100
GLOBAL_WINDOW_S = 60.0
#: X509_V_ERR_* codes meaning "no trusted chain": unable to get (local) issuer, signature
#: failure, self-signed leaf or chain, cannot verify leaf signature, untrusted, rejected.
UNTRUSTED_CODES = frozenset({2, 7, 18, 19, 20, 21, 27, 28})
#: OpenSSL reason codes (``ssl.SSLError.reason``) → our reason
SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "WRONG_SSL_VERSION": "protocol_version",
    "UNKNOWN_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "HTTP_REQUEST": "not_tls",
    "HTTPS_PROXY_REQUEST": "not_tls",
    "WRONG_VERSION_NUMBER": "not_tls",
    "PACKET_LENGTH_TOO_LONG": "not_tls",
    "RECORD_LENGTH_MISMATCH": "not_tls",
}
_SSL_NOISE = re.compile(r"^\[SSL: \w+\] |\s*\(_ssl\.c:\d+\)$")
#: reasons only reachable after TLS 1.3 was negotiated (the server speaks nothing else)
AFTER_VERSION = frozenset({"no_client_certificate", "untrusted_chain", "certificate_unknown"})


def classify(exc: BaseException | None) -> tuple[str, str]:
    """(reason, one-line detail) of a handshake that did not complete."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = "untrusted_chain" if exc.verify_code in UNTRUSTED_CODES else "certificate_unknown"
        return reason, f"certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "client_aborted", "the client closed the connection mid-handshake"
    if isinstance(exc, ssl.SSLError):
        code = exc.reason or ""
        text = _SSL_NOISE.sub("", str(exc.strerror or exc)).strip()
        detail = f"{code}: {text}" if code else text
        if code in SSL_REASONS:
            return SSL_REASONS[code], detail
        if code.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")):
            return "client_aborted", f"the client sent an alert ({code})"
        return "other", detail
    if isinstance(exc, TimeoutError | ConnectionAbortedError):  # ours / asyncio's timeout
        return "timeout", str(exc) or "the TLS handshake did not complete in time"
    if isinstance(exc, OSError):  # reset, or EOF (asyncio raises ConnectionResetError)
        return "client_aborted", "the client closed or reset the connection mid-handshake"
    return "other", repr(exc)


@dataclass(frozen=True, slots=True)
class Failure:
    ip: str | None
    port: int | None
    reason: str
    detail: str
    at: float  # wall clock


class Source:
    """One source IP's limiter state: when its last event was written, and the failures
    held back since (by reason, and the latest one)."""

    __slots__ = ("last_event", "pending", "latest")

    def __init__(self) -> None:
        self.last_event = float("-inf")
        self.pending: Counter[str] = Counter()
        self.latest: Failure | None = None


class HandshakeAudit:
    """One per worker; ``emit(event)`` appends an event to the chained audit log."""

    def __init__(self, metrics: Metrics, emit: Callable[[dict[str, Any]], Awaitable[Any]] | None,
                 *, per_source_s: float = PER_SOURCE_S, max_sources: int = MAX_SOURCES,
                 global_events: int = GLOBAL_EVENTS, global_window_s: float = GLOBAL_WINDOW_S,
                 clock: Callable[[], float] = time.time, node: str | None = None) -> None:
        self.metrics, self.emit, self.clock = metrics, emit, clock
        self.node = node  # service.node.name of the events
        self.per_source_s, self.max_sources = per_source_s, max_sources
        self.global_events, self.global_window_s = global_events, global_window_s
        self._sources: OrderedDict[str | None, Source] = OrderedDict()
        self._forgotten = Source()  # held-back failures of sources the LRU dropped
        self._window_start, self._left = float("-inf"), 0
        self._recent: Counter[str] = Counter()  # for the 10 s summary line
        self._recent_ips: set[str | None] = set()
        self._tasks: set[asyncio.Task] = set()

    def failed(self, peer: Any, exc: BaseException | None) -> None:
        """A handshake from ``peer`` (asyncio's ``peername``) ended with ``exc``."""
        reason, detail = classify(exc)
        ip, port = peer[:2] if isinstance(peer, tuple) and len(peer) >= 2 else (None, None)
        failure = Failure(ip, port, reason, detail, self.clock())
        self.metrics.tls_handshake_failures[reason] += 1
        self._recent[reason] += 1
        if len(self._recent_ips) < self.max_sources:
            self._recent_ips.add(ip)
        source, now = self._source(ip), time.monotonic()
        if now - source.last_event >= self.per_source_s and self._spend(now):
            self._write(failure, source.pending, None)
            source.pending, source.latest, source.last_event = Counter(), None, now
        else:
            source.pending[reason] += 1
            source.latest = failure

    def _source(self, ip: str | None) -> Source:
        source = self._sources.get(ip)
        if source is not None:
            self._sources.move_to_end(ip)
            return source
        if len(self._sources) >= self.max_sources:
            _, old = self._sources.popitem(last=False)
            if old.latest is not None:
                self._forgotten.pending.update(old.pending)
                self._forgotten.latest = old.latest
        source = self._sources[ip] = Source()
        return source

    def _spend(self, now: float) -> bool:
        if now - self._window_start >= self.global_window_s:
            self._window_start, self._left = now, self.global_events
        if self._left <= 0:
            return False
        self._left -= 1
        return True

    def _write(self, failure: Failure, same: Counter[str] | None,
               other: Counter[str] | None) -> None:
        same = +same if same else None  # drop zero counts
        other = +other if other else None
        event = handshake_event(
            reason=failure.reason, request_id=str(uuid.uuid4()), source_ip=failure.ip,
            source_port=failure.port, detail=failure.detail, now=failure.at,
            tls_version="1.3" if failure.reason in AFTER_VERSION else None, node=self.node,
            suppressed=same, suppressed_other_sources=other)
        held = sum(same.values()) if same else 0
        log.warning("TLS handshake refused from %s:%s: %s (%s)%s", failure.ip, failure.port,
                    failure.reason, failure.detail,
                    f"; {held} more from this source since its previous event" if held else "")
        if self.emit is not None:
            task = asyncio.get_running_loop().create_task(self.emit(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _release(self, source: Source, *, forgotten: bool = False) -> None:
        """Write ``source``'s latest held-back failure, carrying the count of the others."""
        latest, rest = source.latest, source.pending
        rest[latest.reason] -= 1
        self._write(latest, None if forgotten else rest, rest if forgotten else None)
        source.pending, source.latest = Counter(), None

    def tick(self, every_s: float) -> None:
        """From the guard's sweep (every ``every_s``): release held-back failures of sources
        whose window has passed (within the global cap), and log the summary line."""
        now = time.monotonic()
        for source in list(self._sources.values()):
            if (source.latest is not None and now - source.last_event >= self.per_source_s
                    and self._spend(now)):
                self._release(source)
                source.last_event = now
        if self._forgotten.latest is not None:
            self._release(self._forgotten, forgotten=True)
        if self._recent:
            what = ", ".join(f"{n} {reason}" for reason, n in sorted(self._recent.items()))
            log.warning("TLS handshakes refused in the last %.0f s: %s, from %s source(s) "
                        "(fedgate_tls_handshake_failures_total; audit: tls.handshake_failed)",
                        every_s, what, len(self._recent_ips) if len(self._recent_ips) <
                        self.max_sources else f"{self.max_sources}+")
            self._recent.clear()
            self._recent_ips.clear()

    async def flush(self, *_: Any) -> None:
        """At shutdown (before the audit log closes): release every held-back failure and
        wait for the events being written."""
        for source in self._sources.values():
            if source.latest is not None:
                self._release(source)
        if self._forgotten.latest is not None:
            self._release(self._forgotten, forgotten=True)
        self.emit = None  # the audit log closes next: later failures are counted and logged
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
