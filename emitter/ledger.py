"""The emitter's durable state: §6 step 9's replay cache, the applied-adjustment ledger
and the attestation hashes the emitter sent — one SQLite file that survives restarts.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction is on disk before
``COMMIT`` returns. :meth:`Ledger.apply` is ONE ``BEGIN IMMEDIATE`` transaction that
claims the response nonce and records every adjustment, so a crash (even SIGKILL) before
``COMMIT`` leaves neither the claim nor any applied row — the same response can then be
verified and applied again, exactly once. Call it only after
:func:`emitter.verify.check_feedback` passed: a forged response never reaches the claim.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.store.sqlite import connect_durable
from schemas.canonical import dumps

from .verify import FeedbackRejected, VerifiedFeedback

__all__ = ["MIN_NONCE_TTL_S", "Ledger"]

#: §4's rule with the default skew: a shorter TTL would let a nonce expire while a
#: response carrying it could still pass the ±30 s freshness check.
MIN_NONCE_TTL_S = 2 * 30 + 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback_nonces (
    nonce TEXT PRIMARY KEY, kid TEXT NOT NULL, signed_at INTEGER NOT NULL,
    claimed_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_nonces_expiry ON feedback_nonces (expires_at);
CREATE TABLE IF NOT EXISTS applied (
    tenant_id TEXT NOT NULL, execution_fingerprint TEXT NOT NULL, action TEXT NOT NULL,
    control TEXT NOT NULL, timestamp INTEGER NOT NULL, target_urn TEXT NOT NULL,
    adjustment TEXT NOT NULL, nonce TEXT NOT NULL, applied_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, execution_fingerprint, action, control, timestamp, target_urn));
CREATE TABLE IF NOT EXISTS sent (
    tenant_id TEXT NOT NULL, execution_fingerprint TEXT NOT NULL,
    attestation_hash TEXT NOT NULL, PRIMARY KEY (tenant_id, execution_fingerprint));
"""


class Ledger:
    """One SQLite file (e.g. ``<state_dir>/emitter.db``); safe across processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = connect_durable(self.path, busy_timeout_ms=10_000)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; anything raised (a failed COMMIT included)
        rolls back, so nothing of the block is left half-written."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    # -- step 9 + apply ------------------------------------------------------------------

    def apply(self, verified: VerifiedFeedback, now: int,
              nonce_ttl_s: int = 86400) -> list[dict[str, Any]]:
        """Claim ``verified.nonce`` (replayed → ``FeedbackRejected("replayed_nonce")``),
        then record each adjustment once; return only the newly applied ones. One
        transaction: all of it is durable, or none of it."""
        if nonce_ttl_s < MIN_NONCE_TTL_S:
            raise ValueError(f"nonce_ttl_s must be at least {MIN_NONCE_TTL_S}")
        with self._transaction():
            self._claim(verified, now, nonce_ttl_s)
            fresh = [adj for adj in verified.adjustments
                     if self._record(adj, verified.nonce, now)]
        return fresh

    def _claim(self, verified: VerifiedFeedback, now: int, ttl: int) -> None:
        self._db.execute("DELETE FROM feedback_nonces WHERE expires_at < ?", (now,))
        try:
            self._db.execute(
                "INSERT INTO feedback_nonces VALUES (?, ?, ?, ?, ?)",
                (verified.nonce, verified.kid, verified.signed_at, now, now + ttl))
        except sqlite3.IntegrityError:
            raise FeedbackRejected("replayed_nonce",
                                   "this response nonce was already accepted") from None

    def _record(self, adj: dict[str, Any], nonce: str, now: int) -> bool:
        """Insert one adjustment unless its idempotency key is already applied."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO applied VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (adj["tenant_id"], adj["execution_fingerprint"].lower(), adj["action"],
             adj["control"], adj["timestamp"], adj["target_urn"], dumps(adj).decode("ascii"),
             nonce, now))
        return cur.rowcount == 1

    def applied(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        """Every applied adjustment (optionally one tenant's), in the order applied."""
        sql, args = "SELECT adjustment FROM applied", ()
        if tenant_id is not None:
            sql, args = sql + " WHERE tenant_id = ?", (tenant_id,)
        rows = self._db.execute(sql + " ORDER BY rowid", args).fetchall()
        return [json.loads(row[0]) for row in rows]

    def claimed(self, nonce: str) -> bool:
        """Whether a response nonce is held in the replay cache (for tests and audits)."""
        row = self._db.execute("SELECT 1 FROM feedback_nonces WHERE nonce = ?", (nonce,))
        return row.fetchone() is not None

    # -- what the emitter sent -----------------------------------------------------------

    def record_sent(self, tenant_id: str, execution_fingerprint: str,
                    attestation_hash: str) -> None:
        """Remember the attestation hash sent for an execution (call when sending).

        Hex is stored lower-case. The first hash anchors, as at the gateway: recording a
        different hash for the same execution raises ValueError (the gateway refuses it).
        """
        fp, att = execution_fingerprint.lower(), attestation_hash.lower()
        with self._transaction():
            row = self._db.execute(
                "SELECT attestation_hash FROM sent WHERE tenant_id = ? AND "
                "execution_fingerprint = ?", (tenant_id, fp)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO sent VALUES (?, ?, ?)", (tenant_id, fp, att))
        if row is not None and row[0] != att:
            raise ValueError(f"execution {fp[:16]}… was already sent with another "
                             "attestation hash")

    def sent_for(self, tenant_id: str) -> dict[str, str]:
        """``execution_fingerprint → attestation hash`` for one tenant: Expectation.sent."""
        rows = self._db.execute(
            "SELECT execution_fingerprint, attestation_hash FROM sent WHERE tenant_id = ?",
            (tenant_id,)).fetchall()
        return dict(rows)
