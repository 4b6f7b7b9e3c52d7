"""The producer key generated inside a real SoftHSM2 token by `fedgate keys new --pkcs11`,
added to the gateway's keyring, and used by `fedgate emit` (the emitter signs every
request through PKCS#11): the gateway accepts it. Subprocesses, real files, real mTLS."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from hsm import PIN, PIN_ENV, SoftHsm
from stack import free_port

from emitter.campaign import EXECUTIONS, telemetry_body
from keyring.keys import load_jwks

ROOT = Path(__file__).resolve().parents[2]
TOKEN, KID = "producer-token", "ss-hsm-2027"
URI = f"pkcs11:token={TOKEN};object={KID}"


def fedgate(env: dict, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, input=input)


@contextlib.contextmanager
def serving(root: Path, env: dict):
    log = (root.parent / "serve.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "fedgate.cli", "serve", "--config",
                             str(root / "gateway.toml")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 30
        while fedgate(env, "probe", "--config", str(root / "emitter.toml")).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (
                (root.parent / "serve.log").read_text())
            time.sleep(0.2)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def test_emit_signs_through_a_token_key_made_by_keys_new(tmp_path):
    hsm = SoftHsm(tmp_path / "softhsm")
    hsm.init_token(TOKEN)
    env = {**hsm.env, "FEDGATE_PKCS11_PIN": PIN}
    root = tmp_path / "fed"
    assert fedgate(env, "bootstrap", str(root), "--port", str(free_port())).returncode == 0
    tenants = tomllib.loads((root / "gateway.toml").read_text())[
        "identities"]["spectrastrike-producer"]["tenants"]
    jwks = root / "keys" / "producers.jwks.json"
    made = fedgate(env, "keys", "new", "--pkcs11", URI, "--module", str(hsm.module),
                   "--kid", KID, "--identity", "spectrastrike-producer",
                   *[a for t in tenants for a in ("--tenant", t)], "--jwks", str(jwks))
    assert made.returncode == 0, made.stderr
    jwk = json.loads(made.stdout)
    assert (jwk["kid"], jwk["crv"], "d" in jwk) == (KID, "Ed25519", False)
    assert KID in load_jwks(jwks)
    assert not list(root.rglob(f"{KID}.pem"))  # no private key file anywhere

    again = fedgate(env, "keys", "new", "--pkcs11", URI, "--module", str(hsm.module),
                    "--kid", KID + "-b")
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1
    assert "a key with this label/id exists" in again.stderr

    emitter = root / "emitter.toml"
    lines = [line for line in emitter.read_text().splitlines()
             if line.split(" = ", 1)[0] not in ("signing_key", "kid")]
    lines += [f'signing_key = "{URI}"', f'kid = "{KID}"', hsm.toml()]
    emitter.write_text("\n".join(lines) + "\n")
    body = json.dumps(telemetry_body(EXECUTIONS[0], EXECUTIONS[0].events[0], 1))
    with serving(root, env):
        sent = fedgate(env, "emit", "--config", str(emitter), "-", input=body)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("accepted ")
        locked = fedgate({**env, PIN_ENV: "0000"}, "emit", "--config", str(emitter), "-",
                         input=body)
    assert locked.returncode == 2
    assert locked.stderr.strip().endswith("the PIN is wrong (CKR_PIN_INCORRECT)")
    assert len(locked.stderr.splitlines()) == 1


def test_keys_new_pkcs11_needs_the_pin_in_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FEDGATE_PKCS11_PIN"}
    env["PYTHONPATH"] = str(ROOT)
    result = fedgate(env, "keys", "new", "--pkcs11", URI, "--module", "/nonexistent.so",
                     "--kid", KID)
    assert result.returncode == 2
    assert result.stderr.strip() == ("fedgate: error: environment variable FEDGATE_PKCS11_PIN "
                                     "(the token's user PIN) is not set")
