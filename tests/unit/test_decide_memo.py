"""What a query worked out from a facts state is remembered by the state's bytes
(gateway/feedback/decide.py ``StateRules.decided``, gateway/feedback/bycontent.py):

- an unchanged state is neither decoded nor tried again by the next query;
- a changed state (a record folded into it between two queries) is other bytes, so it
  is decided afresh: one ``StateRules`` kept across queries, commits and clocks answers
  exactly what the reference answers for each query, byte for byte;
- a remembered decision holds only for the ``now`` that cannot change it (the rules'
  ``seen_within_seconds`` edges around the state's ``ts``);
- the memo is bounded by the bytes it holds.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decide import DEFAULT_RULES, NOW, reference, rows_of, rule, ruleset
from test_fold import HASHES, ME, TENANT, record

from gateway.feedback.bycontent import ENTRY_OVERHEAD, ByContent
from gateway.feedback.decide import StateRules, decide
from schemas.canonical import dumps


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(record, min_size=1, max_size=12), min_size=1, max_size=4),
       st.lists(rule, min_size=1, max_size=5),
       st.lists(st.integers(990, 1_030), min_size=8, max_size=8),
       st.integers(1, 4), st.integers(0, 99))
def test_one_memo_across_commits_and_clocks_answers_as_the_reference(
        batches, drawn, nows, limit, seed) -> None:
    """Records arrive in batches (each changes some states and leaves the others byte
    for byte as they were); after each, the same StateRules answers two queries at
    drawn clocks (around the seen_within_seconds edges): each answer is the
    reference's for the rows and the clock of that query."""
    rules = ruleset(drawn)
    memo = StateRules(rules)
    folded: list = []
    clocks = iter(nows)
    for batch in batches:
        folded += batch
        rows = rows_of(folded, {}, seed)
        for now in (next(clocks), next(clocks)):
            got = decide(memo, TENANT, ME, rows, limit, now)
            expected = reference(rules, rows, limit, now)
            assert got == expected
            assert dumps(got) == dumps(expected)


def thousand_rows(ts: int = 1_000) -> list:
    return [(f"{i:064x}:{HASHES[0]}",
             orjson.dumps({"ts": ts + i % 10, "n": 3, "s": i % 5,
                           f"t:urn:target:h{i % 7}": 3 + i % 2, f"o:urn:target:h{i % 7}": i,
                           "a:TA0002": 1, "x:T1059.001": 1}),
             HASHES[0], ME) for i in range(1_000)]


def test_an_unchanged_state_is_decided_once() -> None:
    """At 1,000 executions the second query decodes and tries no state; a commit that
    changed one state makes the next query work out that one alone."""
    rows = thousand_rows()
    memo = StateRules(DEFAULT_RULES)
    first = decide(memo, TENANT, ME, rows, 100, NOW)
    assert memo.worked_out == 1_000
    assert decide(memo, TENANT, ME, rows, 100, NOW + 3_600) == [
        {**a, "timestamp": NOW + 3_600} for a in first]  # no rule depends on the clock
    assert memo.worked_out == 1_000
    member, raw, anchor, owner = rows[5]
    changed = orjson.loads(raw)
    changed.update(s=4, n=changed["n"] + 1)  # a critical finding folded in
    rows[5] = (member, orjson.dumps(changed), anchor, owner)
    got = decide(memo, TENANT, ME, rows, 1_000, NOW)
    assert memo.worked_out == 1_001
    assert got == reference(DEFAULT_RULES, rows, 1_000, NOW)
    assert got != decide(StateRules(DEFAULT_RULES), TENANT, ME, thousand_rows(), 1_000, NOW)


def test_a_decision_that_depends_on_the_clock_is_remembered_only_while_it_holds() -> None:
    """``seen_within_seconds = 10`` on 1,000 states last seen at ts 1,000-1,009 (100
    each): a query at 1,005 decides them all; a later query works out again only the
    states whose edge (ts + 10) it has passed since their decision (at 1,015: the 500
    with edges 1,010-1,014; at 1,016: the 100 more with edge 1,015), and a clock set
    back before every edge all of them. Each answer is the reference's."""
    rules = ruleset([((("seen_within_seconds", 10),), "isolate"), ((), "observe")])
    rows = thousand_rows()
    memo = StateRules(rules)
    for now, worked_out in ((1_005, 1_000), (1_006, 1_000), (1_010, 1_000),
                            (1_015, 1_500), (1_016, 1_600), (1_030, 2_000),
                            (900, 3_000)):  # a clock set back: everything changes again
        got = decide(memo, TENANT, ME, rows, 1_000, now)
        assert memo.worked_out == worked_out, now
        assert got == reference(rules, rows, 1_000, now)


def test_the_memo_is_bounded_by_the_bytes_it_holds() -> None:
    budget = 100 * (1_000 + ENTRY_OVERHEAD)
    memo = ByContent(budget)
    keys = [i.to_bytes(4, "big") * 250 for i in range(1_000)]  # 1,000 bytes each
    for i, key in enumerate(keys):
        memo.put(key, (i,))
        assert memo.charged <= budget
    assert 50 <= len(memo) <= 100
    assert memo.get(keys[-1]) == (999,)
    assert memo.get(keys[0]) is None  # long gone
    memo.put(b"x" * budget, (0,))  # larger than a generation: never kept
    assert memo.get(b"x" * budget) is None


def test_a_hit_in_the_older_generation_keeps_the_entry() -> None:
    """The entries queries keep reading survive the turnover of generations; the others
    go after two."""
    memo = ByContent(2 * 10 * (10 + ENTRY_OVERHEAD))  # 10 keys of 10 bytes per generation
    read_often = b"r" * 10
    memo.put(read_often, (1,))
    for i in range(100):
        memo.put(b"%010d" % i, (i,))
        assert memo.get(read_often) == (1,)
    assert memo.get(b"%010d" % 0) is None
    assert memo.get(b"%010d" % 99) == (99,)


@pytest.mark.parametrize("states", [0, 300])
def test_a_memo_too_small_for_the_query_still_answers(states: int) -> None:
    """A memo holding no state, or 300 of the 1,000 a query reads (its generations turn
    over in the middle of every query): each answer is still the reference's."""
    rows = thousand_rows()
    memo = StateRules(DEFAULT_RULES, memo_bytes=states * (len(rows[0][1]) + ENTRY_OVERHEAD))
    for limit in (100, 1_000, 100):
        assert decide(memo, TENANT, ME, rows, limit, NOW) == reference(DEFAULT_RULES, rows,
                                                                        limit, NOW)
    assert memo.worked_out >= 2_000
    assert len(memo.memo) <= states


def test_other_rules_decide_afresh() -> None:
    """The memo belongs to one set of rules (StateRules): rules read anew (a new
    RulePolicy) decide every state again, and answer as those rules do."""
    rows = thousand_rows()
    old, new = DEFAULT_RULES, ruleset([((("findings_at_least", 3),
                                         ("max_severity_at_least", "medium")), "isolate")])
    warm = StateRules(old)
    decide(warm, TENANT, ME, rows, 1_000, NOW)
    fresh = StateRules(new)
    got = decide(fresh, TENANT, ME, rows, 1_000, NOW)
    assert fresh.worked_out == 1_000
    assert got == reference(new, rows, 1_000, NOW) != reference(old, rows, 1_000, NOW)
