"""The emitter's TOML file → frozen ``EmitterSettings``, checked at load (docs/EMITTER.md).

Same rules as the gateway's file: unknown keys and wrong types are errors, relative paths
are relative to the config file's directory, every file is opened at load, and every
defect is one ``ConfigError`` line ``<file>: <key>…``. ``url`` must be ``https://``: a
plain-HTTP gateway is refused here, before anything could be sent.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.tls import is_pin, normalize_pin
from common.tomlfile import ConfigError, load_file, path_value, readable_file
from keyring.keys import KID_RE
from keyring.pkcs11_uri import Pkcs11Config
from keyring.signer import KeySource, key_source, pkcs11_config
from schemas.routes import IDENTITY_RE

_KEYS = frozenset({
    "url", "ca", "cert", "key", "server_pins", "identity", "signing_key", "kid",
    "feedback_keyring", "state_dir", "clock_skew_s", "legacy_unbound_nonce",
    "max_attempts", "backoff_initial_s", "backoff_max_s", "request_timeout_s",
    "max_body_bytes", "outbox_retention_s", "pkcs11",
})
DEFAULT_MAX_BODY = 1024 * 1024  # the gateway's default max_body_bytes (PROTOCOL.md §4)
DEFAULT_RETENTION_S = 7 * 86400


@dataclass(frozen=True, slots=True, kw_only=True)
class EmitterSettings:
    path: Path | None  # the config file (absolute), None when built in code
    url: str  # https://host:port (no trailing slash)
    ca: Path
    cert: Path
    key: Path
    server_pins: tuple[str, ...]  # gateway cert sha256 (lowercase hex) or spki:<base64>
    identity: str
    signing_key: KeySource  # a PEM file, or a pkcs11: URI (docs/KEYS.md)
    kid: str | None
    feedback_keyring: Path
    state_dir: Path
    clock_skew_s: int = 30
    legacy_unbound_nonce: bool = False
    max_attempts: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float = 10.0
    max_body_bytes: int = DEFAULT_MAX_BODY  # a larger signed body is refused locally
    outbox_retention_s: int = DEFAULT_RETENTION_S  # final outbox rows older: pruned
    pkcs11: Pkcs11Config | None = None  # [pkcs11]: the token's module and PIN


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportSettings:
    """What reaching the gateway needs (``fedgate probe``): the emitter file's own keys."""

    path: Path | None
    url: str
    ca: Path
    cert: Path
    key: Path
    server_pins: tuple[str, ...]


def check_url(url: Any) -> str:
    """An ``https://`` URL without credentials, query or fragment; ConfigError otherwise."""
    if not isinstance(url, str) or not url:
        raise ConfigError("url is required (https://HOST:PORT)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError("url is not a valid URL") from None
    if parts.scheme.lower() != "https":
        raise ConfigError(
            f"url must use https:// (got {parts.scheme or 'no'} scheme): the emitter never "
            "sends telemetry over plain HTTP")
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("url must be https://HOST[:PORT][/PREFIX] without credentials, "
                          "query or fragment")
    return url.rstrip("/")


def load_emitter_settings(path: str | Path) -> EmitterSettings:
    """Read and check the whole file; ``ConfigError`` (one line, naming the key) on a defect."""
    return load_file(path, _build)


def load_transport_settings(path: str | Path) -> TransportSettings:
    """``url``, ``ca``, ``cert``, ``key`` and ``server_pins`` of an emitter file, read and
    checked exactly as :func:`load_emitter_settings` does; the other keys are not opened
    (a healthcheck creates no ``state_dir`` and needs no signing key)."""
    return load_file(path, _build_transport)


def _build_transport(cfg: Path, raw: Mapping[str, Any]) -> TransportSettings:
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}")
    base = cfg.parent
    return TransportSettings(
        path=cfg, url=check_url(raw.get("url")), ca=readable_file(raw, "ca", base),
        cert=readable_file(raw, "cert", base), key=readable_file(raw, "key", base),
        server_pins=_pins(raw.get("server_pins", [])))


