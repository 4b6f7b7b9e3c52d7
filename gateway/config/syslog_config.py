"""``[audit.syslog]``: where ``fedgate audit ship`` forwards the audit log (docs/CONFIG.md).

Checked at load like every other table: unknown keys, wrong types and out-of-range values
are one ``ConfigError`` line naming ``audit.syslog.<key>``; the TLS files must be readable
now. Relative paths are relative to the config file's directory.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.syslog import FACILITIES
from common.tomlfile import ConfigError, path_value, readable_file

PREFIX = "audit.syslog."
DEFAULT_PORTS = {"tcp": 514, "tls": 6514}  # RFC 5425 assigns 6514 to syslog over TLS
# number keys: name → (default, low (exclusive), high (inclusive))
_NUMBERS: dict[str, tuple[float, float, float]] = {
    "poll_interval_s": (0.2, 0.0, 60.0),
    "connect_timeout_s": (5.0, 0.0, 300.0),
    "ack_timeout_s": (10.0, 0.0, 300.0),
    "backoff_initial_s": (0.5, 0.0, 300.0),
    "backoff_max_s": (30.0, 0.0, 3600.0),
}
_KEYS = frozenset({"host", "port", "transport", "ca", "client_cert", "client_key",
                   "server_name", "hostname", "facility", "state_path", "batch_max_events",
                   "metrics_path", *_NUMBERS})
_HOSTNAME = re.compile(r"[\x21-\x7e]{1,255}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyslogSettings:
    host: str
    port: int
    transport: str  # "tcp" | "tls"
    state_path: Path
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None  # the name the server certificate must carry
    hostname: str = "-"
    facility: int = FACILITIES["local0"]
    batch_max_events: int = 1000
    metrics_path: Path | None = None
    poll_interval_s: float = _NUMBERS["poll_interval_s"][0]
    connect_timeout_s: float = _NUMBERS["connect_timeout_s"][0]
    ack_timeout_s: float = _NUMBERS["ack_timeout_s"][0]
    backoff_initial_s: float = _NUMBERS["backoff_initial_s"][0]
    backoff_max_s: float = _NUMBERS["backoff_max_s"][0]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _string(table: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = table.get(key, default)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{PREFIX}{key} must be a non-empty string, got {value!r}")
    return value


def _number(table: Mapping[str, Any], key: str) -> float:
    default, low, high = _NUMBERS[key]
    value = table.get(key, default)
    if not (_is_int(value) or isinstance(value, float)) or not low < value <= high:
        raise ConfigError(f"{PREFIX}{key} must be a number of seconds in ({low:g}, {high:g}], "
                          f"got {value!r}")
    return float(value)


def parse_syslog(table: Any, base: Path, audit_path: Path) -> SyslogSettings:
    """The ``[audit.syslog]`` table (already known to be present)."""
    if not isinstance(table, Mapping):
        raise ConfigError("audit.syslog must be a table ([audit.syslog])")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown key {PREFIX + unknown[0]!r}")
    host = _string(table, "host")
    if host is None:
        raise ConfigError(f"{PREFIX}host is required")
    transport = table.get("transport", "tls")
    if transport not in DEFAULT_PORTS:
        raise ConfigError(f'{PREFIX}transport must be "tcp" or "tls", got {transport!r}')
    port = table.get("port", DEFAULT_PORTS[transport])
    if not _is_int(port) or not 1 <= port <= 65535:
        raise ConfigError(f"{PREFIX}port must be an integer in [1, 65535], got {port!r}")
    tls_keys = [k for k in ("ca", "client_cert", "client_key", "server_name") if k in table]
    if transport == "tcp" and tls_keys:
        raise ConfigError(f'{PREFIX}{tls_keys[0]} applies only to transport = "tls"')
    if transport == "tls" and "ca" not in table:
        raise ConfigError(f'{PREFIX}ca is required with transport = "tls"')
    if ("client_cert" in table) != ("client_key" in table):
        raise ConfigError(f"{PREFIX}client_cert and client_key go together")
    files = {k: readable_file(table, k, base, PREFIX) for k in ("ca", "client_cert",
                                                               "client_key") if k in table}
    hostname = _string(table, "hostname", socket.getfqdn() or socket.gethostname())
    if not _HOSTNAME.fullmatch(hostname):
        raise ConfigError(f"{PREFIX}hostname must be 1-255 printable ASCII characters "
                          f"without spaces, got {hostname!r}")
    facility = table.get("facility", "local0")
    if facility not in FACILITIES:
        raise ConfigError(f"{PREFIX}facility must be one of {', '.join(FACILITIES)}, "
                          f"got {facility!r}")
    batch = table.get("batch_max_events", 1000)
    if not _is_int(batch) or not 1 <= batch <= 100_000:
        raise ConfigError(f"{PREFIX}batch_max_events must be an integer in [1, 100000], "
                          f"got {batch!r}")
    state = path_value(table, "state_path", base, PREFIX,
                       default=str(audit_path) + ".ship-state.json")
    if state == audit_path:
        raise ConfigError(f"{PREFIX}state_path must not be the audit file itself")
    metrics = path_value(table, "metrics_path", base, PREFIX) if "metrics_path" in table \
        else None
    numbers = {k: _number(table, k) for k in _NUMBERS}
    if numbers["backoff_max_s"] < numbers["backoff_initial_s"]:
        raise ConfigError(f"{PREFIX}backoff_max_s must be at least backoff_initial_s")
    return SyslogSettings(host=host, port=port, transport=transport, state_path=state,
                          server_name=_string(table, "server_name", host)
                          if transport == "tls" else None,
                          hostname=hostname, facility=FACILITIES[facility],
                          batch_max_events=batch, metrics_path=metrics, **files, **numbers)
