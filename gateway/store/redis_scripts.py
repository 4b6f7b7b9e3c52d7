"""The Redis store's Lua scripts and its upgrade from the key layout before v1.1.

Every key a script touches is passed in ``KEYS`` (none is built inside a script), and
all of them carry the tenant's hash tag ``{<tenant>}`` — one Redis Cluster hash slot per
commit — except, during an upgrade only, the pre-v1.1 claim ``P:{id:<identity>}:n:<nonce>``
(see :func:`migrate`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from redis.asyncio import Redis

from .redis_facts import FOLD_LUA

# The shebang makes this a flagged (Redis 7) write script: with maxmemory reached, a
# read-only replica or a failing AOF, Redis refuses the whole EVALSHA before running it.
# Without the shebang only the first write would be refused; the script is also ordered
# so that every check runs before the first write. Nothing is rolled back in Redis, so
# neither defence may be dropped.
COMMIT_LUA = """#!lua
-- KEYS[1] claim  KEYS[2] record  KEYS[3] index  KEYS[4] the tenant's epoch marker
-- KEYS[5] the identity's index of this kind (sorted set: record id -> its position in
-- KEYS[3]); then, when ARGV[10] ~= '', KEYS[6] the owner's audit outbox (a stream);
-- then, when ARGV[11] ~= '': the identity's facts hash and index (redis_facts.py); then,
-- when ARGV[7] ~= '': anchor, owner; and last, when ARGV[8] == '1', the pre-v1.1 claim
-- ARGV[1] claim (expires_at|digest|request_id)  ARGV[2] nonce TTL s  ARGV[3] record data
-- ARGV[4] record id  ARGV[5] now  ARGV[6] identity  ARGV[7] attestation hash or ''
-- ARGV[8] '1' when the last key is a pre-v1.1 claim to honour  ARGV[9] the gateway's epoch
-- ARGV[10] the accept's audit events (JSON array) or ''
-- ARGV[11] the facts member (<fp>:<attestation hash>) or ''  ARGV[12] its received_at
-- ARGV[13...] the fold's ops (op, field, value triples)
local a = 6
if ARGV[10] ~= '' then a = 7 end
local f = a
if ARGV[11] and ARGV[11] ~= '' then a = a + 2 end
""" + FOLD_LUA + """
-- 0. the store's epoch (redis_epoch.py): a missing or other marker means the store lost
-- its state or started a new epoch -> nothing judged, nothing written
local epoch = redis.call('GET', KEYS[4])
if epoch ~= ARGV[9] then return {'epoch'} end
local now = tonumber(ARGV[5])
local function live(key)
  local claim = redis.call('GET', key)
  if claim and (tonumber(string.match(claim, '^%d+')) or math.huge) > now then return claim end
  return nil
end
-- 1. the execution's owner, then its attestation anchor: refused -> nothing written
if ARGV[7] ~= '' then
  local anchored = redis.call('GET', KEYS[a])
  local owner = redis.call('GET', KEYS[a + 1])
  if anchored and not owner then return {'unmigrated'} end
  if owner and owner ~= ARGV[6] then return {'not_owned'} end
  if anchored and anchored ~= ARGV[7] then return {'mismatch', anchored} end
end
-- 2. replay: a live claim (or a live pre-v1.1 one) -> replayed, nothing written
local claimed = live(KEYS[1])
if not claimed and ARGV[8] == '1' then claimed = live(KEYS[#KEYS]) end
if claimed then return {'replayed', claimed} end
-- 3. record id already used -> conflict, nothing written
if redis.call('EXISTS', KEYS[2]) > 0 then return {'conflict'} end
-- 4. write everything: claim (replacing an expired one), anchor and owner, record,
-- indexes, and the accept's audit events in the owner's outbox
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[a], ARGV[7], 'NX')
  redis.call('SET', KEYS[a + 1], ARGV[6], 'NX')
end
redis.call('SET', KEYS[2], ARGV[3])
local position = redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[5], position, ARGV[4])
if f < a then fold(KEYS[f], KEYS[f + 1], ARGV[11], ARGV[12], 13, position) end
if ARGV[10] ~= '' then
  return {'accepted', redis.call('XADD', KEYS[6], '*', 'e', ARGV[10])}
