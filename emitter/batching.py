"""Outbox rows sent many at a time (docs/EMITTER.md "Batches"; PROTOCOL.md §5 v1.1).

:class:`Batches` is the half of :class:`emitter.client.EmitterClient` that delivers
several pending telemetry rows in one ``POST /internal/v1/telemetry/batch``. Each row
keeps the bytes and signature it was signed with (the batch carries them, not a new
signature), and its answer is judged exactly as a single send's (``Deliveries._judge``):
202 → delivered; 409 with ``duplicate_of`` → delivered; another 4xx → rejected; 429 / 5xx
→ left pending; 401 ``timestamp_out_of_window`` → re-signed and sent alone. Before the
request every row is durably ``maybe_accepted`` (one transaction for the batch).

The whole request: 200 → per-item results; 404 → the gateway has no batch route: every
row is sent alone, and so is everything after it in this client's life (remembered);
another 4xx (e.g. 413 from a gateway with a smaller ``max_batch_bytes``) → this batch's
rows are sent alone; 429 / 5xx / no answer → retried with backoff as a single send is,
then left pending.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from schemas.routes import BATCH_PATH, TELEMETRY_PATH

from .delivery import DeliveryResult, _queued
from .outbox import OutboxItem
from .transport import RETRY_STATUSES, TRANSPORT_ERRORS, backoff_delay, classify, retry_after

log = logging.getLogger("fedgate.emitter")

MAX_BATCH_BYTES = 1024 * 1024  # bounds the memory a batch takes (its bodies, base64, JSON)


def batchable(item: OutboxItem) -> bool:
    return item.path == TELEMETRY_PATH


def envelope(items: list[OutboxItem]) -> bytes:
    """The batch body: each row's own timestamp, nonce, signature, kid and exact bytes."""
    out = []
    for item in items:
        h = item.headers
        entry = {"timestamp": h["X-Telemetry-Timestamp"], "nonce": h["X-Telemetry-Nonce"],
                 "signature": h["X-Telemetry-Signature"],
                 "body_b64": base64.b64encode(item.body).decode("ascii")}
        if "X-Telemetry-Key-Id" in h:
            entry["kid"] = h["X-Telemetry-Key-Id"]
        out.append(entry)
    return json.dumps({"items": out}, separators=(",", ":")).encode()


def entry_size(item: OutboxItem) -> int:
    return 4 * (len(item.body) + 2) // 3 + 300  # its base64 and the other members


class Batches:
    """Mixin of :class:`EmitterClient` (with :class:`emitter.delivery.Deliveries`)."""

    #: the gateway answered 404 to a batch: single requests from now on
    batch_unsupported: bool = False

    async def deliver_batch(self, items: list[OutboxItem]) -> list[DeliveryResult]:
        """Deliver these rows (in order; one result each, in order). Rows that are not
        telemetry, already in flight, or due for re-signing go alone."""
        if self.batch_unsupported or len(items) < 2:
            return [await self.deliver(item) for item in items]
        results: dict[int, DeliveryResult] = {}
        group = []
        for item in items:
            if (not batchable(item) or item.id in self._inflight or item.state != "pending"
                    or self._must_resign(item)):
                results[item.id] = await self.deliver(item)
            else:
                group.append(item)
        if group:
            self._inflight.update(i.id for i in group)
            try:
                leftover = await self._send_batch(group, results)
            finally:
                self._inflight.difference_update(i.id for i in group)
            for item in leftover:  # undecided by the batch: as a single send
                results[item.id] = await self.deliver(self.outbox.get(item.id))
        return [results[item.id] for item in items]

    async def _send_batch(self, items: list[OutboxItem],
                          results: dict[int, DeliveryResult]) -> list[OutboxItem]:
        """One batch request (retried on a transient failure); fills ``results`` with the
        rows it decided and returns the rest (to be sent alone)."""
        s = self.settings
        body = envelope(items)
        headers = {"Content-Type": "application/json", "X-Service-Identity": s.identity}
        for attempt in range(1, s.max_attempts + 1):
            previous = self.outbox.begin_attempts([i.id for i in items])
            try:
                status, payload, resp_headers = await self.post_raw(BATCH_PATH, headers, body)
            except TRANSPORT_ERRORS as exc:
                failure = classify(exc)
                for item in items:
                    if failure.refused:
                        results[item.id] = self._refuse(item, failure.code, failure.detail,
                                                        previous[item.id]).result
                    else:
                        self.outbox.record_attempt(
                            item.id, failure.detail,
                            maybe_accepted=True if failure.sent else previous[item.id])
                if failure.refused:
                    return []
                wait = 0.0
            else:
                if status == 200:
                    return self._judge_items(items, previous, payload, results)
                if status not in RETRY_STATUSES:  # the batch itself refused: not accepted
                    for item in items:
                        self.outbox.record_attempt(item.id, f"{status} batch refused",
                                                   maybe_accepted=previous[item.id])
                    if status == 404:
                        self.batch_unsupported = True
                        log.info("the gateway has no batch route (404): sending single "
                                 "requests")
                    else:
                        log.warning("batch request refused (%s %s): sending its rows alone",
                                    status, _code(payload))
                    return items
                for item in items:
                    self.outbox.record_attempt(item.id, f"{status} {_code(payload)}",
                                               maybe_accepted=True if status in (502, 504)
                                               else previous[item.id])
                wait = retry_after(resp_headers) if status == 429 else 0.0
            if attempt < s.max_attempts:
                delay = backoff_delay(attempt, s.backoff_initial_s, s.backoff_max_s)
                await self._sleep(min(s.backoff_max_s, max(delay, wait)))
        for item in items:
            results[item.id] = _queued(self.outbox.get(item.id),
                                       "gateway unavailable; will retry")
        self._hold_until = time.monotonic() + s.backoff_max_s
        return []

    def _judge_items(self, items: list[OutboxItem], previous: dict[int, bool], payload: Any,
                     results: dict[int, DeliveryResult]) -> list[OutboxItem]:
        entries = payload.get("results") if isinstance(payload, dict) else None
        if not (isinstance(entries, list) and len(entries) == len(items) and all(
                isinstance(e, dict) and e.get("index") == n and isinstance(e.get("status"), int)
                for n, e in enumerate(entries))):
            for item in items:  # an answer we cannot read: the rows may have landed
                self.outbox.record_attempt(item.id, "200 malformed_response",
                                           maybe_accepted=True)
            return items
        leftover = []
        for item, entry in zip(items, entries, strict=True):
            verdict = self._judge(item, previous[item.id], entry["status"], entry, {})
            if verdict.result is not None:
                results[item.id] = verdict.result
            elif verdict.resign:  # its timestamp left the window: re-signed, sent alone
                leftover.append(item)
            else:  # 429 / 503 for this item: it stays pending, retried later
                results[item.id] = _queued(self.outbox.get(item.id),
                                           f"{entry['status']} {_code(entry)}")
        return leftover


def _code(payload: Any) -> str:
    code = payload.get("error") if isinstance(payload, dict) else None
    return code if isinstance(code, str) else "-"
