"""Per-execution facts kept at commit time give the answer the records give (every store:
SQLite, Redis, Redis Cluster; the upgrade on the two that have one).

Random signed findings and graphs go through the real pipeline into a real store: several
executions, anchored and not (anchoring off, another attestation hash), named and
unnamed targets, timestamps out of order. The facts the store kept (one row per
execution) must equal the facts computed from the stored records themselves, and so
must the adjustments. Then the upgrade: a store whose records predate the facts (facts
removed, layout marker rolled back) is back-filled at open to the same facts, and a
second open changes nothing (idempotent).
"""

from __future__ import annotations

import copy
import hashlib
import random
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from lab import IDENTITY, NOW, TELEMETRY_BODY, TENANT, Lab, body_for

from gateway.feedback.evidence import SkipReport
from gateway.feedback.fold import ANCHORED, MAX_KEYED, keyed_count
from gateway.feedback.issuer import RulePolicy
from gateway.feedback.policy import DEFAULT_RULES_FILE, load_rules, parse_rules
from gateway.store import open_store
from gateway.store.sqlite import SqliteStore
from schemas.canonical import dumps
from schemas.routes import GRAPH_PATH, TELEMETRY_PATH

RULES = load_rules(DEFAULT_RULES_FILE)
FPS = [hashlib.sha256(f"execution {i}".encode()).hexdigest() for i in range(5)]
ATT = {fp: hashlib.sha256(f"attestation {fp}".encode()).hexdigest() for fp in FPS}
OTHER_ATT = "ab" * 32
TARGETS = [None, "db-01", "urn:target:ws-17", "urn:target:db-01"]


def random_body(rng: random.Random, fp: str, att: str) -> tuple[str, dict[str, Any]]:
    if rng.random() < 0.3:
        nodes = rng.randrange(1, 12)
        graph = {"nodes": [{"id": f"n{i}"} for i in range(nodes)],
                 "edges": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(nodes - 1)]}
        if rng.random() < 0.7:
            graph["target_urn"] = rng.choice(TARGETS[2:])
        return GRAPH_PATH, body_for(GRAPH_PATH, execution_fingerprint=fp,
                                    attestation_measurement_hash=att, graph=graph)
    body = copy.deepcopy(TELEMETRY_BODY)
    body["execution_hash"] = fp
    payload = body["payload"]
    payload["severity"] = rng.choice(["info", "low", "medium", "high", "critical"])
    payload["mitre_techniques"] = rng.sample(["T1059", "T1059.001", "T1003.001", "T1046"],
                                             rng.randrange(1, 3))
    payload["mitre_tactics"] = rng.sample(["TA0006", "TA0008", "TA0007"], rng.randrange(1, 3))
    attributes = {**payload["attributes"], "execution_fingerprint": fp,
                  "attestation_measurement_hash": att}
    attributes.pop("asset_ref", None)
    attributes.pop("target", None)
    if (target := rng.choice(TARGETS)) is not None:
        attributes[rng.choice(["asset_ref", "target"])] = target
    payload["attributes"] = attributes
    return TELEMETRY_PATH, body


async def feed_random(store, seed: int, count: int = 40) -> None:
    rng = random.Random(seed)
    anchored, unanchored = Lab(store), Lab(store, anchor_attestation=False)
    for _ in range(count):
        fp = rng.choice(FPS)
        lab, att = ((unanchored, rng.choice([ATT[fp], OTHER_ATT])) if rng.random() < 0.15
                    else (anchored, ATT[fp]))
        path, body = random_body(rng, fp, att)
        at = NOW + rng.randrange(-30, 30)
        headers, raw = lab.signed(path, body, ts=at)
        status, error, ctx = await lab.send(headers, raw, path, now=at)
        assert (status, error) == (202, None), ctx


async def both_ways(store) -> tuple[list, list]:
    """(facts kept by the store, facts from the records) and the same for adjustments."""
    policy = RulePolicy(RULES)
    kept = await policy.facts_from_store(store, TENANT, IDENTITY, SkipReport())
    read = await policy.facts_from_records(store, TENANT, IDENTITY, SkipReport())
    assert kept == read
    by_facts = await policy(store, TENANT, 1000, NOW + 10, identity=IDENTITY)
    by_records = await RulePolicy(RULES, max_records=10**6)(store, TENANT, 1000, NOW + 10,
                                                            identity=IDENTITY)
    assert by_facts.adjustments == by_records.adjustments
    return kept, by_facts.adjustments


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_kept_facts_equal_the_records_facts(any_store, seed: int) -> None:
    await feed_random(any_store, seed)
    kept, adjustments = await both_ways(any_store)
    assert kept and adjustments  # the data exercised the rules


