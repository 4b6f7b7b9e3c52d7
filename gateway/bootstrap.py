"""Lay out a whole federation on disk: dev PKI, keys, gateway and emitter configs.

Used by ``fedgate demo`` (SQLite, loopback), by the docker-compose ``init`` service
(Redis, service names) and by the e2e smoke. DEV material only: fresh keys every time,
private keys written 0600, nothing reused across runs. The policy rules are the one
exception: the package's default rules are copied to ``DIR/policy/rules.toml`` (for the
operator to edit) unless that file already exists, and ``gateway.toml`` names the copy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from keyring.ed25519 import PrivateKey
from keyring.keys import Key, Keyring, save_jwks

from .pki import init_pki
from .policy import DEFAULT_RULES_FILE

IDENTITY = "spectrastrike-producer"
PRODUCER_KID = "ss-prod-2026"
FEEDBACK_KID = "vv-fb-2026"
TENANTS = {"op-001": "10000000-0000-0000-0000-000000000001",
           "op-002": "10000000-0000-0000-0000-000000000001",
           "op-003": "20000000-0000-0000-0000-000000000002"}
RULES = "policy/rules.toml"  # relative to gateway.toml


@dataclass(frozen=True)
class Layout:
    root: Path
    gateway_config: Path
    emitter_config: Path
    gateway_audit: Path
    store_url: str


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _toml(value: object) -> str:
    return json.dumps(value)  # TOML basic strings, arrays and integers are JSON-compatible


def bootstrap(root: Path, *, store_url: str | None = None, host: str = "127.0.0.1",
              port: int = 8443, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
              bind: str | None = None) -> Layout:
    """Write certs/, keys/, gateway.toml and emitter.toml under ``root``."""
    root = Path(root)
    (root / "keys").mkdir(parents=True, exist_ok=True)
    pki = init_pki(root / "certs", [IDENTITY], hosts=list(hosts))
    producer, feedback = PrivateKey(os.urandom(32)), PrivateKey(os.urandom(32))
    _write_private(root / "keys" / f"{PRODUCER_KID}.pem", producer.to_pem())
    _write_private(root / "keys" / f"{FEEDBACK_KID}.pem", feedback.to_pem())
    tenants = sorted(set(TENANTS.values()))
    save_jwks(root / "keys" / "producers.jwks.json", Keyring([
        Key(PRODUCER_KID, producer.public, identity=IDENTITY, tenants=frozenset(tenants))]))
    save_jwks(root / "keys" / "feedback.jwks.json", Keyring([Key(FEEDBACK_KID, feedback.public)]))
    store_url = store_url or f"sqlite:///{root / 'state' / 'fedgate.db'}"
    audit = root / "audit" / "gateway-audit.jsonl"
    rules = root / RULES
    if not rules.exists():  # keep an operator's edited copy
        rules.parent.mkdir(parents=True, exist_ok=True)
        rules.write_bytes(DEFAULT_RULES_FILE.read_bytes())
    gateway = root / "gateway.toml"
    gateway.write_text(
        "clock_skew_s = 30\nnonce_ttl_s = 120\nrequire_canonical_body = true\n"
        'allowed_schema_versions = ["1.0"]\nanchor_attestation = true\n'
        f'producer_keyring = "keys/producers.jwks.json"\n'
        f'feedback_key = "keys/{FEEDBACK_KID}.pem"\nfeedback_kid = "{FEEDBACK_KID}"\n\n'
        f"[server]\nhost = {_toml(bind or host)}\nport = {port}\n"
        'tls_cert = "certs/gateway.crt"\ntls_key = "certs/gateway.key"\n'
        'client_ca = "certs/ca.crt"\n\n'
        f"[store]\nurl = {_toml(store_url)}\n\n[audit]\npath = {_toml(str(audit))}\n\n"
        f"[policy]\nrules = {_toml(RULES)}\n\n"
        f"[identities.{IDENTITY}]\npins = [{_toml(pki.identities[IDENTITY].sha256)}]\n"
        f"tenants = {_toml(tenants)}\n\n[operator_tenants]\n"
        + "".join(f"{op} = {_toml(t)}\n" for op, t in TENANTS.items()),
        encoding="utf-8")
    emitter = root / "emitter.toml"
    emitter.write_text(
        f'url = "https://{host}:{port}"\nca = "certs/ca.crt"\n'
        f'cert = "certs/{IDENTITY}.crt"\nkey = "certs/{IDENTITY}.key"\n'
        f"server_pins = [{_toml(pki.gateway.sha256)}]\nidentity = {_toml(IDENTITY)}\n"
        f'signing_key = "keys/{PRODUCER_KID}.pem"\nkid = "{PRODUCER_KID}"\n'
        'feedback_keyring = "keys/feedback.jwks.json"\nstate_dir = "emitter-state"\n',
        encoding="utf-8")
    return Layout(root, gateway, emitter, audit, store_url)
