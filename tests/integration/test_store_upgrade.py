"""Opening a store written by a pre-v1.1 gateway (both real stores).

The old data is written the way the old code wrote it (its SQLite DDL and rows, its
Redis keys), then a v1.1 store opens it: claims made under the old per-identity layout
keep refusing their nonce until they expire (no replay window), and anchors made before
executions had owners get the owner recorded by their oldest finding/graph record.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from test_store_contract import FP, HASH_A, NOW, OTHER_TENANT, TENANT, make_commit

from gateway.store import Outcome, open_store

A, B = "spectrastrike-producer", "spectrastrike-other"
FP_NO_RECORD = "c" * 64
FP_TIE = "e" * 64
LEGACY_NONCE = "nonce-legacy-1"
LEGACY_DIGEST = "d" * 64

# The pre-v1.1 SQLite schema, verbatim.
OLD_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS nonces (
    identity TEXT NOT NULL, nonce TEXT NOT NULL, expires_at INTEGER NOT NULL,
    body_digest TEXT NOT NULL, request_id TEXT NOT NULL,
    PRIMARY KEY (identity, nonce)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at);
CREATE TABLE IF NOT EXISTS anchors (
    tenant_id TEXT NOT NULL, execution_fingerprint TEXT NOT NULL,
    attestation_hash TEXT NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, execution_fingerprint)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL, record_id TEXT NOT NULL, tenant_id TEXT NOT NULL,
    execution_fingerprint TEXT, created_at INTEGER NOT NULL, data BLOB NOT NULL,
    UNIQUE (kind, record_id));
CREATE INDEX IF NOT EXISTS records_by_tenant ON records (kind, tenant_id, seq);
"""


def evidence(identity: str, fp: str, at: int, att: str = HASH_A) -> bytes:
    return json.dumps({"identity": identity, "execution_fingerprint": fp,
                       "received_at": at, "tenant_id": TENANT,
                       "attestation_measurement_hash": att}).encode()


