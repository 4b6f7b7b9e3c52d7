"""What the policy rules may look at: one ``ExecutionFacts`` per anchored execution,
gathered from checked stored records (:mod:`gateway.feedback.evidence`). Pure functions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .evidence import Evidence

SEVERITIES = ("info", "low", "medium", "high", "critical")  # weakest first
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
UNKNOWN_TARGET = "urn:target:unknown"


@dataclass(frozen=True, slots=True)
class ExecutionFacts:
    """What the rules may look at for one ``(tenant, execution_fingerprint)``."""

    tenant_id: str
    execution_fingerprint: str
    attestation_hash: str | None  # the ANCHORED hash (store.get_anchor); None: no anchor
    target_urn: str = UNKNOWN_TARGET
    max_severity: str | None = None  # None: no finding
    techniques: frozenset[str] = frozenset()
    tactics: frozenset[str] = frozenset()
    event_types: frozenset[str] = frozenset()
    graph_nodes: int = 0
    graph_edges: int = 0
    findings: int = 0
    repeat_per_target: int = 0
    latest_timestamp: int | None = None  # latest received_at (gateway clock)



def facts_from_records(
    tenant_id: str, findings: Iterable[Evidence], graphs: Iterable[Evidence],
    anchors: Mapping[str, str],
) -> list[ExecutionFacts]:
    """Facts per execution (sorted by fingerprint), from checked records oldest first.

    Only executions with an anchor count, and only their records made under the
    anchored attestation hash; records of another tenant are ignored. Which records are
    the querying identity's own is the caller's choice (:mod:`gateway.feedback.issuer`).
    """
    groups: dict[str, tuple[list[Evidence], list[Evidence]]] = {}
    for is_graph, records in ((0, findings), (1, graphs)):
        for record in records:
            fp = record.execution_fingerprint
            anchor = anchors.get(fp)
            if (record.tenant_id != tenant_id or not anchor
                    or record.attestation_hash != anchor.lower()):
                continue
            groups.setdefault(fp, ([], []))[is_graph].append(record)
    return [_facts(tenant_id, fp, anchors[fp], *groups[fp]) for fp in sorted(groups)]


def _facts(tenant_id: str, fp: str, anchor: str, findings: list[Evidence],
           graphs: list[Evidence]) -> ExecutionFacts:
    payloads = [_dict(r.body.get("payload")) for r in findings]
    graph = _dict(graphs[-1].body.get("graph")) if graphs else {}
    graph_target = _text(graph.get("target_urn"))
    own = [_finding_target(p) for p in payloads]
    named = Counter(t for t in own if t)
    target = graph_target or (named.most_common(1)[0][0] if named else UNKNOWN_TARGET)
    severities = [p["severity"] for p in payloads if p.get("severity") in SEVERITY_RANK]
    times = [r.received_at for r in (*findings, *graphs)]
    return ExecutionFacts(
        tenant_id=tenant_id, execution_fingerprint=fp, attestation_hash=anchor,
        target_urn=target,
        max_severity=max(severities, key=SEVERITY_RANK.__getitem__, default=None),
        techniques=_union(p.get("mitre_techniques") for p in payloads),
        tactics=_union(p.get("mitre_tactics") for p in payloads),
        event_types=frozenset(t for p in payloads if (t := _text(p.get("event_type")))),
        graph_nodes=_length(graph.get("nodes")), graph_edges=_length(graph.get("edges")),
        findings=len(findings),
        repeat_per_target=max(Counter(t or target for t in own).values(), default=0),
        latest_timestamp=max(times, default=None),
    )


def _finding_target(payload: Mapping[str, Any]) -> str | None:
    attributes = _dict(payload.get("attributes"))
    for key in ("asset_ref", "target"):
        if value := _text(attributes.get(key)):
            return value if value.startswith("urn:") else f"urn:target:{value}"
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _length(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _union(lists: Iterable[Any]) -> frozenset[str]:
    return frozenset(v for items in lists if isinstance(items, list)
                     for v in items if isinstance(v, str))
