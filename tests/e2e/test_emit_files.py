"""`fedgate emit` and `fedgate outbox` with real files (issue 8, point 9): the real CLI as
a subprocess against a real `fedgate serve` (bootstrapped federation, real mTLS, real
SQLite store). Each test failed on the code before (023d59a)."""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack import free_port
from test_cli_edges import ENV, ROOT, fedgate, serving, with_changes

from emitter.campaign import EXECUTIONS, telemetry_body
from emitter.outbox import Outbox
from emitter.settings import load_emitter_settings
from emitter.signing import new_nonce, sign_request
from keyring.ed25519 import PrivateKey
from schemas.routes import TELEMETRY_PATH

EX = EXECUTIONS[0]


@pytest.fixture
def fed(tmp_path):
    """A bootstrapped federation with its `fedgate serve` running (SQLite store)."""
    root = tmp_path / "fed"
    result = fedgate("bootstrap", str(root), "--port", str(free_port()))
    assert result.returncode == 0, result.stderr
    with serving(root):
        yield root


def body(seq: int, **attributes) -> dict:
    out = telemetry_body(EX, EX.events[0], seq)
    out["payload"]["attributes"].update(attributes)
    return out


def foreign(seq: int, **attributes) -> dict:
    """Valid for the schema, but op-003 belongs to another tenant: 403 mapping_violation."""
    out = body(seq, **attributes)
    out["operator_id"] = out["signed_metadata"]["operator_id"] = "op-003"
    return out


def jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def emit(fed: Path, *args: str, config: Path | None = None, input: str | None = None):
    return fedgate("emit", "--config", str(config or fed / "emitter.toml"), *args,
                   input=input)


def outbox(fed: Path, action: str, *args: str, config: Path | None = None):
    return fedgate("outbox", action, "--config", str(config or fed / "emitter.toml"), *args)


def finding_events(fed: Path) -> list[str]:
    """payload.event_id of every finding the gateway stored."""
    with sqlite3.connect(fed / "state" / "fedgate.db") as db:
        rows = db.execute("SELECT data FROM records WHERE kind = 'finding'").fetchall()
    bodies = [json.loads(base64.b64decode(json.loads(row[0])["body_b64"])) for row in rows]
    return [b["payload"]["event_id"] for b in bodies]


def audited(fed: Path) -> list[dict]:
    path = fed / "audit" / "gateway-audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def status(fed: Path, config: Path | None = None) -> dict[str, tuple[int, int]]:
    result = outbox(fed, "status", config=config)
    assert result.returncode == 0, result.stderr
    out = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[2] == "row(s)":
            out[parts[0]] = (int(parts[1]), int(parts[3]))
    return out


# -- rejections carry the gateway's pointer and message ----------------------------------

def test_rejection_lines_carry_the_pointer_and_the_message(fed):
    result = emit(fed, input=json.dumps(foreign(1)))
    assert result.returncode == 1
    assert result.stdout == ("rejected 403 mapping_violation: the operator is not mapped to "
                             "this tenant\n")
    # a schema-invalid body queued by an earlier emitter (emit checks before queueing now)
    settings = load_emitter_settings(fed / "emitter.toml")
    bad = body(2)
    bad["payload"]["severity"] = "catastrophic"
    signed = sign_request(PrivateKey.load(settings.signing_key), bad,
                          identity=settings.identity, kid=settings.kid,
                          timestamp=int(time.time()), nonce=new_nonce())
    box = Outbox(settings.state_dir / "outbox.db")
    box.enqueue(signed, TELEMETRY_PATH)
    box.close()
    flushed = outbox(fed, "flush")
    assert flushed.returncode == 1, flushed.stderr
    assert flushed.stdout == ("rejected 422 schema_violation at /payload/severity: the body "
                              "does not match the telemetry schema\n")


# -- everything is checked before anything is sent -----------------------------------------

