"""Group commit on a Redis Cluster (issue 9 on issue 11's store): one round of
``redis_group.commit_many`` sent to the masters (``RedisClusterStore._send_group``).

The shared loop (redis_group.py) decides which commits are ready (conflicts in later
rounds), syncs the tenants' epochs and judges every reply; this module sends one round's
calls (a commit's EVALSHA arguments each) and answers, per call, its reply, its error
reply or the StoreError that failed it:

- a call goes to the master of its slot (KEYS[1]: every key of one commit carries the
  tenant's hash tag); the calls of one master go in ONE pipelined round trip on one of
  its connections, the masters' round trips in parallel; the commits of one slot go in
  one EVALSHA of the group script (GROUP_LUA, as on the single Redis: each in ``pcall``,
  an error that commit's alone; a refusal of the call — MOVED, ASK, OOM — is each of
  its commits' reply, none of them ran);
- ``min_replicas_acked`` = n > 0: ONE ``WAIT n timeout`` ends each master's round trip,
  on the same connection, and covers every script of it. Fewer than n acknowledgements:
  every call that ran there gets StoreError("write") (503 ``store_unavailable``), never
  202 (the record is on the master: the producer's retry is told ``duplicate_of``);
- ``MOVED``, ``ASK`` and ``TRYAGAIN`` are answered before a script runs: those calls
  alone are sent again within the round (to the node the reply names, after ``ASKING``
  for ``ASK``; to the slot's master after 50 ms for ``TRYAGAIN``), at most
  :data:`REDIRECTS` times each; ready calls never depend on each other, so their order
  does not matter;
- ``NOSCRIPT`` (a promoted replica, SCRIPT FLUSH): the script is loaded again on that
  node and the reply handed back: the loop sends the commit again (bounded by its tries);
- a lost connection or a timeout fails every call of that master's round trip with
  StoreError("claim") (any of them may have run) and nothing is resent; the topology is
  read again before the next round (a failover).
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)

from .base import StoreError
from .redis_group import GROUP_CALL, group_command, no_script_failed, spread, unavailable
from .resp import exchange, pack

RedisClusterStore = Any  # redis_cluster.RedisClusterStore (which imports this module)

REDIRECTS = 16  # MOVED/ASK/TRYAGAIN followed per commit (as redis-py's own request TTL)
TRYAGAIN_SLEEP_S = 0.05  # a slot being migrated: its keys are split across two masters
ASKING = pack(["ASKING"])


async def send_group(store: RedisClusterStore, calls: list[list]) -> list:
    if store._redis is None:
        return [StoreError("claim", "the Redis store is not open")] * len(calls)
    if store._refresh:  # a node failed or a slot moved: find the masters again
        try:
            await store._reload_topology()
        except StoreError as exc:
            return [exc] * len(calls)
    out: list = [None] * len(calls)
    routes: dict[int, tuple[ClusterNode, bool]] = {}  # call → (its node, ASKING first)
    for j, args in enumerate(calls):
        if isinstance(node := _master(store, args), StoreError):
            out[j] = node
        else:
            routes[j] = (node, False)
    redirects = dict.fromkeys(routes, 0)
    while routes:
        by_node: dict[ClusterNode, list[int]] = {}
        for j, (node, _) in routes.items():
            by_node.setdefault(node, []).append(j)
        sends = [_round_trip(store, node, [(routes[j][1], calls[j]) for j in js])
                 for node, js in by_node.items()]
        # one master (a tenant's group, a single commit): no task to run it in parallel
        trips = [await sends[0]] if len(sends) == 1 else await asyncio.gather(*sends)
        again = False  # a TRYAGAIN: wait before the next send
        for js, replies in zip(by_node.values(), trips, strict=True):
            for j, reply in zip(js, replies, strict=True):
                if not isinstance(reply, AskError | TryAgainError):  # MOVED is an AskError
                    out[j] = reply  # it ran, or was refused, or failed: never resent
                    del routes[j]
                    continue
                again = again or isinstance(reply, TryAgainError)
                redirects[j] += 1
                route = _follow(store, reply, calls[j])
                if redirects[j] == REDIRECTS and not isinstance(route, StoreError):
                    route = StoreError("claim", "the commit's slot kept moving "
                                       "(MOVED/ASK/TRYAGAIN)")
                if isinstance(route, StoreError):
                    out[j] = route
                    del routes[j]
                else:
                    routes[j] = route
        if again and routes:
            await asyncio.sleep(TRYAGAIN_SLEEP_S)
    return out


def _follow(store: RedisClusterStore, reply: AskError | TryAgainError,
            args: list) -> tuple[ClusterNode, bool] | StoreError:
    """Where a call goes after a redirection (it did not run): (node, ASKING first)."""
    if isinstance(reply, TryAgainError):  # its keys are split by a migration: the slot's
        node = _master(store, args)  # master again, after TRYAGAIN_SLEEP_S
        return node if isinstance(node, StoreError) else (node, False)
    # MOVED: the slot moved there (the slot map is read again before the next round);
    # ASK: the slot is being moved there and our keys are gone already
    node = store._redis.get_node(host=reply.host, port=reply.port)
    if node is None:  # a node this process does not know yet
        store._refresh = True
        return StoreError("claim", f"the commit's slot is moving to an unknown node "
                          f"{reply.host}:{reply.port}")
    moved = isinstance(reply, MovedError)
    store._refresh = store._refresh or moved
    return node, not moved


def _master(store: RedisClusterStore, args: list) -> ClusterNode | StoreError:
    """The master of the call's slot, as this process's slot map says."""
    try:
        return store._redis.nodes_manager.get_node_from_slot(key_slot(args[1].encode()))
    except RedisClusterException as e:  # no node for the slot: the map is stale
        store._refresh = True
        exc = StoreError("claim", f"Redis Cluster is unavailable ({e})")
        exc.__cause__ = e
        return exc


async def _round_trip(store: RedisClusterStore, node: ClusterNode,
                      sends: list[tuple[bool, list]]) -> list:
    """The calls, in one write on one connection of ``node``: the commits of one slot
    together, GROUP_CALL per EVALSHA of GROUP_LUA (as on the single Redis,
    redis_group.py: every key of one call in one slot), a call to follow an ``ASK``
    alone after ``ASKING``; then WAIT when min_replicas_acked; → per call."""
    parts: list[bytes] = []
    members: list[tuple[bool, list[int]]] = []  # per command: (a group call?, its sends)
    by_slot: dict[int, list[int]] = {}
    for i, (asking, args) in enumerate(sends):
        if asking:
            parts += [ASKING, pack(["EVALSHA", store._sha, *args])]
            members += [(False, []), (False, [i])]
        else:
            by_slot.setdefault(key_slot(args[1].encode()), []).append(i)
    for group in by_slot.values():
        for at in range(0, len(group), GROUP_CALL):
            chunk = group[at:at + GROUP_CALL]
            parts.append(pack(group_command(store._group_sha, [sends[i][1] for i in chunk])))
            members.append((True, chunk))
    if acks := store.min_replicas_acked:
        parts.append(pack(["WAIT", acks, store.wait_timeout_ms]))
    try:
        async with store._connection_slot():
            conn = node.acquire_connection()
            try:
                replies = await exchange(conn, b"".join(parts), len(parts))
            finally:
                node.release(conn)
    except StoreError as exc:  # no free connection: nothing was sent
        return [exc] * len(sends)
    except RedisError as e:  # lost connection, timeout: any of them may have run
        store._refresh = True  # a node that fails may have been failed over
        return [unavailable(e)] * len(sends)
    out: list = [None] * len(sends)
    for (group, chunk), reply in zip(members, replies, strict=False):
        for i, answer in zip(chunk, spread(reply, len(chunk)) if group else [reply] * len(chunk),
                             strict=True):
            out[i] = answer
    if acks and (refusal := store._acked_refusal(replies[-1])) is not None:
        out = [refusal if not isinstance(reply, Exception) else reply for reply in out]
    if any(isinstance(reply, NoScriptError) for reply in out):
        try:
            await store._load_script(node)
        except StoreError as exc:
            out = no_script_failed(out, exc)
    return out