class OldGateway:
    """Writes what a pre-v1.1 gateway wrote, in its layout, without the v1.1 code."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            self.db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
            self.db.executescript(OLD_SQLITE_SCHEMA)
        else:
            self.r = redis.Redis.from_url(url)

    def claim(self, identity: str, nonce: str, expires_at: int, request_id: str) -> None:
        value = (identity, nonce, expires_at, LEGACY_DIGEST, request_id)
        if self.url.startswith("sqlite"):
            self.db.execute("INSERT INTO nonces VALUES (?,?,?,?,?)", value)
        else:
            self.r.set(f"fedgate:{{id:{identity}}}:n:{nonce}",
                       f"{expires_at}|{LEGACY_DIGEST}|{request_id}", ex=600)

    def anchor(self, fp: str, records: list[tuple]) -> None:
        """An anchor for ``fp`` in TENANT and its records [(kind, identity, received_at
        [, attestation hash; default the anchored one])], oldest first."""
        if self.url.startswith("sqlite"):
            self.db.execute("INSERT INTO anchors VALUES (?,?,?,?)", (TENANT, fp, HASH_A, NOW))
        else:
            self.r.set(f"fedgate:{{{TENANT}}}:a:{fp}", HASH_A)
        for i, (kind, identity, at, *att) in enumerate(records):
            rid, data = f"{fp[:4]}-{kind}-{i}", evidence(identity, fp, at, *att)
            if self.url.startswith("sqlite"):
                self.db.execute(
                    "INSERT INTO records (kind, record_id, tenant_id, execution_fingerprint,"
                    " created_at, data) VALUES (?,?,?,?,?,?)", (kind, rid, TENANT, fp, at, data))
            else:
                self.r.set(f"fedgate:{{{TENANT}}}:r:{kind}:{rid}", data)
                self.r.set(f"fedgate:p:{kind}:{rid}", TENANT)
                self.r.rpush(f"fedgate:{{{TENANT}}}:i:{kind}", rid)

    def close(self) -> None:
        (self.db if self.url.startswith("sqlite") else self.r).close()


@pytest.fixture
def old(store_url):
    gateway = OldGateway(store_url)
    yield gateway
    gateway.close()


async def reopened(url: str):
    store = open_store(url)
    await store.open()
    return store


async def test_legacy_claim_still_refuses_its_nonce_until_it_expires(store_url, old):
    old.claim(A, LEGACY_NONCE, NOW + 60, "req-old")
    old.claim(B, "nonce-legacy-2", NOW - 1, "req-expired")  # already expired: ignored
    store = await reopened(store_url)
    try:
        again = make_commit(LEGACY_NONCE, fp=None, digest=LEGACY_DIGEST)
        result = await store.commit(again)
        assert (result.outcome, result.duplicate_of) == (Outcome.REPLAYED, "req-old")
        # the old claim named no tenant: it refuses the nonce in every tenant
        other = make_commit(LEGACY_NONCE, fp=None, tenant=OTHER_TENANT, digest="e" * 64)
        assert (await store.commit(other)).outcome is Outcome.REPLAYED
        assert await store.is_claimed(A, TENANT, LEGACY_NONCE, NOW)
        claim = await store.get_claim(A, OTHER_TENANT, LEGACY_NONCE, NOW + 59)
        assert claim is not None and claim.request_id == "req-old"
        assert not await store.is_claimed(B, TENANT, LEGACY_NONCE, NOW)
        expired = make_commit("nonce-legacy-2", identity=B, fp=None, record_id="rec-2")
        assert (await store.commit(expired)).outcome is Outcome.ACCEPTED
        # once it has expired the nonce is free again (judged with the request's now)
        assert not await store.is_claimed(A, TENANT, LEGACY_NONCE, NOW + 60)
        later = make_commit(LEGACY_NONCE, fp=None, now=NOW + 60, request_id="req-new",
                            record_id="rec-3")
        assert (await store.commit(later)).outcome is Outcome.ACCEPTED
    finally:
        await store.close()


async def test_legacy_anchor_owner_is_back_filled_from_its_oldest_record(store_url, old):
    old.anchor(FP, [("finding", A, NOW), ("finding", B, NOW + 5), ("graph", B, NOW + 1)])
    old.anchor(FP_NO_RECORD, [])
    old.anchor(FP_TIE, [("finding", A, NOW), ("graph", B, NOW)])
    for _ in range(2):  # the migration is idempotent: a second open changes nothing
        store = await reopened(store_url)
        try:
            assert await store.get_anchor_owner(TENANT, FP) == A
            assert await store.get_anchor_owner(TENANT, FP_NO_RECORD) is None
            # a graph and a finding by two identities in the same second: SQLite knows
            # their order (seq); Redis only has seconds across kinds, so nobody's
            tie_owner = A if store_url.startswith("sqlite") else None
            assert await store.get_anchor_owner(TENANT, FP_TIE) == tie_owner
            assert await store.get_anchor(TENANT, FP_NO_RECORD) == HASH_A
        finally:
            await store.close()
    store = await reopened(store_url)
    try:
        squat = make_commit("nonce-0001", identity=B, record_id="r1")
        assert (await store.commit(squat)).outcome is Outcome.EXECUTION_NOT_OWNED
        owner = make_commit("nonce-0002", identity=A, record_id="r2")
        assert (await store.commit(owner)).outcome is Outcome.ACCEPTED
        # an anchor whose owner cannot be known is nobody's: no first comer takes it
        for i, ident in enumerate((A, B)):
            first = make_commit(f"nonce-1{i:03d}", identity=ident, fp=FP_NO_RECORD,
                                record_id=f"r-{i}")
            assert (await store.commit(first)).outcome is Outcome.EXECUTION_NOT_OWNED
        assert await store.get_anchor_owner(TENANT, FP_NO_RECORD) is None
    finally:
        await store.close()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_sqlite_upgrade_adds_the_owner_column_once(store_url, old) -> None:
    old.anchor(FP, [("graph", B, NOW)])
    store = await reopened(store_url)
    await store.close()
    db = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")))
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5  # facts, rowid (sqlite_facts)
        assert db.execute("SELECT owner FROM anchors").fetchall() == [(B,)]
    finally:
        db.close()


FP_UNANCHORED_FIRST = "9" * 64
HASH_OFF = "0" * 64


async def test_back_fill_skips_records_made_under_another_attestation_hash(store_url, old):
    """The oldest record of an execution may have been sent, by another identity, while
    anchoring was off (another hash): it did not make the anchor, and gives no owner."""
    old.anchor(FP_UNANCHORED_FIRST, [("finding", B, NOW - 60, HASH_OFF),
                                     ("graph", B, NOW - 30, HASH_OFF.upper()),
                                     ("finding", A, NOW, HASH_A.upper())])
    store = await reopened(store_url)
    try:
        assert await store.get_anchor_owner(TENANT, FP_UNANCHORED_FIRST) == A
    finally:
        await store.close()


async def test_upgrade_indexes_the_records_of_each_identity(store_url, old):
    """Records written before the per-identity index are found by their identity after
    the upgrade (back-filled once, idempotent), in order, next to new commits."""
    old.anchor(FP, [("finding", A, NOW), ("finding", B, NOW + 1), ("finding", A, NOW + 2),
                    ("graph", B, NOW + 3)])
    for _ in range(2):
        store = await reopened(store_url)
        try:
            mine = await store.list_records("finding", TENANT, identity=A)
            assert [json.loads(r)["received_at"] for r in mine] == [NOW, NOW + 2]
            theirs = await store.list_records("graph", TENANT, identity=B)
            assert [json.loads(r)["identity"] for r in theirs] == [B]
        finally:
            await store.close()
    store = await reopened(store_url)
    try:
        new = make_commit("nonce-0001", identity=A, record_id="new-1")
        assert (await store.commit(new)).outcome is Outcome.ACCEPTED
        mine = await store.list_records("finding", TENANT, 2, newest_first=True, identity=A)
        assert mine[0] == new.record.data and json.loads(mine[1])["received_at"] == NOW + 2
    finally:
        await store.close()


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
async def test_redis_layout_3_gets_its_identity_indexes_once(store_url) -> None:
    """A v1.1 store with epochs (layout 3) has records only in the per-kind index: the
    next open builds the per-identity indexes and marks the layout 4."""
    store = await reopened(store_url)
    try:
        for i, ident in enumerate((A, B, A)):
            c = make_commit(f"nonce-{i:04d}", identity=ident, fp=None, record_id=f"r{i}")
            c = replace(c, record=replace(c.record, data=evidence(ident, FP, NOW + i)))
            assert (await store.commit(c)).outcome is Outcome.ACCEPTED
    finally:
        await store.close()
    r = redis.Redis.from_url(store_url)
    try:
        r.delete(*r.keys(f"fedgate:{{{TENANT}}}:i:finding:*"))  # as layout 3 wrote it
        r.hset("fedgate:schema", "version", "3")
        store = await reopened(store_url)
        try:
            mine = await store.list_records("finding", TENANT, identity=A)
            assert [json.loads(m)["received_at"] for m in mine] == [NOW, NOW + 2]
        finally:
            await store.close()
        assert r.hget("fedgate:schema", "version") == b"4"
    finally:
        r.close()