end
return {'accepted'}
"""

# The group commit on a single Redis (redis_group.py): several commits in one EVALSHA,
# each run by COMMIT_LUA's own body as a function of its own KEYS and ARGV, in pcall: a
# commit that fails is that commit's error reply, the others still run, exactly as when
# each was its own EVALSHA in one pipeline. One call instead of one per commit costs
# Redis ~2.5x less CPU per commit (no per-call script set-up, one MULTI/EXEC of effects
# in the AOF). KEYS: every commit's keys, in order; ARGV[1] the number of commits n,
# ARGV[2c], ARGV[2c+1] commit c's numbers of keys and of arguments, then every commit's
# arguments, in order. → one reply per commit, as COMMIT_LUA's.
GROUP_LUA = "#!lua\nlocal function commit(KEYS, ARGV)\n" + COMMIT_LUA.removeprefix(
    "#!lua\n") + """end
local n = tonumber(ARGV[1])
local out = {}
local k, v = 0, 2 * n + 1
for c = 1, n do
  local nk, na = tonumber(ARGV[2 * c]), tonumber(ARGV[2 * c + 1])
  -- copied by unpack, in C (a loop in Lua cost Redis ~8 us more per commit)
  local keys, argv = {unpack(KEYS, k + 1, k + nk)}, {unpack(ARGV, v + 1, v + na)}
  k, v = k + nk, v + na
  local ok, reply = pcall(commit, keys, argv)
  if ok then
    out[c] = reply
  elseif type(reply) == 'table' and reply.err then
    out[c] = reply
  else
    out[c] = redis.error_reply(tostring(reply))
  end
