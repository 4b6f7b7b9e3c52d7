"""Store amnesia on a Redis Cluster: one epoch per tenant (docs/STORES.md "Store amnesia
on a Redis Cluster").

On a single Redis every key is lost together, so one missing tenant marker next to a
store-wide epoch can only be a new tenant. On a cluster each master holds its own slots
and can lose them alone (restarted without its data, a failover to a replica that never
synced): a tenant's marker may vanish while ``P:schema`` — in another slot, maybe on
another master — keeps its epoch. So:

- ``P:{<tenant>}:epoch`` (the tenant's slot) holds **the tenant's own epoch**, checked by
  every commit exactly as on the single Redis (``COMMIT_LUA``, KEYS[4]);
- ``P:schema`` (its own slot) holds the store-wide ``epoch`` and one field
  ``tenant:<tenant>`` per tenant that ever got a marker: the **known tenants**. A tenant
  is registered there before any gateway commits for it (:func:`sync_tenant`, step 3,
  runs before the gateway's first commit with the marker).

A tenant whose marker is missing is then:

- *known*: it had a marker, so its slot lost its data → a new epoch for it, starting now;
- *unknown*, with ``P:schema`` intact: no gateway ever committed for it → it inherits the
  store-wide start (plus :data:`GRACE_S`, see below) with an id of its own;
- *unknown*, ``P:schema`` without an epoch (lost or new): cannot be told → starts now.

``P:schema`` itself may lose its data (the known set with it). Every gateway re-reads the
store-wide epoch every :data:`SCHEMA_CHECK_S` and, when it changed, registers again every
tenant it holds (:func:`reregister`). Commits of a tenant not yet registered again can
only happen within ``SCHEMA_CHECK_S + socket_timeout`` after the new store-wide epoch
started; an unknown tenant's inherited start is therefore ``store start + GRACE_S``
(never later than now): such commits are before it, and refused if their slot is lost.
"""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from .redis_epoch import ADOPT_OR_START_LUA, epoch_start, new_epoch

SCHEMA_CHECK_S = 1.0
GRACE_S = 2 * 300 + 60  # > SCHEMA_CHECK_S + the largest socket_timeout (300 s), twice

# KEYS[1] P:schema; ARGV[1] a new store-wide epoch (used only when there is none);
# ARGV[2] the tenant's field. → {store epoch, '1' if started here, '1' if the tenant is known}
SCHEMA_LUA = "#!lua" + ADOPT_OR_START_LUA + """\
local known = redis.call('HEXISTS', KEYS[1], ARGV[2])
return {epoch, started, tostring(known)}
"""

# KEYS[1] P:{<tenant>}:epoch; ARGV[1] the epoch to give it when it has none.
# → {the tenant's epoch, '1' if set here}
TENANT_LUA = """#!lua
local epoch = redis.call('GET', KEYS[1])
if epoch then return {epoch, '0'} end
redis.call('SET', KEYS[1], ARGV[1])
return {ARGV[1], '1'}
"""

# KEYS[1] P:schema; ARGV[1] a new store-wide epoch (used only when there is none);
# ARGV[2..] the tenant fields to register. → the store-wide epoch
REREGISTER_LUA = """#!lua
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('HSETNX', KEYS[1], 'version', '4')
end
for i = 2, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], '1') end
return epoch
"""


def tenant_field(tenant_id: str) -> str:
    return f"tenant:{tenant_id}"


async def sync_tenant(rc: RedisCluster, schema_key: str, tenant_id: str, tenant_key: str,
                      now: int) -> tuple[str, str, bool]:
    """The tenant's epoch: → (tenant epoch, store-wide epoch, whether this call began a
    new epoch for a tenant whose past may be lost). Three steps, each one slot: read
    the store-wide epoch and whether the tenant is known; give the tenant a marker if it
    has none; register the tenant (before the caller's first commit with the marker)."""
    field = tenant_field(tenant_id)
    store, started, known = await rc.eval(SCHEMA_LUA, 1, schema_key, new_epoch(now), field)
    store = store.decode()
    lost = started == b"1" or known == b"1"
    start = now if lost else min(now, epoch_start(store) + GRACE_S)
    epoch, made = await rc.eval(TENANT_LUA, 1, tenant_key, new_epoch(start))
    await rc.hset(schema_key, field, "1")
    return epoch.decode(), store, lost and made == b"1"


async def reregister(rc: RedisCluster, schema_key: str, tenants: list[str], now: int) -> str:
    """Register ``tenants`` again (after ``P:schema`` changed epoch); → the store epoch."""
    epoch = await rc.eval(REREGISTER_LUA, 1, schema_key, new_epoch(now),
                          *(tenant_field(t) for t in tenants))
    return epoch.decode()