def _build(cfg: Path, raw: Mapping[str, Any]) -> EmitterSettings:
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}")
    base = cfg.parent
    settings = EmitterSettings(
        path=cfg, url=check_url(raw.get("url")),
        ca=readable_file(raw, "ca", base), cert=readable_file(raw, "cert", base),
        key=readable_file(raw, "key", base), server_pins=_pins(raw.get("server_pins", [])),
        identity=_identity(raw.get("identity")),
        signing_key=key_source(raw, "signing_key", base), kid=_kid(raw.get("kid")),
        pkcs11=pkcs11_config(raw, base, ("signing_key",)),
        feedback_keyring=readable_file(raw, "feedback_keyring", base),
        state_dir=_state_dir(raw, base),
        clock_skew_s=_number(raw, "clock_skew_s", 30, 1, 3600, integer=True),
        legacy_unbound_nonce=_bool(raw, "legacy_unbound_nonce", False),
        max_attempts=_number(raw, "max_attempts", 5, 1, 100, integer=True),
        backoff_initial_s=_number(raw, "backoff_initial_s", 0.5, 0.001, 3600),
        backoff_max_s=_number(raw, "backoff_max_s", 30.0, 0.001, 86400),
        request_timeout_s=_number(raw, "request_timeout_s", 10.0, 0.1, 600),
        max_body_bytes=_number(raw, "max_body_bytes", DEFAULT_MAX_BODY, 1024, 1 << 30,
                               integer=True),
        outbox_retention_s=_number(raw, "outbox_retention_s", DEFAULT_RETENTION_S, 0,
                                   10 * 365 * 86400, integer=True),
    )
    if settings.backoff_max_s < settings.backoff_initial_s:
        raise ConfigError("backoff_max_s must be at least backoff_initial_s")
    return settings


def _state_dir(raw: Mapping[str, Any], base: Path) -> Path:
    return secure_state_dir(path_value(raw, "state_dir", base))


def secure_state_dir(path: Path) -> Path:
    """Create ``path`` ``0700`` if missing; refuse (ConfigError naming ``state_dir``) one
    that is not a directory, not owned by this user, or writable by group or others —
    whoever can write there can swap the outbox, the replay cache or the audit log."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot create {path} ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir: not a writable directory: {path}")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"state_dir: {path} is owned by uid {st.st_uid}, not by this "
                          f"user (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise ConfigError(f"state_dir: {path} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod 700 it")
    return path


def private_file(path: Path) -> None:
    """Create ``path`` (and its directory, ``0700``) with mode ``0600`` if missing, and
    take group/other permissions away from it and from SQLite's ``-wal``/``-shm``
    companions if they exist (SQLite gives those the database file's mode)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
            if mode & 0o077:
                file.chmod(mode & 0o700)
        except FileNotFoundError:
            pass


def _pins(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError("server_pins must be a list of pin strings")
    pins = tuple(normalize_pin(p) for p in value)
    for pin in pins:
        if not is_pin(pin):
            raise ConfigError(f"server_pins: {pin!r} is neither a sha256 hex fingerprint nor "
                              "spki:<base64 sha256 of the key>")
    return pins


def _identity(value: Any) -> str:
    if not isinstance(value, str) or not IDENTITY_RE.fullmatch(value):
        raise ConfigError(f"identity must match ^[A-Za-z0-9._-]{{1,128}}$, got {value!r}")
    return value


def _kid(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not KID_RE.fullmatch(value)):
        raise ConfigError(f"kid must match ^[A-Za-z0-9._:-]{{1,128}}$, got {value!r}")
    return value


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _number(raw: Mapping[str, Any], key: str, default: float, lo: float, hi: float, *,
            integer: bool = False) -> Any:
    value = raw.get(key, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {what} in [{lo}, {hi}], got {value!r}")
    return value
