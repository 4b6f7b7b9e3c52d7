"""``EmitterClient``: sign, persist, deliver; query and verify feedback (docs/EMITTER.md).

Every telemetry or graph body is signed once, written to the outbox (durable) and then
delivered over mTLS (``emitter.transport``: TLS 1.3, gateway certificate pinned when
``server_pins`` is set, redirects never followed, answers capped). Before each attempt
the row is durably marked ``maybe_accepted``; only an answer proving the attempt was not
accepted takes that back. Transient failures are retried with capped exponential backoff
and jitter, resending the **same** signed bytes while the gateway's window still admits
them; a 409 carrying ``duplicate_of`` means an earlier attempt already landed. Feedback
queries (``emitter.feedback``) pass §6 (``emitter.verify``) and are applied once while in
force through the ledger (``emitter.ledger``); every verdict is audited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from audit import AuditLog
from gateway.config import ConfigError
from gateway.routes import GRAPH_PATH, TELEMETRY_PATH
from gateway.tls import TlsConfigError, client_context
from keyring.ed25519 import PrivateKey, verify

from .feedback import FeedbackQueries, QueryError, text
from .ledger import Ledger
from .outbox import Outbox, OutboxItem
from .settings import EmitterSettings, check_url, private_file, secure_state_dir
from .signing import SignedBody, new_nonce, sign_request
from .transport import (
    RETRY_STATUSES,
    TRANSPORT_ERRORS,
    ServerPins,
    backoff_delay,
    classify,
    open_session,
    post,
    retry_after,
)
from .verify import VerifiedFeedback, load_feedback_keyring

__all__ = ["DeliveryResult", "EmitterClient", "QueryError", "ServerPins", "backoff_delay"]

log = logging.getLogger("fedgate.emitter")

MAYBE_LANDED_STATUSES = frozenset({502, 504})  # a proxy may have lost the upstream's 202
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """``outcome``: accepted | duplicate (delivered earlier) | queued (kept in the outbox,
    retried by ``flush``) | rejected (permanent) | refused (not sent: TLS/pin failure;
    kept in the outbox)."""

    outcome: str
    outbox_id: int | None
    status: int | None = None
    request_id: str | None = None
    finding_id: str | None = None
    duplicate_of: str | None = None
    error: str | None = None
    detail: str | None = None
    possible_duplicate: bool = False  # re-signed after an attempt that may have landed

    @property
    def delivered(self) -> bool:
        return self.outcome in ("accepted", "duplicate")


@dataclass(frozen=True, slots=True)
class _Verdict:
    result: DeliveryResult | None = None  # final; None: transient, try again
    resign: bool = False  # the gateway said timestamp_out_of_window
    wait: float = 0.0  # at least this long before the next attempt (Retry-After)


class EmitterClient(FeedbackQueries):
    """Async context manager. ``signer``: anything with ``.sign(bytes) -> bytes`` and
    ``.public`` (an HSM handle); default: the PEM ``signing_key`` of the settings.
    ``query_feedback`` comes from :class:`emitter.feedback.FeedbackQueries`."""

    def __init__(self, settings: EmitterSettings, *, signer: Any = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        check_url(settings.url)  # refuse http:// even for settings built in code
        self.settings, self._clock, self._sleep = settings, clock, sleep
        self.signer = signer if signer is not None else self._load_signer()
        self._check_signer()
        self._ssl = self._tls_context()
        try:
            self.keyring = load_feedback_keyring(settings.feedback_keyring)
        except ValueError as exc:
            raise ConfigError(f"feedback_keyring: {exc}") from None
        if not settings.server_pins:
            log.warning("server_pins is empty: the gateway certificate is checked against "
                        "the CA only (pinning recommended)")
        self.outbox: Outbox | None = None
        self.ledger: Ledger | None = None
        self.audit: AuditLog | None = None
        self.session: aiohttp.ClientSession | None = None
        self.last_feedback: VerifiedFeedback | None = None
        self._inflight: set[int] = set()
        self._hold_until = 0.0  # monotonic: after an outage, new sends just queue

    # -- set-up ------------------------------------------------------------------------

    def _load_signer(self) -> PrivateKey:
        try:
            return PrivateKey.load(self.settings.signing_key)
        except ValueError as exc:
            raise ConfigError(f"signing_key: {exc}") from None

    def _check_signer(self) -> None:
        probe = b"fedgate emitter signer self-check"
        try:
            ok = verify(bytes(self.signer.public), self.signer.sign(probe), probe)
        except (AttributeError, TypeError) as exc:
            raise ConfigError(f"signing_key: not a signer (.sign/.public): {exc}") from None
        if not ok:
            raise ConfigError("signing_key: the signer's signature does not verify under "
                              "its public key")

    def _tls_context(self):
        s = self.settings
        try:
            return client_context(s.ca, s.cert, s.key)
        except TlsConfigError as exc:
            raise ConfigError(f"ca/cert/key: {exc}") from None

    async def open(self) -> EmitterClient:
        state = secure_state_dir(self.settings.state_dir)  # settings may come from code
        self.outbox = Outbox(state / "outbox.db", clock=self._clock)
        self.ledger = Ledger(state / "emitter.db")
        private_file(state / "emitter-audit.jsonl")
        self.audit = AuditLog(state / "emitter-audit.jsonl")
        self.session = open_session(self._ssl, self.settings.server_pins,
                                    self.settings.request_timeout_s)
        return self

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        for part in (self.outbox, self.ledger, self.audit):
            if part is not None:
                part.close()
        self.session = self.outbox = self.ledger = self.audit = None

    async def __aenter__(self) -> EmitterClient:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- signing and sending -----------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def sign(self, body: dict[str, Any]) -> SignedBody:
        """Fresh timestamp and nonce, the producer signature, canonical bytes."""
        return sign_request(self.signer, body, identity=self.settings.identity,
                            kid=self.settings.kid, timestamp=self._now(), nonce=new_nonce())

    async def send_telemetry(self, body: dict[str, Any]) -> DeliveryResult:
        return await self._send(TELEMETRY_PATH, body)

    async def send_graph(self, body: dict[str, Any]) -> DeliveryResult:
        return await self._send(GRAPH_PATH, body)

    async def _send(self, path: str, body: dict[str, Any]) -> DeliveryResult:
        signed = self.sign(body)  # ValueError: not JSON-serialisable (NaN, …)
        execution = _execution(path, body)
        if execution is not None:  # only a hash the gateway ACCEPTED earlier binds
            anchored = self.ledger.sent_hash(execution[0], execution[1])
            if anchored is not None and anchored != execution[2].lower():
                return DeliveryResult("rejected", None, error="attestation_mismatch",
                                      detail="this execution was accepted with another "
                                      "attestation hash; the gateway would refuse it")
        item = self.outbox.enqueue(signed, path)  # durable before the first send
        if time.monotonic() < self._hold_until:
            return _queued(item, "gateway unavailable recently; queued")
        return await self.deliver(item)

    def _accepted(self, item: OutboxItem) -> None:
        """The gateway took this row: remember its attestation hash for §6 check 8 (before
        the row is marked delivered, so a crash in between only repeats this)."""
        execution = _execution(item.path, json.loads(item.body))
        if execution is None:
            return
        try:
            self.ledger.record_sent(*execution)
        except ValueError as exc:  # only with anchoring off at the gateway
            log.warning("outbox #%d: %s; the first hash stays bound", item.id, exc)

    async def flush(self) -> list[DeliveryResult]:
        """Retry every pending outbox row, oldest first (call on start-up). Each row is
        re-read before it is tried (another task may have settled it). Stops trying at
        the first row the gateway cannot take now; the rest are reported queued."""
        results: list[DeliveryResult] = []
        down = False
        for item_id in self.outbox.pending_ids():
            item = self.outbox.get(item_id)
            if item.state != "pending" or item.id in self._inflight:
                continue
            if down:
                results.append(_queued(item, "gateway unavailable; not tried"))
                continue
            result = await self.deliver(item)
            down = result.outcome == "queued"
            results.append(result)
        return results

    async def deliver(self, item: OutboxItem) -> DeliveryResult:
        """Deliver one outbox row: retries with backoff, same bytes while the gateway's
        window admits them; re-signs (new timestamp and nonce) at most once when its
        timestamp has left the window. A row already being delivered is not sent twice."""
        if item.id in self._inflight:
            return _queued(item, "already being delivered")
        ids = {item.id}  # this row, and each row it is re-signed into
        self._inflight.add(item.id)
        try:
            result = await self._deliver(item, ids)
        finally:
            self._inflight.difference_update(ids)
        self._hold_until = (time.monotonic() + self.settings.backoff_max_s
                            if result.outcome == "queued" else 0.0)
        return result

    async def _deliver(self, item: OutboxItem, ids: set[int]) -> DeliveryResult:
        s = self.settings
        final = item.state != "pending"  # a final row is resent as is, never re-signed
        resigned = final
        for attempt in range(1, s.max_attempts + 1):
            if not final:
                item = self.outbox.get(item.id)  # maybe_accepted may have changed
                if item.state != "pending":
                    return self._settled(item)
                if not resigned and self._must_resign(item):
                    item, resigned = self._resign(item, ids), True
                    if item.state != "pending":
                        return self._settled(item)
            verdict = await self._attempt(item)
            if verdict.result is not None:
                return verdict.result
            if verdict.resign:
                if resigned:  # fresh and still out of window: the clocks disagree
                    return self._refuse(item, "timestamp_out_of_window", "the gateway's "
                                        "clock disagrees with ours; fix it, then flush").result
                item, resigned = self._resign(item, ids), True
                if item.state != "pending":
                    return self._settled(item)
                continue
            if attempt < s.max_attempts:
                delay = backoff_delay(attempt, s.backoff_initial_s, s.backoff_max_s)
                await self._sleep(min(s.backoff_max_s, max(delay, verdict.wait)))
        return _queued(self.outbox.get(item.id), "gateway unavailable; will retry")

    def _must_resign(self, item: OutboxItem) -> bool:
        """Too old to be inside the gateway's ±skew window when it arrives. Bytes that may
        already have landed are resent until they have left the window itself — while
        inside it the gateway can still answer 409 ``duplicate_of`` — and re-signed only
        after; bytes never accepted are re-signed a margin earlier (exactly-once safe)."""
        skew = self.settings.clock_skew_s
        limit = skew if item.maybe_accepted else skew - max(1, skew // 6)
        return self._now() - item.timestamp > limit

    def _resign(self, item: OutboxItem, ids: set[int]) -> OutboxItem:
        """The re-signed row (added to ``ids`` and the in-flight set), or — if another
        task settled this one meanwhile — the row as it is now (not pending)."""
        body = json.loads(item.body)
        try:
            new = self.outbox.resign(item.id, self.sign(body))
        except ValueError:
            return self.outbox.get(item.id)
        ids.add(new.id)
        self._inflight.add(new.id)
        if new.possible_duplicate:
            log.warning("outbox #%d re-signed as #%d after an attempt that may have been "
                        "accepted: a duplicate finding is possible", item.id, new.id)
        return new

    def _settled(self, item: OutboxItem, hops: int = 0) -> DeliveryResult:
        """The result for a row that is no longer pending (its replacement, if expired)."""
        if item.state == "expired" and item.replaced_by is not None and hops < 100:
            return self._settled(self.outbox.get(item.replaced_by), hops + 1)
        if item.state == "delivered":
            if item.status == 409:
                return DeliveryResult("duplicate", item.id, 409,
                                      duplicate_of=item.request_id)
            return DeliveryResult("accepted", item.id, item.status, item.request_id,
                                  possible_duplicate=item.possible_duplicate)
        if item.state == "rejected":
            return DeliveryResult("rejected", item.id, item.status, error=item.last_error)
        return _queued(item, "being delivered elsewhere")

    async def _attempt(self, item: OutboxItem) -> _Verdict:
        previous = self.outbox.begin_attempt(item.id)  # durable before a byte goes out
        try:
            status, payload, headers = await self.post_raw(item.path, item.headers, item.body)
        except TRANSPORT_ERRORS as exc:
            failure = classify(exc)
            if failure.refused:
                return self._refuse(item, failure.code, failure.detail, previous)
            self.outbox.record_attempt(item.id, failure.detail,
                                       maybe_accepted=True if failure.sent else previous)
            return _Verdict()
        return self._judge(item, previous, status, payload, headers)

    def _refuse(self, item: OutboxItem, code: str, detail: str,
                previous: bool | None = None) -> _Verdict:
        self.outbox.record_attempt(item.id, code, maybe_accepted=previous)
        log.error("outbox #%d not sent: %s (%s); kept in the outbox", item.id, code, detail)
        return _Verdict(DeliveryResult("refused", item.id, error=code, detail=detail))

    def _judge(self, item: OutboxItem, previous: bool, status: int, payload: Any,
               headers: Any) -> _Verdict:
        """``previous`` goes back into ``maybe_accepted`` only when the answer proves this
        attempt was not accepted (a gateway 4xx, 503, 429)."""
        if status in (202, 409) and not isinstance(payload, dict):
            # the decision needs the body (request_id / duplicate_of): not an answer
            self.outbox.record_attempt(item.id, f"{status} malformed_response",
                                       maybe_accepted=True)
            return _Verdict()
        body = payload if isinstance(payload, dict) else {}
        code, rid = text(body.get("error")) or f"http_{status}", text(body.get("request_id"))
        if status == 202:
            self._accepted(item)
            self.outbox.mark_delivered(item.id, rid)
            return _Verdict(DeliveryResult(
                "accepted", item.id, 202, rid, text(body.get("finding_id")),
                possible_duplicate=item.possible_duplicate))
        duplicate_of = text(body.get("duplicate_of"))
        if status == 409 and duplicate_of is not None:
            self._accepted(item)
            self.outbox.mark_delivered(item.id, duplicate_of, 409)
            return _Verdict(DeliveryResult("duplicate", item.id, 409, rid,
                                           duplicate_of=duplicate_of))
        if status in RETRY_STATUSES:
            self.outbox.record_attempt(item.id, f"{status} {code}", maybe_accepted=(
                True if status in MAYBE_LANDED_STATUSES else previous))
            return _Verdict(wait=retry_after(headers) if status == 429 else 0.0)
        if status == 401 and code == "timestamp_out_of_window":
            self.outbox.record_attempt(item.id, f"{status} {code}", maybe_accepted=previous)
            return _Verdict(resign=True)
        if 300 <= status < 400:
            code = "redirect_refused"
        self.outbox.mark_rejected(item.id, status, code,
                                  maybe_accepted=previous if 400 <= status < 500 else None)
        return _Verdict(DeliveryResult("rejected", item.id, status, rid, error=code,
                                       detail=text(body.get("detail"))))

    async def post_raw(self, path: str, headers: dict[str, str], body: bytes):
        """One POST of exactly these bytes over the pinned mTLS session: no outbox, no
        retry, no redirect, answer capped (``transport.ResponseTooLarge``). →
        ``(status, parsed JSON or None, response headers)``. (``deliver`` uses it; demos
        use it to show tampered and replayed requests.)"""
        return await post(self.session, self.settings.url + path, headers, body,
                          ssl_context=self._ssl)


def _execution(path: str, body: Any) -> tuple[str, str, str] | None:
    """``(tenant_id, execution fingerprint, attestation hash)`` of a telemetry or graph
    body when all three are well formed (64 hex), else None: the gateway will say why."""
    try:
        if path == TELEMETRY_PATH:
            fp = body["execution_hash"]
            att = body["payload"]["attributes"]["attestation_measurement_hash"]
        else:
            fp, att = body["execution_fingerprint"], body["attestation_measurement_hash"]
        tenant = body["tenant_id"]
    except (KeyError, TypeError):
        return None
    if not (isinstance(tenant, str) and isinstance(fp, str) and isinstance(att, str)
            and _HEX64.fullmatch(fp) and _HEX64.fullmatch(att)):
        return None
    return tenant, fp, att


def _queued(item: OutboxItem, detail: str) -> DeliveryResult:
    return DeliveryResult("queued", item.id, error=item.last_error, detail=detail,
                          possible_duplicate=item.possible_duplicate)