def test_invalid_items_are_all_named_and_nothing_is_sent(fed, tmp_path):
    bad_severity, no_description = body(2), body(4)
    bad_severity["payload"]["severity"] = "catastrophic"
    del no_description["payload"]["description"]
    data = jsonl(tmp_path / "mixed.jsonl", [body(1), bad_severity, body(3), no_description])
    result = emit(fed, str(data))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        'fedgate: emit: line 2: schema_violation at /payload/severity: value is not one of '
        '"info", "low" or 3 other candidates',
        'fedgate: emit: line 4: schema_violation at /payload: "description" is a required '
        'property',
        "fedgate: error: 2 of 4 item(s) invalid; nothing sent (fix them, or --skip-invalid to "
        "send the valid ones)"]
    assert finding_events(fed) == [] and audited(fed) == []
    assert status(fed)["pending"] == (0, 0)
    # --skip-invalid: the valid ones go, the invalid ones are named, exit 1
    skipped = emit(fed, "--skip-invalid", str(data))
    assert skipped.returncode == 1, skipped.stderr
    assert [line.split()[0] for line in skipped.stdout.splitlines()] == ["accepted"] * 2
    assert "fedgate: emit: skipped 2 invalid item(s) of 4 (--skip-invalid)" in skipped.stderr
    assert sorted(finding_events(fed)) == sorted(b["payload"]["event_id"]
                                                 for b in (json.loads(x) for x in
                                                           data.read_text().splitlines()[::2]))


def test_an_item_over_max_body_bytes_is_refused_locally(fed, tmp_path):
    data = jsonl(tmp_path / "big.jsonl", [body(1), body(2, blob="x" * (1024 * 1024))])
    result = emit(fed, str(data))
    assert result.returncode == 2 and result.stdout == ""
    line = result.stderr.splitlines()[0]
    assert line.startswith("fedgate: emit: line 2: body_too_large: ")
    assert line.endswith(" bytes signed, max_body_bytes is 1048576")
    assert finding_events(fed) == [] and audited(fed) == []  # not even the 413 happened
    smaller = with_changes(fed / "emitter.toml", "small.toml", max_body_bytes=4096)
    refused = emit(fed, config=smaller, input=json.dumps(body(3, blob="y" * 5000)))
    assert refused.returncode == 2
    assert "line 1: body_too_large: " in refused.stderr and "max_body_bytes is 4096" in \
        refused.stderr


@pytest.mark.parametrize("text", ["", "\n\n  \n", "[]", " [ ]\n"])
def test_an_empty_input_says_nothing_to_send(fed, text):
    result = emit(fed, input=text)
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == "fedgate: emit: nothing to send (empty input)\n"


# -- queued durably first; Ctrl-C; a re-run sends no duplicate -------------------------------

