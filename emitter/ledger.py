"""The emitter's durable state: §6 step 9's replay cache, the applied-adjustment ledger
and the attestation hashes the gateway accepted from this emitter — one SQLite file
(``0600``) that survives restarts.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction is on disk before
``COMMIT`` returns. :meth:`Ledger.apply` is ONE ``BEGIN IMMEDIATE`` transaction that
claims the response nonce and records every adjustment, so a crash (even SIGKILL) before
``COMMIT`` leaves neither the claim nor any applied row — the same response can then be
verified and applied again, exactly once. Call it only after
:func:`emitter.verify.check_feedback` passed: a forged response never reaches the claim.

An adjustment is applied once **while it is in force**: its identity is
:data:`IDENTITY` (not its ``timestamp``, which the gateway sets to the time it answers,
nor ``confidence``/``rationale``/``ttl_seconds``), and it stays in force for its
``ttl_seconds`` from when it was applied. The same adjustment received again after that
is a refresh and is applied again.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from common.sqlite import connect_durable, transaction
from schemas.canonical import dumps

from .settings import private_file
from .verify import FeedbackRejected, VerifiedFeedback

__all__ = ["IDENTITY", "MIN_NONCE_TTL_S", "Ledger"]

#: What makes two adjustments "the same" (hex members compared lower-case).
IDENTITY = ("tenant_id", "execution_fingerprint", "action", "control", "target_urn",
            "attestation_measurement_hash")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

#: §4's rule with the default skew: a shorter TTL would let a nonce expire while a
#: response carrying it could still pass the ±30 s freshness check.
MIN_NONCE_TTL_S = 2 * 30 + 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback_nonces (
    nonce TEXT PRIMARY KEY, kid TEXT NOT NULL, signed_at INTEGER NOT NULL,
    claimed_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_nonces_expiry ON feedback_nonces (expires_at);
CREATE TABLE IF NOT EXISTS applied_adjustments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL, execution_fingerprint TEXT NOT NULL, action TEXT NOT NULL,
    control TEXT NOT NULL, target_urn TEXT NOT NULL, attestation_hash TEXT NOT NULL,
    adjustment TEXT NOT NULL, nonce TEXT NOT NULL,
    applied_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS applied_adjustments_identity ON applied_adjustments (
    tenant_id, execution_fingerprint, action, control, target_urn, attestation_hash,
    expires_at);
CREATE TABLE IF NOT EXISTS sent (
    tenant_id TEXT NOT NULL, execution_fingerprint TEXT NOT NULL,
    attestation_hash TEXT NOT NULL, PRIMARY KEY (tenant_id, execution_fingerprint));
"""


class Ledger:
    """One SQLite file (e.g. ``<state_dir>/emitter.db``); safe across processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        private_file(self.path)  # 0600 before SQLite creates it (its -wal/-shm follow)
        self._db = connect_durable(self.path, busy_timeout_ms=10_000, schema=_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[None]:
        return transaction(self._db)

    # -- step 9 + apply ------------------------------------------------------------------

    def apply(self, verified: VerifiedFeedback, now: int,
              nonce_ttl_s: int = 86400) -> list[dict[str, Any]]:
        """Claim ``verified.nonce`` (replayed → ``FeedbackRejected("replayed_nonce")``),
        then apply each adjustment that is not already in force at ``now``; return only
        the newly applied ones (refreshes of expired ones included). One transaction: all
        of it is durable, or none of it."""
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
        """Apply one adjustment unless the same one (:data:`IDENTITY`) is in force."""
        key = _identity(adj)
        in_force = self._db.execute(
            "SELECT 1 FROM applied_adjustments WHERE tenant_id = ? AND "
            "execution_fingerprint = ? AND action = ? AND control = ? AND target_urn = ? "
            "AND attestation_hash = ? AND expires_at > ? LIMIT 1", (*key, now)).fetchone()
        if in_force is not None:
            return False
        self._db.execute(
            "INSERT INTO applied_adjustments (tenant_id, execution_fingerprint, action, "
            "control, target_urn, attestation_hash, adjustment, nonce, applied_at, "
            "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*key, dumps(adj).decode("ascii"), nonce, now, now + adj["ttl_seconds"]))
        return True

    def applied(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        """Every application (optionally one tenant's), in the order applied: an
        adjustment refreshed after it expired appears once per application."""
        return self._adjustments("", (), tenant_id)

    def in_force(self, now: int, tenant_id: str | None = None) -> list[dict[str, Any]]:
        """The adjustments applied and not yet expired at ``now``, in the order applied."""
        return self._adjustments("expires_at > ?", (now,), tenant_id)

    def _adjustments(self, where: str, args: tuple, tenant_id: str | None):
        clauses, params = ([where] if where else []), list(args)
        if tenant_id is not None:
            clauses.append("tenant_id = ?")
            params.append(tenant_id)
        sql = "SELECT adjustment FROM applied_adjustments"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        rows = self._db.execute(sql + " ORDER BY seq", params).fetchall()
        return [json.loads(row[0]) for row in rows]

    def claimed(self, nonce: str) -> bool:
        """Whether a response nonce is held in the replay cache (for tests and audits)."""
        row = self._db.execute("SELECT 1 FROM feedback_nonces WHERE nonce = ?", (nonce,))
        return row.fetchone() is not None

    # -- what the gateway accepted from this emitter ----------------------------------

    def record_sent(self, tenant_id: str, execution_fingerprint: str,
                    attestation_hash: str) -> None:
        """Remember the attestation hash the gateway ACCEPTED for an execution (call on
        a 202, or a 409 with ``duplicate_of``): §6 check 8 compares feedback with it.

        Both hex members must be 64 hex characters (ValueError otherwise); they are
        stored lower-case. The first hash anchors, as at the gateway: recording a
        different hash for the same execution raises ValueError.
        """
        if not (isinstance(execution_fingerprint, str) and isinstance(attestation_hash, str)
                and _HEX64.fullmatch(execution_fingerprint)
                and _HEX64.fullmatch(attestation_hash)):
            raise ValueError("execution fingerprint and attestation hash must be 64 hex "
                             "characters")
        fp, att = execution_fingerprint.lower(), attestation_hash.lower()
        with self._transaction():
            row = self._db.execute(
                "SELECT attestation_hash FROM sent WHERE tenant_id = ? AND "
                "execution_fingerprint = ?", (tenant_id, fp)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO sent VALUES (?, ?, ?)", (tenant_id, fp, att))
        if row is not None and row[0] != att:
            raise ValueError(f"execution {fp[:16]}… was already accepted with another "
                             "attestation hash")

    def sent_hash(self, tenant_id: str, execution_fingerprint: str) -> str | None:
        """The attestation hash accepted for one execution (lower-case), or None."""
        row = self._db.execute(
            "SELECT attestation_hash FROM sent WHERE tenant_id = ? AND "
            "execution_fingerprint = ?", (tenant_id, execution_fingerprint.lower()))
        found = row.fetchone()
        return found[0] if found else None

    def sent_for(self, tenant_id: str) -> dict[str, str]:
        """``execution_fingerprint → attestation hash`` for one tenant: Expectation.sent."""
        rows = self._db.execute(
            "SELECT execution_fingerprint, attestation_hash FROM sent WHERE tenant_id = ?",
            (tenant_id,)).fetchall()
        return dict(rows)


def _identity(adj: dict[str, Any]) -> tuple[str, ...]:
    return (adj["tenant_id"], adj["execution_fingerprint"].lower(), adj["action"],
            adj["control"], adj["target_urn"], adj["attestation_measurement_hash"].lower())
