"""The Redis store's audit outbox (docs/AUDIT.md *Outbox*, docs/STORES.md).

An accepted commit adds one entry (field ``e``: the accept's events, a JSON array) to
the stream ``P:{<tenant>}:audit:<owner>`` inside the commit script (redis_scripts.py
``COMMIT_LUA``; the key is passed in ``KEYS`` and carries the tenant's hash tag, so a
commit stays in one Redis Cluster slot). The owner (``<node_name>/<worker>``) chains
the events and acknowledges them here; the stream is deleted once empty.

Start-up recovery finds an owner's streams with ``SCAN`` (one pass over the keyspace).
On a Redis Cluster the cluster client's ``scan_iter`` walks every master in turn.
"""

from __future__ import annotations

from redis.asyncio import Redis

from .base import OWNER_RE, OutboxEntry
from .redis_scripts import ACK_LUA

SCAN_COUNT = 1000
ACK_BATCH = 500


async def _scan(r: Redis, pattern: str) -> list[str]:
    return [k.decode() if isinstance(k, bytes) else k
            async for k in r.scan_iter(match=pattern, count=SCAN_COUNT)]


async def owners(r: Redis, prefix: str, node: str) -> set[str]:
    """The owners ``<node>/<k>`` with a non-empty outbox in some tenant."""
    keys = await _scan(r, f"{prefix}:{{*}}:audit:{node}/*")
    found = {key.rsplit(":audit:", 1)[1] for key in keys}
    return {o for o in found if OWNER_RE.fullmatch(o) and o.startswith(f"{node}/")}


async def read(r: Redis, prefix: str, owner: str) -> list[OutboxEntry]:
    """Every entry of ``owner``'s streams (all tenants), oldest first per stream."""
    entries = []
    for key in sorted(await _scan(r, f"{prefix}:{{*}}:audit:{owner}")):
        for entry_id, fields in await r.xrange(key):
            if b"e" in fields:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                entries.append(OutboxEntry((key, eid), owner, fields[b"e"]))
    return entries


async def ack(r: Redis, refs: list) -> None:
    """``XDEL`` the entries ``(stream key, entry id)``; an emptied stream is deleted."""
    by_key: dict[str, list[str]] = {}
    for key, entry_id in refs:
        by_key.setdefault(key, []).append(entry_id)
    for key, ids in by_key.items():
        for i in range(0, len(ids), ACK_BATCH):
            await r.eval(ACK_LUA, 1, key, *ids[i:i + ACK_BATCH])
