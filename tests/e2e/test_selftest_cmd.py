"""`fedgate selftest`: the start-up known-answer tests on demand, one line per test, run
as the operator runs it (a subprocess), with the feedback key in a PEM file or in a real
SoftHSM2 token (tests/hsm.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hsm import PIN_ENV, SoftHsm
from stack import FEEDBACK_SEED, ROOT, Stack

from keyring.ed25519 import PrivateKey

TOKEN, OBJECT = "fedgate-feedback", "vv-fb-2026"
BASE = ["ed25519: ok", "canonical_json: ok", "schema: ok"]


def selftest(*args: str, env: dict | None = None) -> tuple[int, list[str], str]:
    done = subprocess.run([sys.executable, "-m", "fedgate.cli", "selftest", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout.splitlines(), done.stderr


@pytest.fixture
def hsm(tmp_path) -> SoftHsm:
    hsm = SoftHsm(tmp_path / "softhsm")
    hsm.init_token(TOKEN)
    return hsm


def test_without_config_runs_the_three_kats():
    assert selftest()[:2] == (0, BASE)


def test_file_key(tmp_path, sqlite_url):
    stack = Stack(tmp_path / "stack", sqlite_url)
    assert selftest("--config", str(stack.config_path))[:2] == (0, [*BASE,
                                                                    "feedback_signer: ok"])


def test_token_key(tmp_path, sqlite_url, hsm):
    hsm.import_seed(TOKEN, OBJECT, FEEDBACK_SEED)
    stack = Stack(tmp_path / "stack", sqlite_url, hsm=hsm)
    code, lines, _ = selftest("--config", str(stack.config_path), env=hsm.env)
    assert (code, lines) == (0, [*BASE, "feedback_signer: ok"])


@pytest.mark.parametrize("fault, expected", [
    ("wrong_answer", "the signature does not verify under the key's public key"),
    ("wrong_pin", "cannot log in: the PIN is wrong (CKR_PIN_INCORRECT)"),
    ("no_key", "no private key objects match"),
])
def test_token_faults_fail_the_signer_test(tmp_path, sqlite_url, hsm, fault, expected):
    env = hsm.env
    if fault == "wrong_answer":
        hsm.import_mismatched_pair(TOKEN, OBJECT, FEEDBACK_SEED, PrivateKey(bytes(32)).public)
    elif fault == "wrong_pin":
        hsm.import_seed(TOKEN, OBJECT, FEEDBACK_SEED)
        env = {**env, PIN_ENV: "0000"}
    stack = Stack(tmp_path / "stack", sqlite_url, hsm=hsm)
    code, lines, _ = selftest("--config", str(stack.config_path), env=env)
    assert code == 1
    assert lines[:3] == BASE and len(lines) == 4
    assert lines[3].startswith("feedback_signer: FAIL: ") and expected in lines[3]


def test_unusable_config_is_one_line_exit_2(tmp_path):
    code, lines, err = selftest("--config", str(tmp_path / "missing.toml"))
    assert (code, lines) == (2, [])
    assert len(err.splitlines()) == 1 and "cannot read" in err
