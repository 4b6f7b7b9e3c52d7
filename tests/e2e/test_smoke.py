"""The e2e smoke against real running stacks: `fedgate serve` processes on SQLite and on
Redis, configured by `fedgate bootstrap`; and `fedgate demo` end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def fedgate(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120, **kw)


def wait_ready(config: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()}")
        if fedgate("probe", "--config", str(config)).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError("gateway not ready")


@pytest.fixture
def running_stack(tmp_path, store_url):
    from stack import free_port
    root = tmp_path / "state"
    result = fedgate("bootstrap", str(root), "--store-url", store_url,
                     "--port", str(free_port()))
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "serve.log").open("ab")  # a pipe nobody reads could stall it
    proc = subprocess.Popen([sys.executable, "-m", "fedgate.cli", "serve", "--config",
                             str(root / "gateway.toml"), "--workers", "2"], cwd=ROOT, env=ENV,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        wait_ready(root / "emitter.toml", proc, tmp_path / "serve.log")
        yield root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def test_smoke_against_running_stack(running_stack, tmp_path):
    out = ROOT / "local_docs" / "audit"
    result = subprocess.run(
        [sys.executable, "tests/e2e/smoke.py", "--emitter-config",
         str(running_stack / "emitter.toml"), "--gateway-audit",
         str(running_stack / "audit" / "gateway-audit.jsonl"), "--out", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1].split("outputs in ", 1)[1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accepted"] == {"telemetry": 4, "graph": 3}
    assert summary["rejected"] == {"invalid_signature": 1, "replayed_nonce": 1}
    assert {a["action"] for a in summary["adjustments_applied"]} == {"tighten", "isolate",
                                                                     "observe"}
    assert summary["reapplied_on_second_query"] == 0
    assert all(chain["ok"] for chain in summary["audit_chains"].values())
    assert set(summary["audit_chains"]) == {"gateway-audit.jsonl", "emitter-audit.jsonl"}


def test_demo_end_to_end(tmp_path):
    result = fedgate("demo", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "# fedgate run summary" in result.stdout
    assert "invalid_signature: 1" in result.stdout and "replayed_nonce: 1" in result.stdout
    (run_dir,) = (tmp_path / "out").iterdir()
    assert {p.name for p in run_dir.iterdir()} == {
        "gateway-audit.jsonl", "emitter-audit.jsonl", "summary.json", "summary.md"}
    assert fedgate("audit", "verify", str(run_dir / "gateway-audit.jsonl")).returncode == 0
