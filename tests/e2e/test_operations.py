"""Operator-facing behaviour of the real `fedgate` command (subprocesses, real files):
bootstrap's policy rules, the start-up warning without rules, --version, and a missing
command or action."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from stack import free_port

from gateway.feedback.policy import DEFAULT_RULES_FILE

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def fedgate(*args: str, cwd: Path = ROOT, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], cwd=cwd,
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
        proc = subprocess.Popen([sys.executable, "-m", "fedgate.cli", "serve", "--config",
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
    # console format: "<timestamp> <level> <logger>: …"; a probe that gave up mid-handshake
    # on a busy machine is logged by fedgate.tls (the probe loop's doing, not the config's)
    warnings = [line.split(" ", 1)[1] for line in log_path.read_text().splitlines()
                if " warning " in line and " warning fedgate.tls: " not in line]
    assert warnings == [f"warning fedgate.server: {cfg}: no [policy] rules configured: every "
                        "feedback answer will carry no adjustments"]


# -- fedgate --version; a missing command or action ---------------------------------------

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_version_is_the_package_version():
    result = fedgate("--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"fedgate {PROJECT['version']}\n", "")


def test_version_falls_back_to_the_checkout_when_the_distribution_is_not_installed():
    from fedgate.cli import package_version

    assert package_version("fedgate-not-installed") == PROJECT["version"]


@pytest.mark.parametrize(("args", "line"), [
    ((), "fedgate: error: missing command (one of: serve, certs, keys, audit, bootstrap, "
         "probe, selftest, demo, emit, outbox, feedback)"),
    (("certs",), "fedgate certs: error: missing action (one of: init, issue)"),
    (("keys",), "fedgate keys: error: missing action (one of: new, revoke, revoked)"),
    (("audit",), "fedgate audit: error: missing action (one of: verify, ship, rotate)"),
])
def test_a_missing_command_or_action_is_one_line_plus_usage_exit_2(tmp_path, args, line):
    result = fedgate(*args, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    usage, error = result.stderr.splitlines()[0], result.stderr.splitlines()[-1]
    assert usage.startswith(f"usage: {' '.join(('fedgate', *args))} ")
    assert error == line
    assert "Traceback" not in result.stderr