EVERY_CONDITION = parse_rules({"rule": [
    {"name": name, "when": when, "then": {"action": action, "confidence": 0.5,
                                          "control": "execution", "ttl_seconds": 600,
                                          "rationale": name}}
    for name, when, action in (
        ("recent-lateral", {"seen_within_seconds": 20, "tactics_any": ["TA0008"]}, "isolate"),
        ("repeat-scripting", {"repeat_per_target_at_least": 2,
                              "techniques_any": ["T1059"]}, "isolate"),
        ("process-events", {"event_types_any": ["process_execution"],
                            "findings_at_least": 2}, "tighten"),
        ("edges", {"graph_edges_at_least": 4, "graph_nodes_at_least": 5}, "tighten"),
        ("medium", {"max_severity_at_least": "medium"}, "observe"),
    )]})


async def feed_executions(store, executions: int, seed: int) -> None:
    """1-2 random findings or graphs for each of ``executions`` executions (15% sent
    with anchoring off, half of those under another hash: not anchored)."""
    rng = random.Random(seed)
    anchored, unanchored = Lab(store), Lab(store, anchor_attestation=False)
    for i in range(executions):
        fp = hashlib.sha256(f"execution {seed}.{i}".encode()).hexdigest()
        att = hashlib.sha256(f"attestation {fp}".encode()).hexdigest()
        lab = anchored
        if rng.random() < 0.15:
            lab, att = unanchored, rng.choice([att, OTHER_ATT])
        for _ in range(rng.randrange(1, 3)):
            path, body = random_body(rng, fp, att)
            at = NOW + rng.randrange(-30, 30)
            headers, raw = lab.signed(path, body, ts=at)
            status, error, ctx = await lab.send(headers, raw, path, now=at)
            assert (status, error) == (202, None), ctx


async def test_a_thousand_executions_answer_as_the_reference(any_store) -> None:
    """At 1,000 executions (the size issue 9 times) the answer read from the facts states
    (gateway/feedback/decide.py) is the reference's, byte for byte: the facts built per
    execution and ranked (RulePolicy.answer), and the stored records themselves — for
    the default rules and rules using every condition, cut at several limits."""
    await feed_executions(any_store, 1_000, seed=11)
    for rules in (RULES, EVERY_CONDITION):
        policy = RulePolicy(rules)
        facts = await policy.facts_from_store(any_store, TENANT, IDENTITY, SkipReport())
        assert len(facts) > 800  # most executions are anchored (and so counted)
        by_records = await RulePolicy(rules, max_records=10**6)(
            any_store, TENANT, 1000, NOW + 10, identity=IDENTITY)
        for limit in (1, 100, 999, 1000):
            for now in (NOW, NOW + 25):
                got = (await policy(any_store, TENANT, limit, now, identity=IDENTITY)
                       ).adjustments
                expected = policy.answer(facts, limit, now)
                assert got == expected, (limit, now)
                assert dumps(got) == dumps(expected)  # the signed `data`, byte for byte
        assert policy.answer(facts, 1000, NOW + 10) == by_records.adjustments
        actions = {a["action"] for a in by_records.adjustments}
        assert actions == {"isolate", "tighten", "observe"}  # the limits cut across them


async def stored_anchors(store, rows: list) -> list:
    """(anchored hash, owner) of each row's execution, as the store's own reads give."""
    out = []
    for member, _, _, _ in rows:
        fp = member.partition(":")[0]
        out.append((await store.get_anchor(TENANT, fp),
                    await store.get_anchor_owner(TENANT, fp)))
    return out


async def strip_anchor_notes(store) -> None:
    """Make every Redis facts state look as before states noted their anchor (no "A")."""
    fkey = f"{store.prefix}:{{{TENANT}}}:f:{IDENTITY}"
    states = {m: orjson.loads(s) for m, s in (await store._redis.hgetall(fkey)).items()}
    await store._redis.hset(fkey, mapping={
        m: orjson.dumps({k: v for k, v in s.items() if k != ANCHORED})
        for m, s in states.items()})


