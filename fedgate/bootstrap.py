"""Lay out a whole federation on disk: dev PKI, keys, gateway and emitter configs.

Used by ``fedgate demo`` (SQLite, loopback), by the docker-compose ``init`` service
(Redis, service names) and by the e2e smoke. DEV material only: fresh keys every time,
private keys written 0600, nothing reused across runs. A directory that already holds
any of the generated files is refused unless ``force=True``, which replaces each of them
atomically. The policy rules are the one exception: the package's default rules are
copied to ``DIR/policy/rules.toml`` (for the operator to edit) unless that file already
exists — even with ``force`` — and ``gateway.toml`` names the copy.

Every path written into the two configs is relative to the config file (so the
directory can be moved, and nothing absolute about the machine that ran bootstrap is
recorded); only an operator's own ``store_url`` is written as given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.feedback.policy import DEFAULT_RULES_FILE
from keyring.ed25519 import PrivateKey
from keyring.keys import Key, Keyring

from .pki import PkiError, init_pki, write_file

IDENTITY = "spectrastrike-producer"
PRODUCER_KID = "ss-prod-2026"
FEEDBACK_KID = "vv-fb-2026"
AUDIT_KID = "fedgate-audit-2026"  # signs audit checkpoints (docs/AUDIT.md)
TENANTS = {"op-001": "10000000-0000-0000-0000-000000000001",
           "op-002": "10000000-0000-0000-0000-000000000001",
           "op-003": "20000000-0000-0000-0000-000000000002"}
RULES = "policy/rules.toml"  # relative to gateway.toml, as are the two below
STORE_URL = "sqlite:///state/fedgate.db"
AUDIT = "audit/gateway-audit.jsonl"


@dataclass(frozen=True)
class Layout:
    root: Path
    gateway_config: Path
    emitter_config: Path
    gateway_audit: Path
    store_url: str



def generated_files(root: Path) -> list[Path]:
    """Every file ``bootstrap`` writes under ``root`` (the rules copy excepted)."""
    root = Path(root)
    certs = [root / "certs" / f"{stem}{ext}" for stem in ("ca", "gateway", IDENTITY)
             for ext in (".crt", ".key")]
    keys = [root / "keys" / name for name in (
        f"{PRODUCER_KID}.pem", f"{FEEDBACK_KID}.pem", f"{AUDIT_KID}.pem",
        "producers.jwks.json", "feedback.jwks.json", "audit.jwks.json")]
    return [*certs, root / "certs" / "pins.json", *keys, root / "gateway.toml",
            root / "emitter.toml"]


def _toml(value: object) -> str:
    return json.dumps(value)  # TOML basic strings, arrays and integers are JSON-compatible


def bootstrap(root: Path, *, store_url: str | None = None, host: str = "127.0.0.1",
              port: int = 8443, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
              bind: str | None = None, force: bool = False) -> Layout:
    """Write certs/, keys/, gateway.toml and emitter.toml under ``root``; refuse (PkiError)
    when any of them exists, unless ``force``."""
    root = Path(root)
    if not force:
        existing = [p for p in generated_files(root) if os.path.lexists(p)]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise PkiError(f"refusing to overwrite {existing[0]}{more} (use --force to "
                           f"replace what bootstrap generated; {RULES} is kept)")
    (root / "keys").mkdir(parents=True, exist_ok=True)
    pki = init_pki(root / "certs", [IDENTITY], hosts=list(hosts), force=force)
    producer, feedback = PrivateKey(os.urandom(32)), PrivateKey(os.urandom(32))
    audit_key = PrivateKey(os.urandom(32))
    write_file(root / "keys" / f"{AUDIT_KID}.pem", audit_key.to_pem(), 0o600, force)
    write_file(root / "keys" / "audit.jwks.json",
               _jwks(Keyring([Key(AUDIT_KID, audit_key.public)])), 0o644, force)
    write_file(root / "keys" / f"{PRODUCER_KID}.pem", producer.to_pem(), 0o600, force)
    write_file(root / "keys" / f"{FEEDBACK_KID}.pem", feedback.to_pem(), 0o600, force)
    tenants = sorted(set(TENANTS.values()))
    producers = Keyring([Key(PRODUCER_KID, producer.public, identity=IDENTITY,
                             tenants=frozenset(tenants))])
    write_file(root / "keys" / "producers.jwks.json", _jwks(producers), 0o644, force)
    write_file(root / "keys" / "feedback.jwks.json",
           _jwks(Keyring([Key(FEEDBACK_KID, feedback.public)])), 0o644, force)
    rules = root / RULES
    if not rules.exists():  # keep an operator's edited copy, even with force
        rules.parent.mkdir(parents=True, exist_ok=True)
        rules.write_bytes(DEFAULT_RULES_FILE.read_bytes())
    configured_store = store_url or STORE_URL
    gateway = root / "gateway.toml"
    write_file(gateway, (
        "clock_skew_s = 30\nnonce_ttl_s = 120\nrequire_canonical_body = true\n"
        'allowed_schema_versions = ["1.0"]\nanchor_attestation = true\n'
        f'producer_keyring = "keys/producers.jwks.json"\n'
        f'feedback_key = "keys/{FEEDBACK_KID}.pem"\nfeedback_kid = "{FEEDBACK_KID}"\n\n'
        f"[server]\nhost = {_toml(bind or host)}\nport = {port}\n"
        'tls_cert = "certs/gateway.crt"\ntls_key = "certs/gateway.key"\n'
        'client_ca = "certs/ca.crt"\n\n'
        f"[store]\nurl = {_toml(configured_store)}\n\n[audit]\npath = {_toml(AUDIT)}\n"
        f'checkpoint_key = "keys/{AUDIT_KID}.pem"\ncheckpoint_kid = "{AUDIT_KID}"\n\n'
        f"[policy]\nrules = {_toml(RULES)}\n\n"
        f"[identities.{IDENTITY}]\npins = [{_toml(pki.identities[IDENTITY].sha256)}]\n"
        f"tenants = {_toml(tenants)}\n\n[operator_tenants]\n"
        + "".join(f"{op} = {_toml(t)}\n" for op, t in TENANTS.items())).encode(),
        0o644, force)
    emitter = root / "emitter.toml"
    write_file(emitter, (
        f'url = "https://{host}:{port}"\nca = "certs/ca.crt"\n'
        f'cert = "certs/{IDENTITY}.crt"\nkey = "certs/{IDENTITY}.key"\n'
        f"server_pins = [{_toml(pki.gateway.sha256)}]\nidentity = {_toml(IDENTITY)}\n"
        f'signing_key = "keys/{PRODUCER_KID}.pem"\nkid = "{PRODUCER_KID}"\n'
        'feedback_keyring = "keys/feedback.jwks.json"\nstate_dir = "emitter-state"\n'
        ).encode(), 0o644, force)
    base = root.resolve()
    if store_url is None:
        store_url = f"sqlite:///{base / STORE_URL.removeprefix('sqlite:///')}"
    return Layout(root, gateway, emitter, base / AUDIT, store_url)


def _jwks(keyring: Keyring) -> bytes:
    return (json.dumps(keyring.to_jwks(), indent=2) + "\n").encode()
