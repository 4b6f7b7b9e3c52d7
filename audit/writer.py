"""Group commit of the audit chain on the asyncio side (issue 9).

:class:`GroupWriter` batches the events submitted while a write is in flight or within
the same event-loop tick, and writes each batch with one executor hop and one
``write_many`` call (``AuditSink.emit_many`` → ``AuditLog.append_many``: one flock, one
write, one fsync). Each submitter's future resolves when its own batch is durable; an
event the chain refuses fails alone, a file that cannot be extended fails the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

__all__ = ["GroupWriter"]

Event = dict[str, Any]


class GroupWriter:
    """One per process (event loop); ``write_many`` runs in ``executor``, one at a time."""

    def __init__(self, write_many: Callable[[list[Event]], list[Any]], executor: Executor,
                 *, observe: Callable[[int], None] | None = None) -> None:
        self.write_many, self.executor, self.observe = write_many, executor, observe
        #: per submission: its events, its future (resolved with the events' outcomes)
        self._pending: list[tuple[list[Event], asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def write(self, event: Event) -> Event:
        """``event`` chained and durable (its chained body); raises what the write raised."""
        (body,) = await self.write_all([event])
        return body

    async def write_all(self, events: list[Event]) -> list[Event]:
        """Several events, in this order, in the next batch (one submitter); raises the
        first exception that kept one of them out."""
        outcomes = await self._submit(events)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes

    async def write_each(self, events: list[Event]) -> list[Event | Exception]:
        """As :meth:`write_all`, but each event's own outcome: its chained body, or the
        exception that kept it out (the batch route's items are judged one by one)."""
        return await self._submit(events)

    def _submit(self, events: list[Event]) -> asyncio.Future:
        """One future for the submission (not one per event: no gather per request)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((list(events), future))
        if self._task is None:  # starts on the next tick: this tick's submitters join
            self._task = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                events = [event for submitted, _ in batch for event in submitted]
                try:
                    results = await loop.run_in_executor(self.executor, self.write_many,
                                                         events)
                except BaseException as exc:  # nothing of this batch was written
                    _fail(batch, exc if isinstance(exc, Exception)
                          else RuntimeError("audit write cancelled"))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                if len(results) != len(events):  # a bug of write_many: fail, never hang
                    _fail(batch, RuntimeError(f"audit write returned {len(results)} "
                                              f"outcomes for {len(events)} events"))
                    continue
                if self.observe is not None:
                    self.observe(len(events))
                at = 0
                for submitted, future in batch:
                    if not future.done():
                        future.set_result(results[at:at + len(submitted)])
                    at += len(submitted)
        finally:
            self._task = None
            if self._pending:  # cancelled with submitters waiting: they fail, never hang
                batch, self._pending = self._pending, []
                _fail(batch, RuntimeError("audit writer stopped"))


def _fail(batch: list[tuple[list[Event], asyncio.Future]], exc: Exception) -> None:
    """Every event of ``batch`` failed with ``exc`` (its submitter learns it per event)."""
    for submitted, future in batch:
        if not future.done():
            future.set_result([exc] * len(submitted))
