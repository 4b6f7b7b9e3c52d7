"""The rules tested on the facts states themselves (gateway/feedback/decide.py) answer
exactly what the reference answers: ``facts_from_states`` → ``evaluate`` per execution →
strongest action first, then fingerprint, at most ``limit`` — the same adjustments in the
same order, so the same canonical bytes (the signed ``data``).

Hypothesis draws the states the fold makes from random findings and graphs (several
executions, two attestation hashes each, anchored or not, ours or another identity's,
rows in any order) and random rules: every condition, thresholds around the values the
states hold (the early exits of the repeat count), every action, any limit.
"""

from __future__ import annotations

import gc
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fold import FPS, HASHES, ME, TENANT, evidence, folded_rows, record

from gateway.feedback.decide import STATE_CONDITIONS, StateRules, answer, decide
from gateway.feedback.fold import facts_from_states
from gateway.feedback.policy import (
    ACTIONS,
    CONDITIONS,
    DEFAULT_RULES_FILE,
    evaluate,
    load_rules,
    parse_rules,
)
from schemas.canonical import dumps

NOW = 1_005
DEFAULT_RULES = load_rules(DEFAULT_RULES_FILE)

condition = st.one_of(
    st.tuples(st.just("max_severity_at_least"),
              st.sampled_from(["info", "low", "medium", "high", "critical"])),
    st.tuples(st.just("techniques_any"),
              st.lists(st.sampled_from(["T1059", "T1059.001", "T1003", "T1046"]),
                       min_size=1, max_size=2)),
    st.tuples(st.just("tactics_any"),
              st.lists(st.sampled_from(["TA0006", "TA0008", "TA0002"]), min_size=1,
                       max_size=2)),
    st.tuples(st.just("event_types_any"),
              st.lists(st.sampled_from(["process.start", "net.conn", "x"]), min_size=1,
                       max_size=2)),
    *(st.tuples(st.just(name), st.integers(0, 6)) for name in (
        "graph_nodes_at_least", "graph_edges_at_least", "findings_at_least",
        "repeat_per_target_at_least")),
    st.tuples(st.just("seen_within_seconds"), st.integers(0, 12)),
)
rule = st.tuples(st.lists(condition, max_size=3, unique_by=lambda c: c[0]),
                 st.sampled_from(ACTIONS))


def ruleset(drawn: list) -> tuple:
    return parse_rules({"rule": [
        {"name": f"r{i}", "when": dict(when),
         "then": {"action": action, "confidence": 0.5, "control": "execution",
                  "ttl_seconds": 600, "rationale": f"rule {i}"}}
        for i, (when, action) in enumerate(drawn)]})


def rows_of(records: list, anchoring: dict, seed: int) -> list:
    """``Store.list_facts`` rows for the folded records, in a shuffled order."""
    anchoring = {fp: anchoring.get(fp, (HASHES[0], ME)) for fp in FPS}  # mostly ours
    rows = folded_rows([evidence(*r) for r in records], anchoring)
    random.Random(seed).shuffle(rows)
    return rows


def reference(rules: tuple, rows: list, limit: int, now: int) -> list:
    adjustments = (evaluate(rules, f, now) for f in facts_from_states(TENANT, ME, rows))
    return answer((a for a in adjustments if a is not None), limit)


@settings(max_examples=400, deadline=None)
@given(st.lists(record, max_size=40),
       st.dictionaries(st.sampled_from(FPS),
                       st.tuples(st.sampled_from([*HASHES, HASHES[0].upper(), ""]),
                                 st.sampled_from([ME, "other", None])),
                       max_size=2),
       st.lists(rule, min_size=1, max_size=5), st.integers(1, 4), st.integers(0, 99),
       st.integers(995, 1_015))
def test_decide_answers_what_the_reference_answers(records, anchoring, drawn, limit, seed,
                                                   now) -> None:
    rules, rows = ruleset(drawn), rows_of(records, anchoring, seed)
    expected = reference(rules, rows, limit, now)
    got = decide(StateRules(rules), TENANT, ME, rows, limit, now)
    assert got == expected
    assert dumps(got) == dumps(expected)  # the signed bytes, members in the same order


@settings(max_examples=200, deadline=None)
@given(st.lists(record, max_size=40), st.integers(1, 4), st.integers(0, 99))
def test_the_default_rules_too(records, limit, seed) -> None:
    rows = rows_of(records, {}, seed)
    assert (decide(StateRules(DEFAULT_RULES), TENANT, ME, rows, limit, NOW)
            == reference(DEFAULT_RULES, rows, limit, NOW))


VALUES = {  # every condition with values on both sides of what the states hold
    "max_severity_at_least": ["info", "low", "medium", "high", "critical"],
    "techniques_any": [["T1059"], ["T1059.001"], ["T1003"], ["T1046", "T1003"]],
    "tactics_any": [["TA0006"], ["TA0008"], ["TA0002", "TA0006"]],
    "event_types_any": [["process.start"], ["net.conn", "x"]],
    **{name: list(range(9)) for name in (
        "graph_nodes_at_least", "graph_edges_at_least", "findings_at_least",
        "repeat_per_target_at_least")},
    "seen_within_seconds": list(range(16)),
}


