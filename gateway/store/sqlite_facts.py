"""The SQLite store's per-execution facts (docs/STORES.md *Facts*, docs/POLICY.md *Facts*).

``facts`` holds one row per ``(tenant, identity, execution_fingerprint:attestation
hash)``: the facts state (JSON) that :mod:`gateway.feedback.fold` folds every stored
finding and graph into, **in the transaction that stores the record** (:func:`fold_into`).
``facts_skipped`` names the records listed under an identity that could not be folded
(older version, edited), so every query of that identity still reports them. A feedback
query reads the identity's newest rows with their anchors (:func:`list_facts`): one
small row per execution, no record body.

:func:`backfill` (re)builds both tables from the records, in the upgrade's write
transaction (``sqlite_schema.migrate``, layout version 4): idempotent. :func:`relayout`
turns the version-4 table into the version-5 one (rowid: below).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from gateway.feedback.fold import Fold, Skip, apply, fold_record, stored_validators

# ``facts`` is a rowid table (layout version 5; a WITHOUT ROWID table before): a row of
# a WITHOUT ROWID table lives in an index b-tree page, which keeps at most ~1,000 bytes
# of it inline (4 KiB pages) and moves the rest to overflow pages — a typical state of
# ~800 bytes plus the key columns is at that line, and one a little larger made every
# read of its row ~3× slower (a query of 1,000 executions: 3 → 8 ms) and every fold ~2×.
# A rowid table's leaf keeps ~4,000 bytes inline. Measured with the same rows: reads and
# folds as fast as before below the line, and staying so above it.
FACTS_TABLE = """
CREATE TABLE IF NOT EXISTS facts (
    tenant_id TEXT NOT NULL, identity TEXT NOT NULL, member TEXT NOT NULL,
    latest INTEGER NOT NULL, state BLOB NOT NULL,
    UNIQUE (tenant_id, identity, member))"""
FACTS_BY_LATEST = ("CREATE INDEX IF NOT EXISTS facts_by_latest"
                   " ON facts (tenant_id, identity, latest, member)")
FACTS_SCHEMA = FACTS_TABLE + ";\n" + FACTS_BY_LATEST + """;
CREATE TABLE IF NOT EXISTS facts_skipped (
    tenant_id TEXT NOT NULL, identity TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, record_id TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (tenant_id, identity, seq)) WITHOUT ROWID;
"""


def fold_into(db: sqlite3.Connection, kind: str, raw: bytes, tenant_id: str,
              identity: str | None, seq: int, *, trusted: bool,
              given: Fold | None = None) -> None:
    """Fold one stored record (row ``seq``) into its execution's facts; inside the
    caller's transaction. ``trusted``: built by this gateway from a checked body.
    ``given``: the commit's own fold (``Commit.fold``), else read from ``raw``."""
    fold = given if given is not None else fold_record(
        kind, raw, tenant_id, identity, validators=None if trusted else stored_validators())
    if isinstance(fold, Fold):
        row = db.execute("SELECT state, latest FROM facts WHERE tenant_id=? AND identity=?"
                         " AND member=?", (tenant_id, identity, fold.member)).fetchone()
        state = apply({} if row is None else orjson.loads(row[0]), fold.ops, seq)
        latest = fold.received_at if row is None else max(row[1], fold.received_at)
        db.execute("INSERT INTO facts (tenant_id, identity, member, latest, state)"
                   " VALUES (?,?,?,?,?) ON CONFLICT (tenant_id, identity, member)"
                   " DO UPDATE SET latest = excluded.latest, state = excluded.state",
                   (tenant_id, identity, fold.member, latest, orjson.dumps(state)))
    elif isinstance(fold, Skip):
        db.execute("INSERT OR REPLACE INTO facts_skipped (tenant_id, identity, seq, kind,"
                   " record_id, reason) VALUES (?,?,?,?,?,?)",
                   (tenant_id, identity, seq, fold.kind, fold.record_id, fold.reason))


def relayout(db: sqlite3.Connection) -> None:
    """``facts`` as a WITHOUT ROWID table (layout version 4) rebuilt as the rowid table
    of :data:`FACTS_TABLE`, rows unchanged; nothing when it is one already. Inside the
    caller's write transaction."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'facts'"
                     ).fetchone()
    if row is None or "WITHOUT ROWID" not in row[0].upper():
        return
    db.execute("DROP INDEX IF EXISTS facts_by_latest")
    db.execute("ALTER TABLE facts RENAME TO facts_v4")
    db.execute(FACTS_TABLE)
    db.execute("INSERT INTO facts (tenant_id, identity, member, latest, state)"
               " SELECT tenant_id, identity, member, latest, state FROM facts_v4")
    db.execute("DROP TABLE facts_v4")
    db.execute(FACTS_BY_LATEST)


def backfill(db: sqlite3.Connection) -> None:
    """(Re)build the facts from every finding and graph listed under an identity."""
    db.execute("DELETE FROM facts")
    db.execute("DELETE FROM facts_skipped")
    rows = db.execute("SELECT seq, kind, tenant_id, identity, data FROM records"
                      " WHERE kind IN ('finding', 'graph') AND identity IS NOT NULL"
                      " ORDER BY seq")
    for seq, kind, tenant_id, identity, data in rows:
        fold_into(db, kind, bytes(data), tenant_id, identity, seq, trusted=False)


def list_facts(db: sqlite3.Connection, tenant_id: str, identity: str,
               limit: int) -> list[tuple[str, Any, str | None, str | None]]:
    """``(member, state, anchored hash, owner)`` of ``identity``'s newest executions."""
    return db.execute(
        "SELECT f.member, f.state, a.attestation_hash, a.owner FROM facts f"
        " LEFT JOIN anchors a ON a.tenant_id = f.tenant_id"
        " AND a.execution_fingerprint = substr(f.member, 1, 64)"
        " WHERE f.tenant_id=? AND f.identity=? ORDER BY f.latest DESC, f.member DESC LIMIT ?",
        (tenant_id, identity, max(0, limit))).fetchall()


def list_skipped(db: sqlite3.Connection, tenant_id: str, identity: str,
                 limit: int) -> list[tuple[str, str, str]]:
    """``(kind, record id, reason)`` of ``identity``'s records that could not be folded."""
    return db.execute(
        "SELECT kind, record_id, reason FROM facts_skipped WHERE tenant_id=? AND identity=?"
        " ORDER BY kind = 'graph', seq DESC LIMIT ?",
        (tenant_id, identity, max(0, limit))).fetchall()
