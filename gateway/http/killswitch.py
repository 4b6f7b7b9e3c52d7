"""The kill switch in a running gateway (PROTOCOL.md §8 v1.1): keep the pipeline's
revoked-key set equal to the store's.

At start-up the whole set is read before the gateway serves (gateway/http/app.py
``resources``; a store that cannot be read stops start-up: fail closed). Then one task
re-reads it whenever the store signals a change (gateway/store/revocations.py: Redis
pub/sub, a SQLite poll) and, in any case, every ``[server] revocation_refresh_s``: a lost
signal delays a revocation by at most that period. Each re-read swaps the pipeline's
``Trust`` in one assignment; a newly revoked kid is one log line. A failed re-read keeps
the set already known (revocations are never undone, so it is only late, never wrong) and
is logged, throttled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from gateway import logs
from gateway.pipeline.pipeline import Pipeline
from gateway.store import Revocation, Store, StoreError

log = logs.get_logger("fedgate.keys")


class RevocationWatcher:
    def __init__(self, store: Store, pipeline: Pipeline, refresh_s: float,
                 on_count: Callable[[int], None] | None = None) -> None:
        self.store, self.pipeline, self.refresh_s = store, pipeline, refresh_s
        self.on_count = on_count  # the fedgate_revoked_keys gauge
        self.failures = logs.Throttle(log, "cannot re-read the revoked keys")
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        """Run :meth:`run` in a task of its own, until :meth:`close`."""
        self._task = asyncio.get_running_loop().create_task(self.run())

    def changed(self) -> None:
        """The store signalled a change: re-read now."""
        self._changed.set()

    async def close(self) -> None:
        """Stop and wait for the task. It is cancelled, but a cancel can be lost (Python
        3.11's asyncio.wait_for returns its result when what it awaited finished on the
        tick the cancel came, and redis-py writes every command through it): the loop
        also ends on ``_closing``, and the shutdown awaiting it never hangs."""
        self._closing = True
        self._changed.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def refresh(self) -> None:
        try:
            revoked = await self.store.revoked_keys()
        except StoreError as exc:
            self.failures.failed(exc, keeping="the revoked keys already known")
            return
        self.failures.recovered()
        self.apply(revoked)

    def apply(self, revoked: Mapping[str, Revocation], *, at_start: bool = False) -> None:
        known = self.pipeline.trust.revoked
        self.pipeline.revoke(known | frozenset(revoked))  # one assignment; never undone
        keyring = self.pipeline.trust.files_keyring
        if at_start:
            if revoked:
                log.info("revoked keys read from the store", count=len(revoked),
                         in_keyring=len(set(revoked) & set(keyring)))
        else:
            for kid in sorted(set(revoked) - known):
                rev = revoked[kid]
                log.warning("key revoked: refusing it from now on (401 key_not_valid)",
                            kid=kid, in_keyring=kid in keyring, reason=rev.reason,
                            revoked_at=rev.revoked_at)
        if self.on_count is not None:
            self.on_count(len(self.pipeline.trust.revoked))

    async def run(self) -> None:
        """Until closed: re-read on every signal and every ``refresh_s``."""
        listener = asyncio.create_task(self._listen())
        try:
            while not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.refresh_s):  # not wait_for: see close
                        await self._changed.wait()
                self._changed.clear()
                if not self._closing:
                    await self.refresh()
        finally:
            # its store calls never go through wait_for (the pub/sub connection has no
            # socket_timeout; SQLite polls in a thread): this cancel is not lost
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _listen(self) -> None:
        async for _ in self.store.revocation_signals():
            self.changed()
