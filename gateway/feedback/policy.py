"""The rule-driven policy engine (PROTOCOL.md §5): findings and graphs → adjustments.

Pure functions; ``load_rules`` is the only I/O. The rules come from a TOML file checked
at start-up (every defect is one ``ConfigError`` line naming the rule and key). Per
execution the facts are gathered (:mod:`gateway.feedback.facts`) and the rules are tried in
file order: the FIRST rule whose conditions all hold decides (:func:`evaluate`).
**[hardening]** An execution without an anchored attestation hash gets no adjustment;
the hash in an adjustment is always the anchored one, never invented. See docs/POLICY.md.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.tomlfile import ConfigError

from .facts import SEVERITIES, SEVERITY_RANK, ExecutionFacts

ACTIONS = ("observe", "tighten", "isolate")  # weakest first
ADJUSTMENT_SCHEMA_VERSION = "feedback.adjustment.v1"
# The default rules ship inside the package (package data); `fedgate bootstrap` copies them.
DEFAULT_RULES_FILE = Path(__file__).resolve().parent / "policy_rules" / "default.toml"
ACTION_RANK = {a: i for i, a in enumerate(ACTIONS)}

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_CONTROL_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_TECHNIQUE_RE = re.compile(r"T\d{4}(\.\d{3})?")
_TACTIC_RE = re.compile(r"TA\d{4}")
_EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RULE_KEYS = frozenset({"name", "when", "then"})
_THEN_KEYS = ("action", "confidence", "control", "ttl_seconds", "rationale")
_MAX_COUNT = 10**6


@dataclass(frozen=True, slots=True)
class Then:
    action: str
    confidence: float
    control: str
    ttl_seconds: int
    rationale: str


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: tuple[tuple[str, Any], ...]  # (condition name, checked value), file order
    then: Then


class _Bad(ValueError):
    """A defect in one rule: ``key`` is its dotted name inside the rule."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


# -- conditions: name → (check the TOML value, test the facts) ------------------------------

def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise ValueError(f"must be an integer in [0, {_MAX_COUNT}]")
    return value


def _severity(value: Any) -> str:
    if value not in SEVERITY_RANK:
        raise ValueError(f"must be one of {', '.join(SEVERITIES)}")
    return value


def _ids(pattern: re.Pattern[str], what: str) -> Callable[[Any], frozenset[str]]:
    def check(value: Any) -> frozenset[str]:
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and pattern.fullmatch(v) for v in value)):
            raise ValueError(f"must be a non-empty list of {what}")
        return frozenset(value)
    return check


def _at_least(attr: str) -> Callable[[ExecutionFacts, int, int], bool]:
    return lambda f, v, now: getattr(f, attr) >= v


def _technique_any(f: ExecutionFacts, wanted: frozenset[str], now: int) -> bool:
    """``T1059`` matches ``T1059`` and its sub-techniques ``T1059.001``…"""
    return any(t in wanted or t.split(".", 1)[0] in wanted for t in f.techniques)


CONDITIONS: dict[str, tuple[Callable[[Any], Any], Callable[[ExecutionFacts, Any, int], bool]]] = {
    "max_severity_at_least": (_severity, lambda f, v, now: f.max_severity is not None
                              and SEVERITY_RANK[f.max_severity] >= SEVERITY_RANK[v]),
    "techniques_any": (_ids(_TECHNIQUE_RE, "technique ids like T1059 or T1059.001"),
                       _technique_any),
    "tactics_any": (_ids(_TACTIC_RE, "tactic ids like TA0006"),
                    lambda f, v, now: not f.tactics.isdisjoint(v)),
    "event_types_any": (_ids(_EVENT_TYPE_RE, "event types ([A-Za-z0-9._:-]{1,128})"),
                        lambda f, v, now: not f.event_types.isdisjoint(v)),
    "graph_nodes_at_least": (_count, _at_least("graph_nodes")),
    "graph_edges_at_least": (_count, _at_least("graph_edges")),
    "findings_at_least": (_count, _at_least("findings")),
    "repeat_per_target_at_least": (_count, _at_least("repeat_per_target")),
    "seen_within_seconds": (_count, lambda f, v, now: f.latest_timestamp is not None
                            and now - f.latest_timestamp <= v),
}


# -- loading ------------------------------------------------------------------------------