def test_ctrl_c_leaves_the_rest_queued_and_a_rerun_sends_no_duplicate(fed, tmp_path):
    items = [body(n) for n in range(200)]
    data = jsonl(tmp_path / "campaign.jsonl", items)
    # --batch 2: many small requests, so Ctrl-C lands while most are still to go (with the
    # default 100 the run is two requests, and the second may be done before the signal)
    proc = subprocess.Popen([sys.executable, "-m", "fedgate.cli", "emit", "--batch", "2",
                             "--config", str(fed / "emitter.toml"), str(data)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    # unbuffered: readline takes no more than its line (a batch's lines come at once,
    # and communicate() would not see what a buffered reader had taken ahead)
    first = [proc.stdout.readline().decode() for _ in range(3)]  # sending has started
    proc.send_signal(signal.SIGINT)
    out, err = (part.decode() for part in proc.communicate(timeout=120))
    lines = first + out.splitlines(keepends=True)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    sent = len(lines)
    assert all(line.startswith("accepted ") for line in lines)
    assert 3 <= sent < 200
    assert len(finding_events(fed)) == sent
    # the same file again: nothing queued twice, only the rest is sent
    again = emit(fed, str(data))
    assert again.returncode == 0, again.stderr
    assert sorted(finding_events(fed)) == sorted(b["payload"]["event_id"] for b in items)
    assert err.splitlines()[-1] == (
        f"fedgate: sent {sent} of 200; interrupted: {200 - sent} item(s) stay queued "
        "(fedgate outbox flush, or emit the same input again: nothing is sent twice)")
    assert len(again.stdout.splitlines()) == 200 - sent
    assert ("fedgate: emit: 200 item(s) already in the outbox (queued or delivered earlier): "
            "not queued again") in again.stderr
    assert again.stderr.endswith(f"fedgate: sent {200 - sent} of {200 - sent}\n")
    events = finding_events(fed)
    assert sorted(events) == sorted(b["payload"]["event_id"] for b in items)  # once each
    third = emit(fed, str(data))
    assert (third.returncode, third.stdout) == (0, "")
    assert third.stderr.endswith("nothing to send (every valid item already delivered)\n")
    assert len(finding_events(fed)) == 200


def test_flush_sends_what_an_interrupted_run_left(fed, tmp_path):
    data = jsonl(tmp_path / "campaign.jsonl", [body(n) for n in range(150)])
    proc = subprocess.Popen([sys.executable, "-m", "fedgate.cli", "emit", "--batch", "2",
                             "--config", str(fed / "emitter.toml"), str(data)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    # read the rest through the same buffer as readline (communicate() reads the pipe
    # itself and would miss lines of the first batch already buffered here)
    out = proc.stdout.read()
    proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    left = status(fed)["pending"][0]
    assert left == 150 - 1 - len(out.splitlines()) and left > 0
    flushed = outbox(fed, "flush")
    assert flushed.returncode == 0, flushed.stderr
    assert len(flushed.stdout.splitlines()) == left
    assert flushed.stderr.endswith(f"fedgate: sent {left} of {left}\n")
    assert len(finding_events(fed)) == 150 and status(fed)["pending"][0] == 0


# -- memory stays bounded: the input is streamed ---------------------------------------------

PEAK = """import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps([r.returncode, r.stdout.count(chr(10)), r.stderr,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"""


def peak_rss_kib(fed: Path, data: Path) -> tuple[int, int, str, int]:
    """(exit code, output lines, stderr, peak RSS in KiB) of `fedgate emit` on ``data``,
    measured by a parent that has no other child."""
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + PEAK, sys.executable, "-m", "fedgate.cli",
         "emit", "--config", str(fed / "emitter.toml"), str(data)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return tuple(json.loads(result.stdout))


def test_a_40_mb_file_is_streamed_in_bounded_memory(fed, tmp_path):
    small = jsonl(tmp_path / "one.jsonl", [body(0)])
    code, lines, err, baseline = peak_rss_kib(fed, small)
    assert (code, lines) == (0, 1), err
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:  # 160 items of ~250 KB: 40 MB, each well under 1 MiB
        for n in range(1, 161):
            f.write(json.dumps(body(n, blob=f"{n:08d}" * 31_250)) + "\n")
    size_kib = big.stat().st_size // 1024
    assert size_kib > 39_000
    code, lines, err, peak = peak_rss_kib(fed, big)
    assert (code, lines) == (0, 160), err
    # reading the whole file (as before) costs several times its size; streaming, a few
    # items: far below half the file above the one-item run
    assert peak - baseline < size_kib // 2, (baseline, peak, size_kib)
    assert err.endswith("fedgate: sent 160 of 160\n")
    assert len(finding_events(fed)) == 161


# -- "gateway unavailable" only when it cannot be reached ------------------------------------

def test_a_store_outage_is_not_reported_as_the_gateway_unavailable(fed):
    config = with_changes(fed / "emitter.toml", "once.toml", max_attempts=1)
    blocker = sqlite3.connect(fed / "state" / "fedgate.db", isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # the gateway's store is locked: it fails closed
        result = emit(fed, config=config, input=json.dumps(body(1)))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("queued (gateway up, its store is unavailable (503 "
                             "replay_store_unavailable); will retry)\n")
    assert "gateway unavailable" not in result.stdout + result.stderr
    flushed = outbox(fed, "flush", config=config)
    assert flushed.returncode == 0 and flushed.stdout.startswith("accepted "), flushed.stderr
    # unreachable (nothing listens on that port): that, and only that, is "unavailable"
    closed = with_changes(fed / "emitter.toml", "closed.toml", max_attempts=1,
                          url="https://127.0.0.1:9", state_dir="closed-state")
    down = emit(fed, config=closed, input=json.dumps(body(2)))
    assert (down.returncode, down.stdout) == (0, "queued (gateway unavailable; will retry)\n")
    assert down.stderr.splitlines()[-1] == ("fedgate: sent 0 of 1; stopped: gateway "
                                            "unavailable; 1 item(s) still queued")


# -- fedgate outbox status | prune; rejected bodies do not stay forever ----------------------

def test_outbox_status_and_prune_shrink_the_file(fed, tmp_path):
    data = jsonl(tmp_path / "rejected.jsonl",
                 [foreign(n, blob="r" * 900_000) for n in range(4)])
    result = emit(fed, str(data))
    assert result.returncode == 1
    assert result.stdout.count("rejected 403 mapping_violation") == 4
    before = status(fed)
    assert before["rejected"][0] == 4 and before["rejected"][1] > 3_600_000
    db = load_emitter_settings(fed / "emitter.toml").state_dir / "outbox.db"
    size = db.stat().st_size
    pruned = outbox(fed, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("pruned 4 row(s); ")
    assert status(fed)["rejected"] == (0, 0)
    assert db.stat().st_size < size - 3_000_000  # VACUUMed: the file shrank


def test_rejected_rows_are_pruned_after_the_retention(fed, tmp_path):
    data = jsonl(tmp_path / "rejected.jsonl", [foreign(1, blob="r" * 900_000)])
    assert emit(fed, str(data)).returncode == 1
    accepted = emit(fed, input=json.dumps(body(2)))
    assert accepted.returncode == 0
    db = load_emitter_settings(fed / "emitter.toml").state_dir / "outbox.db"
    with sqlite3.connect(db) as conn:  # both rows were settled 8 days ago
        conn.execute("UPDATE outbox SET updated_at = updated_at - 8 * 86400, "
                     "created_at = created_at - 8 * 86400")
    size = db.stat().st_size
    assert emit(fed, input="").returncode == 0  # any run applies the retention (7 days)
    after = status(fed)
    assert after["rejected"] == (0, 0) and after["delivered"] == (0, 0)
    assert db.stat().st_size < size - 800_000


def test_outbox_prune_older_than_keeps_recent_and_pending_rows(fed, tmp_path):
    assert emit(fed, input=json.dumps(body(1))).returncode == 0
    closed = with_changes(fed / "emitter.toml", "closed.toml", max_attempts=1,
                          url="https://127.0.0.1:9")  # same state_dir: a pending row
    assert emit(fed, config=closed, input=json.dumps(body(2))).returncode == 0
    kept = outbox(fed, "prune", "--older-than", "1d")
    assert kept.stdout.startswith("pruned 0 row(s); ")
    assert status(fed)["delivered"][0] == 1 and status(fed)["pending"][0] == 1
    dropped = outbox(fed, "prune", "--older-than", "0")
    assert dropped.stdout.startswith("pruned 1 row(s); ")
    assert status(fed)["delivered"][0] == 0 and status(fed)["pending"][0] == 1


def test_outbox_without_an_action_is_one_line_plus_usage(tmp_path):
    result = fedgate("outbox", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[0].startswith("usage: fedgate outbox ")
    assert result.stderr.splitlines()[-1] == ("fedgate outbox: error: missing action (one "
                                              "of: status, flush, prune)")


def test_outbox_status_help_is_listed(tmp_path):
    result = fedgate("--help", cwd=tmp_path)
    assert result.returncode == 0 and " outbox " in result.stdout
