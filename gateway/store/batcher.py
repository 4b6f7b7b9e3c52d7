"""Coalescing of concurrent requests' commits (issue 9): one ``commit_many`` per tick.

:class:`CommitBatcher` is the store side of the group commit, as ``audit/writer.py``'s
``GroupWriter`` is the chain's: the commits submitted within one event-loop tick, or while
a group is in flight, go to the store together (``Store.commit_many``: one Redis round
trip, one SQLite transaction and fsync). Each caller gets its own commit's result or
StoreError, exactly what the store said about that commit: ``commit_many`` keeps every
commit atomic alone, and a commit that could be decided by an earlier one (same nonce,
same execution) is decided after it, in the order the callers submitted them. A commit
the store could never run (ValueError) is refused to its caller alone, before it joins
a group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .base import Commit, CommitResult, Store, StoreError

__all__ = ["CommitBatcher"]

MAX_GROUP = 256  # commits per group; more wait for the next one


class CommitBatcher:
    """One per process (event loop), made at start-up around the process's store."""

    def __init__(self, store: Store, *, max_group: int = MAX_GROUP,
                 observe: Callable[[int], None] | None = None) -> None:
        self.store, self.max_group, self.observe = store, max_group, observe
        self._pending: list[tuple[Commit, asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def commit(self, commit: Commit) -> CommitResult:
        """As ``Store.commit``: the result, or raise the StoreError that failed it."""
        self.store.check_commit(commit)  # a programming error fails its caller alone
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((commit, future))
        if self._task is None:  # starts on the next tick: this tick's submitters join
            self._task = loop.create_task(self._drain())
        result = await future
        if isinstance(result, StoreError):
            raise result
        return result

    async def _drain(self) -> None:
        try:
            while self._pending:
                group = self._pending[:self.max_group]
                del self._pending[:self.max_group]
                try:
                    results = await self.store.commit_many([c for c, _ in group])
                except BaseException as exc:  # a bug or a cancel: fail the group, never hang
                    error = exc if isinstance(exc, Exception) else StoreError(
                        "claim", "the commit was cancelled")
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                if self.observe is not None:
                    self.observe(len(group))
                for (_, future), result in zip(group, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._task = None
            if self._pending:  # cancelled with submitters waiting: they fail, never hang
                group, self._pending = self._pending, []
                for _, future in group:
                    if not future.done():
                        future.set_exception(StoreError("claim", "the store is closing"))
