"""``[server]`` and ``[admin]``: the listeners, their connection limits and the batch route.

Each limit is a bounded number with its default beside it (docs/CONFIG.md); a value out of
range is one ``ConfigError`` line naming ``server.<key>`` or ``admin.<key>``. The TLS
files must be readable now; relative paths are relative to the config file's directory.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.tomlfile import ConfigError, readable_file

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8443
NODE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")
# [server] connection limits (issue 7.3, docs/CONFIG.md): name → (default, bounds, kind)
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
SERVER_KEYS = frozenset({"host", "port", "tls_cert", "tls_key", "client_ca", "max_body_bytes",
                         "node_name", "batch_route",
                         *_CONN_LIMITS, *_BATCH_LIMITS})
ADMIN_KEYS = frozenset({"host", "port"})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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


def parse_server(server: Mapping[str, Any], base: Path) -> ServerSettings:
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


def parse_admin(admin: Mapping[str, Any], server: Mapping[str, Any]) -> AdminSettings:
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
