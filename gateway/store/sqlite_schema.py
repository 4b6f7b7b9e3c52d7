"""The SQLite store's schema and its upgrade from the layout before protocol v1.1.

v1.1 claims nonces per ``(identity, tenant_id, nonce)`` (table ``claims``) and records
the owner of each execution (``anchors.owner``). :func:`migrate` runs at every open, in
one write transaction (so concurrent openers serialise), and is idempotent:

- ``anchors.owner`` is added if missing and, once (``PRAGMA user_version`` 0 → 1),
  back-filled from the identity in the evidence of the **oldest** finding or graph
  record of that execution made under the anchored attestation hash — the request that
  made the anchor (a record under another hash was sent while anchoring was off,
  possibly by another identity). An anchor with no such
  record keeps ``owner`` NULL: owned by nobody, refused for everyone (never "first
  comer takes it": another producer of the tenant could learn the fingerprint from
  old feedback answers and squat on it).
- ``records.identity`` (the identity that sent the record; indexed with kind, tenant
  and order, so a feedback query reads and budgets only its own identity's records) is
  added if missing and, once (``user_version`` < 2 → 2), back-filled from the evidence
  JSON's ``identity``; a record without one (issued feedback) keeps NULL.
- ``facts`` and ``facts_skipped`` (version 4): per-execution facts for the feedback
  policy, back-filled once from the findings and graphs (``sqlite_facts.backfill``);
  version 5 keeps ``facts`` in a rowid table instead of a WITHOUT ROWID one, so a
  state of more than ~800 bytes stays in its row's page (``sqlite_facts.relayout``
  copies the rows over, once).
- ``audit_outbox`` (version 3): an accepted commit's audit events, written in its
  transaction, deleted once they are in the hash chain (docs/AUDIT.md *Outbox*).
- the pre-v1.1 ``nonces(identity, nonce)`` table is kept: while it holds rows the
  store consults it for live claims (judged with the request's ``now``, as every claim),
  so an upgrade opens no replay window. Nothing writes to it any more; the periodic
  sweep deletes its expired rows (with a request's ``now``), and once it is empty the
  store stops reading it. It can then be dropped by hand.
"""

from __future__ import annotations

import sqlite3

from .sqlite_facts import FACTS_SCHEMA, backfill, relayout

SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    identity TEXT NOT NULL, tenant_id TEXT NOT NULL, nonce TEXT NOT NULL,
    expires_at INTEGER NOT NULL, body_digest TEXT NOT NULL, request_id TEXT NOT NULL,
    PRIMARY KEY (identity, tenant_id, nonce)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS claims_expiry ON claims (expires_at);
CREATE TABLE IF NOT EXISTS anchors (
    tenant_id TEXT NOT NULL, execution_fingerprint TEXT NOT NULL,
    attestation_hash TEXT NOT NULL, created_at INTEGER NOT NULL, owner TEXT,
    PRIMARY KEY (tenant_id, execution_fingerprint)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL, record_id TEXT NOT NULL, tenant_id TEXT NOT NULL,
    execution_fingerprint TEXT, created_at INTEGER NOT NULL, data BLOB NOT NULL,
    identity TEXT,
    UNIQUE (kind, record_id));
CREATE INDEX IF NOT EXISTS records_by_tenant ON records (kind, tenant_id, seq);
CREATE INDEX IF NOT EXISTS records_by_execution
    ON records (tenant_id, execution_fingerprint, seq);
CREATE TABLE IF NOT EXISTS audit_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, event BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS audit_outbox_by_owner ON audit_outbox (owner, id);
""" + FACTS_SCHEMA
SCHEMA_VERSION = 5  # PRAGMA user_version: 1 once the v1.1 migration has run, 2 once
# records carry the identity that sent them (indexed: a query reads only its own), 3
# with the audit outbox (created by SCHEMA above: nothing to back-fill), 4 with the
# per-execution facts (sqlite_facts.py: back-filled from the records), 5 with the facts
# in a rowid table (sqlite_facts.relayout: the rows copied as they are)
RECORDS_BY_IDENTITY = ("CREATE INDEX IF NOT EXISTS records_by_identity"
                       " ON records (kind, tenant_id, identity, seq)")
# The sender of a record stored before records had an identity column: the evidence
# JSON's ``identity`` (findings, graphs); NULL when there is none (issued feedback).
BACKFILL_IDENTITY = """
UPDATE records SET identity = (
    SELECT CASE WHEN json_valid(d) AND json_type(d, '$.identity') = 'text'
                THEN json_extract(d, '$.identity') END
    FROM (SELECT CAST(records.data AS TEXT) AS d))
WHERE identity IS NULL
"""

# The owner of a pre-v1.1 anchor: the identity in the oldest finding/graph record of the
# execution made under the ANCHORED attestation hash (its evidence JSON), when that record
# is valid JSON with a string identity. Records under another hash were sent while
# anchoring was off (or refused nothing then): possibly by another identity, never the
# request that made the anchor.
BACKFILL_OWNERS = """
UPDATE anchors SET owner = (
    SELECT CASE WHEN json_valid(d) AND json_type(d, '$.identity') = 'text'
                THEN json_extract(d, '$.identity') END
    FROM (SELECT CAST(r.data AS TEXT) AS d FROM records r
          WHERE r.tenant_id = anchors.tenant_id
            AND r.execution_fingerprint = anchors.execution_fingerprint
            AND r.kind IN ('finding', 'graph')
            AND CASE WHEN json_valid(CAST(r.data AS TEXT)) THEN lower(json_extract(
                CAST(r.data AS TEXT), '$.attestation_measurement_hash')) END
                = lower(anchors.attestation_hash)
          ORDER BY r.seq LIMIT 1))
WHERE owner IS NULL
"""


def migrate(db: sqlite3.Connection) -> bool:
    """Upgrade a pre-v1.1 file in place (call inside a write transaction); return True
    when the legacy ``nonces`` table holds claims (live or not: no clock is read here)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(anchors)")}
    if "owner" not in columns:
        db.execute("ALTER TABLE anchors ADD COLUMN owner TEXT")
    if "identity" not in {row[1] for row in db.execute("PRAGMA table_info(records)")}:
        db.execute("ALTER TABLE records ADD COLUMN identity TEXT")
    db.execute(RECORDS_BY_IDENTITY)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version < 1:
        db.execute(BACKFILL_OWNERS)
    if version < 2:
        db.execute(BACKFILL_IDENTITY)
    relayout(db)  # judged by the table itself: a no-op once done
    if version < 4:
        backfill(db)
    if version < SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return sweep_legacy_nonces(db, None)


def sweep_legacy_nonces(db: sqlite3.Connection, now: int | None) -> bool:
    """Delete the pre-v1.1 claims expired at ``now`` (none when None); True while rows
    remain."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'nonces'"
                  ).fetchone() is None:
        return False
    if now is not None:
        db.execute("DELETE FROM nonces WHERE expires_at <= ?", (now,))
    return db.execute("SELECT 1 FROM nonces LIMIT 1").fetchone() is not None
