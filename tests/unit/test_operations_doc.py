"""docs/OPERATIONS.md names every metric the gateway and the audit shipper expose, and no
metric that does not exist (issue 8, point 10). The names come from the code: the
exposition of a fresh ``gateway.http.metrics.Metrics`` (``# TYPE`` lines: every registered
family, labelled or not) and ``audit.shipper.Shipper.metrics_text``."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from audit.shipper import Shipper
from gateway.http.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "OPERATIONS.md"


def exposed(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) \S+$", text, re.MULTILINE))


def gateway_metrics() -> set[str]:
    return exposed(Metrics().render().decode())


def shipper_metrics() -> set[str]:
    return exposed(Shipper.metrics_text(SimpleNamespace(shipped_total=0, lag_events=0)))


def test_the_code_exposes_metrics():
    assert {"fedgate_requests_total", "fedgate_store_amnesia_total",
            "fedgate_build_info"} <= gateway_metrics()
    assert shipper_metrics() == {"fedgate_audit_shipped_total",
                                 "fedgate_audit_shipper_lag_events"}


@pytest.mark.parametrize("name", sorted(m for m in gateway_metrics() | shipper_metrics()
                                        if not m.startswith("process_")))
def test_every_metric_has_a_row(name):
    row = re.compile(rf"^\| `{re.escape(name)}` \|", re.MULTILINE)
    assert row.search(DOC.read_text(encoding="utf-8")), f"docs/OPERATIONS.md: no row for {name}"


def test_process_metrics_have_a_row():
    assert any(m.startswith("process_") for m in gateway_metrics())
    assert "| `process_*` |" in DOC.read_text(encoding="utf-8")


def test_every_metric_the_doc_names_exists():
    known = gateway_metrics() | shipper_metrics()
    named = set(re.findall(r"\b(fedgate_[a-z_]+)", DOC.read_text(encoding="utf-8")))
    stale = {n for n in named if n not in known
             and re.sub(r"_(bucket|count|sum)$", "", n) not in known}
    assert not stale, f"docs/OPERATIONS.md names metrics that do not exist: {sorted(stale)}"
