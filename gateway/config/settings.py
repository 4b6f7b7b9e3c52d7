"""The gateway's TOML file (PROTOCOL.md §8) → frozen ``GatewaySettings``, checked at load.

The security members go to ``SecurityConfig.from_mapping`` (which owns their checks and
the §4 TTL rule); this module adds the tables, the file paths and the keys. Relative
paths are relative to the config file's directory. Every defect is one ``ConfigError``
line, ``<file>: <dotted key>…``; see docs/CONFIG.md.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from common.tomlfile import ConfigError, load_file, path_value, readable_file
from gateway.logs import KEYS as LOG_KEYS
from gateway.logs import LogSettings, from_table
from keyring.ed25519 import PrivateKey
from keyring.keys import KID_RE, Keyring, KeyringError, load_jwks
from keyring.pkcs11 import Pkcs11Config, Pkcs11Error
from keyring.signer import FileSigner, KeySource, key_source, open_signer, pkcs11_config

from .config import SecurityConfig
from .syslog_config import SyslogSettings, parse_syslog

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8443
DEFAULT_STORE_URL = "sqlite:///state/fedgate.db"
DEFAULT_AUDIT_PATH = "audit/gateway-audit.jsonl"
_OWN_KEYS = frozenset({"producer_keyring", "feedback_key", "feedback_kid", "pkcs11",
                       "server", "store", "audit", "policy", "log", "admin"})
# [server] connection limits (issue 7.3, docs/CONFIG.md): name → (default, bounds, kind)
NODE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")
_CONN_LIMITS: dict[str, tuple[float, float, float, str]] = {
    "handshake_timeout_s": (10.0, 0.0, 300.0, "a number of seconds in (0, 300]"),
    "header_timeout_s": (10.0, 0.0, 300.0, "a number of seconds in (0, 300]"),
    "idle_timeout_s": (30.0, 0.0, 3600.0, "a number of seconds in (0, 3600]"),
    "max_connections": (4096, 0, 1_000_000, "an integer in [1, 1000000]"),
    "identity_share": (0.5, 0.0, 1.0, "a number in (0, 1]"),
    # SIGTERM: in-flight requests get this long (docs/OPERATIONS.md "Stopping"); at most
    # SHUTDOWN_TIMEOUT_MAX_S, below the supervisor's SIGKILL grace (gateway/http/workers.py)
    "shutdown_timeout_s": (10.0, 0.0, 20.0, "a number of seconds in (0, 20]"),
    # the kill switch: the whole revoked-key set is re-read this often even if no signal
    # came (a lost pub/sub message costs at most this long; docs/OPERATIONS.md)
    "revocation_refresh_s": (5.0, 0.0, 60.0, "a number of seconds in (0, 60]"),
}
SHUTDOWN_TIMEOUT_MAX_S = _CONN_LIMITS["shutdown_timeout_s"][2]
# the batch route (PROTOCOL.md §5 v1.1): name → (default, lowest, highest)
_BATCH_LIMITS: dict[str, tuple[int, int, int]] = {
    "max_batch_bytes": (8 * 1024 * 1024, 1, 256 * 1024 * 1024),
    "max_batch_items": (1000, 1, 100_000),
}
_SERVER_KEYS = frozenset({"host", "port", "tls_cert", "tls_key", "client_ca", "max_body_bytes",
                          "node_name", "batch_route",
                          *_CONN_LIMITS, *_BATCH_LIMITS})
_IDENTITY_KEYS = frozenset({"pins", "tenants"})
_SQLITE, _REDIS = "sqlite:///", ("redis://", "rediss://")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# [store] options: name → (backend, what it must be, check). Unknown names are refused.
_STORE_OPTIONS: dict[str, tuple[str, str, Callable[[Any], bool]]] = {
    "busy_timeout_ms": ("sqlite", "an integer in [1, 600000]",
                        lambda v: _is_int(v) and 1 <= v <= 600_000),
    "require_durable": ("redis", "true or false", lambda v: isinstance(v, bool)),
    "socket_timeout": ("redis", "a number of seconds in (0, 300]",
                       lambda v: (_is_int(v) or isinstance(v, float)) and 0 < v <= 300),
    "max_connections": ("redis", "an integer in [1, 1024]",
                        lambda v: _is_int(v) and 1 <= v <= 1024),
    "key_prefix": ("redis", "[A-Za-z0-9._-]{1,64}",
                   lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v)),
    "cluster": ("redis", "true or false", lambda v: isinstance(v, bool)),
    # with cluster = true only (checked in _store)
    "min_replicas_acked": ("redis", "an integer in [0, 16]",
                           lambda v: _is_int(v) and 0 <= v <= 16),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    tls_cert: Path
    tls_key: Path
    client_ca: Path
    handshake_timeout_s: float = _CONN_LIMITS["handshake_timeout_s"][0]
    header_timeout_s: float = _CONN_LIMITS["header_timeout_s"][0]
    idle_timeout_s: float = _CONN_LIMITS["idle_timeout_s"][0]
    max_connections: int = int(_CONN_LIMITS["max_connections"][0])
    identity_share: float = _CONN_LIMITS["identity_share"][0]
    shutdown_timeout_s: float = _CONN_LIMITS["shutdown_timeout_s"][0]
    revocation_refresh_s: float = _CONN_LIMITS["revocation_refresh_s"][0]
    #: this replica's name (ECS ``service.node.name``; the audit outbox's owner): unique
    #: among the gateways that share one store
    node_name: str = ""
    #: POST /internal/v1/telemetry/batch is served (false: 404, emitters fall back)
    batch_route: bool = True
    max_batch_bytes: int = _BATCH_LIMITS["max_batch_bytes"][0]
    max_batch_items: int = _BATCH_LIMITS["max_batch_items"][0]


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings:
    """[admin]: plain-HTTP /healthz, /readyz, /metrics for every worker (PROTOCOL §8);
    no listener unless ``port`` is set."""
    host: str = DEFAULT_HOST
    port: int | None = None


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


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSettings:
    """[audit] checkpoint_*: sign the chain head every N events or T seconds (AUDIT.md)."""
    key: Path
    kid: str
    every_events: int = 1000
    every_s: float = 60.0


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
    server = _table(raw, "server", _SERVER_KEYS)
    store = _table(raw, "store", frozenset({"url", *_STORE_OPTIONS}))
    audit = _table(raw, "audit", frozenset({"path", "syslog", *_CHECKPOINT_KEYS}))
    policy = _table(raw, "policy", frozenset({"rules"}))
    admin = _admin(_table(raw, "admin", frozenset({"host", "port"})), server)
    security = _security(raw, server)
    store_url, store_options = _store(store, base)
    rules = readable_file(policy, "rules", base, "policy.") if "rules" in policy else None
    audit_path = _audit(audit, base)
    syslog = parse_syslog(audit["syslog"], base, audit_path) if "syslog" in audit else None
    return GatewaySettings(
        path=cfg, security=security, server=_server(server, base),
        store_url=store_url, store_options=store_options,
        producer_keyring=readable_file(raw, "producer_keyring", base),
        feedback_key=key_source(raw, "feedback_key", base),
        feedback_kid=_feedback_kid(raw),
        pkcs11=pkcs11_config(raw, base, ("feedback_key",)),
        audit_path=audit_path, policy_rules=rules,
        log=from_table(_table(raw, "log", LOG_KEYS)),
        admin=admin,
        audit_syslog=syslog,
        audit_checkpoints=_checkpoints(audit, base),
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


def _server(server: Mapping[str, Any], base: Path) -> ServerSettings:
    host = server.get("host", DEFAULT_HOST)
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"server.host must be a non-empty string, got {host!r}")
    port = server.get("port", DEFAULT_PORT)
    if not _is_int(port) or not 1 <= port <= 65535:
        raise ConfigError(f"server.port must be an integer in [1, 65535], got {port!r}")
    node = server.get("node_name", socket.gethostname())
    if not isinstance(node, str) or not NODE_NAME_RE.fullmatch(node):
        raise ConfigError("server.node_name must match ^[A-Za-z0-9._-]{1,253}$, "
                          f"got {node!r}")
    batch_route = server.get("batch_route", True)
    if not isinstance(batch_route, bool):
        raise ConfigError(f"server.batch_route must be true or false, got {batch_route!r}")
    return ServerSettings(
        host=host, port=port, node_name=node, batch_route=batch_route,
        **{name: _batch_limit(server, name) for name in _BATCH_LIMITS},
        tls_cert=readable_file(server, "tls_cert", base, "server."),
        tls_key=readable_file(server, "tls_key", base, "server."),
        client_ca=readable_file(server, "client_ca", base, "server."),
        **{name: _conn_limit(server, name) for name in _CONN_LIMITS},
    )


def _batch_limit(server: Mapping[str, Any], name: str) -> int:
    default, low, high = _BATCH_LIMITS[name]
    value = server.get(name, default)
    if not _is_int(value) or not low <= value <= high:
        raise ConfigError(f"server.{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _admin(admin: Mapping[str, Any], server: Mapping[str, Any]) -> AdminSettings:
    host = admin.get("host", DEFAULT_HOST)
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"admin.host must be a non-empty string, got {host!r}")
    port = admin.get("port")
    if port is not None and (not _is_int(port) or not 1 <= port <= 65535):
        raise ConfigError(f"admin.port must be an integer in [1, 65535], got {port!r}")
    if port is not None and port == server.get("port", DEFAULT_PORT):
        raise ConfigError(f"admin.port must differ from server.port ({port})")
    return AdminSettings(host=host, port=port)


def _conn_limit(server: Mapping[str, Any], name: str) -> float | int:
    default, low, high, what = _CONN_LIMITS[name]
    value = server.get(name, default)
    if name == "max_connections":
        ok = _is_int(value) and low < value <= high
    else:
        ok = (_is_int(value) or isinstance(value, float)) and low < value <= high
    if not ok:
        raise ConfigError(f"server.{name} must be {what}, got {value!r}")
    return value if name == "max_connections" else float(value)




def _store(store: Mapping[str, Any], base: Path) -> tuple[str, Mapping[str, Any]]:
    url, backend = _store_url(store.get("url", DEFAULT_STORE_URL), base)
    options: dict[str, Any] = {}
    for name, value in store.items():
        if name == "url":
            continue
        wanted, what, check = _STORE_OPTIONS[name]
        if wanted != backend:
            raise ConfigError(f"store.{name} applies only to a {wanted} store, not {backend}")
        if not check(value):
            raise ConfigError(f"store.{name} must be {what}, got {value!r}")
        options[name] = value
    if options.get("min_replicas_acked") and not options.get("cluster"):
        raise ConfigError("store.min_replicas_acked applies only with store.cluster = true")
    if not options.get("cluster", True):
        options.pop("cluster")  # false: the single Redis, as without the key
    return url, MappingProxyType(options)


def _store_url(url: Any, base: Path) -> tuple[str, str]:
    """(url, backend); a relative sqlite path is made absolute against the config dir."""
    if isinstance(url, str) and url.startswith(_SQLITE):
        path = path_value({"url": url[len(_SQLITE):]}, "url", base, "store.")
        return _SQLITE + str(path), "sqlite"
    if isinstance(url, str) and url.startswith(_REDIS) and url.split("//", 1)[1]:
        return url, "redis"
    # never echo the value: a URL may carry a password
    raise ConfigError("store.url must be sqlite:///PATH, redis://HOST… or rediss://HOST…")


def _feedback_kid(raw: Mapping[str, Any]) -> str:
    kid = raw.get("feedback_kid")
    if kid is None:
        raise ConfigError("feedback_kid is required")
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
        raise ConfigError(f"feedback_kid must match ^[A-Za-z0-9._:-]{{1,128}}$, got {kid!r}")
    return kid


def _audit(audit: Mapping[str, Any], base: Path) -> Path:
    """The audit log; its directory is created if missing and must be writable."""
    path = path_value(audit, "path", base, "audit.", default=DEFAULT_AUDIT_PATH)
    if path.is_dir():
        raise ConfigError(f"audit.path: is a directory: {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"audit.path: cannot create {path.parent} ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    ):
        raise ConfigError(f"audit.path: not writable: {path}")
    return path


_CHECKPOINT_KEYS = ("checkpoint_key", "checkpoint_kid", "checkpoint_every_events",
                    "checkpoint_every_s")


def _checkpoints(audit: Mapping[str, Any], base: Path) -> CheckpointSettings | None:
    """checkpoint_key and checkpoint_kid together or neither; the two triggers bounded."""
    every_events = audit.get("checkpoint_every_events", 1000)
    if not _is_int(every_events) or not 1 <= every_events <= 10_000_000:
        raise ConfigError("audit.checkpoint_every_events must be an integer in [1, 10000000], "
                          f"got {every_events!r}")
    every_s = audit.get("checkpoint_every_s", 60)
    if not (_is_int(every_s) or isinstance(every_s, float)) or not 0 < every_s <= 86400:
        raise ConfigError(f"audit.checkpoint_every_s must be a number of seconds in "
                          f"(0, 86400], got {every_s!r}")
    if "checkpoint_key" not in audit:
        if "checkpoint_kid" in audit:
            raise ConfigError("audit.checkpoint_kid is set without audit.checkpoint_key")
        return None
    kid = audit.get("checkpoint_kid")
    if kid is None:
        raise ConfigError("audit.checkpoint_kid is required with audit.checkpoint_key")
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
        raise ConfigError(f"audit.checkpoint_kid must match ^[A-Za-z0-9._:-]{{1,128}}$, "
                          f"got {kid!r}")
    return CheckpointSettings(key=readable_file(audit, "checkpoint_key", base, "audit."),
                              kid=kid, every_events=every_events, every_s=float(every_s))
