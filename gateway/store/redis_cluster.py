"""The Redis store on a Redis Cluster (``[store] cluster = true``, PROTOCOL.md §8 v1.1).

Same key layout and scripts as :mod:`.redis`: every key of one commit carries the
tenant's hash tag, so the commit is one ``EVALSHA`` in one slot on its master. What
differs (docs/STORES.md "Redis Cluster"):

- commits are group commits (redis_group.py's loop, also for a single ``commit``): a
  round's commits go to their slots' masters, one pipelined round trip per master on one
  connection taken from redis-py's cluster node, in parallel, each followed on that same
  connection by ONE ``WAIT n timeout`` when ``min_replicas_acked`` = n > 0 (fewer
  acknowledgements → 503 ``store_unavailable``, never 202). ``MOVED``, ``ASK`` and
  ``TRYAGAIN`` are answered before the script runs, so they are followed (bounded); a
  lost connection or a timeout is never resent (the first copy may have run): 503, as on
  the single Redis (:mod:`.redis_cluster_group`);
- one epoch per tenant (:mod:`.redis_cluster_epoch`): a master can lose its slots alone;
- durability and ``noeviction`` are checked on every node, at ``open`` and by ``ping``;
- no upgrade from an older layout: a cluster store is new in v1.1 (``open`` refuses a
  ``P:schema`` of another layout version).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from . import redis_cluster_group
from .base import Commit, CommitResult, StoreError
from .redis import RedisStore, _text
from .redis_cluster_epoch import SCHEMA_CHECK_S, reregister, sync_tenant
from .redis_epoch import eviction_policy, eviction_refusal
from .redis_scripts import COMMIT_LUA, GROUP_LUA, SCHEMA_VERSION

log = logging.getLogger("fedgate.store")

MAX_REPLICAS_ACKED = 16


class RedisClusterStore(RedisStore):
    def __init__(self, url: str, *, cluster: bool = True, min_replicas_acked: int = 0,
                 **options) -> None:
        if cluster is not True:
            raise ValueError("RedisClusterStore is the cluster = true store")
        if not isinstance(min_replicas_acked, int) or not (
                0 <= min_replicas_acked <= MAX_REPLICAS_ACKED):
            raise ValueError(f"min_replicas_acked must be an integer in [0, {MAX_REPLICAS_ACKED}]")
        super().__init__(url, **options)
        self.min_replicas_acked = min_replicas_acked
        # WAIT gives up before the socket would: half of socket_timeout, in ms
        self.wait_timeout_ms = max(1, int(self.socket_timeout * 500))
        self._epochs: dict[str, str] = {}  # tenant id -> its epoch (redis_cluster_epoch)
        self._store_epoch: str | None = None
        self._schema_due = 0.0  # time.monotonic() of the next P:schema check
        self._slots = asyncio.Semaphore(self.max_connections)
        self._refresh = False  # a node failed: re-read the topology before the next commit
        self._topology = asyncio.Lock()

    @property
    def _schema_key(self) -> str:
        return f"{self.prefix}:schema"

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        if self._redis is None:
            # +2 per node beyond the semaphore: the readiness probe and a topology read
            self._redis = RedisCluster.from_url(
                self.url, max_connections=self.max_connections + 2,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                # No resend after a lost connection or timeout (see redis.py _client):
                # redirections (MOVED/ASK/TRYAGAIN) are still followed by redis-py.
                retry=Retry(NoBackoff(), 0), require_full_coverage=True)
        await self._call(RedisCluster.initialize)
        nodes = self._redis.get_nodes()
        if self.require_durable:
            for node in nodes:
                await self._check_node_durable(node)
        for node in nodes:
            policy = await self._call(_on, node, eviction_policy)
            if (refusal := eviction_refusal(policy)) is not None:
                raise StoreError("claim", f"{node.name}: {refusal}")
        for node in self._redis.get_primaries():
            await self._load_script(node)
        meta = await self._call(lambda r: r.hgetall(self._schema_key))
        version = meta.get(b"version")
        if version not in (None, SCHEMA_VERSION):
            raise StoreError("claim", f"this Redis Cluster holds a store of layout version "
                             f"{_text(version)}; a cluster store starts at version "
                             f"{_text(SCHEMA_VERSION)} (v1.1): upgrade on a single Redis first")
        await self._call(lambda r: r.hsetnx(self._schema_key, "version", SCHEMA_VERSION))
        epoch = meta.get(b"epoch")
        self._store_epoch = None if epoch is None else _text(epoch)
        self._schema_due = time.monotonic() + SCHEMA_CHECK_S
        self._legacy_until = 0  # never a pre-v1.1 layout on a cluster

    async def _check_node_durable(self, node: ClusterNode) -> None:
        try:
            conf = await _on(self._redis, node, lambda r: r.config_get("append*"))
        except ResponseError as e:
            raise StoreError("claim", f"{node.name}: cannot read the Redis persistence "
                             "settings (CONFIG GET is not permitted); set require_durable="
                             "false only if the cluster is durable by other means") from e
        except (RedisError, RedisClusterException) as e:
            raise StoreError("claim", f"Redis is unavailable ({type(e).__name__}: {e})") from e
        conf = {_text(k): _text(v) for k, v in conf.items()}
        if conf.get("appendonly") != "yes" or conf.get("appendfsync") != "always":
            raise StoreError("claim", f"{node.name}: every cluster node must run with "
                             "'appendonly yes' and 'appendfsync always' so that an accepted "
                             "request survives a crash (require_durable)")

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        self._redis = None

    async def ping(self) -> bool:
        """Every master answers and every node runs ``noeviction``."""
        try:
            if self._redis is None:
                return False
            if self._refresh:  # a node failed: find the masters again (a failover)
                await self._reload_topology()
            refusal = None
            for node in self._redis.get_nodes():
                policy = await _on(self._redis, node, eviction_policy)
                refusal = refusal or eviction_refusal(policy)
        except Exception:  # readiness probe: any failure means "not ready"
            self._refresh = True
            return False
        if refusal != self._unsafe and refusal is not None:
            log.error("refusing commits: %s", refusal)
        self._unsafe = refusal
        return refusal is None

    # -- the commit's hooks (redis.py RedisStore.commit) -------------------------------
    def _held_epoch(self, tenant_id: str) -> str | None:
        return self._epochs.get(tenant_id)

    async def _sync_epoch(self, tenant_id: str, tenant_key: str, now: int) -> str:
        epoch, store, lost = await self._call(sync_tenant, self._schema_key, tenant_id,
                                              tenant_key, now)
        held = self._epochs.get(tenant_id)
        if lost or (held is not None and held != epoch):
            self.amnesia_count += 1
            if self.on_amnesia is not None:
                self.on_amnesia()
            log.warning(
                "replay store %s: new epoch %s for tenant %s (%s); its slot lost its data "
                "(a master restarted without it, a failover to an unsynced replica) or the "
                "store is new; signed requests that could have been accepted at or before "
                "it are refused (503 replay_store_unavailable)", self.prefix, epoch,
                tenant_id, "started here" if lost else "started by another gateway")
        self._epochs[tenant_id] = epoch
        self._store_epoch = self._store_epoch or store
        return epoch

    async def _check_schema(self, now: int) -> None:
        """Every SCHEMA_CHECK_S: has ``P:schema`` a new epoch (it lost its data)? Then
        register again every tenant this process holds (redis_cluster_epoch)."""
        self._schema_due = time.monotonic() + SCHEMA_CHECK_S
        epoch = await self._call(lambda r: r.hget(self._schema_key, "epoch"))
        if epoch is not None and _text(epoch) == self._store_epoch:
            return
        self._store_epoch = await self._call(reregister, self._schema_key,
                                             list(self._epochs), now)
        log.warning("replay store %s: the store-wide epoch is now %s (the master of %s lost "
                    "its data, or the store is new); %d tenant(s) registered again",
                    self.prefix, self._store_epoch, self._schema_key, len(self._epochs))

    async def commit(self, commit: Commit) -> CommitResult:
        """A group of one (redis_group.py; redis_cluster_group.py sends it)."""
        (result,) = await self.commit_many([commit])
        if isinstance(result, StoreError):
            raise result
        return result

    groups_commits = True

    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult | StoreError]:
        """Group commit (redis_group.py): each round's calls in one round trip per master,
        in parallel, each ended by WAIT when min_replicas_acked (redis_cluster_group.py)."""
        if commits and time.monotonic() >= self._schema_due:
            try:
                await self._check_schema(max(c.now for c in commits))
            except StoreError as exc:
                for c in commits:  # a commit no store could run still fails first
                    self.check_commit(c)
                return [exc] * len(commits)
        return await super().commit_many(commits)

    async def _send_group(self, calls: list[list]) -> list:
        return await redis_cluster_group.send_group(self, calls)

    def _acked_refusal(self, acked: int | Exception) -> StoreError | None:
        """WAIT's answer below min_replicas_acked: the commits of its round trip are on
        the master, maybe not on a replica: 503, never 202 (the producer's retry is told
        409 duplicate_of if the master keeps them)."""
        if isinstance(acked, Exception) or acked < self.min_replicas_acked:
            return StoreError("write", f"only {acked} of min_replicas_acked = "
                              f"{self.min_replicas_acked} replicas acknowledged the commit "
                              f"within {self.wait_timeout_ms} ms")
        return None

    async def _load_script(self, node: ClusterNode) -> None:
        """The commit script and the group script (redis_cluster_group.py) on ``node``."""
        self._sha = await self._call(_on, node, lambda r: r.script_load(COMMIT_LUA))
        self._group_sha = await self._call(_on, node, lambda r: r.script_load(GROUP_LUA))

    async def _reload_topology(self) -> None:
        async with self._topology:
            if self._refresh:
                self._refresh = False
                await self._call(lambda r: r.nodes_manager.initialize())

    async def _call(self, fn, *args, refused: str = "claim"):
        """As RedisStore._call, with at most ``max_connections`` commands at once (a
        cluster node refuses a connection past its limit instead of waiting for one)."""
        async with self._connection_slot():
            try:
                return await super()._call(fn, *args, refused=refused)
            except RedisClusterException as e:  # no node for a slot, cluster not reachable
                self._refresh = True
                raise StoreError("claim", f"Redis Cluster is unavailable ({e})") from e

    @contextlib.asynccontextmanager
    async def _connection_slot(self) -> AsyncIterator[None]:
        """One of the ``max_connections`` commands in flight, waited for at most
        ``socket_timeout`` (then StoreError "claim": nothing was sent)."""
        try:
            async with asyncio.timeout(self.socket_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise StoreError("claim", "no free Redis connection within socket_timeout") from None
        try:
            yield
        finally:
            self._slots.release()


async def _on(rc: RedisCluster, node: ClusterNode, fn):
    """``fn`` run on one node: a RedisCluster whose commands all go to ``node``."""
    return await fn(_Pinned(rc, node))


class _Pinned:
    """Routes every command of a redis-py command mixin to one node."""

    def __init__(self, rc: RedisCluster, node: ClusterNode) -> None:
        self._rc, self._node = rc, node

    async def execute_command(self, *args, **kwargs):
        return await self._rc.execute_command(*args, target_nodes=self._node, **kwargs)

    def __getattr__(self, name: str):
        from redis.asyncio import Redis

        return getattr(Redis, name).__get__(self)
