"""What ``fedgate emit`` and ``fedgate outbox flush`` do (docs/EMITTER.md "CLI").

1. :func:`stage_input` streams the input (``emitter.inputs``), checks every item, signs
   each valid one and stages it in the outbox (durable, not yet sendable) — bodies the
   outbox already holds (pending or delivered: an earlier, interrupted run of the same
   file) are not staged again. Any invalid item: the batch is dropped, nothing is sent
   (unless ``skip_invalid``). Otherwise the whole batch becomes pending at once.
2. :func:`send_pending` delivers every pending row, oldest first, one output line each,
   ``sent N of M`` on stderr; it stops at the first row the gateway cannot take now
   (the rest stay queued) or on Ctrl-C (:class:`Interrupt`: after the current row; a
   second Ctrl-C cancels that row too — it stays pending, ``maybe_accepted``, and is
   resent as the same bytes, which the gateway recognises: 409 ``duplicate_of``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

from schemas.routes import Route
from schemas.validate import Validators

from .batching import MAX_BATCH_BYTES, batchable, entry_size
from .client import EmitterClient
from .delivery import DeliveryResult
from .inputs import InputError, problem, read_items
from .outbox import FINAL_STATES, OutboxItem, body_digest

PROGRESS_EVERY = 100  # items between two progress lines when stderr is not a terminal
MAX_REPORTED = 100  # invalid items named one by one; the rest are counted
STAGE_ROWS, STAGE_BYTES = 500, 2 * 1024 * 1024  # one staging transaction at most
STORE_DOWN = frozenset({"store_unavailable", "replay_store_unavailable", "audit_unavailable"})
EXIT_INTERRUPTED = 130


class Interrupt:
    """SIGINT handler: the first Ctrl-C asks to stop after the current item, the second
    cancels the running task. Installed before the event loop (``asyncio.run`` keeps a
    handler that is not Python's default one)."""

    def __init__(self) -> None:
        self.count = 0
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> Interrupt:
        """Handle SIGINT (main thread only; elsewhere, e.g. a test's worker thread,
        Ctrl-C is not ours to handle). :meth:`restore` puts the old handler back."""
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self)
        return self

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            os.write(2, b"fedgate: interrupted: stopping after the current item "
                        b"(Ctrl-C again to stop now)\n")
        elif self.task is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)

    def watch(self) -> None:
        """Called from the running task it should cancel on a second Ctrl-C."""
        self.task, self.loop = asyncio.current_task(), asyncio.get_running_loop()

    @property
    def requested(self) -> bool:
        return self.count > 0


@dataclass
class Staged:
    items: int = 0  # items in the input
    queued: int = 0  # newly staged and committed
    known: int = 0  # already pending or delivered in the outbox
    invalid: list[str] = field(default_factory=list)  # "where: why", at most MAX_REPORTED
    invalid_count: int = 0
    error: str | None = None  # the input could not be read on
    interrupted: bool = False


def stage_input(client: EmitterClient, stream: BinaryIO, route: Route, *,
                skip_invalid: bool, interrupt: Interrupt, err: TextIO) -> Staged:
    """Read, check, sign and stage the whole input; commit it only if it may be sent."""
    outbox, s = client.outbox, client.settings
    validators, batch, report = Validators(), uuid.uuid4().hex, Staged()
    rows: list[tuple[Any, str, str]] = []
    size = 0

    def flush_rows() -> None:
        nonlocal size
        if rows:
            outbox.stage(batch, rows)
            rows.clear()
            size = 0

    try:
        for where, value in read_items(stream, s.max_body_bytes):
            if interrupt.requested:
                report.interrupted = True
                break
            report.items += 1
            why = problem(value, route, s.max_body_bytes, validators, client._now())
            if why is not None:
                report.invalid_count += 1
                if len(report.invalid) < MAX_REPORTED:
                    report.invalid.append(f"{where}: {why}")
                    print(_line(f"fedgate: emit: {where}: {why}"), file=err, flush=True)
                continue
            if report.invalid_count and not skip_invalid:
                continue  # nothing will be sent: just keep checking
            digest = body_digest(route.path, value)
            if outbox.holding(digest, batch) is not None:
                report.known += 1
                continue
            signed = client.sign(value)
            rows.append((signed, route.path, digest))
            size += len(signed.body)
            if len(rows) >= STAGE_ROWS or size >= STAGE_BYTES:
                flush_rows()
    except InputError as exc:
        report.error = str(exc)
    if report.error or report.interrupted or (report.invalid_count and not skip_invalid):
        outbox.discard_batch(batch)
        return report
    flush_rows()
    report.queued = outbox.commit_batch(batch)
    return report


