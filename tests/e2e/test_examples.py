"""`examples/events.jsonl` is accepted by a freshly bootstrapped gateway, through the
real CLI exactly as docs/OPERATIONS.md tells a new operator to run it: `fedgate
bootstrap DIR`, `fedgate serve --config DIR/gateway.toml`, `fedgate emit --config
DIR/emitter.toml examples/events.jsonl` (issue 8, point 10)."""

from __future__ import annotations

import json

from stack import free_port
from test_cli_edges import ROOT, fedgate, serving
from test_emit_files import finding_events

from fedgate.bootstrap import TENANTS

EVENTS = ROOT / "examples" / "events.jsonl"


def test_the_example_events_use_the_operators_and_tenants_bootstrap_configures():
    events = [json.loads(line) for line in EVENTS.read_text().splitlines()]
    assert len(events) >= 3
    for event in events:
        assert TENANTS[event["operator_id"]] == event["tenant_id"]
        assert event["signed_metadata"]["operator_id"] == event["operator_id"]
        assert event["signed_metadata"]["tenant_id"] == event["tenant_id"]
    assert len({e["payload"]["event_id"] for e in events}) == len(events)


def test_the_example_events_are_accepted_by_a_bootstrapped_gateway(tmp_path):
    root = tmp_path / "fed"
    boot = fedgate("bootstrap", str(root), "--port", str(free_port()))
    assert boot.returncode == 0, boot.stderr
    events = [json.loads(line) for line in EVENTS.read_text().splitlines()]
    with serving(root):
        sent = fedgate("emit", "--config", str(root / "emitter.toml"), "examples/events.jsonl")
    assert sent.returncode == 0, sent.stderr
    lines = sent.stdout.splitlines()
    assert len(lines) == len(events) and all(line.startswith("accepted ") for line in lines)
    assert sent.stderr.splitlines()[-1] == f"fedgate: sent {len(events)} of {len(events)}"
    assert sorted(finding_events(root)) == sorted(e["payload"]["event_id"] for e in events)
