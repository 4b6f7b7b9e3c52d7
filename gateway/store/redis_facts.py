"""The Redis store's per-execution facts (docs/STORES.md *Facts*, docs/POLICY.md *Facts*).

Per ``(tenant, identity)``, all in the tenant's hash slot:

- ``P:{<tenant>}:f:<identity>`` hash: ``<fp>:<attestation hash>`` → the facts state
  (JSON) that :mod:`gateway.feedback.fold` defines; the commit script folds each stored
  finding or graph into it with :data:`FOLD_LUA` (the ops come precomputed from Python;
  the script applies them), in the same atomic step as the record.
- ``P:{<tenant>}:fi:<identity>`` sorted set: the same members scored by their latest
  ``received_at`` (a query reads the most recently active first).
- ``P:{<tenant>}:fs:<identity>`` list: ``kind|record id|reason`` of records listed
  under the identity that could not be folded (``put_record`` of an unusable record, the
  back-fill), newest first, so every query still reports them.

:func:`backfill_once` builds all three from the stored records for a keyspace written
before the facts existed (marker ``facts`` in ``P:schema``); it rewrites each identity's
keys whole, so a run cut short is simply run again at the next open.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway.feedback.bycontent import ByContent
from gateway.feedback.fold import (
    ANCHORED,
    FOLDED_KINDS,
    MAX_KEYED,
    Fold,
    Skip,
    apply,
    fold_record,
    noted_anchor,
    stored_validators,
)

# fold(facts hash, index, member, latest, first ARGV index of the ops, position):
# the ops are ARGV triples op, field, value (gateway/feedback/fold.py ``apply``)
FOLD_LUA = f"""
local MAX_KEYED = {MAX_KEYED}
""" + """
local function fold(fkey, ikey, member, latest, first, position)
  local raw = redis.call('HGET', fkey, member)
  local s = {}
  if raw then s = cjson.decode(raw) end
  local keyed = 0  -- fold.py MAX_KEYED: judged once per record
  for name in pairs(s) do
    if string.find(name, ':', 1, true) then keyed = keyed + 1 end
  end
  local room = keyed < MAX_KEYED
  for i = first, #ARGV, 3 do
    local op, f, v = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if not room and s[f] == nil and string.find(f, ':', 1, true) then
      -- the state is at its bound: no new keyed field
    elseif op == 'add' then s[f] = (s[f] or 0) + tonumber(v)
    elseif op == 'max' then
      v = tonumber(v)
      if s[f] == nil or v > s[f] then s[f] = v end
    elseif op == 'num' then s[f] = tonumber(v)
    elseif op == 'set' then s[f] = v
    elseif op == 'first' then
      if s[f] == nil then s[f] = position end
    else return redis.error_reply('unknown fold op') end
  end
  redis.call('HSET', fkey, member, cjson.encode(s))
  redis.call('ZADD', ikey, 'GT', latest, member)
