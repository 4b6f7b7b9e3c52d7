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
  (tens of ms in a large heap) every few queries;
- what a state decides (the first matching rule, the target) is remembered by the
  state's bytes (:meth:`StateRules.decided`, :mod:`.bycontent`): between two queries of
  an identity most of its states are byte for byte the same, and such a state is
  neither decoded nor tried again (at 1,000 executions ~5 ms of a query's ~13 ms went
  to decoding the states and trying the rules). A state a commit changed is other bytes,
  so it is decided afresh — keyed on the content, never on a time or a version, a
  decision is never served for bytes it was not made from. Only
  ``seen_within_seconds`` depends on the clock: a remembered decision is used only for
  a ``now`` on the same side of every such edge as the ``now`` it was made at. The
  memo belongs to one :class:`StateRules`, i.e. one set of rules (they are read at
  start-up only; new rules are a new ``RulePolicy``, with an empty memo).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from .bycontent import ByContent
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


#: Bytes of facts states whose decision a :class:`StateRules` remembers (bycontent.py):
#: ~30,000 states of ~850 bytes, 15,000 per generation: one query reads at most 10,000
#: (issuer.MAX_EXECUTIONS).
DECISIONS_BYTES = 32 * 1024 * 1024
NO_RULE = -1


class StateRules:
    """The rules, each condition prepared once for testing facts states; and what they
    decided for the states already seen, by the states' bytes (:meth:`decided`)."""

    def __init__(self, rules: Iterable[Rule], *, memo_bytes: int = DECISIONS_BYTES) -> None:
        self.rules = tuple((rule, _tests(rule)) for rule in rules)
        #: the seen_within_seconds values: the only conditions that depend on ``now``
        self.seconds = tuple(sorted({value for rule, _ in self.rules
                                     for name, value in rule.when
                                     if name == "seen_within_seconds"}))
        self.memo = ByContent(memo_bytes)
        self.worked_out = 0  # states decoded and tried (memo misses), for tests

    def first_match(self, s: State, now: int) -> Rule | None:
        """:func:`~.policy.first_match` on the facts a state gives."""
        index = self.first_index(s, now)
        return None if index == NO_RULE else self.rules[index][0]

    def first_index(self, s: State, now: int) -> int:
        for index, (_, tests) in enumerate(self.rules):
            for test, value in tests:
                if not test(s, value, now):
                    break
            else:
                return index
        return NO_RULE

    def decided(self, raw: bytes, now: int) -> tuple[int, str | None]:
        """(index of the first matching rule or :data:`NO_RULE`, the state's target when
        one matches) for the state whose JSON is ``raw``: remembered by its bytes, so an
        unchanged state is neither decoded nor tried again. Only ``seen_within_seconds``
        depends on ``now``; a remembered decision holds for the ``now`` between the
        state's nearest breakpoints (``ts`` + each such value) around the ``now`` it was
        made at, and is worked out afresh outside them."""
        known = self.memo.get(raw)
        if known is not None and (not self.seconds or known[2] < now <= known[3]):
            return known[0], known[1]
        self.worked_out += 1
        s = orjson.loads(raw)
        index = self.first_index(s, now)
        target = None if index == NO_RULE else target_urn(s)
        low, high = _window(s, self.seconds, now)
        self.memo.put(raw, (index, target, low, high))
        return index, target


def _window(s: State, seconds: tuple[int, ...], now: int) -> tuple[float, float]:
    """(low, high): every seen_within_seconds test on ``s`` answers for any ``t`` with
    low < t <= high what it answers for ``now`` (``t - ts <= k`` ⇔ ``t <= ts + k``)."""
    if not seconds or "ts" not in s:
        return -_INF, _INF  # no such rule, or never seen: the tests never hold
    low, high = -_INF, _INF
    ts = int(s["ts"])
    for k in seconds:
        edge = ts + k
        if edge < now:
            low = max(low, edge)
        else:
            high = min(high, edge)
    return low, high


_INF = float("inf")


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
    only the state made under the anchored hash (as ``facts_from_states`` chooses).
    A state given as bytes (as both stores read them) is decided through the memo
    (:meth:`StateRules.decided`); one given decoded or as text is tried as it is."""
    fps: list[str] = []
    targets: list[Any] = []  # the target, or the decoded state to find it in
    anchors: list[str] = []
    chosen: list[int] = []
    by_action = [[] for _ in ACTIONS]  # positions in the lists above
    ranks = [ACTION_RANK[rule.then.action] for rule, _ in rules.rules]
    decided, timeless = rules.decided, not rules.seconds
    newer = rules.memo.newer  # StateRules.decided's first lookup, inlined (~1,000 a query)
    for member, state, anchor, owner in rows:
        fp, _, att = member.partition(":")
        if owner != identity or not anchor or att != anchor.lower():
            continue
        if type(state) is bytes:
            known = newer.get(state) if timeless else None
            if known is None:
                index, target = decided(state, now)
                newer = rules.memo.newer  # a new generation may have begun
            else:
                index, target = known[0], known[1]
        else:
            target = state if isinstance(state, dict) else orjson.loads(state)
            index = rules.first_index(target, now)
        if index == NO_RULE:
            continue
        by_action[ranks[index]].append(len(fps))
        fps.append(fp)
        targets.append(target)
        anchors.append(anchor)
        chosen.append(index)
    order = [i for positions in reversed(by_action)  # strongest action first
             for i in sorted(positions, key=fps.__getitem__)]
    return [adjustment(rules.rules[chosen[i]][0], tenant_id, fps[i],
                       targets[i] if type(targets[i]) is str else target_urn(targets[i]),
                       anchors[i], now) for i in order[:limit]]


def _priority(adjustment: dict[str, Any]) -> tuple[int, str]:
    """Strongest action first, then by fingerprint: a ``limit`` cuts the weakest."""
    return -ACTION_RANK[adjustment["action"]], adjustment["execution_fingerprint"]


def answer(adjustments: Iterable[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The reference's order and cut (``RulePolicy`` from the records)."""
    return sorted(adjustments, key=_priority)[:limit]
