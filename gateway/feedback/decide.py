"""The rules applied straight to the stored facts states: a feedback query's adjustments
without an :class:`~.facts.ExecutionFacts` per execution (issue 9).

:func:`decide` answers exactly what the reference answers for the same rows —
:func:`~.fold.facts_from_states`, then :func:`~.policy.evaluate` per execution, then
:func:`answer` (strongest action first, then fingerprint, at most ``limit``) — the same
adjustments, members and order, so the same signed bytes. It only does less work:

- each condition is tested on the state itself (a severity, a count, a time: one
  lookup; a tactic or an event type: a key lookup), and within a rule the cheap ones
  first — the conditions are pure, so the order of a conjunction changes nothing; the
  techniques and the repeat count per target (a walk over the state's fields, stopped
  at the first hit) only when a rule gets that far;
- the target (another walk, unless the graph named it) and the adjustment are made
  only for the executions the answer holds;
- nothing is kept per execution but strings, the decoded state (a dict of strings and
  numbers, which the cyclic GC does not track) and the matching rule: a query no longer
  leaves thousands of tracked objects behind, whose promotion set off full collections
  (tens of ms in a large heap) every few queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from .facts import SEVERITY_RANK
from .fold import target_urn
from .policy import ACTION_RANK, ACTIONS, CONDITIONS, Rule, adjustment

Row = tuple[str, Any, str | None, str | None]  # Store.list_facts: member, state (JSON or
# decoded), anchored hash, owner
State = Mapping[str, Any]  # a decoded facts state (gateway/feedback/fold.py)


def _severity(s: State, rank: int, now: int) -> bool:
    severity = s.get("s")
    return severity is not None and int(severity) >= rank


def _count(name: str) -> Callable[[State, int, int], bool]:
    return lambda s, least, now: int(s.get(name, 0)) >= least


# The tests below loop rather than call any(): no generator made per test (a query runs
# a few thousand of them).
def _any_field(s: State, names: tuple[str, ...], now: int) -> bool:
    for name in names:  # noqa: SIM110
        if name in s:
            return True
    return False


def _technique_any(s: State, wanted: frozenset[str], now: int) -> bool:
    """As policy._technique_any: ``T1059`` matches ``T1059`` and ``T1059.001``…"""
    for name in s:
        if name[:2] == "x:":
            t = name[2:]
            if t in wanted or t.split(".", 1)[0] in wanted:
                return True
    return False


def _repeat_at_least(s: State, least: int, now: int) -> bool:
    """``fold.target_and_repeat(s)[1] >= least``, stopping at the first target that
    reaches it (the fold's counters are sums of 1s). The findings naming no target count
    for the graph's target if the graph named one, else for the most named one."""
    unnamed = s.get("u", 0)
    if graph_target := s.get("gt"):
        if s.get("t:" + graph_target, 0) + unnamed >= least:
            return True
        unnamed = 0  # the other targets count alone
    elif unnamed >= least:  # for the most named target, or the unknown one
        return True
    for name, value in s.items():  # noqa: SIM110
        if name[:2] == "t:" and value + unnamed >= least:
            return True
    return False


def _seen_within(s: State, seconds: int, now: int) -> bool:
    return "ts" in s and now - int(s["ts"]) <= seconds


def _prefixed(prefix: str) -> Callable[[frozenset[str]], tuple[str, ...]]:
    return lambda values: tuple(sorted(prefix + value for value in values))


def _same(value: Any) -> Any:
    return value


# condition name → (cost class: cheaper first, the rule's value → the test's, the test)
STATE_CONDITIONS: dict[str, tuple[int, Callable[[Any], Any],
                                  Callable[[State, Any, int], bool]]] = {
    "max_severity_at_least": (0, SEVERITY_RANK.__getitem__, _severity),
    "graph_nodes_at_least": (0, _same, _count("gn")),
    "graph_edges_at_least": (0, _same, _count("ge")),
    "findings_at_least": (0, _same, _count("n")),
    "seen_within_seconds": (0, _same, _seen_within),
    "tactics_any": (1, _prefixed("a:"), _any_field),
    "event_types_any": (1, _prefixed("e:"), _any_field),
    "techniques_any": (2, _same, _technique_any),
    "repeat_per_target_at_least": (2, _same, _repeat_at_least),
}
if STATE_CONDITIONS.keys() != CONDITIONS.keys():  # a new condition needs its state test
    raise RuntimeError("decide.STATE_CONDITIONS and policy.CONDITIONS name other conditions")


class StateRules:
    """The rules, each condition prepared once for testing facts states."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple((rule, _tests(rule)) for rule in rules)

    def first_match(self, s: State, now: int) -> Rule | None:
        """:func:`~.policy.first_match` on the facts a state gives."""
        for rule, tests in self.rules:
            for test, value in tests:
                if not test(s, value, now):
                    break
            else:
                return rule
        return None


def _tests(rule: Rule) -> tuple[tuple[Callable[[State, Any, int], bool], Any], ...]:
    """The rule's conditions as (test, prepared value), cheaper first (a stable sort:
    conditions of one cost keep their file order)."""
    tests = []
    for name, value in rule.when:
        cost, prepare, test = STATE_CONDITIONS[name]
        tests.append((cost, test, prepare(value)))
    tests.sort(key=lambda t: t[0])
    return tuple((test, value) for _, test, value in tests)


def decide(rules: StateRules, tenant_id: str, identity: str, rows: Iterable[Row],
           limit: int, now: int) -> list[dict[str, Any]]:
    """The adjustments for ``identity``'s executions in ``rows``, strongest action first,
    then by fingerprint, the first ``limit``: only executions ``identity`` owns, and
    only the state made under the anchored hash (as ``facts_from_states`` chooses)."""
    fps: list[str] = []
    states: list[Mapping[str, Any]] = []
    anchors: list[str] = []
    chosen: list[Rule] = []
    by_action: list[list[int]] = [[] for _ in ACTIONS]  # positions in the lists above
    for member, state, anchor, owner in rows:
        fp, _, att = member.partition(":")
        if owner != identity or not anchor or att != anchor.lower():
            continue
        s = state if isinstance(state, dict) else orjson.loads(state)
        rule = rules.first_match(s, now)
        if rule is None:
            continue
        by_action[ACTION_RANK[rule.then.action]].append(len(fps))
        fps.append(fp)
        states.append(s)
        anchors.append(anchor)
        chosen.append(rule)
    order = [i for positions in reversed(by_action)  # strongest action first
             for i in sorted(positions, key=fps.__getitem__)]
    return [adjustment(chosen[i], tenant_id, fps[i], target_urn(states[i]),
                       anchors[i], now) for i in order[:limit]]


def _priority(adjustment: dict[str, Any]) -> tuple[int, str]:
    """Strongest action first, then by fingerprint: a ``limit`` cuts the weakest."""
    return -ACTION_RANK[adjustment["action"]], adjustment["execution_fingerprint"]


def answer(adjustments: Iterable[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The reference's order and cut (``RulePolicy`` from the records)."""
    return sorted(adjustments, key=_priority)[:limit]