def describe(result: DeliveryResult) -> str:
    """The one output line for an item."""
    if result.outcome == "accepted":
        line = f"accepted {result.request_id}"
        line += f" finding {result.finding_id}" if result.finding_id else ""
        return line + (" (possible duplicate: re-signed after a lost answer)"
                       if result.possible_duplicate else "")
    if result.outcome == "duplicate":
        return f"delivered (duplicate of {result.duplicate_of})"
    if result.outcome == "queued":
        return f"queued ({why_queued(result.error)}; will retry)"
    if result.outcome == "refused":
        return f"refused {result.error} (not sent; kept in the outbox)"
    line = f"rejected {result.status or '-'} {result.error}"
    line += f" at {result.pointer}" if result.pointer else ""
    return _line(line + (f": {result.detail}" if result.detail else ""))


def why_queued(last_error: str | None) -> str:
    """Unreachable is not the same as up-but-its-store-is-down (``last_error`` is
    ``"<status> <code>"`` after an answer, a transport failure's detail otherwise)."""
    status, _, code = (last_error or "").partition(" ")
    if status == "503" and code in STORE_DOWN:
        return f"gateway up, its store is unavailable (503 {code})"
    if status == "503":
        return f"gateway up but not ready (503 {code})"
    if status == "429":
        return f"gateway busy (429 {code})"
    if status in ("502", "504"):
        return f"no answer through a proxy ({status} {code})"
    return "gateway unavailable"


@dataclass
class Sent:
    total: int = 0
    delivered: int = 0
    failed: bool = False  # a rejection or refusal
    stopped: str | None = None  # why the rest stays queued
    interrupted: bool = False


async def send_pending(client: EmitterClient, interrupt: Interrupt, out: TextIO,
                       err: TextIO, *, batch: int = 1) -> Sent:
    """Deliver every pending row (oldest first): one line each on ``out``, progress on
    ``err``; stop at the first row the gateway cannot take now, or on Ctrl-C. ``batch``
    > 1: up to that many telemetry rows per batch request (``EmitterClient.deliver_batch``;
    single requests for a gateway without the batch route); Ctrl-C then stops after the
    current batch."""
    interrupt.watch()
    outbox, report = client.outbox, Sent()
    report.total = outbox.count_pending()
    tty = err.isatty()
    done, last = 0, 0
    try:
        while not report.stopped:
            ids = outbox.pending_ids(after=last, limit=500)
            if not ids:
                break
            for chunk in chunks(outbox, ids, batch):
                last = chunk[-1].id
                if interrupt.requested:
                    report.interrupted = True
                    return report
                results = (await client.deliver_batch(chunk) if len(chunk) > 1
                           else [await client.deliver(chunk[0])])
                for result in results:
                    done += 1
                    print(describe(result), file=out, flush=True)
                    report.delivered += result.delivered
                    report.failed |= result.outcome in ("rejected", "refused")
                    if result.outcome in ("queued", "refused") and not report.stopped:
                        report.stopped = (why_queued(result.error) if result.outcome == "queued"
                                          else f"refused {result.error}")
                if report.stopped:
                    break
                if tty or done % PROGRESS_EVERY < len(results):
                    end = "\r" if tty else "\n"
                    print(f"fedgate: sent {report.delivered} of {report.total}", end=end,
                          file=err, flush=True)
            else:
                last = max(last, ids[-1])
    except asyncio.CancelledError:  # a second Ctrl-C: the row stays pending
        report.interrupted = True
    return report


def chunks(outbox, ids: list[int], batch: int) -> Iterator[list[OutboxItem]]:
    """The pending rows of ``ids`` in order, grouped: up to ``batch`` consecutive telemetry
    rows (at most ``MAX_BATCH_BYTES`` of them) together; any other row alone."""
    group: list[OutboxItem] = []
    size = 0
    for item_id in ids:
        item = outbox.get(item_id)
        if item.state != "pending":
            continue
        if batch <= 1 or not batchable(item):
            if group:
                yield group
                group, size = [], 0
            yield [item]
            continue
        if group and (len(group) >= batch or size + entry_size(item) > MAX_BATCH_BYTES):
            yield group
            group, size = [], 0
        group.append(item)
        size += entry_size(item)
    if group:
        yield group


def summary(report: Sent, queued: int) -> str:
    """The last stderr line of a sending run; ``queued``: pending rows left."""
    line = f"fedgate: sent {report.delivered} of {report.total}"
    if report.interrupted:
        return line + (f"; interrupted: {queued} item(s) stay queued (fedgate outbox flush, "
                       "or emit the same input again: nothing is sent twice)")
    if report.stopped:
        return line + f"; stopped: {report.stopped}; {queued} item(s) still queued"
    return line


def prune_retained(client: EmitterClient) -> int:
    """Final rows older than ``outbox_retention_s`` go (a rejected body does not stay
    forever); rows staged by a run that died while reading its input go too."""
    outbox = client.outbox
    outbox.discard_batch()
    return outbox.prune(states=FINAL_STATES, older_than=client.settings.outbox_retention_s)


def _line(message: object) -> str:
    return " ".join(str(message).split())[:1000]