def load_rules(path: str | Path) -> tuple[Rule, ...]:
    """Read and check a rules file; ``ConfigError`` (one line) on any defect."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        doc = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_rules(doc, where=f"{path}: ")


def parse_rules(doc: Mapping[str, Any], *, where: str = "") -> tuple[Rule, ...]:
    """Rules from a parsed TOML document (``[[rule]]`` tables, nothing else)."""
    unknown = sorted(set(doc) - {"rule"})
    if unknown:
        raise ConfigError(f"{where}unknown key {unknown[0]!r}")
    tables = doc.get("rule")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{where}rule: at least one [[rule]] table is required")
    rules: list[Rule] = []
    for index, table in enumerate(tables, start=1):
        name = table.get("name") if isinstance(table, dict) else None
        label = f"rule #{index} {name!r}" if isinstance(name, str) else f"rule #{index}"
        try:
            rule = _rule(table)
            if any(r.name == rule.name for r in rules):
                raise _Bad("name", "duplicate rule name")
        except _Bad as exc:
            raise ConfigError(f"{where}{label}: {exc}") from None
        rules.append(rule)
    return tuple(rules)


def _rule(table: Any) -> Rule:
    if not isinstance(table, dict):
        raise _Bad("rule", "must be a table")
    _no_unknown(table, _RULE_KEYS, "")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _Bad("name", "must be a string matching [a-z0-9][a-z0-9._-]{0,63}")
    return Rule(name, _when(table.get("when", {})), _then(table.get("then")))


def _no_unknown(table: Mapping[str, Any], allowed: Iterable[str], prefix: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _Bad(prefix + unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _when(table: Any) -> tuple[tuple[str, Any], ...]:
    if not isinstance(table, dict):
        raise _Bad("when", "must be a table of conditions ({} = always)")
    _no_unknown(table, CONDITIONS, "when.")
    out = []
    for name, raw in table.items():
        try:
            out.append((name, CONDITIONS[name][0](raw)))
        except ValueError as exc:
            raise _Bad(f"when.{name}", f"{exc}, got {_short(raw)}") from None
    return tuple(out)


def _then(table: Any) -> Then:
    if not isinstance(table, dict):
        raise _Bad("then", "is required: a table with " + ", ".join(_THEN_KEYS))
    _no_unknown(table, _THEN_KEYS, "then.")
    missing = [k for k in _THEN_KEYS if k not in table]
    if missing:
        raise _Bad(f"then.{missing[0]}", "is required")
    a, c, ctl, ttl, why = (table[k] for k in _THEN_KEYS)
    _need(a in ACTION_RANK, "then.action", f"must be one of {', '.join(ACTIONS)}", a)
    _need(type(c) in (int, float) and 0 <= c <= 1, "then.confidence",
          "must be a number in [0, 1]", c)
    _need(isinstance(ctl, str) and bool(_CONTROL_RE.fullmatch(ctl)), "then.control",
          "must be a string matching [a-z][a-z0-9_-]{0,63}", ctl)
    _need(type(ttl) is int and 60 <= ttl <= 86400, "then.ttl_seconds",
          "must be an integer in [60, 86400]", ttl)
    _need(isinstance(why, str) and 0 < len(why) <= 256 and why.isprintable(),
          "then.rationale", "must be one printable line of 1-256 characters", why)
    return Then(a, float(c), ctl, ttl, why)


def _need(ok: bool, key: str, problem: str, value: Any) -> None:
    if not ok:
        raise _Bad(key, f"{problem}, got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- evaluation ---------------------------------------------------------------------------

def first_match(rules: Iterable[Rule], facts: ExecutionFacts, now: int) -> Rule | None:
    """The first rule (file order) whose conditions all hold; ``when = {}`` always holds."""
    for rule in rules:
        if all(CONDITIONS[name][1](facts, value, now) for name, value in rule.when):
            return rule
    return None


def evaluate(rules: Iterable[Rule], facts: ExecutionFacts, now: int) -> dict[str, Any] | None:
    """The adjustment (PROTOCOL §5 members exactly) for one execution, or None."""
    if not facts.attestation_hash:  # [hardening] never invent an attestation hash
        return None
    rule = first_match(rules, facts, now)
    if rule is None:
        return None
    return adjustment(rule, facts.tenant_id, facts.execution_fingerprint, facts.target_urn,
                      facts.attestation_hash, now)


def adjustment(rule: Rule, tenant_id: str, execution_fingerprint: str, target_urn: str,
               attestation_hash: str, now: int) -> dict[str, Any]:
    """What ``rule`` answers for one execution: the §5 members, in this order."""
    t = rule.then
    return {
        "tenant_id": tenant_id, "execution_fingerprint": execution_fingerprint,
        "target_urn": target_urn, "action": t.action, "confidence": t.confidence,
        "rationale": t.rationale, "control": t.control, "ttl_seconds": t.ttl_seconds,
        "timestamp": now, "schema_version": ADJUSTMENT_SCHEMA_VERSION,
        "attestation_measurement_hash": attestation_hash,
    }
