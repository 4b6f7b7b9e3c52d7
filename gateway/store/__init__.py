"""Stores behind one interface: SQLite (embedded default), Redis and Redis Cluster."""

from __future__ import annotations

from .base import (
    OWNER_RE,
    Anchor,
    Claim,
    Commit,
    CommitResult,
    OutboxEntry,
    Outcome,
    Record,
    Revocation,
    Store,
    StoreError,
)

__all__ = [
    "OWNER_RE", "Anchor", "Claim", "Commit", "CommitResult", "Outcome", "OutboxEntry", "Record",
    "Revocation", "Store", "StoreError",
    "open_store",
]


def open_store(url: str, **options: object) -> Store:
    """Build (not yet open) the store named by ``url``: ``sqlite:///PATH`` or ``redis://``
    (with ``cluster=True``: a Redis Cluster, the URL naming any one of its nodes)."""
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url, **options)  # type: ignore[arg-type]
    if url.startswith(("redis://", "rediss://")) and options.get("cluster"):
        from .redis_cluster import RedisClusterStore

        return RedisClusterStore(url, **options)  # type: ignore[arg-type]
    options.pop("cluster", None)  # cluster = false: the single Redis
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore

        return RedisStore(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported store url {url!r} (want sqlite:///PATH or redis://HOST:PORT/DB)")
