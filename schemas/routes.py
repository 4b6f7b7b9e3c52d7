"""The signed routes of PROTOCOL.md §5 as data (path, schema, what each stores) and the
form of an identity name (§2, §8): the protocol constants both sides speak."""

from __future__ import annotations

import re
from dataclasses import dataclass

IDENTITY_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a client identity's name

TELEMETRY_PATH = "/internal/v1/telemetry"
GRAPH_PATH = "/internal/v1/cognitive/execution-graph"
QUERY_PATH = "/internal/v1/cognitive/feedback/adjustments/query"
#: [v1.1] many telemetry events, each signed alone (PROTOCOL.md §5); not a SIGNED_ROUTE:
#: its envelope is not signed, its items run the TELEMETRY route one by one
BATCH_PATH = "/internal/v1/telemetry/batch"

GRAPH_SCHEMA_VERSION = "execution.graph.v1"
FINDING_SCHEMA_VERSION = "finding.record.v1"


@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # "telemetry" | "graph" | "query"; also the audit event prefix
    path: str
    schema: str  # name in schemas.validate.SCHEMA_NAMES
    record_kind: str  # Record.kind in the store (a query stores the feedback it was given)
    anchors: bool  # takes part in attestation anchoring (§5)


TELEMETRY = Route("telemetry", TELEMETRY_PATH, "telemetry", "finding", anchors=True)
GRAPH = Route("graph", GRAPH_PATH, "execution_graph", "graph", anchors=True)
QUERY = Route("query", QUERY_PATH, "feedback_query", "feedback", anchors=False)

SIGNED_ROUTES: dict[str, Route] = {r.path: r for r in (TELEMETRY, GRAPH, QUERY)}
