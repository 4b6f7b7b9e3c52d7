"""The embedded store: one SQLite file (WAL, synchronous=FULL), safe across processes.

Each store object owns one connection used from one dedicated thread, so the event loop
never blocks on disk and several worker processes can share the file: SQLite's own
locking serialises writers (``BEGIN IMMEDIATE`` + ``busy_timeout``). ``commit`` is one
transaction: owner and anchor check, nonce claim and record insert succeed or vanish
together, and a 202 is only answered after the WAL is fsynced (durable across a crash).
``commit_many`` (group commit, issue 9) runs a group in ONE transaction (one fsync) with
a ``SAVEPOINT`` per commit: each stays atomic alone, a refused one is rolled back alone.
The schema and its upgrade from the pre-v1.1 layout live in ``sqlite_schema``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from common.sqlite import begin_immediate, connect_durable, transaction

from . import sqlite_facts
from .base import (
    Claim,
    Commit,
    CommitResult,
    OutboxEntry,
    Outcome,
    Record,
    Store,
    StoreError,
    check_owner,
)
from .revocations import SqliteRevocations
from .sqlite_schema import SCHEMA, migrate, sweep_legacy_nonces

T = TypeVar("T")
PURGE_EVERY = 512  # commits between sweeps of expired nonces


class SqliteStore(SqliteRevocations, Store):
    groups_commits = True

    def __init__(self, url: str, *, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.path = Path(url.removeprefix("sqlite:///"))
        self.busy_timeout_ms = busy_timeout_ms
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._commits = 0
        self._legacy_nonces = False  # the pre-v1.1 table still holds live claims
        #: write transactions committed by commit/commit_many (each one fsync of the WAL)
        self.commit_transactions = 0

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedgate-sqlite")
        await self._run(self._open_sync, stage="claim")

    def _open_sync(self) -> None:
        db = connect_durable(self.path, self.busy_timeout_ms, SCHEMA)
        try:
            with transaction(db, self.busy_timeout_ms):
                self._legacy_nonces = migrate(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def ping(self) -> bool:
        try:
            await self._run(lambda: self._conn().execute("SELECT 1").fetchone(), stage="claim")
        except StoreError:
            return False
        return True

    # -- the atomic commit (§4 steps 12-14) -------------------------------------------
    def check_commit(self, commit: Commit) -> None:
        if commit.record.identity not in (None, commit.identity):
            raise ValueError("the record's identity must be the commit's")
        if commit.audit is not None:
            check_owner(commit.audit_owner)

    async def commit(self, commit: Commit) -> CommitResult:
        self.check_commit(commit)
        return await self._run(self._commit_sync, commit, stage="claim")

    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult | StoreError]:
        """One transaction, one fsync; in order, so a conflicting commit is decided after
        the one before it (the contract's ordering, base.conflict_deps, holds a fortiori)."""
        for c in commits:
            self.check_commit(c)
        if not commits:
            return []
        try:
            return await self._run(self._commit_many_sync, list(commits), stage="claim")
        except StoreError as exc:  # the lock could not be taken: nothing was decided
            return [exc] * len(commits)

    def _commit_many_sync(self, commits: list[Commit]) -> list[CommitResult | StoreError]:
        db = self._conn()
        begin_immediate(db, self.busy_timeout_ms)
        results: list[CommitResult | StoreError] = []
        try:
            for c in commits:
                db.execute("SAVEPOINT c")
                try:
                    result = self._decide(db, c)
                    if result is None:
                        result = CommitResult(Outcome.ACCEPTED, outbox_ref=self._write(db, c))
                        self._commits += 1
                except StoreError as exc:  # e.g. the record id is taken: this one only
                    result = exc
                except sqlite3.Error as exc:
                    result = StoreError("claim", f"sqlite: {exc}")
                if not db.in_transaction:  # SQLite rolled the whole group back (disk
                    # full, I/O error): nothing of it is written, every commit fails
                    raise StoreError("write", f"sqlite rolled the group back: {result}")
                if isinstance(result, CommitResult) and result.outcome is Outcome.ACCEPTED:
                    db.execute("RELEASE c")
                else:  # a refusal or a failure leaves no trace
                    db.execute("ROLLBACK TO c")
                    db.execute("RELEASE c")
                results.append(result)
            try:
                db.execute("COMMIT")  # returns once the WAL is fsynced
            except sqlite3.Error as exc:
                # nothing of the group is written; a refusal may have been decided by
                # an earlier commit of the group: every commit fails (503, retried)
                raise StoreError("write", f"sqlite commit failed: {exc}") from exc
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, StoreError):
                return [exc] * len(commits)
            raise
        self.commit_transactions += 1
        return results

    def _commit_sync(self, c: Commit) -> CommitResult:
        db = self._conn()
        begin_immediate(db, self.busy_timeout_ms)  # the write lock: claims are serialised
        try:
            decided = self._decide(db, c)
            if decided is not None:  # a rejection writes nothing
                db.execute("ROLLBACK")
                return decided
            outbox_ref = self._write(db, c)
            try:
                db.execute("COMMIT")  # returns once the WAL is fsynced
            except sqlite3.Error as exc:
                raise StoreError("write", f"sqlite commit failed: {exc}") from exc
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._commits += 1
        self.commit_transactions += 1
        return CommitResult(Outcome.ACCEPTED, outbox_ref=outbox_ref)

    def _decide(self, db: sqlite3.Connection, c: Commit) -> CommitResult | None:
        # 12. the execution's owner, then its attestation anchor
        if c.anchor is not None:
            row = db.execute(
                "SELECT attestation_hash, owner FROM anchors"
                " WHERE tenant_id=? AND execution_fingerprint=?",
                (c.anchor.tenant_id, c.anchor.execution_fingerprint)).fetchone()
            if row is not None and row[1] != c.identity:  # NULL owner: nobody's
                return CommitResult(Outcome.EXECUTION_NOT_OWNED)
            if row is not None and row[0] != c.anchor.attestation_hash:
                return CommitResult(Outcome.ATTESTATION_MISMATCH, anchored_hash=row[0])
        # 13. replay: an unexpired (identity, tenant, nonce) claim, or a pre-v1.1 one
        claim = self._claim(db, c.identity, c.tenant_id, c.nonce, c.now)
        if claim is not None:
            duplicate_of = claim.request_id if claim.body_digest == c.body_digest else None
            return CommitResult(Outcome.REPLAYED, duplicate_of=duplicate_of)
        return None

    def _claim(self, db: sqlite3.Connection, identity: str, tenant_id: str, nonce: str,
               now: int) -> Claim | None:
        row = db.execute(
            "SELECT body_digest, request_id FROM claims"
            " WHERE identity=? AND tenant_id=? AND nonce=? AND expires_at>?",
            (identity, tenant_id, nonce, now)).fetchone()
        if row is None and self._legacy_nonces:  # claimed per identity before v1.1
            row = db.execute(
                "SELECT body_digest, request_id FROM nonces"
                " WHERE identity=? AND nonce=? AND expires_at>?",
                (identity, nonce, now)).fetchone()
        return None if row is None else Claim(row[0], row[1])

    def _write(self, db: sqlite3.Connection, c: Commit) -> int | None:
        outbox_ref = None
        try:
            # 13. claim (replacing an expired claim of the same nonce, if any)
            db.execute(
                "INSERT OR REPLACE INTO claims (identity, tenant_id, nonce, expires_at,"
                " body_digest, request_id) VALUES (?,?,?,?,?,?)",
                (c.identity, c.tenant_id, c.nonce, c.now + c.nonce_ttl_s, c.body_digest,
                 c.request_id))
            if c.anchor is not None:  # 12. a new execution: anchored and owned by us
                db.execute(
                    "INSERT OR IGNORE INTO anchors (tenant_id, execution_fingerprint,"
                    " attestation_hash, created_at, owner) VALUES (?,?,?,?,?)",
                    (c.anchor.tenant_id, c.anchor.execution_fingerprint,
                     c.anchor.attestation_hash, c.now, c.identity))
            # 14. persist the record
            r = c.record
            seq = db.execute(
                "INSERT INTO records (kind, record_id, tenant_id, execution_fingerprint,"
                " created_at, data, identity) VALUES (?,?,?,?,?,?,?)",
                (r.kind, r.record_id, r.tenant_id, r.execution_fingerprint, c.now, r.data,
                 c.identity)).lastrowid
            # ... and its execution's facts (sqlite_facts.py), in the same transaction
            sqlite_facts.fold_into(db, r.kind, r.data, r.tenant_id, c.identity, seq,
                                   trusted=True, given=c.fold)
            if c.audit is not None:  # the accept's audit events, in the same transaction
                outbox_ref = db.execute(
                    "INSERT INTO audit_outbox (owner, event) VALUES (?,?)",
                    (c.audit_owner, c.audit)).lastrowid
            if self._commits % PURGE_EVERY == PURGE_EVERY - 1:
                db.execute("DELETE FROM claims WHERE expires_at <= ?", (c.now,))
                if self._legacy_nonces:
                    self._legacy_nonces = sweep_legacy_nonces(db, c.now)
        except sqlite3.Error as exc:
            raise StoreError("write", f"sqlite write failed: {exc}") from exc
        return outbox_ref

    async def put_record(self, record: Record, now: int) -> None:
        await self._run(self._put_sync, record, now, stage="write")

    def _put_sync(self, r: Record, now: int) -> None:
        try:
            db = self._conn()
            with transaction(db, self.busy_timeout_ms):  # one transaction, fsynced at commit
                seq = db.execute(
                    "INSERT INTO records (kind, record_id, tenant_id, execution_fingerprint,"
                    " created_at, data, identity) VALUES (?,?,?,?,?,?,?)",
                    (r.kind, r.record_id, r.tenant_id, r.execution_fingerprint, now, r.data,
                     r.identity)).lastrowid
                sqlite_facts.fold_into(db, r.kind, r.data, r.tenant_id, r.identity, seq,
                                       trusted=False)
        except sqlite3.Error as exc:
            raise StoreError("write", f"sqlite write failed: {exc}") from exc

    # -- the audit outbox (docs/AUDIT.md *Outbox*) ------------------------------------
    async def outbox_owners(self, node: str) -> set[str]:
        prefix = f"{node}/"
        rows = await self._run(lambda: self._conn().execute(
            "SELECT DISTINCT owner FROM audit_outbox WHERE substr(owner, 1, ?) = ?",
            (len(prefix), prefix)).fetchall(), stage="claim")
        return {row[0] for row in rows}

    async def outbox_read(self, owner: str) -> list[OutboxEntry]:
        rows = await self._run(lambda: self._conn().execute(
            "SELECT id, event FROM audit_outbox WHERE owner=? ORDER BY id",
            (check_owner(owner),)).fetchall(), stage="claim")
        return [OutboxEntry(row[0], owner, bytes(row[1])) for row in rows]

    async def outbox_ack(self, refs: list[Any]) -> None:
        if refs:
            await self._run(self._ack_sync, [int(r) for r in refs], stage="write")

    def _ack_sync(self, ids: list[int]) -> None:
        db = self._conn()
        with transaction(db, self.busy_timeout_ms):
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                db.execute(f"DELETE FROM audit_outbox WHERE id IN ({','.join('?' * len(chunk))})",
                           chunk)

    # -- reads ------------------------------------------------------------------------
    async def get_claim(self, identity: str, tenant_id: str, nonce: str,
                        now: int) -> Claim | None:
        return await self._run(lambda: self._claim(self._conn(), identity, tenant_id, nonce,
                                                   now), stage="claim")

    async def get_record(self, kind: str, record_id: str, tenant_id: str) -> bytes | None:
        row = await self._run(lambda: self._conn().execute(
            "SELECT data FROM records WHERE kind=? AND record_id=? AND tenant_id=?",
            (kind, record_id, tenant_id)).fetchone(), stage="claim")
        return None if row is None else bytes(row[0])

    async def get_anchor(self, tenant_id: str, execution_fingerprint: str) -> str | None:
        row = await self._anchor_row(tenant_id, execution_fingerprint)
        return None if row is None else row[0]

    async def get_anchor_owner(self, tenant_id: str, execution_fingerprint: str) -> str | None:
        row = await self._anchor_row(tenant_id, execution_fingerprint)
        return None if row is None else row[1]

    async def _anchor_row(self, tenant_id: str, fp: str) -> tuple[str, str | None] | None:
        return await self._run(lambda: self._conn().execute(
            "SELECT attestation_hash, owner FROM anchors"
            " WHERE tenant_id=? AND execution_fingerprint=?", (tenant_id, fp)).fetchone(),
            stage="claim")

    async def list_records(self, kind: str, tenant_id: str, limit: int = 1000, *,
                           newest_first: bool = False, offset: int = 0,
                           identity: str | None = None) -> list[bytes]:
        order = "DESC" if newest_first else "ASC"
        where, args = "kind=? AND tenant_id=?", [kind, tenant_id]
        if identity is not None:  # index records_by_identity: only that identity's rows
            where, args = where + " AND identity=?", [*args, identity]
        rows = await self._run(lambda: self._conn().execute(
            f"SELECT data FROM records WHERE {where} ORDER BY seq {order} LIMIT ? OFFSET ?",
            (*args, max(0, limit), max(0, offset))).fetchall(), stage="claim")
        return [bytes(row[0]) for row in rows]

    async def list_facts(self, tenant_id: str, identity: str,
                         limit: int) -> list[tuple[str, Any, str | None, str | None]]:
        return await self._run(lambda: sqlite_facts.list_facts(self._conn(), tenant_id,
                                                               identity, limit), stage="claim")

    async def list_skipped(self, tenant_id: str, identity: str,
                           limit: int) -> list[tuple[str, str, str]]:
        return await self._run(lambda: sqlite_facts.list_skipped(self._conn(), tenant_id,
                                                                 identity, limit),
                               stage="claim")

    # -- plumbing ---------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("store is not open")
        return self._db

    async def _run(self, fn: Any, *args: Any, stage: str) -> Any:
        if self._executor is None:
            raise StoreError(stage, "store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except StoreError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(stage, f"sqlite: {exc}") from exc