end
return out
"""

# Acknowledge outbox entries: KEYS[1] the stream, ARGV the entry ids. The stream is
# deleted once empty (in the same script: a concurrent XADD cannot fall in between),
# so a start-up SCAN finds only owners with something pending.
ACK_LUA = """#!lua
redis.call('XDEL', KEYS[1], unpack(ARGV))
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 'ok'
"""

# A record outside any claim (issued feedback): same record/index layout.
# KEYS[1] record  KEYS[2] index  [KEYS[3] the identity's index]; ARGV[1] data  ARGV[2] id
# ARGV[3] 'f': fold into KEYS[4] facts hash, KEYS[5] index (ARGV[4] member, ARGV[5]
# received_at, ARGV[6...] ops); 's': note ARGV[4] in KEYS[4] (not foldable); '': neither
PUT_LUA = """#!lua
""" + FOLD_LUA + """
if redis.call('EXISTS', KEYS[1]) > 0 then return 'conflict' end
redis.call('SET', KEYS[1], ARGV[1])
local position = redis.call('RPUSH', KEYS[2], ARGV[2])
if KEYS[3] then redis.call('ZADD', KEYS[3], position, ARGV[2]) end
if ARGV[3] == 'f' then fold(KEYS[4], KEYS[5], ARGV[4], ARGV[5], 6, position) end
if ARGV[3] == 's' then redis.call('LPUSH', KEYS[4], ARGV[4]) end
return 'ok'
"""

# 1 (implicit): pre-v1.1 layout; 2: v1.1; 3: v1.1 with epochs; 4: with the per-identity
# record indexes ``P:{<tenant>}:i:<kind>:<identity>`` (``redis_epoch.SYNC_LUA`` writes it
# too, for a store that lost its state: keep the two equal)
SCHEMA_VERSION = b"4"
V11 = (b"2", b"3")  # v1.1 layouts: the owners and claims are migrated already
BATCH = 500
_IDENTITY = re.compile(r"[A-Za-z0-9._-]{1,128}")


async def migrate(r: Redis, prefix: str) -> int:
    """Upgrade an older keyspace (idempotent); return ``legacy_nonces_until``.

    Recorded in the hash ``P:schema`` once done, so later opens read one key:

    - ``legacy_nonces_until``: the latest ``expires_at`` of the pre-v1.1 claims
      ``P:{id:<identity>}:n:<nonce>``. Until then the store also consults that key
      (in another hash slot: fine on the single Redis every pre-v1.1 deployment runs).
    - owners of pre-v1.1 anchors, back-filled (``SET NX``) by :func:`backfill_owners`.
    - (layout < 4) the per-identity record indexes, built by :func:`index_identities`.

    Older gateways must be stopped first: they still write the old layout (a record they
    commit after the upgrade is missing from its identity's index).
    """
    meta_key = f"{prefix}:schema"
    meta = await r.hgetall(meta_key)
    version = meta.get(b"version")
    until = int(meta.get(b"legacy_nonces_until", b"0"))
    if version == SCHEMA_VERSION:
        return until
    if version not in V11:
        until = 0
        keys = [k async for k in r.scan_iter(match=f"{prefix}:{{id:*}}:n:*", count=BATCH)]
        for i in range(0, len(keys), BATCH):
            for value in await r.mget(keys[i:i + BATCH]):
                head = (value or b"").split(b"|", 1)[0]
                until = max(until, int(head) if head.isdigit() else 0)
        await backfill_owners(r, prefix)
    await index_identities(r, prefix)
    await r.hset(meta_key, mapping={"version": SCHEMA_VERSION, "legacy_nonces_until": until})
    return until


async def index_identities(r: Redis, prefix: str) -> None:
    """Build ``P:{<tenant>}:i:<kind>:<identity>`` (sorted set: record id → its 1-based
    position in ``P:{<tenant>}:i:<kind>``, as the commit script writes it) from the
    records' evidence ``identity``. ``ZADD`` of a fixed position is idempotent and
    commutes with concurrent commits (which add later positions): safe to re-run and to
    run while gateways of this version serve. A record without an identity (issued
    feedback, unparsable) is in no identity's index."""
    index_re = re.compile(re.escape(prefix) + r":\{([a-fA-F0-9-]{36})\}:i:([a-z_]{1,32})")
    async for key in r.scan_iter(match=f"{prefix}:{{*}}:i:*", count=BATCH):
        m = index_re.fullmatch(key.decode())  # not an identity index (one more ':' part)
        if m is None or await r.type(key) != b"list":
            continue
        tagged, kind = f"{prefix}:{{{m[1]}}}", m[2]
        pending: dict[str, dict[str, int]] = {}  # identity index -> {record id: position}
        position = 0
        async for rid, record in _records(r, tagged, kind):
            position += 1
            ident = record.get("identity") if record is not None else None
            if isinstance(ident, str) and _IDENTITY.fullmatch(ident):
                pending.setdefault(f"{tagged}:i:{kind}:{ident}", {})[rid] = position
            if position % BATCH == 0:
                for zkey, members in pending.items():
                    await r.zadd(zkey, members)
                pending.clear()
        for zkey, members in pending.items():
            await r.zadd(zkey, members)


async def backfill_owners(r: Redis, prefix: str) -> None:
    """Give each anchor without an owner key the identity of the oldest finding or graph
    record of its execution made under the anchored attestation hash (evidence
    ``identity``; within a kind the index order, across kinds ``received_at``). A record
    under another hash was sent while anchoring was off — possibly by another identity —
    and did not make the anchor. No record, or two identities in the same second: owner
    ``""`` — owned by nobody, refused for everyone (never "first comer takes it")."""
    anchor_re = re.compile(re.escape(prefix) + r":\{([a-fA-F0-9-]{36})\}:a:([A-Fa-f0-9]{64})")
    unowned: dict[str, dict[str, str]] = {}  # tenant -> fp -> anchored hash (lower case)
    async for key in r.scan_iter(match=f"{prefix}:{{*}}:a:*", count=BATCH):
        m = anchor_re.fullmatch(key.decode())
        if m and not await r.exists(f"{prefix}:{{{m[1]}}}:o:{m[2]}"):
            anchored = await r.get(key)
            if anchored is not None:
                unowned.setdefault(m[1], {})[m[2]] = anchored.decode().lower()
    for tenant, fps in unowned.items():
        first: dict[str, tuple[int, str]] = {}  # fp -> (received_at, identity or "")
        for kind in ("finding", "graph"):
            seen: set[str] = set()
            async for _, record in _records(r, f"{prefix}:{{{tenant}}}", kind):
                if record is None:
                    continue
                fp, at, ident = (record.get("execution_fingerprint"),
                                 record.get("received_at"), record.get("identity"))
                att = record.get("attestation_measurement_hash")
                if (fp not in fps or fp in seen or not isinstance(at, int)
                        or not isinstance(att, str) or att.lower() != fps[fp]):
                    continue
                seen.add(fp)  # the oldest record of this kind for the execution
                ident = ident if isinstance(ident, str) else ""
                if fp not in first or at < first[fp][0]:
                    first[fp] = (at, ident)
                elif at == first[fp][0] and ident != first[fp][1]:
                    first[fp] = (at, "")  # ambiguous: nobody's
        for fp in fps:
            owner = first.get(fp, (0, ""))[1]
            await r.set(f"{prefix}:{{{tenant}}}:o:{fp}", owner, nx=True)


async def _records(r: Redis, tagged: str, kind: str):
    """``(record id, parsed record or None)`` for each entry of the tenant's index of
    ``kind``, oldest first (None: missing, unparsable or not an object)."""
    start = 0
    while ids := await r.lrange(f"{tagged}:i:{kind}", start, start + BATCH - 1):
        start += len(ids)
        values = await r.mget([f"{tagged}:r:{kind}:{rid.decode()}" for rid in ids])
        for rid, raw in zip(ids, values, strict=True):
            try:
                record: Any = orjson.loads(raw) if raw is not None else None
            except orjson.JSONDecodeError:
                record = None
            yield rid.decode(), (record if isinstance(record, dict) else None)
