"""The store contract, run on every real store (SQLite file, redis-server, a 3 + 3
Redis Cluster).

Scenarios are rows of data (python-tuf style): a sequence of commits and the outcome
each must get.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import orjson
import pytest

from gateway.store import Anchor, Commit, Outcome, Record, StoreError

TENANT = "7758e414-233a-5ea0-575b-cf0c26f5259a"
OTHER_TENANT = "3526adb4-6352-d1d7-fa72-23d93cd439b3"
FP = "f" * 64
HASH_A = "a" * 64
HASH_B = "b" * 64
NOW = 1_795_000_000


@pytest.fixture
def store(any_store):
    """An open store of each kind: sqlite, redis, redis_cluster (conftest)."""
    return any_store


def make_commit(nonce: str = "nonce-0001", *, identity: str = "spectrastrike-producer",
                digest: str = "d" * 64, request_id: str = "req-1", record_id: str = "rec-1",
                tenant: str = TENANT, fp: str | None = FP, att: str = HASH_A,
                now: int = NOW, ttl: int = 120, kind: str = "finding") -> Commit:
    record = Record(kind, record_id, tenant, fp, b'{"record":"%s"}' % record_id.encode())
    anchor = Anchor(tenant, fp, att) if fp is not None else None
    return Commit(identity=identity, nonce=nonce, body_digest=digest, request_id=request_id,
                  now=now, nonce_ttl_s=ttl, record=record, anchor=anchor)


# Each row: (name, [(commit overrides, expected outcome, expected duplicate_of)]).
SCENARIOS = [
    ("first_accepted", [({}, Outcome.ACCEPTED, None)]),
    ("replay_same_body_names_original", [
        ({}, Outcome.ACCEPTED, None),
        ({"request_id": "req-2", "record_id": "rec-2"}, Outcome.REPLAYED, "req-1"),
    ]),
    ("replay_other_body_has_no_duplicate_of", [
        ({}, Outcome.ACCEPTED, None),
        ({"request_id": "req-2", "record_id": "rec-2", "digest": "e" * 64},
         Outcome.REPLAYED, None),
    ]),
    ("nonce_namespace_is_per_identity", [
        ({}, Outcome.ACCEPTED, None),
        ({"identity": "spectrastrike-other", "request_id": "req-2", "record_id": "rec-2",
          "fp": None}, Outcome.ACCEPTED, None),
    ]),
    ("nonce_shared_across_routes", [
        ({}, Outcome.ACCEPTED, None),
        ({"kind": "graph", "request_id": "req-2", "record_id": "rec-2", "fp": None},
         Outcome.REPLAYED, "req-1"),
    ]),
    # [v1.1] §4.13: one nonce namespace per (identity, tenant)
    ("nonce_namespace_is_per_tenant", [
        ({"fp": None}, Outcome.ACCEPTED, None),
        ({"tenant": OTHER_TENANT, "fp": None, "request_id": "req-2", "record_id": "rec-2",
          "digest": "e" * 64}, Outcome.ACCEPTED, None),
        ({"tenant": OTHER_TENANT, "fp": None, "request_id": "req-3", "record_id": "rec-3",
          "digest": "e" * 64}, Outcome.REPLAYED, "req-2"),
        ({"fp": None, "request_id": "req-4", "record_id": "rec-4"}, Outcome.REPLAYED, "req-1"),
    ]),
    ("nonce_expires_after_ttl", [
        ({}, Outcome.ACCEPTED, None),
        ({"now": NOW + 120, "request_id": "req-2", "record_id": "rec-2"},
         Outcome.ACCEPTED, None),
    ]),
    ("nonce_still_claimed_just_before_ttl", [
        ({}, Outcome.ACCEPTED, None),
        ({"now": NOW + 119, "request_id": "req-2", "record_id": "rec-2"},
         Outcome.REPLAYED, "req-1"),
    ]),
    ("same_anchor_accepted", [
        ({}, Outcome.ACCEPTED, None),
        ({"nonce": "nonce-0002", "request_id": "req-2", "record_id": "rec-2"},
         Outcome.ACCEPTED, None),
    ]),
    ("different_attestation_rejected", [
        ({}, Outcome.ACCEPTED, None),
        ({"nonce": "nonce-0002", "request_id": "req-2", "record_id": "rec-2", "att": HASH_B},
         Outcome.ATTESTATION_MISMATCH, None),
    ]),
    ("anchor_is_per_tenant", [
        ({}, Outcome.ACCEPTED, None),
        ({"nonce": "nonce-0002", "request_id": "req-2", "record_id": "rec-2", "att": HASH_B,
          "tenant": OTHER_TENANT}, Outcome.ACCEPTED, None),
    ]),
    # [v1.1] §5: an execution belongs to the identity that anchored it
    ("execution_not_owned_by_another_identity", [
        ({}, Outcome.ACCEPTED, None),
        ({"identity": "spectrastrike-other", "nonce": "nonce-0002", "request_id": "req-2",
          "record_id": "rec-2"}, Outcome.EXECUTION_NOT_OWNED, None),
        ({"nonce": "nonce-0003", "request_id": "req-3", "record_id": "rec-3"},
         Outcome.ACCEPTED, None),
    ]),
    ("ownership_is_per_tenant", [
        ({}, Outcome.ACCEPTED, None),
        ({"identity": "spectrastrike-other", "tenant": OTHER_TENANT, "request_id": "req-2",
          "record_id": "rec-2"}, Outcome.ACCEPTED, None),
    ]),
    ("not_owned_checked_before_attestation", [
        ({}, Outcome.ACCEPTED, None),
        ({"identity": "spectrastrike-other", "nonce": "nonce-0002", "request_id": "req-2",
          "record_id": "rec-2", "att": HASH_B}, Outcome.EXECUTION_NOT_OWNED, None),
    ]),
    ("not_owned_checked_before_replay", [
        ({"identity": "spectrastrike-other", "fp": None}, Outcome.ACCEPTED, None),
        ({"nonce": "nonce-0002", "request_id": "req-2", "record_id": "rec-2"},
         Outcome.ACCEPTED, None),
        ({"identity": "spectrastrike-other", "request_id": "req-3", "record_id": "rec-3"},
         Outcome.EXECUTION_NOT_OWNED, None),
    ]),
    ("attestation_checked_before_replay", [
        ({}, Outcome.ACCEPTED, None),
        ({"request_id": "req-2", "record_id": "rec-2", "att": HASH_B},
         Outcome.ATTESTATION_MISMATCH, None),
    ]),
]


@pytest.mark.parametrize("steps", [s for _, s in SCENARIOS], ids=[n for n, _ in SCENARIOS])
async def test_commit_scenarios(store, steps):
    for overrides, outcome, duplicate_of in steps:
        result = await store.commit(make_commit(**overrides))
        assert result.outcome is outcome
        assert result.duplicate_of == duplicate_of


async def test_rejected_commit_writes_nothing(store):
    assert (await store.commit(make_commit())).outcome is Outcome.ACCEPTED
    mismatch = make_commit("nonce-0002", request_id="req-2", record_id="rec-2", att=HASH_B)
    assert (await store.commit(mismatch)).outcome is Outcome.ATTESTATION_MISMATCH
    assert not await store.is_claimed("spectrastrike-producer", TENANT, "nonce-0002", NOW)
    assert await store.get_record("finding", "rec-2", TENANT) is None
    replay = make_commit(request_id="req-3", record_id="rec-3")
    assert (await store.commit(replay)).outcome is Outcome.REPLAYED
    assert await store.get_record("finding", "rec-3", TENANT) is None
    assert await store.get_anchor(TENANT, FP) == HASH_A


async def test_not_owned_commit_writes_nothing(store):
    assert (await store.commit(make_commit())).outcome is Outcome.ACCEPTED
    squat = make_commit("nonce-0002", identity="spectrastrike-other", request_id="req-2",
                        record_id="rec-2")
    assert (await store.commit(squat)).outcome is Outcome.EXECUTION_NOT_OWNED
    assert not await store.is_claimed("spectrastrike-other", TENANT, "nonce-0002", NOW)
    assert await store.get_record("finding", "rec-2", TENANT) is None
    assert await store.get_anchor_owner(TENANT, FP) == "spectrastrike-producer"
    assert await store.get_anchor_owner(OTHER_TENANT, FP) is None
    assert await store.get_anchor_owner(TENANT, "0" * 64) is None


async def test_get_claim_names_the_accepted_request(store):
    assert await store.get_claim("spectrastrike-producer", TENANT, "nonce-0001", NOW) is None
    await store.commit(make_commit(fp=None))
    claim = await store.get_claim("spectrastrike-producer", TENANT, "nonce-0001", NOW)
    assert claim is not None and (claim.body_digest, claim.request_id) == ("d" * 64, "req-1")
    assert await store.get_claim("spectrastrike-producer", OTHER_TENANT, "nonce-0001",
                                 NOW) is None
    assert await store.get_claim("spectrastrike-other", TENANT, "nonce-0001", NOW) is None
    assert await store.get_claim("spectrastrike-producer", TENANT, "nonce-0001",
                                 NOW + 120) is None


async def test_accepted_commit_is_readable(store):
    await store.commit(make_commit())
    assert await store.get_record("finding", "rec-1", TENANT) == b'{"record":"rec-1"}'
    assert await store.get_anchor(TENANT, FP) == HASH_A
    assert await store.get_anchor(OTHER_TENANT, FP) is None
    assert await store.is_claimed("spectrastrike-producer", TENANT, "nonce-0001", NOW)
    assert not await store.is_claimed("spectrastrike-producer", TENANT, "nonce-0001", NOW + 120)
    assert await store.get_record("graph", "rec-1", TENANT) is None


async def test_list_records_by_kind_and_tenant_oldest_first(store):
    for i in range(5):
        await store.commit(make_commit(f"nonce-{i:04d}", record_id=f"rec-{i}",
                                       request_id=f"req-{i}", now=NOW + i))
    await store.commit(make_commit("nonce-9999", record_id="rec-x", tenant=OTHER_TENANT))
    listed = await store.list_records("finding", TENANT)
    assert listed == [b'{"record":"rec-%d"}' % i for i in range(5)]
    assert await store.list_records("finding", TENANT, limit=2) == listed[:2]
    assert await store.list_records("graph", TENANT) == []


async def test_records_survive_reopen(new_store):
    first = new_store()
    await first.open()
    await first.commit(make_commit())
    await first.close()
    second = new_store()
    await second.open()
    try:
        assert await second.get_record("finding", "rec-1", TENANT) is not None
        replay = make_commit(request_id="req-2", record_id="rec-2")
        assert (await second.commit(replay)).outcome is Outcome.REPLAYED
    finally:
        await second.close()


async def test_fifty_concurrent_claims_of_one_nonce_exactly_one_wins(new_store):
    """50 claims of one nonce, each through its own connection: exactly one wins."""
    stores = [new_store() for _ in range(50)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        base = make_commit()
        commits = [replace(base, request_id=f"req-{i}",
                           record=replace(base.record, record_id=f"rec-{i}"))
                   for i in range(50)]
        results = await asyncio.gather(*(s.commit(c) for s, c in zip(stores, commits, strict=True)))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    outcomes = [r.outcome for r in results]
    assert outcomes.count(Outcome.ACCEPTED) == 1
    assert outcomes.count(Outcome.REPLAYED) == 49
    winner = f"req-{outcomes.index(Outcome.ACCEPTED)}"
    assert {r.duplicate_of for r in results if r.outcome is Outcome.REPLAYED} == {winner}
    check = new_store()
    await check.open()
    try:
        kept = [i for i in range(50) if await check.get_record("finding", f"rec-{i}", TENANT)]
    finally:
        await check.close()
    assert kept == [outcomes.index(Outcome.ACCEPTED)]


async def test_two_identities_racing_for_a_new_execution_one_owns_it(new_store):
    """40 commits for one new execution, from two identities, each through its own
    connection and with its own nonce: every accepted one is from the same identity."""
    identities = ["spectrastrike-producer", "spectrastrike-other"]
    stores = [new_store() for _ in range(40)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        commits = [make_commit(f"nonce-{i:04d}", identity=identities[i % 2],
                               request_id=f"req-{i}", record_id=f"rec-{i}") for i in range(40)]
        results = await asyncio.gather(*(s.commit(c) for s, c in zip(stores, commits, strict=True)))
        owner = await stores[0].get_anchor_owner(TENANT, FP)
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    by_identity = {ident: {r.outcome for c, r in zip(commits, results, strict=True)
                           if c.identity == ident} for ident in identities}
    assert owner in identities
    assert by_identity[owner] == {Outcome.ACCEPTED}
    loser, = set(identities) - {owner}
    assert by_identity[loser] == {Outcome.EXECUTION_NOT_OWNED}


async def test_ping_true_when_open(store):
    assert await store.ping() is True


async def test_put_record_outside_a_claim(store):
    record = Record("feedback", "fb-1", TENANT, None, b'{"issued":1}')
    await store.put_record(record, NOW)
    assert await store.get_record("feedback", "fb-1", TENANT) == b'{"issued":1}'
    assert await store.list_records("feedback", TENANT) == [b'{"issued":1}']
    with pytest.raises(StoreError) as exc:
        await store.put_record(record, NOW)
    assert exc.value.stage == "write"
    assert await store.list_records("feedback", TENANT) == [b'{"issued":1}']


async def test_list_records_newest_first_in_pages(store):
    for i in range(5):
        await store.commit(make_commit(f"nonce-{i:04d}", record_id=f"rec-{i}",
                                       request_id=f"req-{i}", now=NOW + i))
    rec = [b'{"record":"rec-%d"}' % i for i in range(5)]
    assert await store.list_records("finding", TENANT, 2, newest_first=True) == [rec[4], rec[3]]
    assert await store.list_records("finding", TENANT, 2, newest_first=True, offset=2) == [
        rec[2], rec[1]]
    assert await store.list_records("finding", TENANT, 9, newest_first=True, offset=4) == [rec[0]]
    assert await store.list_records("finding", TENANT, 2, newest_first=True, offset=5) == []
    assert await store.list_records("finding", TENANT, 2, offset=3) == [rec[3], rec[4]]


async def test_list_records_of_one_identity_in_pages(store):
    """A query reads only its identity's records, through their own index: interleaved
    commits of two identities (and another tenant) page apart, oldest or newest first."""
    ids = ["spectrastrike-producer", "spectrastrike-other"]
    for i in range(6):
        await store.commit(make_commit(f"nonce-{i:04d}", identity=ids[i % 2], fp=None,
                                       record_id=f"rec-{i}", request_id=f"req-{i}"))
    await store.commit(make_commit("nonce-9999", record_id="rec-x", tenant=OTHER_TENANT))
    rec = [b'{"record":"rec-%d"}' % i for i in range(6)]
    mine = rec[0::2]
    assert await store.list_records("finding", TENANT, identity=ids[0]) == mine
    assert await store.list_records("finding", TENANT, identity=ids[1]) == rec[1::2]
    assert await store.list_records("finding", TENANT, 2, newest_first=True,
                                    identity=ids[0]) == [mine[2], mine[1]]
    assert await store.list_records("finding", TENANT, 2, newest_first=True, offset=2,
                                    identity=ids[0]) == [mine[0]]
    assert await store.list_records("finding", TENANT, 1, offset=1, identity=ids[0]) == [
        mine[1]]
    assert await store.list_records("finding", OTHER_TENANT, identity=ids[1]) == []
    assert await store.list_records("graph", TENANT, identity=ids[0]) == []
    assert await store.list_records("finding", TENANT, identity="nobody") == []
    assert await store.list_records("finding", TENANT) == rec  # the tenant's: all of them


async def test_put_record_is_listed_under_its_identity_when_it_names_one(store):
    await store.put_record(Record("finding", "old-1", TENANT, FP, b'{"old":1}',
                                  identity="spectrastrike-producer"), NOW)
    await store.put_record(Record("finding", "old-2", TENANT, FP, b'{"old":2}'), NOW)
    assert await store.list_records("finding", TENANT, identity="spectrastrike-producer") == [
        b'{"old":1}']
    assert await store.list_records("finding", TENANT) == [b'{"old":1}', b'{"old":2}']
    mismatched = make_commit()
    mismatched = replace(mismatched, record=replace(mismatched.record, identity="someone"))
    with pytest.raises(ValueError):
        await store.commit(mismatched)


# -- the audit outbox (docs/AUDIT.md *Outbox*): written by the commit itself ------------

OWNER = "node-a/0"


def audited(commit: Commit, n: int, owner: str = OWNER) -> Commit:
    events = [{"event.id": f"ev-{n}", "event.action": "telemetry.accepted",
               "request_id": commit.request_id}]
    return replace(commit, audit=orjson.dumps(events), audit_owner=owner)


@pytest.mark.parametrize("steps", [s for _, s in SCENARIOS], ids=[n for n, _ in SCENARIOS])
async def test_an_accepted_commit_leaves_one_outbox_entry_and_a_refusal_none(store, steps):
    expected = []
    for n, (overrides, outcome, _) in enumerate(steps):
        commit = audited(make_commit(**overrides), n)
        result = await store.commit(commit)
        assert result.outcome is outcome
        if outcome is Outcome.ACCEPTED:
            expected.append(commit.audit)
            assert result.outbox_ref is not None
        else:
            assert result.outbox_ref is None
        entries = await store.outbox_read(OWNER)
        assert sorted(e.events for e in entries) == sorted(expected)
        assert {e.owner for e in entries} <= {OWNER}
    assert await store.outbox_owners("node-a") == ({OWNER} if expected else set())
    await store.outbox_ack([e.ref for e in await store.outbox_read(OWNER)])
    assert await store.outbox_read(OWNER) == []
    assert await store.outbox_owners("node-a") == set()


async def test_a_commit_that_fails_writes_no_outbox_entry(store):
    assert (await store.commit(audited(make_commit(), 0))).outcome is Outcome.ACCEPTED
    taken = audited(make_commit("nonce-0002", request_id="req-2"), 1)  # record id rec-1
    with pytest.raises(StoreError):
        await store.commit(taken)
    assert [e.events for e in await store.outbox_read(OWNER)] == [audited(make_commit(), 0).audit]
    assert not await store.is_claimed("spectrastrike-producer", TENANT, "nonce-0002", NOW)


async def test_outboxes_are_per_owner_and_acks_are_per_entry(store):
    for n, owner in enumerate(["node-a/1", "node-a/1", "node-a/2", "node-ab/1"]):
        commit = make_commit(f"nonce-000{n}", request_id=f"req-{n}", record_id=f"rec-{n}",
                             fp=None, tenant=TENANT if n % 2 else OTHER_TENANT)
        assert (await store.commit(audited(commit, n, owner))).outcome is Outcome.ACCEPTED
    assert (await store.commit(make_commit("nonce-0009", request_id="req-9", record_id="rec-9",
                                           fp=None))).outbox_ref is None  # no audit given
    assert await store.outbox_owners("node-a") == {"node-a/1", "node-a/2"}
    first, second = await store.outbox_read("node-a/1")
    assert {orjson.loads(e.events)[0]["event.id"] for e in (first, second)} == {"ev-0", "ev-1"}
    await store.outbox_ack([first.ref])
    await store.outbox_ack([first.ref])  # twice: ignored
    assert [e.ref for e in await store.outbox_read("node-a/1")] == [second.ref]
    assert len(await store.outbox_read("node-ab/1")) == 1
    with pytest.raises(ValueError):
        await store.commit(audited(make_commit("nonce-0010", request_id="r", record_id="r"),
                                   10, owner="node a/1"))
