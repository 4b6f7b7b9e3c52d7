"""Durable SQLite (WAL, synchronous=FULL) and short-retry write transactions: the
gateway's SQLite store and the emitter's outbox and ledger share them."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def retry_locked(fn: Callable[[], T], timeout_ms: int) -> T:
    """``fn()``, retried every ~1 ms (jittered) while SQLite answers "database is locked",
    until ``timeout_ms``. SQLite's own busy handler backs off to 100 ms sleeps (a 1.8 s
    p99 with two workers, docs/BENCHMARKS.md) and is not consulted for some locks taken
    while several processes open one new file (WAL set-up, schema creation)."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.0005 + random.random() * 0.001)


def begin_immediate(db: sqlite3.Connection, timeout_ms: int) -> None:
    """Take the write lock (BEGIN IMMEDIATE) with :func:`retry_locked`'s short retries."""
    db.execute("PRAGMA busy_timeout = 0")
    try:
        retry_locked(lambda: db.execute("BEGIN IMMEDIATE"), timeout_ms)
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")


@contextmanager
def transaction(db: sqlite3.Connection, timeout_ms: int = 5000) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on an autocommit connection; anything raised (a
    failed COMMIT included) rolls back, so nothing of the block is left half-written."""
    begin_immediate(db, timeout_ms)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def connect_durable(path: Path, busy_timeout_ms: int = 5000,
                    schema: str = "") -> sqlite3.Connection:
    """A connection in WAL mode with synchronous=FULL (a COMMIT returns once fsynced),
    with ``schema`` (idempotent DDL) applied.

    Autocommit mode (``isolation_level=None``): callers issue their own BEGIN.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         timeout=busy_timeout_ms / 1000)
    db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    mode = retry_locked(lambda: db.execute("PRAGMA journal_mode = WAL").fetchone()[0],
                        busy_timeout_ms)
    if mode.lower() != "wal":
        db.close()
        raise sqlite3.OperationalError(f"cannot enable WAL on {path} (got {mode})")
    db.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit
    if schema:
        retry_locked(lambda: db.executescript(schema), busy_timeout_ms)
    return db
