"""Signed audit checkpoints from the real gateway (issue 10): `fedgate serve --workers 2`
appending to one file, the count and time triggers, `fedgate audit rotate` while it runs,
`fedgate audit verify` over the result. Real Ed25519 keys, real processes; the waits
below are deadlines for polling, not performance assertions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack import ROOT, Stack
from test_workers import poll, send

from keyring.ed25519 import PrivateKey
from keyring.keys import Key, Keyring, save_jwks

AUDIT_KEY = PrivateKey(bytes([42]) * 32)
KID = "fedgate-audit-2026"


class CheckpointStack(Stack):
    EVERY_EVENTS, EVERY_S = 5, 3600

    def write_config(self, **security) -> None:
        super().write_config(**security)
        key = self.root / "keys" / "audit.pem"
        key.write_bytes(AUDIT_KEY.to_pem())
        save_jwks(self.root / "keys" / "audit.jwks.json", Keyring([Key(KID, AUDIT_KEY.public)]))
        text = self.config_path.read_text().replace("[audit]\n", (
            f'[audit]\ncheckpoint_key = "keys/audit.pem"\ncheckpoint_kid = "{KID}"\n'
            f"checkpoint_every_events = {self.EVERY_EVENTS}\n"
            f"checkpoint_every_s = {self.EVERY_S}\n"))
        self.config_path.write_text(text)


class TimedStack(CheckpointStack):
    EVERY_EVENTS, EVERY_S = 1_000_000, 0.4


def fedgate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def events(path: Path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_bytes().splitlines()]


def checkpoints(lines: list[dict]) -> list[tuple[int, dict]]:
    return [(i, e) for i, e in enumerate(lines) if e["event.action"] == "audit.checkpoint"]


def assert_one_per_trigger(lines: list[dict]) -> None:
    """Every checkpoint signs the line just before it, and no head is signed twice."""
    signed = [e["checkpoint.sequence"] for _, e in checkpoints(lines)]
    assert len(signed) == len(set(signed)), signed
    for i, cp in checkpoints(lines):
        assert lines[i - 1]["event.action"] not in ("audit.checkpoint", "audit.rotated")
        assert (cp["checkpoint.sequence"], cp["checkpoint.hash"]) == (
            lines[i - 1]["event.sequence"], lines[i - 1]["hash"])


@pytest.fixture
def stack(tmp_path, sqlite_url):
    st = CheckpointStack(tmp_path, sqlite_url)
    yield st
    st.kill_all(signal.SIGKILL)


@pytest.fixture
def timed(tmp_path, sqlite_url):
    st = TimedStack(tmp_path, sqlite_url)
    yield st
    st.kill_all(signal.SIGKILL)


async def test_two_workers_write_one_checkpoint_every_n_events_and_follow_rotation(stack):
    stack.spawn("--workers", "2")
    await stack.wait_ready()
    await send(stack, 23)
    lines = events(stack.audit_path)
    assert_one_per_trigger(lines)
    signed = [e["checkpoint.sequence"] for _, e in checkpoints(lines)]
    multiples = [e["event.sequence"] for e in lines
                 if e["event.sequence"] % 5 == 0 and e["event.action"] != "audit.checkpoint"]
    assert signed == multiples and len(signed) >= 4  # exactly one per 5-event boundary
    keys = str(stack.root / "keys" / "audit.jwks.json")

    old = stack.root / "audit" / "old.jsonl"
    rotated = fedgate("audit", "rotate", "--config", str(stack.config_path), "--to", str(old))
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith(f"{stack.audit_path}: rotated to {old} (ends with a ")
    await send(stack, 6)  # both workers now append to the new file
    new = events(stack.audit_path)
    assert new[0]["event.action"] == "audit.rotated"
    assert new[0]["prev_hash"] == events(old)[-1]["hash"]
    assert [e["event.sequence"] for e in new] == list(
        range(events(old)[-1]["event.sequence"] + 1, new[-1]["event.sequence"] + 1))
    assert_one_per_trigger(new)
    assert events(old)[-1]["event.action"] == "audit.checkpoint"  # the old file ends signed

    both = fedgate("audit", "verify", str(old), str(stack.audit_path), "--checkpoint-key", keys)
    assert both.returncode == 0, both.stderr
    assert f"intact: {len(lines) + 1 + len(new)} lines" in both.stdout
    assert "covered by checkpoint at sequence" in both.stdout and f"kid {KID}" in both.stdout
    alone = fedgate("audit", "verify", str(stack.audit_path), "--checkpoint-key", keys)
    assert alone.returncode == 0, alone.stderr
    assert f"(chain starts at sequence {new[0]['event.sequence']}, after hash " in alone.stdout


async def test_the_time_trigger_signs_an_idle_head_once_across_two_workers(timed):
    timed.spawn("--workers", "2")
    await timed.wait_ready()
    for _ in range(3):
        await send(timed, 3)
        # the last event (a tick may already have signed it: then the head line is the
        # checkpoint itself, whose own sequence no checkpoint ever signs)
        head = [e for e in events(timed.audit_path)
                if e["event.action"] != "audit.checkpoint"][-1]["event.sequence"]
        assert poll(lambda head=head: any(e["checkpoint.sequence"] >= head
                                          for _, e in checkpoints(events(timed.audit_path)))), head
        time.sleep(1.0)  # several more ticks of both workers: the head is already signed
        lines = events(timed.audit_path)
        assert lines[-1]["event.action"] == "audit.checkpoint"
        assert_one_per_trigger(lines)
    keys = str(timed.root / "keys" / "audit.jwks.json")
    result = fedgate("audit", "verify", str(timed.audit_path), "--checkpoint-key", keys)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("; 0 events after it unsigned\n")
