"""The policy engine (gateway/feedback/policy.py) as tables: facts → the action (or None).

Rows in the python-tuf style: one named row per behaviour, ``pytest.mark.parametrize``
over a dict so a failure names the row. Covered: every condition (a hit and a miss),
first-match order, the no-attestation rule, facts built from stored records, the exact
adjustment members, and every ``load_rules`` refusal (the message names rule and key).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from common.tomlfile import ConfigError
from gateway.feedback.evidence import Evidence
from gateway.feedback.facts import ExecutionFacts, facts_from_records
from gateway.feedback.policy import (
    CONDITIONS,
    DEFAULT_RULES_FILE,
    evaluate,
    first_match,
    load_rules,
    parse_rules,
)
from schemas.canonical import dumps, loads
from schemas.validate import Validators

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_795_000_000
TENANT = "7758e414-233a-5ea0-575b-cf0c26f5259a"
OTHER_TENANT = "3526adb4-6352-d1d7-fa72-23d93cd439b3"
FP = "4aa626da6a2fcccfa450c83257a15a93b6cd0548da686eff7cae5f520bbdf13c"
FP2 = "1" * 64
ATT = "744ebf90954f39958e7612c4d74de98f4d0b9fb1dbac3711c5bab5ab1c019c4a"
ATT_OTHER = "b0b92d22b1cb93072aa3e76085ebef6cac4013f03524f4b949502ed1018090c8"
BASE = ExecutionFacts(TENANT, FP, ATT)
DEFAULT_RULES = load_rules(DEFAULT_RULES_FILE)


def facts(**changes: Any) -> ExecutionFacts:
    return dataclasses.replace(BASE, **changes)


def rules(*whens: dict[str, Any], actions: tuple[str, ...] = ()) -> tuple:
    """One rule per ``when`` (named r0, r1…), action ``actions[i]`` or ``tighten``."""
    doc = {"rule": [
        {"name": f"r{i}", "when": when,
         "then": {"action": actions[i] if i < len(actions) else "tighten",
                  "confidence": 0.5, "control": "execution", "ttl_seconds": 600,
                  "rationale": f"rule {i}"}}
        for i, when in enumerate(whens)]}
    return parse_rules(doc)


# -- every condition: (when, facts changes, matches?) --------------------------------------
CONDITION_ROWS: dict[str, tuple[dict, dict, bool]] = {
    "severity equal": ({"max_severity_at_least": "high"}, {"max_severity": "high"}, True),
    "severity above": ({"max_severity_at_least": "high"}, {"max_severity": "critical"}, True),
    "severity below": ({"max_severity_at_least": "high"}, {"max_severity": "medium"}, False),
    "severity none": ({"max_severity_at_least": "info"}, {"max_severity": None}, False),
    "technique parent matches sub": (
        {"techniques_any": ["T1059"]}, {"techniques": frozenset({"T1059.001"})}, True),
    "technique exact": ({"techniques_any": ["T1003"]}, {"techniques": frozenset({"T1003"})},
                        True),
    "technique sub does not match parent": (
        {"techniques_any": ["T1059.001"]}, {"techniques": frozenset({"T1059"})}, False),
    "technique sibling sub": (
        {"techniques_any": ["T1059.001"]}, {"techniques": frozenset({"T1059.002"})}, False),
    "technique other": ({"techniques_any": ["T1059"]}, {"techniques": frozenset({"T10590"})},
                        False),
    "tactic any hit": ({"tactics_any": ["TA0006", "TA0008"]},
                       {"tactics": frozenset({"TA0002", "TA0008"})}, True),
    "tactic miss": ({"tactics_any": ["TA0006"]}, {"tactics": frozenset({"TA0002"})}, False),
    "event type hit": ({"event_types_any": ["process_execution"]},
                       {"event_types": frozenset({"process_execution"})}, True),
    "event type miss": ({"event_types_any": ["network_scan"]},
                        {"event_types": frozenset({"process_execution"})}, False),
    "nodes at threshold": ({"graph_nodes_at_least": 8}, {"graph_nodes": 8}, True),
    "nodes below": ({"graph_nodes_at_least": 8}, {"graph_nodes": 7}, False),
    "edges at threshold": ({"graph_edges_at_least": 3}, {"graph_edges": 3}, True),
    "edges below": ({"graph_edges_at_least": 3}, {"graph_edges": 2}, False),
    "findings at threshold": ({"findings_at_least": 2}, {"findings": 2}, True),
    "findings below": ({"findings_at_least": 2}, {"findings": 1}, False),
    "repeat at threshold": ({"repeat_per_target_at_least": 3}, {"repeat_per_target": 3}, True),
    "repeat below": ({"repeat_per_target_at_least": 3}, {"repeat_per_target": 2}, False),
    "seen within": ({"seen_within_seconds": 60}, {"latest_timestamp": NOW - 60}, True),
    "seen too long ago": ({"seen_within_seconds": 60}, {"latest_timestamp": NOW - 61}, False),
    "never seen": ({"seen_within_seconds": 60}, {"latest_timestamp": None}, False),
    "all must hold: both": ({"max_severity_at_least": "high", "graph_nodes_at_least": 2},
                            {"max_severity": "high", "graph_nodes": 2}, True),
    "all must hold: one fails": ({"max_severity_at_least": "high", "graph_nodes_at_least": 2},
                                 {"max_severity": "high", "graph_nodes": 1}, False),
    "empty when always holds": ({}, {}, True),
}


@pytest.mark.parametrize("when, changes, matches", CONDITION_ROWS.values(), ids=CONDITION_ROWS)
def test_condition(when: dict, changes: dict, matches: bool) -> None:
    adjustment = evaluate(rules(when), facts(**changes), NOW)
    assert (adjustment is not None) is matches
    if matches:
        assert adjustment["action"] == "tighten"


def test_every_condition_has_rows() -> None:
    used = {name for when, _, _ in CONDITION_ROWS.values() for name in when}
    assert used == set(CONDITIONS)


# -- first match wins, in file order -------------------------------------------------------
ORDER_ROWS: dict[str, tuple[tuple[dict, ...], tuple[str, ...], dict, str | None]] = {
    "first of two matching": (({}, {}), ("isolate", "observe"), {}, "r0"),
    "file order, not strength": (({}, {}), ("observe", "isolate"), {}, "r0"),
    "skips a non-matching first": (({"graph_nodes_at_least": 5}, {}),
                                   ("isolate", "observe"), {"graph_nodes": 4}, "r1"),
    "takes a matching first": (({"graph_nodes_at_least": 5}, {}),
                               ("isolate", "observe"), {"graph_nodes": 5}, "r0"),
    "none matches": (({"findings_at_least": 1},), ("observe",), {"findings": 0}, None),
}


@pytest.mark.parametrize("whens, actions, changes, expected", ORDER_ROWS.values(),
                         ids=ORDER_ROWS)
def test_first_match_wins(whens, actions, changes, expected) -> None:
    ruleset = rules(*whens, actions=actions)
    rule = first_match(ruleset, facts(**changes), NOW)
    assert (rule.name if rule else None) == expected
    adjustment = evaluate(ruleset, facts(**changes), NOW)
    want = None if expected is None else actions[int(expected[1:])]
    assert (adjustment["action"] if adjustment else None) == want


# -- the default rules file: facts → (rule, action) ----------------------------------------
DEFAULT_ROWS: dict[str, tuple[dict, str, str]] = {
    "critical credential access": (
        {"max_severity": "critical", "tactics": frozenset({"TA0006"}), "graph_nodes": 20},
        "isolate-critical-credential-access", "isolate"),
    "critical lateral movement": (
        {"max_severity": "critical", "tactics": frozenset({"TA0008"})},
        "isolate-critical-lateral-movement", "isolate"),
    "repeated high target": ({"max_severity": "high", "repeat_per_target": 3},
                             "tighten-repeated-target", "tighten"),
    "critical, other tactic": ({"max_severity": "critical", "tactics": frozenset({"TA0002"})},
                               "tighten-critical-finding", "tighten"),
    "complex graph": ({"graph_nodes": 8}, "tighten-complex-graph", "tighten"),
    "high scripting": ({"max_severity": "high", "techniques": frozenset({"T1059.001"})},
                       "tighten-high-severity-scripting", "tighten"),
    "medium scripting": ({"max_severity": "medium", "techniques": frozenset({"T1059.001"})},
                         "observe-everything-else", "observe"),
    "graph only, small": ({"graph_nodes": 2, "graph_edges": 1}, "observe-everything-else",
                          "observe"),
}


@pytest.mark.parametrize("changes, rule_name, action", DEFAULT_ROWS.values(), ids=DEFAULT_ROWS)
def test_default_rules(changes: dict, rule_name: str, action: str) -> None:
    assert first_match(DEFAULT_RULES, facts(**changes), NOW).name == rule_name
    assert evaluate(DEFAULT_RULES, facts(**changes), NOW)["action"] == action


# -- [hardening] no attestation hash, no adjustment ----------------------------------------
NO_ATTESTATION_ROWS = {"none": None, "empty": ""}


@pytest.mark.parametrize("attestation", NO_ATTESTATION_ROWS.values(), ids=NO_ATTESTATION_ROWS)
def test_no_attestation_no_adjustment(attestation: str | None) -> None:
    loud = facts(attestation_hash=attestation, max_severity="critical",
                 tactics=frozenset({"TA0006"}))
    assert first_match(DEFAULT_RULES, loud, NOW) is not None  # a rule would match…
    assert evaluate(DEFAULT_RULES, loud, NOW) is None  # …but nothing is invented


def test_adjustment_members_exact_and_valid() -> None:
    f = facts(target_urn="urn:target:db-01", max_severity="critical",
              tactics=frozenset({"TA0006"}))
    adjustment = evaluate(DEFAULT_RULES, f, NOW)
    assert adjustment == {
        "tenant_id": TENANT, "execution_fingerprint": FP, "target_urn": "urn:target:db-01",
        "action": "isolate", "confidence": 0.9, "rationale": "critical credential-access finding",
        "control": "network", "ttl_seconds": 3600, "timestamp": NOW,
        "schema_version": "feedback.adjustment.v1", "attestation_measurement_hash": ATT,
    }
    Validators().validate("adjustment", adjustment)


CONFIDENCE_ROWS = {"0.55": (0.55, b'"confidence":0.55'), "0.82": (0.82, b'"confidence":0.82'),
                   "0.1": (0.1, b'"confidence":0.1'), "int 1": (1, b'"confidence":1.0')}


@pytest.mark.parametrize("value, wire", CONFIDENCE_ROWS.values(), ids=CONFIDENCE_ROWS)
def test_confidence_survives_canonical_json(value: float, wire: bytes) -> None:
    ruleset = parse_rules({"rule": [{"name": "c", "then": {
        "action": "observe", "confidence": value, "control": "execution",
        "ttl_seconds": 60, "rationale": "x"}}]})
    adjustment = evaluate(ruleset, BASE, NOW)
    assert wire in dumps(adjustment)
    assert loads(dumps(adjustment)) == adjustment
    assert dumps(loads(dumps(adjustment))) == dumps(adjustment)


# -- facts from stored records -------------------------------------------------------------

def _evidence(kind: str, fp: str, att: str, tenant: str, received_at: int,
              body: dict) -> Evidence:
    """Checked evidence as ``read_evidence`` gives it. Built directly: these bodies hold
    only the members the facts read, not whole schema-valid requests (reading stored
    records is tested in test_evidence.py)."""
    return Evidence(kind, "spectrastrike-producer", tenant, fp.lower(), att.lower(),
                    received_at, loads(dumps(body)))


def finding(fp: str = FP, *, att: str = ATT, tenant: str = TENANT, received_at: int = NOW,
            **payload: Any) -> Evidence:
    body = {"execution_hash": fp, "payload": {
        "severity": "high", "mitre_techniques": ["T1059.001"], "mitre_tactics": ["TA0002"],
        "event_type": "process_execution", "attributes": {"attestation_measurement_hash": att},
        **payload}}
    return _evidence("finding", fp, att, tenant, received_at, body)


def graph(fp: str = FP, *, att: str = ATT, nodes: int = 2, edges: int = 1,
          target: str | None = "urn:target:ws-17", received_at: int = NOW) -> Evidence:
    g: dict[str, Any] = {"nodes": [{"id": f"n{i}"} for i in range(nodes)],
                         "edges": [{"from": "n0", "to": "n0"}] * edges}
    if target is not None:
        g["target_urn"] = target
    return _evidence("graph", fp, att, TENANT, received_at,
                     {"execution_fingerprint": fp, "graph": g})


def asset(ref: str, key: str = "asset_ref") -> dict:
    return {"attributes": {"attestation_measurement_hash": ATT, key: ref}}


FACTS_ROWS: dict[str, tuple[list, list, dict, dict]] = {
    "graph target wins": (
        [finding(**asset("db-01"))], [graph(target="urn:target:ws-17")], {FP: ATT},
        {"target_urn": "urn:target:ws-17", "findings": 1, "graph_nodes": 2, "graph_edges": 1,
         "repeat_per_target": 1}),
    "asset_ref target": ([finding(**asset("db-01"))], [], {FP: ATT},
                         {"target_urn": "urn:target:db-01"}),
    "target attribute": ([finding(**asset("db-02", "target"))], [], {FP: ATT},
                         {"target_urn": "urn:target:db-02"}),
    "urn kept as is": ([finding(**asset("urn:host:x"))], [], {FP: ATT},
                       {"target_urn": "urn:host:x"}),
    "graph without target": ([finding()], [graph(target=None)], {FP: ATT},
                             {"target_urn": "urn:target:unknown"}),
    "max severity and unions": (
        [finding(severity="low", mitre_techniques=["T1003"], mitre_tactics=["TA0006"]),
         finding(severity="critical", event_type="credential_dump"), finding(severity="info")],
        [], {FP: ATT},
        {"max_severity": "critical", "findings": 3,
         "techniques": frozenset({"T1003", "T1059.001"}),
         "tactics": frozenset({"TA0002", "TA0006"}),
         "event_types": frozenset({"process_execution", "credential_dump"})}),
    "repeat per target": (
        [finding(**asset("a")), finding(**asset("b")), finding(**asset("a")), finding()],
        [graph(target="urn:target:a")], {FP: ATT},
        {"target_urn": "urn:target:a", "repeat_per_target": 3}),
    "most named target without graph": (
        [finding(**asset("b")), finding(**asset("a")), finding(**asset("a"))], [], {FP: ATT},
        {"target_urn": "urn:target:a", "repeat_per_target": 2}),
    "latest graph counts": ([], [graph(nodes=9, edges=8), graph(nodes=3, edges=2)], {FP: ATT},
                            {"graph_nodes": 3, "graph_edges": 2, "findings": 0,
                             "max_severity": None}),
    "latest timestamp": ([finding(received_at=NOW - 5)], [graph(received_at=NOW - 9)],
                         {FP: ATT}, {"latest_timestamp": NOW - 5}),
    "anchored hash is used": ([finding()], [], {FP: ATT}, {"attestation_hash": ATT}),
    "other attestation ignored": ([finding(), finding(att=ATT_OTHER, severity="critical")], [],
                                  {FP: ATT}, {"findings": 1, "max_severity": "high"}),
    "other tenant ignored": ([finding(), finding(tenant=OTHER_TENANT, severity="critical")],
                             [], {FP: ATT}, {"findings": 1, "max_severity": "high"}),
}


@pytest.mark.parametrize("findings, graphs, anchors, expected", FACTS_ROWS.values(),
                         ids=FACTS_ROWS)
def test_facts_from_records(findings, graphs, anchors, expected) -> None:
    (got,) = facts_from_records(TENANT, findings, graphs, anchors)
    assert (got.tenant_id, got.execution_fingerprint) == (TENANT, FP)
    assert {k: getattr(got, k) for k in expected} == expected


def test_facts_group_by_execution_and_skip_unanchored() -> None:
    findings = [finding(FP2, severity="critical"), finding(FP), finding("2" * 64)]
    graphs = [graph(FP2, nodes=9), graph("2" * 64)]
    got = facts_from_records(TENANT, findings, graphs, {FP: ATT, FP2: ATT})  # "2"*64: none
    assert [f.execution_fingerprint for f in got] == sorted([FP, FP2])
    by_fp = {f.execution_fingerprint: f for f in got}
    assert by_fp[FP2].graph_nodes == 9 and by_fp[FP2].max_severity == "critical"
    assert by_fp[FP].graph_nodes == 0
    assert facts_from_records(TENANT, findings, graphs, {}) == []




# -- load_rules refusals: (file text, key named) -------------------------------------------
GOOD_THEN = ('then = { action = "observe", confidence = 0.5, control = "execution", '
             'ttl_seconds = 600, rationale = "x" }')


def rule_text(name: str = "bad-rule", when: str = "", then: str = GOOD_THEN,
              extra: str = "") -> str:
    return f'[[rule]]\nname = "{name}"\n{when}\n{then}\n{extra}\n'


def then_with(**changes: str) -> str:
    members = {"action": '"observe"', "confidence": "0.5", "control": '"execution"',
               "ttl_seconds": "600", "rationale": '"x"', **changes}
    return "then = { " + ", ".join(f"{k} = {v}" for k, v in members.items() if v) + " }"


REFUSAL_ROWS: dict[str, tuple[str, str]] = {  # (file text, key named)
    "unknown top-level key": ("version = 1\n" + rule_text(), "unknown key 'version'"),
    "no rules": ("", "rule"),
    "rule not a table list": ("rule = 5\n", "rule"),
    "unknown rule key": (rule_text(extra='priority = 1'), "priority"),
    "missing name": ('[[rule]]\n' + GOOD_THEN + "\n", "name"),
    "bad name": (rule_text(name="Bad Name"), "name"),
    "duplicate name": (rule_text() + rule_text(), "name"),
    "unknown condition": (rule_text(when="when.severity_at_least = 'high'"),
                          "when.severity_at_least"),
    "when not a table": (rule_text(when="when = 3"), "when"),
    "unknown severity": (rule_text(when="when.max_severity_at_least = 'severe'"),
                         "when.max_severity_at_least"),
    "bad technique": (rule_text(when="when.techniques_any = ['T105']"), "when.techniques_any"),
    "technique not a list": (rule_text(when="when.techniques_any = 'T1059'"),
                             "when.techniques_any"),
    "empty tactic list": (rule_text(when="when.tactics_any = []"), "when.tactics_any"),
    "bad tactic": (rule_text(when="when.tactics_any = ['TA06']"), "when.tactics_any"),
    "bad event type": (rule_text(when="when.event_types_any = ['a b']"), "when.event_types_any"),
    "count is a string": (rule_text(when="when.graph_nodes_at_least = '8'"),
                          "when.graph_nodes_at_least"),
    "count is a bool": (rule_text(when="when.findings_at_least = true"),
                        "when.findings_at_least"),
    "count negative": (rule_text(when="when.graph_edges_at_least = -1"),
                       "when.graph_edges_at_least"),
    "count is a float": (rule_text(when="when.repeat_per_target_at_least = 2.0"),
                         "when.repeat_per_target_at_least"),
    "seconds negative": (rule_text(when="when.seen_within_seconds = -5"),
                         "when.seen_within_seconds"),
    "missing then": (rule_text(then=""), "then"),
    "unknown then key": (rule_text(then=then_with(priority="1")), "then.priority"),
    "missing action": (rule_text(then=then_with(action="")), "then.action"),
    "unknown action": (rule_text(then=then_with(action='"block"')), "then.action"),
    "confidence above 1": (rule_text(then=then_with(confidence="1.5")), "then.confidence"),
    "confidence below 0": (rule_text(then=then_with(confidence="-0.1")), "then.confidence"),
    "confidence nan": (rule_text(then=then_with(confidence="nan")), "then.confidence"),
    "confidence a string": (rule_text(then=then_with(confidence='"0.5"')), "then.confidence"),
    "confidence a bool": (rule_text(then=then_with(confidence="true")), "then.confidence"),
    "ttl below 60": (rule_text(then=then_with(ttl_seconds="59")), "then.ttl_seconds"),
    "ttl above 86400": (rule_text(then=then_with(ttl_seconds="86401")), "then.ttl_seconds"),
    "ttl a float": (rule_text(then=then_with(ttl_seconds="600.0")), "then.ttl_seconds"),
    "missing control": (rule_text(then=then_with(control="")), "then.control"),
    "bad control": (rule_text(then=then_with(control='"Net Work"')), "then.control"),
    "empty rationale": (rule_text(then=then_with(rationale='""')), "then.rationale"),
    "multi-line rationale": (rule_text(then=then_with(rationale='"a\\nb"')), "then.rationale"),
}


FILE_LEVEL = {"unknown top-level key", "no rules", "rule not a table list"}
RULE_LABEL = {"missing name": "rule #1: ", "duplicate name": "rule #2 'bad-rule': ",
              "bad name": "rule #1 'Bad Name': "}


@pytest.mark.parametrize("row", REFUSAL_ROWS)
def test_load_rules_refuses(tmp_path: Path, row: str) -> None:
    text, key = REFUSAL_ROWS[row]
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    rest = message.removeprefix(f"{path}: ")
    if row not in FILE_LEVEL:  # the rule is named first, then the key
        label = RULE_LABEL.get(row, "rule #1 'bad-rule': ")
        assert rest.startswith(label)
        rest = rest.removeprefix(label)
    assert rest.startswith(key)


def test_load_rules_second_rule_is_numbered(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(rule_text(name="ok") + rule_text(then=then_with(ttl_seconds="5")))
    with pytest.raises(ConfigError, match=r"rule #2 'bad-rule': then\.ttl_seconds"):
        load_rules(path)


REFUSED_FILE_ROWS = {"missing": None, "not utf-8": b"\xff\xfe", "bad toml": b"[[rule]\n"}


@pytest.mark.parametrize("data", REFUSED_FILE_ROWS.values(), ids=REFUSED_FILE_ROWS)
def test_load_rules_refuses_file(tmp_path: Path, data: bytes | None) -> None:
    path = tmp_path / "rules.toml"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load_rules(path)


def test_default_rules_file_loads_and_ends_with_catch_all() -> None:
    assert len(DEFAULT_RULES) >= 3
    assert DEFAULT_RULES[-1].when == ()
    assert DEFAULT_RULES[0].then.action == "isolate"
    assert (DEFAULT_RULES_FILE).read_text().count("[[rule]]") == len(DEFAULT_RULES)
