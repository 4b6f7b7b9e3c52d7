"""Operator-facing behaviour of the real `fedgate` command (subprocesses, real files):
bootstrap's policy rules, the start-up warning without rules."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from stack import free_port

from gateway.policy import DEFAULT_RULES_FILE

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def fedgate(*args: str, cwd: Path = ROOT, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd,
                          env=env or ENV, capture_output=True, text=True, timeout=120)


def test_bootstrap_copies_the_default_rules_beside_the_config_and_keeps_an_edited_copy(
        tmp_path):
    first = fedgate("bootstrap", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    text = (tmp_path / "a" / "gateway.toml").read_text()
    assert '[policy]\nrules = "policy/rules.toml"\n' in text
    assert str(ROOT) not in text.split("[policy]", 1)[1].split("\n\n", 1)[0]
    assert (tmp_path / "a/policy/rules.toml").read_bytes() == DEFAULT_RULES_FILE.read_bytes()

    edited = tmp_path / "b" / "policy" / "rules.toml"  # an operator's own rules, kept
    edited.parent.mkdir(parents=True)
    edited.write_text('[[rule]]\nname = "mine"\n[rule.then]\naction = "observe"\n'
                      'control = "c"\nttl_s = 60\n')
    before = edited.read_bytes()
    assert fedgate("bootstrap", str(tmp_path / "b")).returncode == 0
    assert edited.read_bytes() == before


def test_serve_without_rules_warns_once_at_start_up(tmp_path):
    state = tmp_path / "fed"
    assert fedgate("bootstrap", str(state), "--port", str(free_port())).returncode == 0
    cfg = state / "gateway.toml"
    text = cfg.read_text()
    cfg.write_text(re.sub(r"\[policy\]\nrules = .*\n", "", text))
    assert "[policy]" not in cfg.read_text()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config",
                                 str(cfg), "--workers", "2"], cwd=ROOT, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while fedgate("probe", "--config", str(state / "emitter.toml")).returncode != 0:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    warnings = [line for line in log_path.read_text().splitlines() if "warning" in line]
    assert warnings == [f"fedgate: warning: {cfg}: no [policy] rules configured: every "
                        "feedback answer will carry no adjustments"]
