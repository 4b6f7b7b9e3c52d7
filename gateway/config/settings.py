"""The gateway's TOML file (PROTOCOL.md §8) → frozen ``GatewaySettings``, checked at load.

The security members go to ``SecurityConfig.from_mapping`` (which owns their checks and
the §4 TTL rule); this module assembles the tables, the file paths and the keys, and loads
the keys the file names. The tables' own checks live beside their settings:
``server_config.py`` ([server], [admin]), ``storage_config.py`` ([store], [audit]) and
``syslog_config.py`` ([audit.syslog]). Relative paths are relative to the config file's
directory. Every defect is one ``ConfigError`` line, ``<file>: <dotted key>…``; see
docs/CONFIG.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.tomlfile import ConfigError, load_file, readable_file
from gateway.logs import KEYS as LOG_KEYS
from gateway.logs import LogSettings, from_table
from keyring.ed25519 import PrivateKey
from keyring.keys import KID_RE, Keyring, KeyringError, load_jwks
from keyring.pkcs11_uri import Pkcs11Config, Pkcs11Error
from keyring.signer import FileSigner, KeySource, key_source, open_signer, pkcs11_config

from .config import SecurityConfig
from .server_config import (
    ADMIN_KEYS,
    SERVER_KEYS,
    AdminSettings,
    ServerSettings,
    parse_admin,
    parse_server,
)
from .storage_config import (
    AUDIT_KEYS,
    STORE_KEYS,
    CheckpointSettings,
    parse_audit_path,
    parse_checkpoints,
    parse_store,
)
from .syslog_config import SyslogSettings, parse_syslog

__all__ = ["AdminSettings", "CheckpointSettings", "GatewaySettings", "ServerSettings",
           "load_checkpoint_key", "load_keys", "load_producer_keyring", "load_settings"]

_OWN_KEYS = frozenset({"producer_keyring", "feedback_key", "feedback_kid", "pkcs11",
                       "server", "store", "audit", "policy", "log", "admin"})
_IDENTITY_KEYS = frozenset({"pins", "tenants"})


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    path: Path  # the config file (absolute)
    security: SecurityConfig
    server: ServerSettings
    store_url: str  # sqlite:///ABS/PATH (so "sqlite:////…") or redis[s]://…
    store_options: Mapping[str, Any]  # keyword arguments for gateway.store.open_store
    producer_keyring: Path
    feedback_key: KeySource  # a PEM file, or a pkcs11: URI (docs/KEYS.md)
    feedback_kid: str
    pkcs11: Pkcs11Config | None = None  # [pkcs11]: the token's module and PIN
    audit_path: Path
    policy_rules: Path | None = None
    log: LogSettings = LogSettings()  # [log]; `fedgate serve` flags override it
    admin: AdminSettings = AdminSettings()
    audit_syslog: SyslogSettings | None = None  # [audit.syslog]: `fedgate audit ship`
    audit_checkpoints: CheckpointSettings | None = None  # None: no checkpoint key


def load_settings(path: str | Path) -> GatewaySettings:
    """Read and check the whole file; ``ConfigError`` (one line, naming the key) on a defect."""
    return load_file(path, _build)


def load_keys(settings: GatewaySettings) -> tuple[Keyring, FileSigner | Any]:
    """The producer keyring and the feedback signer (a file key, or a session on the
    PKCS#11 token: the caller closes it)."""
    keyring = load_producer_keyring(settings)
    audit_key = load_checkpoint_key(settings)  # a bad audit key fails start-up too
    try:
        feedback = open_signer(settings.feedback_key, settings.feedback_kid,
                               pkcs11=settings.pkcs11)
    except (Pkcs11Error, ValueError) as exc:
        raise ConfigError(f"{settings.path}: feedback_key: {exc}") from None
    if audit_key is not None and audit_key.public == feedback.public:
        feedback.close()
        raise ConfigError(f"{settings.path}: audit.checkpoint_key: is the feedback key; use a "
                          "separate audit key (docs/AUDIT.md, Checkpoints)")
    return keyring, feedback


def load_producer_keyring(settings: GatewaySettings) -> Keyring:
    """The producer keyring (also what ``SIGHUP`` re-reads); every producer key must belong
    to a configured identity (a key that can never verify anything is a mistake)."""
    try:
        keyring = load_jwks(settings.producer_keyring)
    except KeyringError as exc:
        raise ConfigError(f"{settings.path}: producer_keyring: {exc}") from None
    for key in keyring.values():
        if key.identity not in settings.security.identities:
            what = "has no identity" if key.identity is None else (
                f"is for identity {key.identity!r}, which is not configured in identities")
            raise ConfigError(f"{settings.path}: producer_keyring: key {key.kid!r} {what}")
    owners: dict[bytes, str] = {}
    for key in keyring.values():  # one public key acting for two identities is a mistake
        if owners.setdefault(key.public, key.identity) != key.identity:
            raise ConfigError(f"{settings.path}: producer_keyring: key {key.kid!r} reuses the "
                              f"public key of another identity ({owners[key.public]!r})")
    return keyring


def load_checkpoint_key(settings: GatewaySettings) -> PrivateKey | None:
    """The audit checkpoint key ([audit] checkpoint_key); None when not configured."""
    if settings.audit_checkpoints is None:
        return None
    try:
        return PrivateKey.load(settings.audit_checkpoints.key)
    except ValueError as exc:
        raise ConfigError(f"{settings.path}: audit.checkpoint_key: {exc}") from None


def _build(cfg: Path, raw: Mapping[str, Any]) -> GatewaySettings:
    base = cfg.parent
    server = _table(raw, "server", SERVER_KEYS)
    store = _table(raw, "store", STORE_KEYS)
    audit = _table(raw, "audit", AUDIT_KEYS)
    policy = _table(raw, "policy", frozenset({"rules"}))
    admin = parse_admin(_table(raw, "admin", ADMIN_KEYS), server)
    security = _security(raw, server)
    store_url, store_options = parse_store(store, base)
    rules = readable_file(policy, "rules", base, "policy.") if "rules" in policy else None
    audit_path = parse_audit_path(audit, base)
    syslog = parse_syslog(audit["syslog"], base, audit_path) if "syslog" in audit else None
    return GatewaySettings(
        path=cfg, security=security, server=parse_server(server, base),
        store_url=store_url, store_options=store_options,
        producer_keyring=readable_file(raw, "producer_keyring", base),
        feedback_key=key_source(raw, "feedback_key", base),
        feedback_kid=_feedback_kid(raw),
        pkcs11=pkcs11_config(raw, base, ("feedback_key",)),
        audit_path=audit_path, policy_rules=rules,
        log=from_table(_table(raw, "log", LOG_KEYS)),
        admin=admin,
        audit_syslog=syslog,
        audit_checkpoints=parse_checkpoints(audit, base),
    )


def _table(raw: Mapping[str, Any], name: str, allowed: frozenset[str]) -> Mapping[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name} must be a table ([{name}])")
    _reject_unknown(table, allowed, f"{name}.")
    return table


def _reject_unknown(table: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"unknown key {prefix + unknown[0]!r}")


def _security(raw: Mapping[str, Any], server: Mapping[str, Any]) -> SecurityConfig:
    """Everything top-level that is not ours, plus server.max_body_bytes, to SecurityConfig
    (which refuses unknown names, bad values and the unsafe TTL)."""
    members = {k: v for k, v in raw.items() if k not in _OWN_KEYS}
    identities = members.get("identities")
    if isinstance(identities, Mapping):
        for name, entry in identities.items():
            if isinstance(entry, Mapping):
                _reject_unknown(entry, _IDENTITY_KEYS, f"identities.{name}.")
    from_server = "max_body_bytes" in server
    if from_server:
        if "max_body_bytes" in members:
            raise ConfigError("max_body_bytes is set both at the top level and in [server]")
        members["max_body_bytes"] = server["max_body_bytes"]
    try:
        return SecurityConfig.from_mapping(members)
    except ConfigError as exc:
        msg = str(exc)
        if from_server and msg.startswith("max_body_bytes"):
            msg = "server." + msg
        raise ConfigError(msg) from None


def _feedback_kid(raw: Mapping[str, Any]) -> str:
    kid = raw.get("feedback_kid")
    if kid is None:
        raise ConfigError("feedback_kid is required")
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
        raise ConfigError(f"feedback_kid must match ^[A-Za-z0-9._:-]{{1,128}}$, got {kid!r}")
    return kid

