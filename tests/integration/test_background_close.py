"""The gateway's background loops end when closed, on whichever event-loop tick the close
lands (the outbox acknowledgements, the revocation watcher), on both stores.

Python 3.11's ``asyncio.wait_for`` loses a cancellation that arrives once the thing it
waits for has finished but before the waiting task has resumed: it returns the result.
The loops waited for their wake-up event through it, and redis-py writes every command
through it, so a ``cancel()`` landing on such a tick was lost and the loop ran on while
the gateway's shutdown awaited it forever: in-process gateway tests hung 120 s in
``runner.cleanup()`` with an idle event loop (found by tests/hangdump.py: the task
``OutboxAcks._run`` "cancelling", still waiting at its ``wait_for``). Here every tick
from the wake-up to a few store round trips later gets its close; each must end
(``HANG_S`` only bounds a hang: the close takes milliseconds).
"""

from __future__ import annotations

import asyncio

import pytest
from lab import TENANT, Lab

from gateway.http.killswitch import RevocationWatcher
from gateway.http.outbox import ACK_BATCH, OutboxAcks
from gateway.store.redis import RedisStore

TICKS = 24  # closes at 0 … TICKS-1 ticks after the wake-up
HANG_S = 20.0


async def ticks(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def closes(close, n: int) -> None:
    try:
        async with asyncio.timeout(HANG_S):
            await close()
    except TimeoutError:
        pytest.fail(f"the close {n} tick(s) after the wake-up never ended")


def unknown_ref(store):
    """An outbox reference to no entry: acknowledging it deletes nothing."""
    return (f"fedgate:{{{TENANT}}}:audit:gw/0", "1-1") if isinstance(store, RedisStore) else 1


async def test_outbox_acks_close_ends_its_loop_on_any_tick(store):
    for n in range(TICKS):
        acks = OutboxAcks(store)
        acks.start()
        await ticks(2)  # the loop waits for its wake-up
        for _ in range(ACK_BATCH):  # a full batch wakes it: a flush (a store call) starts
            acks.add(unknown_ref(store))
        await ticks(n)
        await closes(acks.close, n)
        assert acks._task.done(), n


async def test_revocation_watcher_close_ends_it_on_any_tick(store):
    pipeline = Lab(store).pipeline
    for n in range(TICKS):
        watcher = RevocationWatcher(store, pipeline, 60.0)
        watcher.start()
        await ticks(2)  # it waits for a change signal
        watcher.changed()  # as the store's signal does: a re-read (a store call) starts
        await ticks(n)
        await closes(watcher.close, n)
