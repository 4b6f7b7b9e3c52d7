"""The emitter's on-disk outbox: signed requests that must reach the gateway.

One SQLite file (WAL, ``synchronous=FULL``: a committed row survives a power cut), created
``0600``. A request is written here **before** its first send attempt, so once ``enqueue``
returns, the telemetry survives an emitter crash and a gateway outage;
``EmitterClient.flush`` retries whatever is still ``pending`` on start-up. Every change
is one explicit ``BEGIN IMMEDIATE`` … ``COMMIT`` (the connection is in autocommit mode,
where ``with connection:`` would open no transaction): a crash (even SIGKILL) leaves
each change whole or absent.

States: ``pending`` → ``delivered`` (202, or 409 with ``duplicate_of``) | ``rejected``
(a permanent answer; the bytes stay for inspection) | ``expired`` (its timestamp left
the skew window; replaced by a re-signed row, ``replaced_by``). ``maybe_accepted`` is
set durably **before** each attempt (:meth:`Outbox.begin_attempt`) and put back only by an
answer proving that attempt was not accepted: after a crash mid-attempt, the row is known
to be possibly delivered.

**Staging** (``fedgate emit``): a whole input is written first as rows carrying a
``batch`` id, which nothing delivers; :meth:`Outbox.commit_batch` then makes them pending
in one transaction, or :meth:`Outbox.discard_batch` drops them (an invalid input, a
Ctrl-C while reading). ``digest`` (sha256 of the route and the body without its
``timestamp``/``nonce``) lets a re-run skip a body the outbox already holds, pending or
delivered. **Pruning**: :meth:`Outbox.prune` drops final rows (never a pending one) and
VACUUMs, so the file shrinks.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from common.sqlite import connect_durable, transaction
from emitter.settings import private_file
from emitter.signing import SignedBody
from schemas.canonical import dumps

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    timestamp INTEGER NOT NULL,
    nonce TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivered', 'rejected', 'expired')),
    last_error TEXT,
    maybe_accepted INTEGER NOT NULL DEFAULT 0,
    status INTEGER,
    request_id TEXT,
    replaced_by INTEGER,
    possible_duplicate INTEGER NOT NULL DEFAULT 0,
    updated_at REAL,
    digest TEXT,
    batch TEXT,
    body_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, id);
"""
# added after the first release: ALTERed into an older file, then indexed
_ADDED_COLUMNS = (("digest", "TEXT"), ("batch", "TEXT"), ("body_bytes", "INTEGER"))
_INDEXES = """
CREATE INDEX IF NOT EXISTS outbox_digest ON outbox (digest);
CREATE INDEX IF NOT EXISTS outbox_batch ON outbox (batch);
"""
FINAL_STATES = ("delivered", "rejected", "expired")


def body_digest(path: str, body: dict) -> str:
    """What makes two requests "the same telemetry": route and body, without the
    ``timestamp``/``nonce`` the signature adds."""
    unsigned = {k: v for k, v in body.items() if k not in ("timestamp", "nonce")}
    return hashlib.sha256(path.encode() + b"\n" + dumps(unsigned)).hexdigest()
_COLUMNS = ("id, path, headers, body, timestamp, nonce, created_at, attempts, state, "
            "last_error, maybe_accepted, status, request_id, replaced_by, possible_duplicate")


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    path: str
    headers: dict[str, str]
    body: bytes
    timestamp: int
    nonce: str
    created_at: float
    attempts: int = 0
    state: str = "pending"
    last_error: str | None = None
    maybe_accepted: bool = False
    status: int | None = None
    request_id: str | None = None
    replaced_by: int | None = None
    possible_duplicate: bool = False  # re-signed after an attempt that may have landed

    @classmethod
    def from_row(cls, row: tuple) -> OutboxItem:
        (id_, path, headers, body, ts, nonce, created, attempts, state, err, maybe,
         status, request_id, replaced_by, dup) = row
        return cls(id_, path, json.loads(headers), bytes(body), ts, nonce, created, attempts,
                   state, err, bool(maybe), status, request_id, replaced_by, bool(dup))


