"""`fedgate serve` with its feedback key in a real SoftHSM2 token (a token of the test's
own, tests/hsm.py), as subprocesses:

1. Two workers, each with its own PKCS#11 session, answer a feedback query whose
   signature verifies (PyNaCl) under the vector key the token holds.
2. Start-up stops with one stderr line and a non-zero exit when the token is missing,
   locked by a wrong PIN, or answers wrongly (a private key that does not match the
   public key object beside it): the start-up self-test signs through the token.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import uuid

import pytest
from hsm import PIN_ENV, SoftHsm
from lab import IDENTITY, PRODUCER, body_for
from stack import FEEDBACK_SEED, ROOT, Stack

from emitter.signing import sign_request
from gateway.feedback.policy import DEFAULT_RULES_FILE
from keyring.ed25519 import PrivateKey, verify
from schemas.routes import QUERY_PATH
from schemas.signing import feedback_signing_input

TOKEN, OBJECT = "fedgate-feedback", "vv-fb-2026"


class HsmStack(Stack):
    POLICY_RULES = DEFAULT_RULES_FILE  # no "no policy" warning: stderr is the error alone


@pytest.fixture
def hsm(tmp_path) -> SoftHsm:
    return SoftHsm(tmp_path / "softhsm")


def serve_fails(stack: Stack, env: dict[str, str]) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "fedgate.cli", "serve", "--config",
                           str(stack.config_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    return done.returncode, done.stderr.splitlines()


async def test_workers_sign_feedback_through_the_token(tmp_path, sqlite_url, hsm):
    hsm.init_token(TOKEN)
    assert hsm.import_seed(TOKEN, OBJECT, FEEDBACK_SEED) == PrivateKey(FEEDBACK_SEED).public
    stack = HsmStack(tmp_path / "stack", sqlite_url, hsm=hsm)
    stack.spawn("--workers", "2", env=hsm.env)
    try:
        await stack.wait_ready(timeout=30)
        answers = []
        for _ in range(4):  # over several connections: both workers' sessions sign
            now = int(time.time())  # the gateway runs on the real clock
            out = sign_request(PRODUCER, body_for(QUERY_PATH), identity=IDENTITY,
                               kid="lab-2026", timestamp=now, nonce=uuid.uuid4().hex)
            async with stack.session() as client, client.post(
                    stack.url + QUERY_PATH, data=out.body, headers=out.headers) as resp:
                assert resp.status == 200, await resp.text()
                answers.append(await resp.json())
    finally:
        stack.kill_all()
    for payload in answers:
        message = feedback_signing_input(body_for(QUERY_PATH)["tenant_id"],
                                         payload["signed_at"], payload["nonce"],
                                         payload["schema_version"], payload["kid"],
                                         payload["data"])
        assert payload["kid"] == OBJECT
        assert verify(PrivateKey(FEEDBACK_SEED).public, base64.b64decode(payload["signature"]),
                      message)


def test_start_up_stops_when_the_token_is_missing(tmp_path, sqlite_url, hsm):
    hsm.init_token("some-other-token")
    stack = HsmStack(tmp_path / "stack", sqlite_url, hsm=hsm)
    code, lines = serve_fails(stack, hsm.env)
    assert code == 2
    assert len(lines) == 1, lines
    assert "feedback_key: pkcs11:token=fedgate-feedback;object=vv-fb-2026: no such token" in (
        lines[0])


def test_start_up_stops_on_a_wrong_pin(tmp_path, sqlite_url, hsm):
    hsm.init_token(TOKEN)
    hsm.import_seed(TOKEN, OBJECT, FEEDBACK_SEED)
    stack = HsmStack(tmp_path / "stack", sqlite_url, hsm=hsm)
    code, lines = serve_fails(stack, {**hsm.env, PIN_ENV: "not-the-pin"})
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].endswith("cannot log in: the PIN is wrong (CKR_PIN_INCORRECT)")
    assert "not-the-pin" not in lines[0]


def test_start_up_stops_when_the_token_answers_wrongly(tmp_path, sqlite_url, hsm):
    hsm.init_token(TOKEN)
    other = PrivateKey(bytes(32)).public
    hsm.import_mismatched_pair(TOKEN, OBJECT, FEEDBACK_SEED, other)
    stack = HsmStack(tmp_path / "stack", sqlite_url, hsm=hsm)
    code, lines = serve_fails(stack, hsm.env)
    assert code == 2
    assert len(lines) == 1, lines
    assert "self-test: the signature does not verify under the key's public key" in lines[0]


def test_start_up_stops_when_the_key_is_not_in_the_token(tmp_path, sqlite_url, hsm):
    hsm.init_token(TOKEN)
    stack = HsmStack(tmp_path / "stack", sqlite_url, hsm=hsm)
    code, lines = serve_fails(stack, hsm.env)
    assert (code, len(lines)) == (2, 1), lines
    assert lines[0].endswith("no private key objects match (need exactly one)")
