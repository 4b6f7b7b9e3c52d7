"""The Redis store's epoch: noticing a store that lost its state ("amnesia").

A Redis that was flushed (``FLUSHALL``/``FLUSHDB``) or restarted without its data has
forgotten every nonce claim; without more, a captured request replayed inside the clock
window would be accepted again. The store therefore keeps an **epoch** — a value
``"<start>|<id>"`` (``start``: Unix seconds on the gateway clock, ``id``: random) — in two
places:

- ``P:schema`` field ``epoch``: the store-wide epoch, read at ``open``;
- ``P:{<tenant>}:epoch``: a copy in the tenant's hash slot, passed in ``KEYS`` of every
  commit. The commit script refuses to run (reply ``epoch``) unless it equals the epoch
  the gateway holds, so no claim is ever written or judged against a forgotten past.

A tenant marker that is missing while ``P:schema`` still holds the gateway's epoch
belongs to a tenant new to this epoch (keys are only lost all together: the store runs
``noeviction``, checked by ``check_eviction``): :data:`SYNC_LUA` copies the epoch.
``P:schema`` without an epoch means the store lost its state (or is brand new: the two
cannot be told apart): :data:`SYNC_LUA` starts a new epoch at the commit's ``now``. A
signed request whose timestamp − ``clock_skew_s`` is at or before that start may have
been accepted, and its nonce claimed, in the forgotten past: it is refused
(docs/STORES.md, "Store amnesia").
"""

from __future__ import annotations

import secrets

from redis.asyncio import Redis

# open: KEYS[1] P:schema; ARGV[1] the epoch of a store upgraded from the layout before
# epochs (version 2, no epoch: the store kept its state, so "since forever": start 0).
# Returns the epoch, or false when the store holds none (new, or lost its state).
OPEN_LUA = """#!lua
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then return epoch end
if redis.call('HGET', KEYS[1], 'version') == '2' then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
  return ARGV[1]
end
return false
"""

# KEYS[1] P:schema  KEYS[2] P:{<tenant>}:epoch; ARGV[1] a new epoch, started only when
# the store holds none. Returns {epoch, '1' if this call started it else '0'}.
# (Two hash slots: fine on the single Redis primary the store speaks to today.)
# The store-wide epoch in KEYS[1] (P:schema), started as ARGV[1] when there is none:
# sets ``epoch`` and ``started`` ('1' when this call started it). Shared with the
# cluster store's SCHEMA_LUA (redis_cluster_epoch.py).
ADOPT_OR_START_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local started = '0'
if not epoch then
  epoch, started = ARGV[1], '1'
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('HSETNX', KEYS[1], 'version', '4')  -- redis_scripts.SCHEMA_VERSION
end
"""
SYNC_LUA = "#!lua" + ADOPT_OR_START_LUA + """\
if redis.call('GET', KEYS[2]) ~= epoch then redis.call('SET', KEYS[2], epoch) end
return {epoch, started}
"""

SAFE_POLICY = "noeviction"


def new_epoch(start: int) -> str:
    return f"{start}|{secrets.token_hex(8)}"


def epoch_start(epoch: str) -> int:
    return int(epoch.split("|", 1)[0])


async def read_epoch(r: Redis, prefix: str) -> str | None:
    """The store's epoch at ``open`` (None: new, or lost its state). Call before
    ``migrate``: it tells an upgraded store (layout version 2) from a new one."""
    value = await r.eval(OPEN_LUA, 1, f"{prefix}:schema", new_epoch(0))
    return value.decode() if value else None


async def sync_epoch(r: Redis, prefix: str, tenant_key: str, now: int) -> tuple[str, bool]:
    """Give the tenant the store's epoch, starting a new one at ``now`` if the store has
    none; → (epoch, whether this call started it)."""
    epoch, started = await r.eval(SYNC_LUA, 2, f"{prefix}:schema", tenant_key, new_epoch(now))
    return epoch.decode(), started == b"1"


async def eviction_policy(r: Redis) -> str:
    """``maxmemory-policy`` from ``INFO memory`` (allowed where ``CONFIG`` is not)."""
    info = await r.info("memory")
    return str(info.get("maxmemory_policy", ""))


def eviction_refusal(policy: str) -> str | None:
    """Why ``policy`` is unsafe, or None for ``noeviction``."""
    if policy == SAFE_POLICY:
        return None
    return (f"Redis must run with 'maxmemory-policy {SAFE_POLICY}' (it runs "
            f"'{policy or 'unknown'}'): an evicted nonce claim lets its request be replayed")