end
"""
#: Each state's noted anchor, by the state's bytes (gateway/feedback/bycontent.py): finding
#: it scans the state (~1.4 us for 850 bytes), a lookup hashes it (~0.2 us, and the hash
#: stays with the bytes object for the query's own memo, decide.py). Between two queries
#: most states are byte for byte the same; a changed one is another key.
_NOTED = ByContent(16 * 1024 * 1024)


def _noted_anchor(raw: bytes) -> str | None:
    known = _NOTED.get(raw)
    if known is None:
        known = (noted_anchor(raw),)
        _NOTED.put(raw, known)
    return known[0]


MARKER = "facts"  # field of P:schema: "1" once the back-fill has run
BATCH = 500


def keys(tenant_prefix: str, identity: str) -> tuple[str, str, str]:
    """(facts hash, index, skipped list) of one identity; ``tenant_prefix`` is P:{<t>}."""
    return (f"{tenant_prefix}:f:{identity}", f"{tenant_prefix}:fi:{identity}",
            f"{tenant_prefix}:fs:{identity}")


def skip_entry(skip: Skip) -> str:
    return f"{skip.kind}|{skip.record_id}|{skip.reason}"


async def list_facts(r: Redis, tenant_prefix: str, identity: str,
                     limit: int) -> list[tuple[str, Any, str | None, str | None]]:
    """``(member, state, anchored hash, owner)`` of ``identity``'s newest executions, in
    no particular order, the state as stored (JSON bytes: the query decodes only the
    states it has not seen, gateway/feedback/decide.py). A state noting its anchor
    (``fold.ANCHORED``, read without decoding it: ``fold.noted_anchor``) is
    ``identity``'s with that hash; the anchor and owner keys of the others are read (one
    MGET).

    When the identity has at most ``limit`` executions (``HLEN``: the hash and the index
    always hold the same members, both written by one script or one MULTI) the hash is
    read whole (``HGETALL``); else the newest ``limit`` members from the index, then
    their states (``HMGET``). The first spares the client packing a command of
    ``limit`` arguments and the server a ``ZRANGE``."""
    if limit <= 0:
        return []
    fkey, ikey, _ = keys(tenant_prefix, identity)
    states = None
    if await r.hlen(fkey) <= limit:
        states = await r.hgetall(fkey)
        if len(states) > limit:  # executions added since the HLEN
            states = None
    if states is None:
        members = await r.zrange(ikey, 0, limit - 1, desc=True)
        states = dict(zip(members, await r.hmget(fkey, members) if members else (),
                          strict=True))
    out: list[tuple[str, Any, str | None, str | None]] = []
    unknown: list[int] = []  # positions in out
    for member, raw in states.items():
        if raw is None:
            continue
        anchor = _noted_anchor(raw)
        if anchor is None:
            unknown.append(len(out))
        out.append((member.decode(), raw, anchor, None if anchor is None else identity))
    if unknown:
        # the keys as bytes: redis-py packs a str argument through its encoder, ~1 µs each
        a, o = f"{tenant_prefix}:a:".encode(), f"{tenant_prefix}:o:".encode()
        fps = [out[i][0].partition(":")[0].encode() for i in unknown]
        marks = await r.mget([k for fp in fps for k in (a + fp, o + fp)])
        for n, i in enumerate(unknown):
            out[i] = (out[i][0], out[i][1], _text(marks[2 * n]),
                      _text(marks[2 * n + 1]) or None)
    return out


async def list_skipped(r: Redis, tenant_prefix: str, identity: str,
                       limit: int) -> list[tuple[str, str, str]]:
    entries = await r.lrange(keys(tenant_prefix, identity)[2], 0, limit - 1) if limit > 0 else []
    rows = []
    for entry in entries:  # kind|record id|reason (a record id may hold '|')
        kind, rest = entry.decode().split("|", 1)
        rid, reason = rest.rsplit("|", 1)
        rows.append((kind, rid, reason))
    return sorted(rows, key=lambda row: row[0] != "finding")  # findings first, as read


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


async def backfill_once(r: Redis, prefix: str) -> None:
    """Build every identity's facts from its records, once per keyspace (idempotent)."""
    if await r.hget(f"{prefix}:schema", MARKER) == b"1":
        return
    index_re = re.compile(re.escape(prefix) + r":(\{[a-fA-F0-9-]{36}\}):i:([a-z_]{1,32}):(.+)")
    owners: set[tuple[str, str, str]] = set()  # (tenant prefix, tenant, identity)
    async for key in r.scan_iter(match=f"{prefix}:{{*}}:i:*:*", count=BATCH):
        m = index_re.fullmatch(key.decode())
        if m is not None and m[2] in FOLDED_KINDS:
            owners.add((f"{prefix}:{m[1]}", m[1][1:-1], m[3]))
    for tenant_prefix, tenant, identity in sorted(owners):
        await _backfill_identity(r, tenant_prefix, tenant, identity)
    await r.hset(f"{prefix}:schema", MARKER, "1")


async def _backfill_identity(r: Redis, tenant_prefix: str, tenant: str, identity: str) -> None:
    states: dict[str, dict[str, Any]] = {}
    latest: dict[str, int] = {}
    skipped: list[str] = []  # oldest first
    for kind in FOLDED_KINDS:
        ids = await r.zrange(f"{tenant_prefix}:i:{kind}:{identity}", 0, -1, withscores=True)
        for i in range(0, len(ids), BATCH):
            chunk = ids[i:i + BATCH]
            raws = await r.mget([f"{tenant_prefix}:r:{kind}:{rid.decode()}" for rid, _ in chunk])
            for (_, position), raw in zip(chunk, raws, strict=True):
                if raw is None:
                    continue
                fold = fold_record(kind, raw, tenant, identity, validators=stored_validators())
                if isinstance(fold, Fold):
                    apply(states.setdefault(fold.member, {}), fold.ops, int(position))
                    latest[fold.member] = max(latest.get(fold.member, 0), fold.received_at)
                elif isinstance(fold, Skip):
                    skipped.append(skip_entry(fold))
    await _note_anchors(r, tenant_prefix, identity, states)
    fkey, ikey, skey = keys(tenant_prefix, identity)
    async with r.pipeline(transaction=True) as tx:  # one identity's facts, whole
        tx.delete(fkey, ikey, skey)
        if states:
            tx.hset(fkey, mapping={m: orjson.dumps(s) for m, s in states.items()})
            tx.zadd(ikey, latest)
        if skipped:
            tx.lpush(skey, *skipped)
        await tx.execute()


async def _note_anchors(r: Redis, tenant_prefix: str, identity: str,
                        states: dict[str, dict[str, Any]]) -> None:
    """``A`` (fold.ANCHORED) in each state whose execution ``identity`` owns: what a
    commit that anchors it notes (an anchor and its owner are written once)."""
    members = list(states)
    for i in range(0, len(members), BATCH):
        chunk = members[i:i + BATCH]
        fps = [m.partition(":")[0] for m in chunk]  # as list_facts reads them
        marks = await r.mget([f"{tenant_prefix}:{p}:{fp}" for fp in fps for p in ("a", "o")])
        for n, member in enumerate(chunk):
            anchor, owner = marks[2 * n], marks[2 * n + 1]
            if anchor is not None and owner is not None and owner.decode() == identity:
                states[member][ANCHORED] = anchor.decode()
