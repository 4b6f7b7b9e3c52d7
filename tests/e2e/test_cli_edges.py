"""Rough edges of the real `fedgate` command found by a new operator (issue 8, point 8):
subprocesses, real files, real gateways over real mTLS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from audit import AuditLog

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def fedgate(*args: str, cwd: Path = ROOT, input: str | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120, input=input)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- fedgate audit verify ----------------------------------------------------------------

def audit_log(path: Path, n: int) -> str:
    """``n`` chained events; the last hash."""
    with AuditLog(path, fsync=False) as log:
        last = [log.append({"message": f"event {i}", "n": i}) for i in range(n)]
    return last[-1]["hash"]


def test_audit_verify_prints_the_count_and_the_last_hash(tmp_path):
    path = tmp_path / "audit.jsonl"
    last = audit_log(path, 3)
    result = fedgate("audit", "verify", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{path}: intact: 3 lines, last hash {last}\n"


def test_audit_verify_an_empty_file_is_an_intact_empty_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    result = fedgate("audit", "verify", str(path))
    assert result.returncode == 0
    assert result.stdout == f"{path}: intact: 0 lines, last hash {'0' * 64}\n"


def test_audit_verify_a_missing_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "nope.jsonl"
    result = fedgate("audit", "verify", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert one_error_line(result) == f"fedgate: error: {path}: no such file"


def test_audit_verify_a_directory_is_one_line(tmp_path):
    result = fedgate("audit", "verify", str(tmp_path))
    assert result.returncode == 2
    assert one_error_line(result) == f"fedgate: error: {tmp_path}: is a directory"


def test_audit_verify_a_broken_chain_names_the_first_bad_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit_log(path, 4)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))  # delete line 2
    result = fedgate("audit", "verify", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert one_error_line(result) == (
        f"fedgate: error: {path}: broken: line 2: prev_hash does not match the previous "
        "line: a line was inserted, deleted or moved")
