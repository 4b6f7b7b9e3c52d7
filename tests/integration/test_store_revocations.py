"""The kill switch's store half (gateway/store/revocations.py), on both real stores: a
revocation is stored for good (the first one's time and reason stand), read back whole by
another store object (another gateway), survives reopening, and is signalled to a
subscriber of another store object."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store import Revocation


@pytest.fixture
def store(any_store):
    """An open store of each kind: sqlite, redis, redis_cluster (conftest)."""
    return any_store


async def test_a_revocation_is_stored_for_good_and_the_first_one_stands(store, new_store):
    assert dict(await store.revoked_keys()) == {}
    first = await store.revoke_key("lab-2026", "laptop stolen", 1_800_000_000)
    assert first == Revocation("lab-2026", 1_800_000_000, "laptop stolen")
    again = await store.revoke_key("lab-2026", "second thoughts", 1_800_000_100)
    assert again == first  # final: not moved, not renamed
    other = new_store()  # another gateway, after a restart
    await other.open()
    try:
        assert dict(await other.revoked_keys()) == {"lab-2026": first}
    finally:
        await other.close()


async def test_another_store_object_is_signalled(store, new_store):
    watcher = new_store()
    await watcher.open()
    signals = watcher.revocation_signals()
    try:
        await asyncio.wait_for(anext(signals), 5)  # the first: (re)subscribed / first poll
        pending = asyncio.ensure_future(anext(signals))
        await asyncio.sleep(0.3)
        assert not pending.done()  # nothing happened: no signal
        await store.revoke_key("lab-b-2026", "", 1_800_000_000)
        await asyncio.wait_for(pending, 5)
        assert "lab-b-2026" in await watcher.revoked_keys()
    finally:
        await signals.aclose()
        await watcher.close()


@pytest.mark.parametrize("kid", ["k-1", "k:2.x"])
async def test_many_kids(store, kid):
    await store.revoke_key(kid, "r", 1)
    await store.revoke_key("other", "r", 2)
    assert set(await store.revoked_keys()) == {kid, "other"}
