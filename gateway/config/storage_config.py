"""``[store]`` and ``[audit]``: where the gateway keeps its state and writes its audit log.

The store URL picks the backend, and each ``[store]`` option belongs to one backend (a
Redis option on a SQLite store is refused, not ignored). The audit log's directory is
created and checked writable at load, so a bad path fails start-up rather than the first
request; the checkpoint key and kid come together or not at all (docs/AUDIT.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from common.tomlfile import ConfigError, path_value, readable_file
from keyring.keys import KID_RE

DEFAULT_STORE_URL = "sqlite:///state/fedgate.db"
DEFAULT_AUDIT_PATH = "audit/gateway-audit.jsonl"
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
    # with cluster = true only (checked in parse_store)
    "min_replicas_acked": ("redis", "an integer in [0, 16]",
                           lambda v: _is_int(v) and 0 <= v <= 16),
}
_CHECKPOINT_KEYS = ("checkpoint_key", "checkpoint_kid", "checkpoint_every_events",
                    "checkpoint_every_s")
STORE_KEYS = frozenset({"url", *_STORE_OPTIONS})
AUDIT_KEYS = frozenset({"path", "syslog", *_CHECKPOINT_KEYS})  # syslog: syslog_config.py


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSettings:
    """[audit] checkpoint_*: sign the chain head every N events or T seconds (AUDIT.md)."""
    key: Path
    kid: str
    every_events: int = 1000
    every_s: float = 60.0


def parse_store(store: Mapping[str, Any], base: Path) -> tuple[str, Mapping[str, Any]]:
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


def parse_audit_path(audit: Mapping[str, Any], base: Path) -> Path:
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


def parse_checkpoints(audit: Mapping[str, Any], base: Path) -> CheckpointSettings | None:
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
