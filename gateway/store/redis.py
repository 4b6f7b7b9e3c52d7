"""The production store on Redis (>= 7.0): steps 12-14 as one EVALSHA (PROTOCOL.md §4).

Key layout (``P`` = ``key_prefix``; braces are Redis Cluster hash tags):

- ``P:{<tenant>}:a:<fp>``          anchor: the first attestation hash (no TTL)
- ``P:{<tenant>}:o:<fp>``          owner: the identity that anchored it (no TTL; ``""``:
                                   a pre-v1.1 anchor whose owner is unknown — nobody's)
- ``P:{<tenant>}:r:<kind>:<id>``   record: its canonical JSON bytes (no TTL)
- ``P:{<tenant>}:i:<kind>``        index: list of record ids, oldest first
- ``P:{<tenant>}:i:<kind>:<identity>``  the records that identity committed: sorted set,
                                   record id → its 1-based position in the index above
                                   (a feedback query reads only its own identity's)
- ``P:{<tenant>}:n:<identity>:<nonce>``  claim: ``<expires_at>|<body digest>|<request
                                   id>``, TTL nonce_ttl_s
- ``P:{<tenant>}:epoch``           the store's epoch, copied into the tenant's slot
- ``P:{<tenant>}:audit:<owner>``   the audit outbox of ``<node_name>/<worker>``: a stream,
                                   one entry (field ``e``: a JSON array of events) per
                                   accepted commit, deleted once chained (docs/AUDIT.md)
- ``P:schema``                     hash: layout version, ``legacy_nonces_until``, ``epoch``

A commit runs only while the tenant's epoch marker equals the epoch the gateway holds;
a store that lost its state starts a new epoch, and requests that could have been
accepted before it are refused (``redis_epoch``; docs/STORES.md "Store amnesia").
The server must run ``maxmemory-policy noeviction`` (checked at ``open`` and by
``ping``): evicted claims would go unnoticed.

A claim is live while the key exists (Redis clock, garbage collection) and its
``expires_at`` (= ``commit.now + nonce_ttl_s``) is after the request's ``now``: the same
gateway clock as the timestamp window (§4.4) and the same rule as the SQLite store.

Nonces are claimed per (identity, tenant) (§4.13 v1.1) and records are read by tenant,
so every key of one commit carries the tenant's hash tag: one Redis Cluster slot. The
only exception is the upgrade window (``redis_scripts.migrate``): until the last claim
made under the pre-v1.1 layout (``P:{id:<identity>}:n:<nonce>``) expires, that key is
also checked — on the single Redis every pre-v1.1 deployment runs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.feedback.fold import (
    Fold,
    Skip,
    anchored,
    flat_args,
    fold_record,
    stored_validators,
)

from . import redis_facts, redis_group, redis_outbox
from .base import (
    Anchor,
    Claim,
    Commit,
    CommitResult,
    OutboxEntry,
    Outcome,
    Record,
    Store,
    StoreError,
    check_owner,
)
from .redis_epoch import epoch_start, eviction_policy, eviction_refusal, read_epoch, sync_epoch
from .redis_scripts import COMMIT_LUA, GROUP_LUA, PUT_LUA, migrate
from .resp import HeldConnections
from .revocations import RedisRevocations

log = logging.getLogger("fedgate.store")

_IDENTITY = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TENANT = re.compile(r"[a-fA-F0-9-]{36}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{8,128}")
_KIND = re.compile(r"[a-z_]{1,32}")
_HEX64 = re.compile(r"[A-Fa-f0-9]{64}")
_RECORD_ID = re.compile(r"[!-z|~]{1,256}")  # printable ASCII without '{' and '}'
_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_POOL = 32  # connections per process (counted in conn.RESERVED_FDS' 64)
MAX_POOL = 1024
MAX_TENANT_KEYS = 4096  # tenants' key prefixes kept (_tenant); more: the cache starts over
_ACCEPTED = CommitResult(Outcome.ACCEPTED)
_BEFORE_EPOCH = CommitResult(Outcome.BEFORE_EPOCH)


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    """Refuse a key part that could escape its key or hash tag ('{', '}', ':')."""
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ValueError(f"invalid {what} for a store key: {value!r}")
    return value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStore(RedisRevocations, Store):
    def __init__(self, url: str, *, require_durable: bool = True, socket_timeout: float = 2.0,
                 key_prefix: str = "fedgate", max_connections: int = DEFAULT_POOL) -> None:
        if not isinstance(max_connections, int) or not 1 <= max_connections <= MAX_POOL:
            raise ValueError(f"max_connections must be an integer in [1, {MAX_POOL}]")
        self.url = url
        self.require_durable = require_durable
        self.socket_timeout = socket_timeout
        self.max_connections = max_connections
        self.prefix = _check(_PREFIX, key_prefix, "key_prefix")
        self._redis: Redis | None = None
        self._held: HeldConnections | None = None  # the group round trips' (resp.py)
        self._probe: Redis | None = None  # /readyz's own connection: never behind a burst
        self._sha = ""
        self._group_sha = ""  # GROUP_LUA: a group's commits in one call (redis_group.py)
        self._legacy_until = 0  # pre-v1.1 claims may be live while a request's now < this
        self._epoch: str | None = None  # None: the store holds none yet (new or wiped)
        self._unsafe: str | None = None  # why commits are refused (eviction policy)
        self._tenant_keys: dict[str, str] = {}  # tenant id → its key prefix (_tenant)

    # -- keys ---------------------------------------------------------------------------
    def _tenant(self, tenant_id: str) -> str:
        key = self._tenant_keys.get(tenant_id) if isinstance(tenant_id, str) else None
        if key is None:  # checked once per tenant
            if len(self._tenant_keys) >= MAX_TENANT_KEYS:
                self._tenant_keys.clear()
            key = f"{self.prefix}:{{{_check(_TENANT, tenant_id, 'tenant id')}}}"
            self._tenant_keys[tenant_id] = key
        return key

    def _record_key(self, tenant_id: str, kind: str, record_id: str) -> str:
        rid = _check(_RECORD_ID, record_id, "record id")
        return f"{self._tenant(tenant_id)}:r:{_check(_KIND, kind, 'kind')}:{rid}"

    def _index_key(self, tenant_id: str, kind: str, identity: str | None = None) -> str:
        key = f"{self._tenant(tenant_id)}:i:{_check(_KIND, kind, 'kind')}"
        return key if identity is None else f"{key}:{_check(_IDENTITY, identity, 'identity')}"

    def _anchor_key(self, tenant_id: str, fp: str, part: str = "a") -> str:
        """``part`` ``a``: the anchored hash; ``o``: the owner."""
        return f"{self._tenant(tenant_id)}:{part}:{_check(_HEX64, fp, 'execution fingerprint')}"

    def _nonce_key(self, identity: str, tenant_id: str, nonce: str) -> str:
        ident = _check(_IDENTITY, identity, "identity")
        return f"{self._tenant(tenant_id)}:n:{ident}:{_check(_NONCE, nonce, 'nonce')}"

    def _outbox_key(self, tenant_id: str, owner: str) -> str:
        """The owner's audit outbox in the tenant's slot (a commit's keys share one slot)."""
        return f"{self._tenant(tenant_id)}:audit:{check_owner(owner)}"

    def _epoch_key(self, tenant_id: str) -> str:
        return f"{self._tenant(tenant_id)}:epoch"

    def _legacy_nonce_key(self, identity: str, nonce: str) -> str:
        """A claim made before v1.1 (per identity, in the identity's slot)."""
        ident = _check(_IDENTITY, identity, "identity")
        return f"{self.prefix}:{{id:{ident}}}:n:{_check(_NONCE, nonce, 'nonce')}"

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        if self._redis is None:  # one pool per store, and one store per process
            self._redis = self._client(self.max_connections)
            self._held = HeldConnections(self._redis.connection_pool)
            self._probe = self._client(1)
        await self._call(Redis.ping)
        if self.require_durable:
            await self._check_durable()
        if (refusal := eviction_refusal(await self._call(eviction_policy))) is not None:
            raise StoreError("claim", refusal)
        try:
            self._sha = await self._redis.script_load(COMMIT_LUA)
            self._group_sha = await self._redis.script_load(GROUP_LUA)
        except ResponseError as e:  # a server before 7.0 rejects the '#!lua' shebang
            raise StoreError("claim", f"Redis refused the commit script ({e}); "
                             "Redis 7.0 or newer is required") from e
        except RedisError as e:
            raise StoreError("claim", f"Redis is unavailable ({type(e).__name__}: {e})") from e
        self._epoch = await self._call(read_epoch, self.prefix)  # before migrate
        self._legacy_until = await self._call(migrate, self.prefix)
        await self._call(redis_facts.backfill_once, self.prefix)  # once per keyspace

    def _client(self, size: int) -> Redis:
        """A client on a blocking pool of ``size`` connections: a burst beyond it waits
        for a free connection (at most ``socket_timeout``, then StoreError "claim": 503)
        instead of failing at once (redis-py's default pool refuses past its limit)."""
        pool = BlockingConnectionPool.from_url(
            self.url, max_connections=size, timeout=self.socket_timeout,
            socket_timeout=self.socket_timeout, socket_connect_timeout=self.socket_timeout,
            # No client-side retry: a resent EVALSHA whose first copy ran would answer
            # "replayed" for our own commit. Fail closed (503); the producer retries.
            retry=Retry(NoBackoff(), 0),
        )
        return Redis.from_pool(pool)

    async def _check_durable(self) -> None:
        try:
            conf = await self._redis.config_get("append*")
        except ResponseError as e:  # CONFIG renamed away or not permitted (managed Redis)
            raise StoreError("claim", "cannot read the Redis persistence settings (CONFIG GET "
                             "is not permitted); set require_durable=false only if the server "
                             "is durable by other means") from e
        except RedisError as e:
            raise StoreError("claim", f"Redis is unavailable ({type(e).__name__}: {e})") from e
        conf = {_text(k): _text(v) for k, v in conf.items()}
        if conf.get("appendonly") != "yes":
            raise StoreError("claim", "Redis must run with 'appendonly yes' so that an "
                             "accepted request survives a crash (require_durable)")
        if conf.get("appendfsync") != "always":
            raise StoreError("claim", "Redis must run with 'appendfsync always' so that an "
                             "accepted request survives a crash (require_durable)")

    async def close(self) -> None:
        if self._held is not None:
            await self._held.close()
        for client in (self._redis, self._probe):
            if client is not None:
                await client.aclose()
        self._redis = self._probe = self._held = None

    async def ping(self) -> bool:
        """Also re-reads the eviction policy: while it is unsafe, not ready and every
        commit fails closed."""
        try:  # on the probe's own connection: a burst holding the pool cannot starve it
            if self._probe is None or not await self._probe.ping():
                return False
            refusal = eviction_refusal(await eviction_policy(self._probe))
        except Exception:  # readiness probe: any failure means "not ready"
            return False
        if refusal != self._unsafe and refusal is not None:
            log.error("refusing commits: %s", refusal)
        self._unsafe = refusal
        return refusal is None

    # -- commit -------------------------------------------------------------------------
    groups_commits = True

    def check_commit(self, commit: Commit) -> None:
        self._prepare(commit, fold=False)  # the checks only: the fold is made once, later

    def _prepare(self, commit: Commit, *, fold: bool = True) -> tuple[list[str], list, list]:
        """The commit's KEYS, its ARGV before the epoch and the audit events, and its ARGV
        after them (the facts fold, redis_facts.py); ValueError for a commit no store
        could run."""
        rec, anchor = commit.record, commit.anchor
        if commit.nonce_ttl_s <= 0:
            raise ValueError("nonce_ttl_s must be positive")
        if anchor is not None and anchor.tenant_id != rec.tenant_id:
            raise ValueError("the anchor and the record must belong to one tenant")
        if rec.identity not in (None, commit.identity):
            raise ValueError("the record's identity must be the commit's")
        if commit.audit is not None and not commit.audit:
            raise ValueError("an outbox entry cannot be empty")
        keys = [self._nonce_key(commit.identity, rec.tenant_id, commit.nonce),
                self._record_key(rec.tenant_id, rec.kind, rec.record_id),
                self._index_key(rec.tenant_id, rec.kind), self._epoch_key(rec.tenant_id),
                self._index_key(rec.tenant_id, rec.kind, commit.identity)]
        if commit.audit is not None:
            keys.append(self._outbox_key(rec.tenant_id, commit.audit_owner))
        tail, fold_keys, _ = (self._fold(rec, commit.identity, trusted=True, given=commit.fold,
                                         anchor=anchor) if fold else ([""], [], None))
        keys += fold_keys  # the execution's facts (redis_facts.py), folded by the script
        if anchor is not None:
            fp = anchor.execution_fingerprint
            keys += [self._anchor_key(rec.tenant_id, fp), self._anchor_key(rec.tenant_id, fp, "o")]
        legacy = commit.now < self._legacy_until
        if legacy:
            keys.append(self._legacy_nonce_key(commit.identity, commit.nonce))
        claim = f"{commit.now + commit.nonce_ttl_s}|{commit.body_digest}|{commit.request_id}"
        args = [len(keys), *keys, claim, commit.nonce_ttl_s, rec.data, rec.record_id,
                commit.now, commit.identity, anchor.attestation_hash if anchor else "",
                "1" if legacy else "0"]
        return keys, args, tail

    async def commit(self, commit: Commit) -> CommitResult:
        keys, args, fold = self._prepare(commit)
        if self._unsafe is not None:
            raise StoreError("claim", self._unsafe)
        audit = commit.audit if commit.audit is not None else b""
        for _ in range(3):  # the epoch can change under us only by another loss of state
            if (epoch := self._held_epoch(commit.tenant_id)) is None:
                epoch = await self._sync_epoch(commit.tenant_id, keys[3], commit.now)
            if commit.earliest <= epoch_start(epoch):
                return _BEFORE_EPOCH
            reply = await self._run_commit([*args, epoch, audit, *fold])
            if reply[0] != b"epoch":
                return self._finish(reply, commit, keys)
            await self._sync_epoch(commit.tenant_id, keys[3], commit.now)
        raise StoreError("claim", "the store's epoch kept changing during the commit")

    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult | StoreError]:
        """Group commit: the group's EVALSHAs in one pipeline on one connection
        (redis_group.py); conflicting commits in later round trips, in order."""
        return await redis_group.commit_many(self, commits)

    def _finish(self, reply: list, commit: Commit, keys: list[str]) -> CommitResult:
        result = self._result(reply, commit.body_digest)
        if result.outbox_ref is not None:  # (stream key, entry id) for the ack
            result = CommitResult(Outcome.ACCEPTED, outbox_ref=(keys[5], result.outbox_ref))
        return result

    # Hooks the cluster store (redis_cluster.py) overrides: per-tenant epochs, and a
    # group's calls sent per slot's master, each round trip followed by WAIT.
    def _held_epoch(self, tenant_id: str) -> str | None:
        return self._epoch  # one epoch for the whole store (every key on one server)

    async def _send_group(self, calls: list[list]) -> list:
        """One round of ``commit_many``: per call (a commit's EVALSHA arguments) its
        reply, error reply or StoreError (redis_group.send_group)."""
        return await redis_group.send_group(self, calls)

    async def _run_commit(self, args: list) -> list:
        return await self._call(self._evalsha, args, refused="write")

    async def _sync_epoch(self, tenant_id: str, tenant_key: str, now: int) -> str:
        """Adopt the store's epoch for this tenant (starting one at ``now`` if the store
        has none); one log line and the counter when it is a new one for this process."""
        epoch, started = await self._call(sync_epoch, self.prefix, tenant_key, now)
        if epoch != self._epoch:
            self.amnesia_count += 1
            if self.on_amnesia is not None:
                self.on_amnesia()
            log.warning(
                "replay store %s: new epoch %s (%s); the store held no epoch marker: it was "
                "flushed, restarted without its data, or is new; signed requests that could "
                "have been accepted at or before it are refused (503 replay_store_unavailable)",
                self.prefix, epoch, "started here" if started else "started by another gateway")
        self._epoch = epoch
        return epoch

    async def _evalsha(self, client: Redis, args: list) -> list:
        try:
            return await client.evalsha(self._sha, *args)
        except NoScriptError:  # SCRIPT FLUSH, a restart or a failover lost the script
            self._sha = await client.script_load(COMMIT_LUA)
            return await client.evalsha(self._sha, *args)

    async def _call(self, fn, *args, refused: str = "claim"):
        """``fn(client, *args)``; a refusal (error reply) is StoreError(refused), else claim."""
        if self._redis is None:
            raise StoreError("claim", "the Redis store is not open")
        try:
            return await fn(self._redis, *args)
        except ResponseError as e:  # OOM, READONLY, MISCONF, ...: refused, nothing written
            raise StoreError(refused, f"Redis refused the command: {e}") from e
        except RedisError as e:  # refused/lost connection, LOADING, timeout (a commit may
            # then have landed: fail closed; the producer's retry gets 409 duplicate_of)
            raise StoreError("claim", f"Redis is unavailable ({type(e).__name__}: {e})") from e

    @staticmethod
    def _result(reply: list, body_digest: str) -> CommitResult:
        status = reply[0]
        if status == b"accepted":
            return _ACCEPTED if len(reply) < 2 else CommitResult(
                Outcome.ACCEPTED, outbox_ref=reply[1].decode())
        if status == b"replayed":
            _, digest, request_id = reply[1].decode().split("|", 2)
            dup = request_id if digest == body_digest else None
            return CommitResult(Outcome.REPLAYED, duplicate_of=dup)
        if status == b"mismatch":
            return CommitResult(Outcome.ATTESTATION_MISMATCH, anchored_hash=reply[1].decode())
        if status == b"not_owned":
            return CommitResult(Outcome.EXECUTION_NOT_OWNED)
        if status == b"unmigrated":  # another gateway is still back-filling owners
            raise StoreError("claim", "the execution's owner is not migrated yet (v1.1)")
        raise StoreError("write", "record id already exists; nothing was written")

    def _fold(self, rec: Record, identity: str | None, *, trusted: bool,
              given: Fold | None = None,
              anchor: Anchor | None = None) -> tuple[list, list, Skip | None]:
        """(ARGV tail, KEYS, skip) folding ``rec`` into its execution's facts: ``member,
        received_at, ops…`` or ``''`` when the record is not folded (``skip``: why).
        ``given``: the commit's own fold (``Commit.fold``), else read from ``rec.data``.
        ``anchor``: the commit's (the state then notes the anchored hash: fold.anchored)."""
        fold = given if given is not None else fold_record(
            rec.kind, rec.data, rec.tenant_id, identity,
            validators=None if trusted else stored_validators())
        if not isinstance(fold, Fold):
            return [""], [], fold
        if anchor is not None:
            fold = anchored(fold, rec.tenant_id, anchor.tenant_id,
                            anchor.execution_fingerprint, anchor.attestation_hash)
        fkey, ikey, _ = redis_facts.keys(self._tenant(rec.tenant_id),
                                         _check(_IDENTITY, identity, "identity"))
        return [fold.member, fold.received_at, *flat_args(fold)], [fkey, ikey], None

    async def put_record(self, record: Record, now: int) -> None:
        keys = [self._record_key(record.tenant_id, record.kind, record.record_id),
                self._index_key(record.tenant_id, record.kind)]
        fold: list = [""]
        if record.identity is not None:
            keys.append(self._index_key(record.tenant_id, record.kind, record.identity))
            args, fold_keys, skip = self._fold(record, record.identity, trusted=False)
            if fold_keys:
                fold, keys = ["f", *args], [*keys, *fold_keys]
            elif skip is not None:
                skipped = redis_facts.keys(self._tenant(record.tenant_id), record.identity)[2]
                fold, keys = ["s", redis_facts.skip_entry(skip)], [*keys, skipped]
        reply = await self._call(Redis.eval, PUT_LUA, len(keys), *keys, record.data,
                                 record.record_id, *fold, refused="write")
        if reply != b"ok":
            raise StoreError("write", "record id already exists; nothing was written")

    # -- the audit outbox (docs/AUDIT.md *Outbox*; redis_outbox.py) --------------------------
    async def outbox_owners(self, node: str) -> set[str]:
        return await self._call(redis_outbox.owners, self.prefix, node)

    async def outbox_read(self, owner: str) -> list[OutboxEntry]:
        return await self._call(redis_outbox.read, self.prefix, check_owner(owner))

    async def outbox_ack(self, refs: list) -> None:
        await self._call(redis_outbox.ack, refs, refused="write")

    # -- reads --------------------------------------------------------------------------
    async def get_claim(self, identity: str, tenant_id: str, nonce: str,
                        now: int) -> Claim | None:
        if not (_IDENTITY.fullmatch(identity) and _NONCE.fullmatch(nonce)
                and _TENANT.fullmatch(tenant_id)):
            return None  # never claimable: the pipeline refuses such requests first
        keys = [self._nonce_key(identity, tenant_id, nonce)]
        if now < self._legacy_until:
            keys.append(self._legacy_nonce_key(identity, nonce))
        for key in keys:  # one GET each: the legacy key lives in another slot
            value = await self._call(Redis.get, key)
            if value is not None:
                expires_at, digest, request_id = value.decode().split("|", 2)
                if int(expires_at) > now:
                    return Claim(digest, request_id)
        return None

    async def get_record(self, kind: str, record_id: str, tenant_id: str) -> bytes | None:
        return await self._call(Redis.get, self._record_key(tenant_id, kind, record_id))

    async def get_anchor(self, tenant_id: str, execution_fingerprint: str) -> str | None:
        value = await self._call(Redis.get, self._anchor_key(tenant_id, execution_fingerprint))
        return None if value is None else value.decode()

    async def get_anchor_owner(self, tenant_id: str, execution_fingerprint: str) -> str | None:
        value = await self._call(Redis.get,
                                 self._anchor_key(tenant_id, execution_fingerprint, "o"))
        return (value.decode() or None) if value is not None else None

    async def list_facts(self, tenant_id: str, identity: str,
                         limit: int) -> list[tuple[str, Any, str | None, str | None]]:
        if not _IDENTITY.fullmatch(identity):
            return []  # never a committing identity: the pipeline refuses it first
        return await self._call(redis_facts.list_facts, self._tenant(tenant_id), identity,
                                limit)

    async def list_skipped(self, tenant_id: str, identity: str,
                           limit: int) -> list[tuple[str, str, str]]:
        if not _IDENTITY.fullmatch(identity):
            return []
        return await self._call(redis_facts.list_skipped, self._tenant(tenant_id), identity,
                                limit)

    async def list_records(self, kind: str, tenant_id: str, limit: int = 1000, *,
                           newest_first: bool = False, offset: int = 0,
                           identity: str | None = None) -> list[bytes]:
        if limit <= 0 or offset < 0:
            return []
        if identity is not None and not _IDENTITY.fullmatch(identity):
            return []  # never a committing identity: the pipeline refuses it first
        prefix, index = self._tenant(tenant_id), self._index_key(tenant_id, kind, identity)
        if identity is not None:  # sorted by position: the same order as the index
            ids = await self._call(lambda r: r.zrange(index, offset, offset + limit - 1,
                                                      desc=newest_first))
        elif newest_first:  # the index is oldest first: take a slice from its end, reversed
            ids = (await self._call(Redis.lrange, index, -(offset + limit),
                                    -(offset + 1)))[::-1]
        else:
            ids = await self._call(Redis.lrange, index, offset, offset + limit - 1)
        if not ids:
            return []
        keys = [f"{prefix}:r:{kind}:{rid.decode()}" for rid in ids]
        return [v for v in await self._call(Redis.mget, keys) if v is not None]
