"""A realistic SpectraStrike campaign, run through a real EmitterClient.

Shared by ``fedgate demo`` and the e2e smoke (``tests/e2e/smoke.py``): several operators
and tenants, findings and execution graphs, one tampered request and one replayed
request (to show the gateway's rejections), then a feedback query per tenant that is
verified (§6) and applied, and a second query per tenant (possibly seconds later)
whose re-issued adjustments verify again and apply nothing twice.
Every step is checked; a surprise raises ``CampaignError`` naming the step.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.routes import TELEMETRY_PATH

from .client import EmitterClient

TENANT_1 = "10000000-0000-0000-0000-000000000001"
TENANT_2 = "20000000-0000-0000-0000-000000000002"
OPERATORS = {"op-001": TENANT_1, "op-002": TENANT_1, "op-003": TENANT_2}


class CampaignError(AssertionError):
    """A step of the campaign did not get the answer it must get."""


@dataclass
class Report:
    accepted: Counter = field(default_factory=Counter)  # by kind
    rejected: Counter = field(default_factory=Counter)  # by error code
    applied: list[dict[str, Any]] = field(default_factory=list)
    reapplied: int = 0
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": dict(self.accepted), "rejected": dict(self.rejected),
                "adjustments_applied": self.applied, "reapplied_on_second_query":
                self.reapplied, "steps": self.steps}


def _hex(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


@dataclass(frozen=True)
class Execution:
    operator: str
    name: str
    target: str
    graph_nodes: int
    events: tuple[tuple[str, str, str, str], ...]  # (event_type, severity, technique, tactic)

    @property
    def tenant(self) -> str:
        return OPERATORS[self.operator]

    @property
    def fingerprint(self) -> str:
        return _hex(f"execution:{self.name}")

    @property
    def attestation(self) -> str:
        return _hex(f"attestation:{self.name}")


EXECUTIONS = (
    Execution("op-001", "recon-and-exploit", "10.0.0.5", 9, (
        ("NMAP_SCAN_COMPLETED", "medium", "T1595", "TA0043"),
        ("METASPLOIT_EXPLOIT_COMPLETED", "high", "T1059.001", "TA0002"))),
    Execution("op-002", "credential-dump", "10.0.0.6", 3, (
        ("MIMIKATZ_LSASS_DUMP", "critical", "T1003.001", "TA0006"),)),
    Execution("op-003", "c2-beacon", "10.0.8.7", 2, (
        ("SLIVER_COMMAND_COMPLETED", "low", "T1105", "TA0011"),)),
)


def telemetry_body(ex: Execution, event: tuple[str, str, str, str], seq: int) -> dict[str, Any]:
    event_type, severity, technique, tactic = event
    return {
        "campaign_id": "cmp-demo", "execution_hash": ex.fingerprint,
        "operator_id": ex.operator, "tenant_id": ex.tenant,
        "signed_metadata": {"campaign_id": "cmp-demo", "operator_id": ex.operator,
                            "tenant_id": ex.tenant},
        "payload": {
            "event_id": str(uuid.uuid4()), "event_type": event_type,
            "source_system": "spectrastrike", "severity": severity,
            "observed_at": "2026-11-23T14:52:49.163896+00:00",
            "mitre_techniques": [technique], "mitre_tactics": [tactic],
            "description": f"SpectraStrike telemetry event {event_type.lower()} #{seq}",
            "attributes": {"attestation_measurement_hash": ex.attestation,
                           "execution_fingerprint": ex.fingerprint, "schema_version": "1.0",
                           "asset_ref": ex.target},
        },
    }


def graph_body(ex: Execution) -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "kind": "step"} for i in range(ex.graph_nodes)]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(ex.graph_nodes - 1)]
    return {"operator_id": ex.operator, "tenant_id": ex.tenant,
            "execution_fingerprint": ex.fingerprint, "schema_version": "execution.graph.v1",
            "attestation_measurement_hash": ex.attestation,
            "graph": {"nodes": nodes, "edges": edges,
                      "target_urn": f"urn:target:host:{ex.target}"}}


def _expect(report: Report, step: str, ok: bool, detail: str) -> None:
    if not ok:
        raise CampaignError(f"{step}: {detail}")
    report.steps.append(step)


async def run_campaign(client: EmitterClient, progress: Callable[[str], None] = lambda s: None
                       ) -> Report:
    report = Report()
    first_accepted = None
    # 1. findings and graphs from three operators in two tenants
    for ex in EXECUTIONS:
        for seq, event in enumerate(ex.events, 1):
            result = await client.send_telemetry(telemetry_body(ex, event, seq))
            _expect(report, f"telemetry {ex.name} #{seq} accepted", result.outcome == "accepted",
                    f"{result.outcome} {result.status} {result.error}")
            report.accepted["telemetry"] += 1
            first_accepted = first_accepted or result
            progress(f"telemetry {ex.name} #{seq}")
        result = await client.send_graph(graph_body(ex))
        _expect(report, f"graph {ex.name} accepted", result.outcome == "accepted",
                f"{result.outcome} {result.status} {result.error}")
        report.accepted["graph"] += 1
        progress(f"graph {ex.name}")
    # 2. a tampered request: one byte changed after signing -> 401 invalid_signature
    signed = client.sign(telemetry_body(EXECUTIONS[0], EXECUTIONS[0].events[0], 99))
    tampered = signed.body.replace(b"medium", b"low\x20\x20\x20", 1)
    status, payload, _ = await client.post_raw(TELEMETRY_PATH, signed.headers, tampered)
    _expect(report, "tampered request rejected", (status, (payload or {}).get("error")) ==
            (401, "invalid_signature"), f"got {status} {payload}")
    report.rejected["invalid_signature"] += 1
    progress("tampered request")
    # 3. a replayed request: the exact bytes of an accepted one -> 409 replayed_nonce
    item = client.outbox.get(first_accepted.outbox_id)
    status, payload, _ = await client.post_raw(item.path, item.headers, item.body)
    payload = payload or {}
    _expect(report, "replayed request rejected", status == 409 and payload.get("error") ==
            "replayed_nonce" and payload.get("duplicate_of") == first_accepted.request_id,
            f"got {status} {payload}")
    report.rejected["replayed_nonce"] += 1
    progress("replayed request")
    # 4. feedback per tenant: verified (§6) and applied; a second query applies nothing
    for operator in ("op-001", "op-003"):
        applied = await client.query_feedback(OPERATORS[operator], operator)
        _expect(report, f"feedback for {OPERATORS[operator]} verified and applied",
                bool(applied), "no adjustment applied")
        report.applied.extend(applied)
        progress(f"feedback {operator}")
    # The gateway re-issues the same adjustments, stamped with the time it answers: they
    # must verify again and none may apply twice, however many seconds have passed since
    # (an adjustment is the same while in force; only an expired one is refreshed).
    repeated = 0
    for operator in ("op-001", "op-003"):
        again = await client.query_feedback(OPERATORS[operator], operator)
        report.reapplied += len(again)
        repeated += len(client.last_feedback.adjustments)
    _expect(report, "second query applies nothing twice", repeated > 0 and
            report.reapplied == 0, f"{report.reapplied} of {repeated} re-issued "
            "adjustments applied again" if repeated else "the second answers were empty")
    _check_bindings(report)
    return report


def _check_bindings(report: Report) -> None:
    """Every applied adjustment carries the attestation hash the emitter sent."""
    sent = {ex.fingerprint: ex for ex in EXECUTIONS}
    for adj in report.applied:
        ex = sent.get(adj["execution_fingerprint"])
        _expect(report, f"adjustment {adj['action']} bound to {adj['execution_fingerprint'][:12]}",
                ex is not None and adj["attestation_measurement_hash"] == ex.attestation
                and adj["tenant_id"] == ex.tenant, f"unbound adjustment {adj}")
