"""The audit outbox, gateway side (docs/AUDIT.md *Outbox*, docs/STORES.md).

An accepted commit stores its audit events in the store's outbox under this worker's
owner name ``<node_name>/<worker index>`` (gateway/store/base.py ``Commit.audit``); the
worker then appends them to the hash chain before answering and acknowledges the entry
(:class:`OutboxAcks`: batched, allowed to lag). At start-up, before serving,
:func:`recover` chains what a previous run of the same owner left: entries whose events
are already in the chain (a crash before the ack) are only acknowledged; the others
(a crash or an audit failure before the append) are appended first.

Owners: ``fedgate serve`` is worker 0; ``--workers N`` runs workers 1..N. The first
worker (0 or 1) also recovers the node's other owners that no live worker has (a
restart with fewer workers, or a switch between one process and several).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import orjson

from audit.recovery import find_event_ids, oldest_minus
from audit.writer import GroupWriter
from gateway.store import Store, StoreError

log = logging.getLogger("fedgate.audit")

ACK_EVERY_S = 0.2
ACK_BATCH = 256


def owner_name(node: str, index: int) -> str:
    return f"{node}/{index}"


def owners_to_recover(node: str, index: int, workers: int, pending: set[str]) -> list[str]:
    """This worker's own owner, and (the first worker only) the node's owners that no
    live worker has: ``pending`` are the owners with outbox entries."""
    live = {0} if workers <= 1 else set(range(1, workers + 1))
    mine = [owner_name(node, index)]
    if index == min(live):
        mine += sorted(o for o in pending
                       if o.rpartition("/")[2].isdigit() and int(o.rpartition("/")[2]) not in live)
    return mine


async def recover(store: Store, writer: GroupWriter, audit_path: Path, owners: list[str],
                  executor: Executor) -> tuple[int, int]:
    """Chain the events ``owners`` left in the outbox; return (appended, already there).
    Raises (the gateway does not start) if an entry is unreadable or the chain refuses."""
    entries = [entry for owner in owners for entry in await store.outbox_read(owner)]
    if not entries:
        return 0, 0
    events: list[dict[str, Any]] = []
    for entry in entries:
        try:
            batch = orjson.loads(entry.events)
        except orjson.JSONDecodeError:
            batch = None
        if not isinstance(batch, list) or not all(isinstance(e, dict) for e in batch):
            raise ValueError(f"audit outbox entry {entry.ref!r} of {entry.owner} is not a "
                             "JSON array of events: inspect it before starting again")
        events += batch
    ids = {e["event.id"] for e in events if isinstance(e.get("event.id"), str)}
    since = oldest_minus(e.get("@timestamp") for e in events)
    found = await asyncio.get_running_loop().run_in_executor(
        executor, find_event_ids, audit_path, ids, since)
    missing = [e for e in events if e.get("event.id") not in found]
    if missing:
        await writer.write_all(missing)
    await store.outbox_ack([entry.ref for entry in entries])
    return len(missing), len(events) - len(missing)


class OutboxAcks:
    """Acknowledgements of chained entries, sent in batches (every ``ACK_EVERY_S`` or
    ``ACK_BATCH`` entries, and at shutdown). One that fails is kept and sent again; an
    entry never acknowledged is only re-checked at the next start (its events are in
    the chain: recovery acknowledges it without appending)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._refs: list[Any] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failing = False
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add(self, ref: Any) -> None:
        self._refs.append(ref)
        if len(self._refs) >= ACK_BATCH:
            self._wake.set()

    async def _run(self) -> None:
        # ``close`` cancels this task, but a cancel can be lost: Python 3.11's
        # asyncio.wait_for returns its result when what it awaited finished on the tick
        # the cancel came, and redis-py writes every command through it. So the loop
        # also ends on ``_closing`` (never hanging the shutdown that awaits it), and
        # waits for its wake-up without wait_for.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ACK_EVERY_S):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return  # close() flushes
            await self.flush()

    async def flush(self) -> None:
        refs, self._refs = self._refs, []
        if not refs:
            return
        try:
            await self.store.outbox_ack(refs)
        except StoreError as exc:
            if not self._failing:  # one line per outage, not one per retry
                log.warning("audit outbox: acknowledgements failed, retrying: %s", exc)
            self._failing = True
            self._refs[:0] = refs
            return
        except BaseException:  # cancelled mid-way: kept for the final flush
            self._refs[:0] = refs
            raise
        if self._failing:
            log.info("audit outbox: acknowledgements recovered")
            self._failing = False

    async def close(self) -> None:
        self._closing = True
        self._wake.set()  # the loop ends even if the cancel below is lost
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()