async def test_a_redis_state_notes_its_anchor_so_a_query_reads_no_anchor_key(
        any_store) -> None:
    """A commit that anchors its execution notes the anchored hash in the Redis facts
    state ("A"): list_facts then gives that hash and the committing identity as owner
    without reading the anchor and owner keys — exactly what they hold. A state without
    the note (made under anchoring off; kept by an older version) is looked up, and
    gives the same rows and answer as before the notes existed. (SQLite joins the
    anchors and notes nothing; its rows must hold what they hold, too.)"""
    await feed_random(any_store, 5)
    rows = await any_store.list_facts(TENANT, IDENTITY, 100)
    assert [(anchor, owner) for _, _, anchor, owner in rows] == await stored_anchors(
        any_store, rows)
    states = [orjson.loads(s) if isinstance(s, bytes | str) else s for _, s, _, _ in rows]
    noted = [(s[ANCHORED], IDENTITY) for s in states if ANCHORED in s]
    if isinstance(any_store, SqliteStore):
        assert noted == []
        return
    assert noted == [(a, o) for (_, _, a, o), s in zip(rows, states, strict=True)
                     if ANCHORED in s]
    assert 0 < len(noted) < len(rows)  # some states were made under anchoring off only
    answer = (await RulePolicy(RULES)(any_store, TENANT, 100, NOW, identity=IDENTITY)
              ).adjustments
    await strip_anchor_notes(any_store)
    stripped = await any_store.list_facts(TENANT, IDENTITY, 100)
    assert not any(ANCHORED in orjson.loads(state) for _, state, _, _ in stripped)
    assert [(m, a, o) for m, _, a, o in stripped] == [(m, a, o) for m, _, a, o in rows]
    assert (await RulePolicy(RULES)(any_store, TENANT, 100, NOW, identity=IDENTITY)
            ).adjustments == answer


def without_notes(rows: list) -> list:
    """The rows with decoded states less their anchor notes ("A")."""
    states = (orjson.loads(s) if isinstance(s, bytes | str) else s for _, s, _, _ in rows)
    return [(m, {k: v for k, v in s.items() if k != ANCHORED}, a, o)
            for (m, _, a, o), s in zip(rows, states, strict=True)]


def forget_facts(store_url: str) -> None:
    """Make the store look as it did before the facts existed (records only)."""
    if store_url.startswith("sqlite:///"):
        db = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")))
        with db:
            db.execute("DELETE FROM facts")
            db.execute("DELETE FROM facts_skipped")
            db.execute("PRAGMA user_version = 3")
        db.close()
        return
    r = redis.Redis.from_url(store_url)
    try:
        for pattern in ("*:f:*", "*:fi:*", "*:fs:*"):
            for key in r.scan_iter(match=pattern):
                r.delete(key)
        for key in r.scan_iter(match="*:schema"):
            r.hdel(key, "facts")
    finally:
        r.close()


async def test_upgrade_back_fills_the_facts_once(store_url: str) -> None:
    store = open_store(store_url)
    await store.open()
    try:
        await feed_random(store, 7)
        before, adjustments = await both_ways(store)
        rows = await store.list_facts(TENANT, IDENTITY, 100)
    finally:
        await store.close()
    forget_facts(store_url)
    for _ in range(2):  # the first open back-fills, the second finds nothing to do
        store = open_store(store_url)
        await store.open()
        try:
            assert await both_ways(store) == (before, adjustments)
            again = await store.list_facts(TENANT, IDENTITY, 100)
            assert sorted(without_notes(again)) == sorted(without_notes(rows))
            if not store_url.startswith("sqlite"):  # Redis: every execution the identity
                # owns is noted ("A"), so a query reads no anchor key
                assert [orjson.loads(s).get(ANCHORED) for _, s, _, o in again] == [
                    a if o == IDENTITY else None for _, _, a, o in again]
        finally:
            await store.close()


