"""Group commit on the single Redis (issue 9): a group's commits in one round trip.

``commit_many`` sends every commit that is ready in ONE round trip on one connection,
up to GROUP_CALL commits per EVALSHA of GROUP_LUA (redis_scripts.py: the commit script's
body run per commit in ``pcall``): each commit stays atomic on its own (a refusal writes
nothing; an error is that commit's alone), and a commit that conflicts with an earlier
one of the group (``base.conflict_deps``: same nonce claim, or the same execution claimed
with another attestation hash or owner) waits for that one's final answer and goes in a
later round trip, as the one-by-one default would run it. The epoch is handled as in
``RedisStore.commit``: a tenant whose epoch the gateway does not hold is synced first, a
commit that could have been accepted before the epoch began is ``BEFORE_EPOCH``, and a
commit the script refused with ``epoch`` is tried again (at most 3 times) after the sync.
A script Redis lost (``NOSCRIPT``: it did not run) is loaded again and its commits sent
again. Fail closed: a lost connection or a timeout fails every commit of that round trip
with ``StoreError("claim")`` — some may have run — and nothing is ever resent.

The loop is shared by both Redis stores; each round's calls go out through the store's
``_send_group`` hook: :func:`send_group` here (one pipeline on one connection), or the
cluster's (redis_cluster_group.py: one pipeline per master, in parallel, each ended by
``WAIT`` when ``min_replicas_acked`` > 0, redirections followed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from .base import Commit, CommitResult, Outcome, StoreError, conflict_deps
from .redis_epoch import epoch_start
from .redis_scripts import GROUP_LUA
from .resp import pack

RedisStore = Any  # redis.RedisStore (which imports this module): its commit hooks

TRIES = 3  # per commit: as RedisStore.commit's epoch loop
MAX_GROUP = 512  # commits per round trip
GROUP_CALL = 128  # commits per GROUP_LUA call (Redis runs one call at a time: bounded)


async def commit_many(store: RedisStore,
                      commits: Sequence[Commit]) -> list[CommitResult | StoreError]:
    prepared = [store._prepare(c) for c in commits]  # ValueError before anything is sent
    deps = conflict_deps(commits)
    results: list[CommitResult | StoreError | None] = [None] * len(commits)
    tries = [0] * len(commits)
    todo = set(range(len(commits)))
    while todo:
        ready = [i for i in sorted(todo) if not deps[i] & todo][:MAX_GROUP]
        epochs: dict[str, str | StoreError] = {}
        sent: list[int] = []
        for i in ready:
            c, keys = commits[i], prepared[i][0]
            if store._unsafe is not None:
                results[i] = StoreError("claim", store._unsafe)
            elif tries[i] == TRIES:
                results[i] = StoreError("claim", "the store's epoch kept changing (or its "
                                        "script kept being lost) during the commit")
            else:
                epoch = await _epoch(store, epochs, c, keys[3])
                if isinstance(epoch, StoreError):
                    results[i] = epoch
                elif c.earliest <= epoch_start(epoch):
                    results[i] = CommitResult(Outcome.BEFORE_EPOCH)
                else:
                    tries[i] += 1
                    sent.append(i)
                    continue
            todo.discard(i)
        if not sent:
            continue
        audits = [commits[i].audit if commits[i].audit is not None else b"" for i in sent]
        calls = [[*prepared[i][1], epochs[commits[i].tenant_id], audit, *prepared[i][2]]
                 for i, audit in zip(sent, audits, strict=True)]
        replies = await store._send_group(calls)
        stale: dict[str, tuple[str, int]] = {}  # tenant → (epoch key, now)
        for i, reply in zip(sent, replies, strict=True):
            c, keys = commits[i], prepared[i][0]
            if isinstance(reply, NoScriptError):  # it did not run; the script is loaded
                continue  # again (send_group): send it again
            if isinstance(reply, StoreError):  # the round trip failed: nothing resent
                results[i] = reply
            elif isinstance(reply, ResponseError):  # OOM, READONLY, MISCONF: refused
                refused = StoreError("write", f"Redis refused the command: {reply}")
                refused.__cause__ = reply  # the log names the reply's type (OutOfMemoryError…)
                results[i] = refused
            elif reply[0] == b"epoch":
                stale.setdefault(c.tenant_id, (keys[3], c.now))
                continue
            else:
                try:
                    results[i] = store._finish(reply, c, keys)
                except StoreError as exc:
                    results[i] = exc
            todo.discard(i)
        for tenant, (key, now) in stale.items():
            try:
                await store._sync_epoch(tenant, key, now)
            except StoreError as exc:
                for i in [i for i in todo if commits[i].tenant_id == tenant]:
                    results[i] = exc
                    todo.discard(i)
    return results  # type: ignore[return-value]


async def _epoch(store: RedisStore, epochs: dict[str, str | StoreError], c: Commit,
                 key: str) -> str | StoreError:
    """The tenant's epoch for this round trip (synced once per round when not held)."""
    if c.tenant_id not in epochs:
        epoch = store._held_epoch(c.tenant_id)
        if epoch is None:
            try:
                epoch = await store._sync_epoch(c.tenant_id, key, c.now)
            except StoreError as exc:
                epoch = exc
        epochs[c.tenant_id] = epoch
    return epochs[c.tenant_id]