class Outbox:
    """Not thread-safe: one outbox per client, used from its event loop's thread."""

    def __init__(self, path: Path | str, *, clock=time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        private_file(self.path)  # 0600 before SQLite creates it (its -wal/-shm follow)
        self._db = connect_durable(self.path, schema=SCHEMA)  # IF NOT EXISTS: idempotent
        self._migrate()

    def _migrate(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        with self._transaction():
            for name, kind in _ADDED_COLUMNS:
                if name not in have:
                    self._db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")
        self._db.executescript(_INDEXES)

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[None]:
        return transaction(self._db)

    def _insert(self, signed: SignedBody, path: str, possible_duplicate: bool = False,
                digest: str | None = None, batch: str | None = None) -> int:
        cur = self._db.execute(
            "INSERT INTO outbox (path, headers, body, timestamp, nonce, created_at, "
            "possible_duplicate, digest, batch, body_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (path, json.dumps(signed.headers), signed.body,
             int(signed.headers["X-Telemetry-Timestamp"]),
             signed.headers["X-Telemetry-Nonce"], self._clock(), int(possible_duplicate),
             digest, batch, len(signed.body)))
        return int(cur.lastrowid)

    def enqueue(self, signed: SignedBody, path: str, digest: str | None = None) -> OutboxItem:
        """Durably store a signed request (committed and fsynced when this returns)."""
        with self._transaction():
            item_id = self._insert(signed, path, digest=digest)
        return self.get(item_id)

    # -- staging a whole input (fedgate emit) ------------------------------------------

    def stage(self, batch: str, rows: list[tuple[SignedBody, str, str]]) -> None:
        """``(signed, path, digest)`` rows of ``batch``, in one transaction: durable, but
        not pending (nothing delivers them) until :meth:`commit_batch`."""
        with self._transaction():
            for signed, path, digest in rows:
                self._insert(signed, path, digest=digest, batch=batch)

    def commit_batch(self, batch: str) -> int:
        """Every row of ``batch`` becomes pending, in one transaction; → how many."""
        with self._transaction():
            cur = self._db.execute("UPDATE outbox SET batch = NULL WHERE batch = ?", (batch,))
        return cur.rowcount

    def discard_batch(self, batch: str | None = None) -> int:
        """Drop the staged rows of ``batch`` (None: of every batch, e.g. left by a run
        that died while reading its input; they were never sent)."""
        with self._transaction():
            if batch is None:
                cur = self._db.execute("DELETE FROM outbox WHERE batch IS NOT NULL")
            else:
                cur = self._db.execute("DELETE FROM outbox WHERE batch = ?", (batch,))
        return cur.rowcount

    def holding(self, digest: str, batch: str | None = None) -> tuple[int, str] | None:
        """``(id, state)`` of a pending or delivered row (or one staged in ``batch``) with
        this digest: the same body is already on its way or there."""
        row = self._db.execute(
            "SELECT id, state FROM outbox WHERE digest = ? AND state IN ('pending', "
            "'delivered') AND (batch IS NULL OR batch = ?) ORDER BY id LIMIT 1",
            (digest, batch)).fetchone()
        return (row[0], row[1]) if row else None

    def get(self, item_id: int) -> OutboxItem:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?",
                               (item_id,)).fetchone()
        if row is None:
            raise KeyError(item_id)
        return OutboxItem.from_row(row)

    def pending(self) -> list[OutboxItem]:
        """Pending rows, oldest first (staged rows are not pending yet)."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE state = 'pending' AND batch IS NULL "
            "ORDER BY id").fetchall()
        return [OutboxItem.from_row(r) for r in rows]

    def pending_ids(self, after: int = 0, limit: int = -1) -> list[int]:
        """Ids of the pending rows after ``after``, oldest first, at most ``limit``
        (re-read each with :meth:`get`)."""
        rows = self._db.execute(
            "SELECT id FROM outbox WHERE state = 'pending' AND batch IS NULL AND id > ? "
            "ORDER BY id LIMIT ?", (after, limit))
        return [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute(
            "SELECT state, COUNT(*) FROM outbox WHERE batch IS NULL GROUP BY state"))

    def count_pending(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND "
                                "batch IS NULL").fetchone()[0]

    def status(self) -> dict[str, tuple[int, int]]:
        """``state → (rows, body bytes)`` for every state (staged rows as ``staged``).
        Sizes come from ``body_bytes`` (reading the bodies would cost their size in
        memory); rows written before that column existed are measured once."""
        with self._transaction():
            self._db.execute("UPDATE outbox SET body_bytes = LENGTH(body) "
                             "WHERE body_bytes IS NULL")
        out = {state: (0, 0) for state in ("pending", *FINAL_STATES, "staged")}
        for state, n, size in self._db.execute(
                "SELECT CASE WHEN batch IS NULL THEN state ELSE 'staged' END AS s, COUNT(*), "
                "COALESCE(SUM(body_bytes), 0) FROM outbox GROUP BY s"):
            out[state] = (n, size)
        return out

    def oldest_pending(self) -> OutboxItem | None:
        ids = self.pending_ids(limit=1)
        return self.get(ids[0]) if ids else None

    def file_bytes(self) -> int:
        """The database and its WAL on disk."""
        wal = self.path.with_name(self.path.name + "-wal")
        return sum(f.stat().st_size for f in (self.path, wal) if f.exists())

    def prune(self, *, states: tuple[str, ...], older_than: float | None = None) -> int:
        """Drop final rows in ``states`` — those last changed more than ``older_than``
        seconds ago (None: whatever their age) — then VACUUM (the file shrinks) and
        checkpoint the WAL. A pending or staged row is never dropped. → rows dropped."""
        states = tuple(s for s in states if s in FINAL_STATES)
        if not states:
            return 0
        cutoff = self._clock() - older_than if older_than is not None else float("inf")
        marks = ", ".join("?" * len(states))
        with self._transaction():
            cur = self._db.execute(
                f"DELETE FROM outbox WHERE state IN ({marks}) AND batch IS NULL AND "
                "COALESCE(updated_at, created_at) <= ?", (*states, cutoff))
        if cur.rowcount:
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return cur.rowcount

    def _update(self, item_id: int, sql: str, args: tuple) -> None:
        """Only a pending row changes: delivered, rejected and expired are final."""
        with self._transaction():
            self._db.execute(
                f"UPDATE outbox SET {sql}, updated_at = ? WHERE id = ? AND state = 'pending'",
                (*args, self._clock(), item_id))

    def begin_attempt(self, item_id: int) -> bool:
        """Before a send: count the attempt and durably set ``maybe_accepted`` (a crash
        from here on leaves a row that may have been delivered). Returns the previous
        value, for :meth:`record_attempt` to put back when the answer proves this
        attempt was not accepted. A final row is left as it is."""
        with self._transaction():
            row = self._db.execute("SELECT maybe_accepted FROM outbox WHERE id = ?",
                                   (item_id,)).fetchone()
            if row is None:
                raise KeyError(item_id)
            self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1, maybe_accepted = 1, "
                "updated_at = ? WHERE id = ? AND state = 'pending'", (self._clock(), item_id))
        return bool(row[0])

    def begin_attempts(self, item_ids: list[int]) -> dict[int, bool]:
        """:meth:`begin_attempt` for the rows of one batch request, in one transaction
        (one fsync): → each row's previous ``maybe_accepted``."""
        with self._transaction():
            previous = {}
            for item_id in item_ids:
                row = self._db.execute("SELECT maybe_accepted FROM outbox WHERE id = ?",
                                       (item_id,)).fetchone()
                if row is None:
                    raise KeyError(item_id)
                previous[item_id] = bool(row[0])
                self._db.execute(
                    "UPDATE outbox SET attempts = attempts + 1, maybe_accepted = 1, "
                    "updated_at = ? WHERE id = ? AND state = 'pending'",
                    (self._clock(), item_id))
        return previous

    def record_attempt(self, item_id: int, error: str | None, *,
                       maybe_accepted: bool | None) -> None:
        """The outcome of an attempt that left the row pending: ``error``, and what
        ``maybe_accepted`` is now (None: unchanged)."""
        if maybe_accepted is None:
            self._update(item_id, "last_error = ?", (error,))
        else:
            self._update(item_id, "last_error = ?, maybe_accepted = ?",
                         (error, int(maybe_accepted)))

    def mark_delivered(self, item_id: int, request_id: str | None, status: int = 202) -> None:
        self._update(item_id, "state = 'delivered', request_id = ?, status = ?",
                     (request_id, status))

    def mark_rejected(self, item_id: int, status: int, code: str, *,
                      maybe_accepted: bool | None = None) -> None:
        sql, args = "state = 'rejected', status = ?, last_error = ?", (status, code)
        if maybe_accepted is not None:
            sql, args = sql + ", maybe_accepted = ?", (*args, int(maybe_accepted))
        self._update(item_id, sql, args)

    def resign(self, item_id: int, signed: SignedBody) -> OutboxItem:
        """One transaction: the old row becomes ``expired`` and a re-signed row takes its
        place — a crash leaves either the old row pending or the new one, never both.
        ValueError if the row is no longer pending (nothing changes).

        The new row is a ``possible_duplicate`` when the old one (or its own predecessor)
        may already have been accepted: at-least-once, see docs/EMITTER.md."""
        with self._transaction():
            old = self.get(item_id)
            if old.state != "pending":
                raise ValueError(f"outbox #{item_id} is {old.state}, not pending: "
                                 "not re-signed")
            digest = self._db.execute("SELECT digest FROM outbox WHERE id = ?",
                                      (item_id,)).fetchone()[0]
            new_id = self._insert(signed, old.path,
                                  old.maybe_accepted or old.possible_duplicate, digest)
            self._db.execute(
                "UPDATE outbox SET state = 'expired', replaced_by = ?, updated_at = ?, "
                "last_error = ? WHERE id = ? AND state = 'pending'",
                (new_id, self._clock(), "timestamp left the skew window; re-signed",
                 item_id))
        return self.get(new_id)