async def test_a_state_stays_bounded_however_many_targets_one_execution_names(
        any_store) -> None:
    """A producer naming a new target in every finding of one execution must not grow its
    facts state without bound (every commit of the execution decodes and re-encodes it,
    in Redis's single thread): past MAX_KEYED keyed fields no new one is added, while
    the counters still count every finding — the same in both stores."""
    lab, fp = Lab(any_store), FPS[0]
    findings = MAX_KEYED // 2 + 40  # two keyed fields per new target: t:<urn>, o:<urn>
    for i in range(findings):
        body = copy.deepcopy(TELEMETRY_BODY)
        body["execution_hash"] = fp
        attributes = {**body["payload"]["attributes"], "execution_fingerprint": fp,
                      "attestation_measurement_hash": ATT[fp], "asset_ref": f"host-{i:05d}"}
        attributes.pop("target", None)
        body["payload"]["attributes"] = attributes
        headers, raw = lab.signed(TELEMETRY_PATH, body, ts=NOW)
        status, error, ctx = await lab.send(headers, raw, TELEMETRY_PATH, now=NOW)
        assert (status, error) == (202, None), ctx
    (member, state, _, _), = await any_store.list_facts(TENANT, IDENTITY, 10)
    state = orjson.loads(state) if isinstance(state, bytes | str) else state
    keyed = keyed_count(state)
    assert MAX_KEYED <= keyed < MAX_KEYED + 16, keyed  # grew to the bound, then stopped
    assert state["n"] == findings  # every finding still counted
    # (techniques, tactics and the event type hold a few of the keyed fields too)
    assert {f"t:urn:target:host-{i:05d}" for i in range(MAX_KEYED // 2 - 8)} <= set(state)
    assert f"t:urn:target:host-{findings - 1:05d}" not in state  # the late ones are not


async def test_list_facts_gives_the_limit_most_recently_active_executions(any_store) -> None:
    """``Store.list_facts(…, limit)``: the executions whose latest record is the newest,
    at most ``limit`` of them, whether the identity has fewer executions than that (Redis
    reads its hash whole) or more (Redis reads the newest from its index first); the
    same rows on every store, in any order."""
    lab = Lab(any_store)
    fps = [hashlib.sha256(f"recency {i}".encode()).hexdigest() for i in range(6)]
    for i, fp in enumerate(fps):  # execution i is last seen at NOW + i
        att = hashlib.sha256(f"attestation {fp}".encode()).hexdigest()
        for at in (NOW - 20 + i, NOW + i):
            path, body = random_body(random.Random(i), fp, att)
            headers, raw = lab.signed(path, body, ts=at)
            status, error, ctx = await lab.send(headers, raw, path, now=at)
            assert (status, error) == (202, None), ctx
    everything = await any_store.list_facts(TENANT, IDENTITY, 100)
    assert sorted(m[:64] for m, _, _, _ in everything) == sorted(fps)
    for limit in (0, 1, 4, 5, 6, 7):
        rows = await any_store.list_facts(TENANT, IDENTITY, limit)
        assert sorted(m[:64] for m, _, _, _ in rows) == sorted(fps[::-1][:limit]), limit
        assert sorted(rows) == sorted(r for r in everything if r[0][:64] in fps[::-1][:limit])


V4_FACTS = """
CREATE TABLE facts_v4 (
    tenant_id TEXT NOT NULL, identity TEXT NOT NULL, member TEXT NOT NULL,
    latest INTEGER NOT NULL, state BLOB NOT NULL,
    PRIMARY KEY (tenant_id, identity, member)) WITHOUT ROWID;
INSERT INTO facts_v4 SELECT tenant_id, identity, member, latest, state FROM facts;
DROP TABLE facts;
ALTER TABLE facts_v4 RENAME TO facts;
CREATE INDEX facts_by_latest ON facts (tenant_id, identity, latest, member);
PRAGMA user_version = 4;
"""


def overflow_pages(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT count(*) FROM dbstat WHERE name = 'facts'"
                          " AND pagetype = 'overflow'").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_sqlite_facts_of_a_thousand_bytes_stay_in_their_rows(store_url) -> None:
    """A facts state a little over what a WITHOUT ROWID page keeps inline (the version-4
    table: ~1,000 bytes with the key columns) made every read of its row several times
    slower (overflow pages). The version-5 table (rowid) keeps it in its page; opening a
    version-4 file moves the rows over as they are, once, and the answers stay."""
    path = Path(store_url.removeprefix("sqlite:///"))
    store = open_store(store_url)
    await store.open()
    try:
        await feed_executions(store, 40, seed=3)
        lab = Lab(store)
        for i in range(25):  # one execution naming 25 targets: a state of ~1,700 bytes
            body = copy.deepcopy(TELEMETRY_BODY)
            body["execution_hash"] = FPS[0]
            body["payload"]["attributes"].update(
                execution_fingerprint=FPS[0], attestation_measurement_hash=ATT[FPS[0]],
                asset_ref=f"a-rather-long-host-name-{i:03d}.example")
            headers, raw = lab.signed(TELEMETRY_PATH, body, ts=NOW)
            assert (await lab.send(headers, raw, TELEMETRY_PATH, now=NOW))[:2] == (202, None)
        rows = await store.list_facts(TENANT, IDENTITY, 100)
        assert max(len(state) for _, state, _, _ in rows) > 1_200
        answer = (await RulePolicy(RULES)(store, TENANT, 100, NOW, identity=IDENTITY)
                  ).adjustments
    finally:
        await store.close()
    assert overflow_pages(path) == 0
    db = sqlite3.connect(path)
    db.executescript(V4_FACTS)  # the file as version 4 left it
    db.close()
    assert overflow_pages(path) > 0
    for _ in range(2):  # the first open moves the rows, the second finds nothing to do
        store = open_store(store_url)
        await store.open()
        try:
            assert sorted(await store.list_facts(TENANT, IDENTITY, 100)) == sorted(rows)
            assert (await RulePolicy(RULES)(store, TENANT, 100, NOW, identity=IDENTITY)
                    ).adjustments == answer
        finally:
            await store.close()
        assert overflow_pages(path) == 0
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 5
            assert "WITHOUT ROWID" not in db.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'facts'").fetchone()[0]
        finally:
            db.close()
