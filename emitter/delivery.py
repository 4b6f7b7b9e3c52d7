"""Delivery of outbox rows (docs/EMITTER.md "Delivery"): attempts, retries, re-signing.

:class:`Deliveries` is the half of :class:`emitter.client.EmitterClient` that turns one
outbox row into a :class:`DeliveryResult`: before each attempt the row is durably marked
``maybe_accepted``; only an answer proving the attempt was not accepted takes that back.
Transient failures are retried with capped exponential backoff and jitter, resending
the **same** signed bytes while the gateway's window still admits them; a 409 carrying
``duplicate_of`` means an earlier attempt already landed. A rejection keeps the gateway's
``pointer`` and ``errors[0].message``; a row left pending keeps why (``last_error``), so
"gateway unreachable" and "gateway up, its store unavailable" stay distinct.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from schemas.routes import TELEMETRY_PATH

from .feedback import text
from .outbox import OutboxItem
from .transport import (
    RETRY_STATUSES,
    TRANSPORT_ERRORS,
    backoff_delay,
    classify,
    post,
    retry_after,
)

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
    pointer: str | None = None  # a rejection's JSON pointer (422 schema_violation)

    @property
    def delivered(self) -> bool:
        return self.outcome in ("accepted", "duplicate")


@dataclass(frozen=True, slots=True)
class _Verdict:
    result: DeliveryResult | None = None  # final; None: transient, try again
    resign: bool = False  # the gateway said timestamp_out_of_window
    wait: float = 0.0  # at least this long before the next attempt (Retry-After)



class Deliveries:
    """Mixin of :class:`EmitterClient`: needs ``settings``, ``outbox``, ``ledger``,
    ``session``, ``_ssl``, ``_sleep``, ``_now``, ``sign``, ``_inflight``, ``_hold_until``."""

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
                                       detail=_message(body), pointer=text(body.get("pointer"))))

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


def _message(body: dict) -> str | None:
    """The v1.1 ``errors[0].message`` (what the SpectraStrike client reads), else
    ``detail``."""
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        message = text(errors[0].get("message"))
        if message:
            return message
    return text(body.get("detail"))


def _queued(item: OutboxItem, detail: str) -> DeliveryResult:
    return DeliveryResult("queued", item.id, error=item.last_error, detail=detail,
                          possible_duplicate=item.possible_duplicate)
