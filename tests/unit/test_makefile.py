"""`make demo` needs no root and no system package; `make test` still installs what the
tests need (issue 8, point 10). The real Makefile, run by the real `make -n` (print
the commands, run none) in a temporary copy of the checkout's two inputs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = ("apt-get", "sudo", "redis-server", "rsyslog")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def dry_run(tmp_path: Path, target: str, *, venv: bool) -> str:
    """`make -n TARGET` in a copy of Makefile + pyproject.toml, with or without the
    virtualenv's stamp (newer than pyproject.toml: up to date)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    if venv:
        stamp = tmp_path / ".venv" / ".installed"
        stamp.parent.mkdir()
        stamp.touch()
        later = (tmp_path / "pyproject.toml").stat().st_mtime + 10
        os.utime(stamp, (later, later))
    # run as a top-level make even under `make test` (no inherited MAKEFLAGS/MAKELEVEL,
    # which would add "make[1]: Entering directory" lines)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    result = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("venv", [False, True], ids=["fresh", "venv-present"])
def test_make_demo_installs_no_system_package(tmp_path, venv):
    commands = dry_run(tmp_path, "demo", venv=venv)
    assert commands.strip().splitlines()[-1] == ".venv/bin/fedgate demo"
    for word in SYSTEM:
        assert word not in commands, f"`make demo` runs {word}:\n{commands}"


@pytest.mark.parametrize("venv", [False, True], ids=["fresh", "venv-present"])
def test_make_test_still_installs_redis_and_rsyslog(tmp_path, venv):
    commands = dry_run(tmp_path, "test", venv=venv)
    assert "apt-get install -y -qq redis-server" in commands
    assert "apt-get install -y -qq rsyslog rsyslog-gnutls" in commands
    assert "apt-get install -y -qq softhsm2" in commands  # the PKCS#11 signer's tests
    assert commands.strip().splitlines()[-1] == (
        ".venv/bin/python -m pytest -q -n 2 --dist loadfile")


def test_ci_installs_the_test_packages_itself():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install -y -qq redis-server" in ci
    assert "apt-get install -y -qq rsyslog rsyslog-gnutls" in ci
    assert "apt-get install -y -qq softhsm2" in ci
    assert ci.rstrip().endswith("make test")