async def send_group(store: RedisStore, calls: list[list]) -> list:
    """The single Redis's ``_send_group``: the calls (each a commit's EVALSHA arguments)
    in one round trip on one connection (kept between round trips: resp.HeldConnections),
    GROUP_CALL commits per ``GROUP_LUA`` call (redis_scripts.py; written by the lean
    packer, resp.py); → per call its reply, its
    error reply (ResponseError; ``NOSCRIPT`` after the script was loaded again), or the
    StoreError that failed it (a lost connection or timeout fails them all: some may
    have run)."""
    if store._redis is None or store._held is None:
        return [StoreError("claim", "the Redis store is not open")] * len(calls)
    chunks = [calls[i:i + GROUP_CALL] for i in range(0, len(calls), GROUP_CALL)]
    payload = b"".join(pack(group_command(store._group_sha, chunk)) for chunk in chunks)
    try:
        answers = await store._held.round_trip(payload, len(chunks))
    except RedisError as e:  # lost connection, timeout: some may have run (fail closed)
        return [unavailable(e)] * len(calls)
    replies = [reply for chunk, answer in zip(chunks, answers, strict=True)
               for reply in spread(answer, len(chunk))]
    if any(isinstance(reply, NoScriptError) for reply in replies):
        # SCRIPT FLUSH, a restart without the script: those did not run
        try:
            store._group_sha = await store._call(lambda r: r.script_load(GROUP_LUA))
        except StoreError as exc:  # those commits fail alone
            replies = no_script_failed(replies, exc)
    return replies


def spread(reply: Any, n: int) -> list:
    """A group call's reply as its ``n`` commits' replies: each its own, or a whole
    refusal (OOM, NOSCRIPT; on a cluster MOVED, ASK, TRYAGAIN: none of them ran) for
    each; anything else cannot come from GROUP_LUA and fails them closed (some may have
    run)."""
    if isinstance(reply, Exception):
        return [reply] * n
    if isinstance(reply, list) and len(reply) == n:
        return reply
    return [StoreError("claim", f"unexpected reply to a group commit: {str(reply)[:80]}")] * n


def group_command(sha: str, calls: list[list]) -> list:
    """One ``EVALSHA`` of GROUP_LUA for ``calls`` (each ``[numkeys, *keys, *argv]``, the
    arguments COMMIT_LUA's own EVALSHA would take)."""
    keys: list = []
    sizes: list = []
    argv: list = []
    for call in calls:
        nk = call[0]
        keys += call[1:1 + nk]
        argv += call[1 + nk:]
        sizes += (nk, len(call) - 1 - nk)
    return ["EVALSHA", sha, len(keys), *keys, len(calls), *sizes, *argv]


def unavailable(e: RedisError) -> StoreError:
    """A round trip that failed (lost connection, timeout): StoreError("claim") caused by
    ``e`` (the log names its type)."""
    exc = StoreError("claim", f"Redis is unavailable ({type(e).__name__}: {e})")
    exc.__cause__ = e
    return exc


def no_script_failed(replies: list, exc: StoreError) -> list:
    """``replies`` with each ``NOSCRIPT`` replaced by ``exc`` (the script could not be
    loaded again: those commits did not run, and fail alone)."""
    return [exc if isinstance(reply, NoScriptError) else reply for reply in replies]
