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
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from emitter.settings import private_file
from emitter.signing import SignedBody
from gateway.store.sqlite import connect_durable, transaction

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
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, id);
"""
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

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[None]:
        return transaction(self._db)

    def _insert(self, signed: SignedBody, path: str, possible_duplicate: bool = False) -> int:
        cur = self._db.execute(
            "INSERT INTO outbox (path, headers, body, timestamp, nonce, created_at, "
            "possible_duplicate) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (path, json.dumps(signed.headers), signed.body,
             int(signed.headers["X-Telemetry-Timestamp"]),
             signed.headers["X-Telemetry-Nonce"], self._clock(), int(possible_duplicate)))
        return int(cur.lastrowid)

    def enqueue(self, signed: SignedBody, path: str) -> OutboxItem:
        """Durably store a signed request (committed and fsynced when this returns)."""
        with self._transaction():
            item_id = self._insert(signed, path)
        return self.get(item_id)

    def get(self, item_id: int) -> OutboxItem:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?",
                               (item_id,)).fetchone()
        if row is None:
            raise KeyError(item_id)
        return OutboxItem.from_row(row)

    def pending(self) -> list[OutboxItem]:
        """Pending rows, oldest first."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE state = 'pending' ORDER BY id").fetchall()
        return [OutboxItem.from_row(r) for r in rows]

    def pending_ids(self) -> list[int]:
        """Ids of the pending rows, oldest first (re-read each with :meth:`get`)."""
        rows = self._db.execute("SELECT id FROM outbox WHERE state = 'pending' ORDER BY id")
        return [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"))

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
            new_id = self._insert(signed, old.path,
                                  old.maybe_accepted or old.possible_duplicate)
            self._db.execute(
                "UPDATE outbox SET state = 'expired', replaced_by = ?, updated_at = ?, "
                "last_error = ? WHERE id = ? AND state = 'pending'",
                (new_id, self._clock(), "timestamp left the skew window; re-signed",
                 item_id))
        return self.get(new_id)
