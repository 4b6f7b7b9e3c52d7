"""The project as an operator gets it: the built WHEEL, installed non-editable in a fresh
venv, driven from a directory outside the checkout. `fedgate bootstrap` must write a
`[policy]` section naming a copy of the packaged default rules, `fedgate serve` must
answer feedback with adjustments (the e2e smoke), and nothing may come from the source
tree. The venv reuses this interpreter's site-packages for the dependencies (a .pth
line), so only the wheel is built and installed: ~10 s, no dependency download."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

from stack import free_port

ROOT = Path(__file__).resolve().parents[2]
# what the wheel is built from: the working tree (uncommitted edits included), minus bulk
IGNORE = shutil.ignore_patterns(".git", ".venv", "tests", "local_docs", "bench", "docs",
                                "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                ".hypothesis")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert result.returncode == 0, f"{cmd}: {result.stdout}{result.stderr}"
    return result


def build_and_install(tmp: Path) -> Path:
    """Build the wheel, install it (no deps) into a new venv; returns the venv's bin/."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
         str(src)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("fedgate-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                  ).stdout.strip()
    # dependencies from this interpreter's site-packages, AFTER the venv's own (the .pth
    # files there, e.g. an editable install of this checkout, are not processed)
    (Path(purelib) / "_fedgate_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # no PYTHONPATH: a checkout on it (with a fedgate.egg-info a build left there) would
    # make pip take fedgate for installed already and skip the wheel
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return venv / "bin"


def test_wheel_bootstrap_serve_and_feedback_outside_the_checkout(tmp_path):
    bin_ = build_and_install(tmp_path)
    work = tmp_path / "operator"  # cwd: outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    where = run([str(bin_ / "python"), "-c", "import gateway; print(gateway.__file__)"],
                cwd=work, env=env).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel, not the checkout
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert run([str(bin_ / "fedgate"), "--version"], cwd=work, env=env).stdout == (
        f"fedgate {version}\n")  # from the installed distribution's metadata

    run([str(bin_ / "fedgate"), "bootstrap", "fed", "--port", str(free_port())],
        cwd=work, env=env)
    state = work / "fed"
    config = tomllib.loads((state / "gateway.toml").read_text())
    assert config["policy"] == {"rules": "policy/rules.toml"}  # relative: beside the config
    packaged = Path(where).parent / "feedback" / "policy_rules" / "default.toml"
    assert (state / "policy" / "rules.toml").read_bytes() == packaged.read_bytes()

    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(bin_ / "fedgate"), "serve", "--config", "fed/gateway.toml"],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while run_probe(bin_, state, work, env) != 0:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "gateway not ready: " + log_path.read_text()
            time.sleep(0.2)
        smoke = subprocess.run(
            [sys.executable, str(ROOT / "tests/e2e/smoke.py"), "--emitter-config",
             str(state / "emitter.toml"), "--gateway-audit",
             str(state / "audit" / "gateway-audit.jsonl"), "--out", str(tmp_path / "out")],
            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=120)
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    (run_dir,) = (tmp_path / "out").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {a["action"] for a in summary["adjustments_applied"]} == {"tighten", "isolate",
                                                                     "observe"}
    assert "warning" not in log_path.read_text()  # rules configured: no start-up warning


def run_probe(bin_: Path, state: Path, cwd: Path, env: dict) -> int:
    return subprocess.run([str(bin_ / "fedgate"), "probe", "--config",
                           str(state / "emitter.toml")], cwd=cwd, env=env,
                          capture_output=True, timeout=30).returncode
