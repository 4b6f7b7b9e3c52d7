"""Rough edges of the real `fedgate` command found by a new operator (issue 8, point 8):
subprocesses, real files, real gateways over real mTLS."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from pins import openssl_spki_pin
from stack import free_port

from audit import AuditLog
from emitter.campaign import EXECUTIONS, Execution, telemetry_body
from fedgate.pki import cert_sha256
from keyring.keys import KeyStatus, load_jwks

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def fedgate(*args: str, cwd: Path = ROOT, input: str | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120, input=input)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@contextlib.contextmanager
def serving(root: Path):
    """`fedgate serve` on ROOT/gateway.toml (cwd elsewhere), until /readyz answers 200
    over mTLS to ROOT/emitter.toml."""
    log_path = root.parent / f"{root.name}-serve.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedgate.cli", "serve", "--config",
                                 str(root / "gateway.toml")], cwd=root.parent, env=ENV,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while fedgate("probe", "--config", str(root / "emitter.toml")).returncode != 0:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def absolute_values(config: Path) -> list[str]:
    """Every string value in a TOML file that is an absolute path (or sqlite URL)."""
    found, stack = [], [tomllib.loads(config.read_text())]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and (node.startswith("/") or node.startswith("sqlite:////")
                                        or "://" not in node and os.path.isabs(node)):
            found.append(node)
    return found


# -- fedgate bootstrap -------------------------------------------------------------------

def test_bootstrap_writes_paths_relative_to_the_config_so_the_directory_can_move(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = fedgate("bootstrap", "fed", "--port", str(free_port()), cwd=work)  # relative DIR
    assert result.returncode == 0, result.stderr
    for name in ("gateway.toml", "emitter.toml"):
        text = (work / "fed" / name).read_text()
        assert absolute_values(work / "fed" / name) == [], name
        assert str(tmp_path) not in text and str(ROOT) not in text
    moved = tmp_path / "elsewhere" / "fed"
    moved.parent.mkdir()
    shutil.move(work / "fed", moved)
    with serving(moved):
        pass
    # the gateway's state and audit log live in the (moved) directory, nowhere else
    assert (moved / "state" / "fedgate.db").is_file()
    assert (moved / "audit" / "gateway-audit.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "work"]
    assert list(work.iterdir()) == []


def test_bootstrap_refuses_an_existing_federation_naming_force(tmp_path):
    root = tmp_path / "fed"
    assert fedgate("bootstrap", str(root)).returncode == 0
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    again = fedgate("bootstrap", str(root))
    assert again.returncode == 2 and again.stdout == ""
    line = one_error_line(again)
    assert line.startswith(f"fedgate: error: refusing to overwrite {root}/")
    assert "(use --force" in line
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_bootstrap_force_replaces_what_it_generated_and_keeps_the_rules(tmp_path):
    root = tmp_path / "fed"
    assert fedgate("bootstrap", str(root), "--port", str(free_port())).returncode == 0
    rules = root / "policy" / "rules.toml"
    rules.write_text(rules.read_text() + "\n# edited by the operator\n")
    edited = rules.read_bytes()
    old_ca = (root / "certs" / "ca.crt").read_bytes()
    old_key = (root / "keys" / "ss-prod-2026.pem").read_bytes()
    result = fedgate("bootstrap", str(root), "--force", "--port", str(free_port()))
    assert result.returncode == 0, result.stderr
    assert rules.read_bytes() == edited
    assert (root / "certs" / "ca.crt").read_bytes() != old_ca
    assert (root / "keys" / "ss-prod-2026.pem").read_bytes() != old_key
    assert (root / "keys" / "ss-prod-2026.pem").stat().st_mode & 0o777 == 0o600
    assert not [p for p in root.rglob(".*.tmp")]
    gateway = tomllib.loads((root / "gateway.toml").read_text())
    emitter = tomllib.loads((root / "emitter.toml").read_text())
    producer_pin = cert_sha256((root / "certs" / "spectrastrike-producer.crt").read_bytes())
    assert gateway["identities"]["spectrastrike-producer"]["pins"] == [producer_pin]
    assert emitter["server_pins"] == [cert_sha256((root / "certs/gateway.crt").read_bytes())]
    with serving(root):  # the replaced material works together
        pass


# -- fedgate probe: the same pinned transport as fedgate emit --------------------------

@pytest.fixture
def fed(tmp_path):
    """A bootstrapped federation with its `fedgate serve` running."""
    root = tmp_path / "fed"
    result = fedgate("bootstrap", str(root), "--port", str(free_port()))
    assert result.returncode == 0, result.stderr
    with serving(root):
        yield root


def emit(config: Path, execution: Execution = EXECUTIONS[0]) -> subprocess.CompletedProcess:
    body = telemetry_body(execution, execution.events[0], 1)
    return fedgate("emit", "--config", str(config), "-", input=json.dumps(body))


def with_changes(config: Path, name: str, **changes: str | list[str]) -> Path:
    """A copy of an emitter config beside it (so its relative paths still hold)."""
    lines = [line for line in config.read_text().splitlines()
             if line.split(" = ", 1)[0] not in changes]
    lines += [f"{key} = {json.dumps(value)}" for key, value in changes.items()]
    out = config.with_name(name)
    out.write_text("\n".join(lines) + "\n")
    return out


def test_probe_refuses_a_gateway_whose_certificate_is_not_pinned_like_emit(fed):
    good = fed / "emitter.toml"
    ok = fedgate("probe", "--config", str(good))
    assert ok.returncode == 0, ok.stderr
    url = tomllib.loads(good.read_text())["url"] + "/readyz"
    assert ok.stdout == f"{url}: 200\n"
    # a real certificate from the same CA, but not the gateway's
    wrong = with_changes(good, "wrong-pin.toml", server_pins=[
        cert_sha256((fed / "certs" / "spectrastrike-producer.crt").read_bytes())],
        state_dir="wrong-pin-state")
    probe = fedgate("probe", "--config", str(wrong))
    assert probe.returncode == 1 and probe.stdout == ""
    reason = "server_pin_mismatch: the gateway certificate matches no server_pins"
    assert one_error_line(probe) == f"fedgate: probe: {url}: {reason}"
    sent = emit(wrong)  # emit refuses the same gateway for the same reason
    assert sent.returncode == 1, sent.stderr
    assert sent.stdout == "refused server_pin_mismatch (not sent; kept in the outbox)\n"
    assert "server_pin_mismatch (the gateway certificate matches no server_pins)" in sent.stderr
    assert emit(good).stdout.startswith("accepted ")  # the gateway itself is fine


def test_probe_config_errors_are_one_line_exit_2(tmp_path):
    config = tmp_path / "emitter.toml"
    config.write_text('url = "http://127.0.0.1:1"\n')
    result = fedgate("probe", "--config", str(config))
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"fedgate: error: {config}: url must use https://")


# -- fedgate keys new --jwks -------------------------------------------------------------

def test_keys_new_jwks_creates_a_keyring_the_loader_accepts(tmp_path):
    jwks = tmp_path / "producers.jwks.json"
    result = fedgate("keys", "new", "--kid", "k-1", "--out", str(tmp_path / "k"),
                     "--identity", "ss-a", "--tenant", "t-2", "--tenant", "t-1",
                     "--status", "retired", "--not-before", "100", "--not-after", "200",
                     "--jwks", str(jwks))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert json.loads(jwks.read_text()) == {"keys": [printed]}
    assert json.loads((tmp_path / "k" / "k-1.jwk.json").read_text()) == printed
    key = load_jwks(jwks)["k-1"]
    assert (key.identity, key.tenants, key.status, key.not_before, key.not_after) == (
        "ss-a", frozenset({"t-1", "t-2"}), KeyStatus.RETIRED, 100, 200)


def test_keys_new_jwks_appends_and_keeps_the_other_keys(tmp_path):
    jwks = tmp_path / "producers.jwks.json"
    assert fedgate("keys", "new", "--kid", "k-1", "--out", str(tmp_path),
                   "--jwks", str(jwks)).returncode == 0
    first = json.loads(jwks.read_text())["keys"][0]
    jwks.chmod(0o640)
    result = fedgate("keys", "new", "--kid", "k-2", "--out", str(tmp_path), "--identity",
                     "ss-a", "--jwks", str(jwks))
    assert result.returncode == 0, result.stderr
    assert json.loads(jwks.read_text())["keys"] == [first, json.loads(result.stdout)]
    assert list(load_jwks(jwks)) == ["k-1", "k-2"]
    assert jwks.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_keys_new_jwks_refuses_a_duplicate_kid_before_writing_anything(tmp_path):
    jwks = tmp_path / "producers.jwks.json"
    assert fedgate("keys", "new", "--kid", "k-1", "--out", str(tmp_path / "a"),
                   "--jwks", str(jwks)).returncode == 0
    before = jwks.read_bytes()
    again = fedgate("keys", "new", "--kid", "k-1", "--out", str(tmp_path / "b"),
                    "--jwks", str(jwks))
    assert again.returncode == 2 and again.stdout == ""
    assert one_error_line(again) == (
        f"fedgate: error: {jwks}: kid 'k-1' is already in this keyring")
    assert jwks.read_bytes() == before
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("content", "reason"), [
    ("{", "not JSON"), ('{"keys": [{"kid": "x"}]}', "key 'x': not an Ed25519 OKP key")])
def test_keys_new_jwks_refuses_a_file_the_loader_refuses(tmp_path, content, reason):
    jwks = tmp_path / "producers.jwks.json"
    jwks.write_text(content)
    result = fedgate("keys", "new", "--kid", "k-1", "--out", str(tmp_path / "k"),
                     "--jwks", str(jwks))
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith(f"fedgate: error: {jwks}: ") and reason in line
    assert jwks.read_text() == content and not (tmp_path / "k").exists()


def test_keys_new_refuses_a_window_that_ends_before_it_starts(tmp_path):
    result = fedgate("keys", "new", "--kid", "k-1", "--out", str(tmp_path / "k"),
                     "--not-before", "200", "--not-after", "100")
    assert result.returncode == 2
    assert one_error_line(result) == "fedgate: error: --not-after is before --not-before"


def test_a_gateway_accepts_a_key_added_with_keys_new_jwks(tmp_path):
    root = tmp_path / "fed"
    assert fedgate("bootstrap", str(root), "--port", str(free_port())).returncode == 0
    tenants = tomllib.loads((root / "gateway.toml").read_text())[
        "identities"]["spectrastrike-producer"]["tenants"]
    added = fedgate("keys", "new", "--kid", "ss-prod-2027", "--out", str(root / "keys"),
                    "--identity", "spectrastrike-producer",
                    *[a for t in tenants for a in ("--tenant", t)],
                    "--jwks", str(root / "keys" / "producers.jwks.json"))
    assert added.returncode == 0, added.stderr
    # a key made without --jwks: the gateway does not know it
    assert fedgate("keys", "new", "--kid", "ss-stray", "--out", str(root / "keys"),
                   "--identity", "spectrastrike-producer").returncode == 0
    emitter = root / "emitter.toml"
    new_key = with_changes(emitter, "new-key.toml", kid="ss-prod-2027",
                           signing_key="keys/ss-prod-2027.pem", state_dir="new-key-state")
    stray = with_changes(emitter, "stray.toml", kid="ss-stray",
                         signing_key="keys/ss-stray.pem", state_dir="stray-state")
    with serving(root):
        accepted = emit(new_key)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert accepted.stdout.startswith("accepted ")
        rejected = emit(stray, EXECUTIONS[1])
        assert rejected.returncode == 1
        assert rejected.stdout.startswith("rejected 401 unknown_kid: ")


# -- fedgate certs issue ------------------------------------------------------------------



def test_certs_issue_signs_one_more_client_cert_with_the_existing_ca(tmp_path):
    pki = tmp_path / "pki"
    assert fedgate("certs", "init", str(pki), "--identity", "ss-a").returncode == 0
    before = json.loads((pki / "pins.json").read_text())
    ca = (pki / "ca.crt").read_bytes()
    result = fedgate("certs", "issue", str(pki), "--identity", "ss-b")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    cert = pki / "ss-b.crt"
    assert printed == {"identity": "ss-b", "sha256": cert_sha256(cert.read_bytes()),
                       "spki": openssl_spki_pin(cert)}
    assert (pki / "ca.crt").read_bytes() == ca  # the same CA, not a new one
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki / "ca.crt"),
                             "-purpose", "sslclient", str(cert)], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (pki / "ss-b.key").stat().st_mode & 0o777 == 0o600
    after = json.loads((pki / "pins.json").read_text())
    assert after == {**before,
                     "identities": {**before["identities"], "ss-b": printed["sha256"]},
                     "identities_spki": {**before["identities_spki"], "ss-b": printed["spki"]}}


def test_certs_issue_refuses_a_pinned_identity_unless_forced(tmp_path):
    pki = tmp_path / "pki"
    assert fedgate("certs", "init", str(pki), "--identity", "ss-a").returncode == 0
    old = (pki / "ss-a.crt").read_bytes()
    again = fedgate("certs", "issue", str(pki), "--identity", "ss-a")
    assert again.returncode == 2 and again.stdout == ""
    line = one_error_line(again)
    assert line.startswith("fedgate: error: identity 'ss-a' already pinned in ")
    assert line.endswith("(use --force)")
    assert (pki / "ss-a.crt").read_bytes() == old
    forced = fedgate("certs", "issue", str(pki), "--identity", "ss-a", "--force")
    assert forced.returncode == 0, forced.stderr
    new_pin = json.loads(forced.stdout)["sha256"]
    assert new_pin != cert_sha256(old)
    assert json.loads((pki / "pins.json").read_text())["identities"]["ss-a"] == new_pin


def test_certs_issue_without_a_ca_is_one_line(tmp_path):
    result = fedgate("certs", "issue", str(tmp_path), "--identity", "ss-a")
    assert result.returncode == 2
    assert one_error_line(result) == (
        f"fedgate: error: {tmp_path}: no dev CA here (ca.crt and ca.key, as 'fedgate certs "
        "init' writes them)")
    assert list(tmp_path.iterdir()) == []


def test_a_gateway_pinned_to_an_issued_cert_accepts_it_over_mtls(tmp_path):
    """certs issue + keys new --jwks: a new service identity, end to end."""
    root = tmp_path / "fed"
    assert fedgate("bootstrap", str(root), "--port", str(free_port())).returncode == 0
    issued = fedgate("certs", "issue", str(root / "certs"), "--identity", "ss-edge")
    assert issued.returncode == 0, issued.stderr
    pin = json.loads(issued.stdout)["sha256"]
    execution = Execution("op-003", "edge-run", "10.0.9.9", 2, EXECUTIONS[2].events)
    with (root / "gateway.toml").open("a") as cfg:
        cfg.write(f'\n[identities.ss-edge]\npins = ["{pin}"]\n'
                  f'tenants = ["{execution.tenant}"]\n')
    added = fedgate("keys", "new", "--kid", "edge-1", "--out", str(root / "keys"),
                    "--identity", "ss-edge", "--tenant", execution.tenant,
                    "--jwks", str(root / "keys" / "producers.jwks.json"))
    assert added.returncode == 0, added.stderr
    edge = with_changes(root / "emitter.toml", "edge.toml", identity="ss-edge",
                        cert="certs/ss-edge.crt", key="certs/ss-edge.key", kid="edge-1",
                        signing_key="keys/edge-1.pem", state_dir="edge-state")
    # control: the same identity and key over the bootstrap producer's certificate
    other_cert = with_changes(edge, "edge-other-cert.toml", state_dir="edge-other-state",
                              cert="certs/spectrastrike-producer.crt",
                              key="certs/spectrastrike-producer.key")
    with serving(root):
        accepted = emit(edge, execution)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert accepted.stdout.startswith("accepted ")
        rejected = emit(other_cert, execution)
        assert rejected.returncode == 1
        assert rejected.stdout.startswith("rejected 401 identity_rejected: ")


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