@settings(max_examples=400, deadline=None)
@given(st.lists(record, max_size=40), st.integers(995, 1_015))
def test_each_condition_on_a_state_holds_as_on_its_facts(records, now) -> None:
    rows = rows_of(records, {}, 0)
    facts = {f"{f.execution_fingerprint}:{f.attestation_hash}": f
             for f in facts_from_states(TENANT, ME, rows)}
    for member, raw, _, _ in rows:
        if member not in facts:
            continue  # made under a hash that is not the anchored one
        state = orjson.loads(raw)
        for name, values in VALUES.items():
            _, prepare, on_state = STATE_CONDITIONS[name]
            check, on_facts = CONDITIONS[name]
            for value in values:
                value = check(value)
                assert (on_state(state, prepare(value), now)
                        == on_facts(facts[member], value, now)), (name, value, state)


def test_every_condition_has_a_state_test() -> None:
    assert STATE_CONDITIONS.keys() == CONDITIONS.keys()


def test_cheap_conditions_are_tested_first_and_file_order_kept_among_equals() -> None:
    rules = ruleset([((("repeat_per_target_at_least", 3), ("tactics_any", ["TA0006"]),
                       ("findings_at_least", 1), ("max_severity_at_least", "high"),
                       ("techniques_any", ["T1059"])), "tighten")])
    (_, tests), = StateRules(rules).rules
    assert [test for test, _ in tests] == [STATE_CONDITIONS[name][2] for name in (
        "findings_at_least", "max_severity_at_least", "tactics_any",
        "repeat_per_target_at_least", "techniques_any")]
    assert [value for _, value in tests] == [1, 3, ("a:TA0006",), 3, frozenset({"T1059"})]


def tracked_objects_at_the_last_row(read, rows: list) -> int:
    """How many more objects the cyclic GC tracks once ``read`` has consumed every row
    (what it keeps per execution until the query ends) than before it started."""
    seen = []

    def rows_then_count():
        yield from rows
        seen.append(len(gc.get_objects()))

    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        read(rows_then_count())
    finally:
        gc.enable()
    return seen[0] - before


def test_a_query_keeps_no_tracked_object_per_execution() -> None:
    """The reference kept an ExecutionFacts and its frozensets per execution to the end
    of the query: at 1,000 executions their promotion set off a full collection every
    few queries (tens of ms in a large heap). decide keeps a fixed few; the decisions it
    remembers (StateRules.memo) are tuples of plain values, which the cyclic GC stops
    tracking at their first collection."""
    rows = [(f"{i:064x}:{HASHES[0]}",
             orjson.dumps({"ts": 1_000 + i, "n": 3, "s": i % 5, f"t:urn:target:h{i % 7}": 3,
                           f"o:urn:target:h{i % 7}": i, "a:TA0002": 1, "x:T1059.001": 1}),
             HASHES[0], ME) for i in range(1_000)]
    for rules in (StateRules(DEFAULT_RULES), StateRules(DEFAULT_RULES, memo_bytes=0)):
        decide(rules, TENANT, ME, rows, 100, NOW)  # the memo is filled (or stays empty)
        gc.collect()
        assert not any(gc.is_tracked(known) for known in rules.memo.newer.values())
        kept = tracked_objects_at_the_last_row(
            lambda rows, rules=rules: decide(rules, TENANT, ME, rows, 100, NOW), rows)
        assert kept < 50, kept
    by_reference = tracked_objects_at_the_last_row(
        lambda rows: facts_from_states(TENANT, ME, rows), rows)
    assert by_reference >= 1_000  # what the test tells apart


@pytest.mark.parametrize("limit", [1, 3, 1_000])
def test_limit_cuts_the_weakest_then_the_highest_fingerprints(limit: int) -> None:
    rules = ruleset([((("max_severity_at_least", "critical"),), "isolate"),
                     ((("max_severity_at_least", "high"),), "tighten"),
                     ((), "observe")])
    rows = [(f"{fp}:{HASHES[0]}", orjson.dumps({"s": severity, "n": 1}), HASHES[0], ME)
            for fp, severity in (("3" * 64, 3), ("1" * 64, 1), ("4" * 64, 4),
                                 ("2" * 64, 3), ("0" * 64, 0))]
    got = decide(StateRules(rules), TENANT, ME, rows, limit, NOW)
    order = [("4" * 64, "isolate"), ("2" * 64, "tighten"), ("3" * 64, "tighten"),
             ("0" * 64, "observe"), ("1" * 64, "observe")]
    assert [(a["execution_fingerprint"], a["action"]) for a in got] == order[:limit]
    assert got == reference(rules, rows, limit, NOW)
