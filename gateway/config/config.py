"""Gateway configuration: the security members of PROTOCOL.md §8, checked at load time.

``SecurityConfig`` carries exactly the names and meanings of the ``config`` object of
``vectors/telemetry_v1.json``. Every defect is a ``ConfigError`` with one line naming the
key; an unsafe configuration (a replay window: ``nonce_ttl_s < 2 * clock_skew_s + 1``)
refuses to start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from common.tls import is_pin
from common.tomlfile import ConfigError
from schemas.routes import IDENTITY_RE

TENANT_RE = re.compile(r"[a-fA-F0-9-]{36}")
DEFAULT_MAX_BODY = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    # accepted client certificates: sha256 of the DER (lowercase hex), or [v1.1]
    # "spki:<standard base64 of sha256(SubjectPublicKeyInfo DER)>" (survives renewal)
    pins: frozenset[str]
    tenants: frozenset[str]


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    clock_skew_s: int = 30
    nonce_ttl_s: int = 120
    require_canonical_body: bool = True
    allowed_schema_versions: frozenset[str] = frozenset({"1.0"})
    anchor_attestation: bool = True
    identities: Mapping[str, Identity] = field(default_factory=lambda: MappingProxyType({}))
    operator_tenants: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_body_bytes: int = DEFAULT_MAX_BODY
    rate_limit_per_minute: int = 0  # 0: off (§4 step 11 is optional)
    #: pin → the identity it is pinned to, built once here (the identity check is O(1))
    pin_owners: Mapping[str, str] = field(init=False, repr=False, compare=False,
                                          default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        owners = {pin: i.name for i in self.identities.values() for pin in i.pins}
        object.__setattr__(self, "pin_owners", MappingProxyType(owners))
        if self.nonce_ttl_s < 2 * self.clock_skew_s + 1:
            raise ConfigError(
                f"nonce_ttl_s = {self.nonce_ttl_s} leaves a replay window: it must be at least "
                f"2 * clock_skew_s + 1 = {2 * self.clock_skew_s + 1}"
            )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, where: str = "") -> SecurityConfig:
        """Build from a parsed TOML/JSON mapping holding only security members."""
        unknown = set(raw) - _SECURITY_KEYS
        if unknown:
            raise ConfigError(f"{where}unknown key {sorted(unknown)[0]!r}")
        return cls(
            clock_skew_s=_int(raw, "clock_skew_s", 30, lo=0, hi=3600, where=where),
            nonce_ttl_s=_int(raw, "nonce_ttl_s", 120, lo=1, hi=7 * 86400, where=where),
            require_canonical_body=_bool(raw, "require_canonical_body", True, where),
            allowed_schema_versions=_str_set(raw, "allowed_schema_versions", ["1.0"], where),
            anchor_attestation=_bool(raw, "anchor_attestation", True, where),
            identities=_identities(raw.get("identities", {}), where),
            operator_tenants=_operator_tenants(raw.get("operator_tenants", {}), where),
            max_body_bytes=_int(raw, "max_body_bytes", DEFAULT_MAX_BODY, lo=1,
                                hi=64 * 1024 * 1024, where=where),
            rate_limit_per_minute=_int(raw, "rate_limit_per_minute", 0, lo=0, hi=10**6,
                                       where=where),
        )


_SECURITY_KEYS = frozenset(
    {"clock_skew_s", "nonce_ttl_s", "require_canonical_body", "allowed_schema_versions",
     "anchor_attestation", "identities", "operator_tenants", "max_body_bytes",
     "rate_limit_per_minute"}
)


def _int(raw: Mapping[str, Any], key: str, default: int, *, lo: int, hi: int, where: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _bool(raw: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{key} must be true or false, got {value!r}")
    return value


def _str_set(raw: Mapping[str, Any], key: str, default: list[str], where: str) -> frozenset[str]:
    value = raw.get(key, default)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}{key} must be a non-empty list of strings")
    return frozenset(value)


def _identities(raw: Any, where: str) -> Mapping[str, Identity]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}identities must be a table")
    out: dict[str, Identity] = {}
    for name, entry in raw.items():
        key = f"{where}identities.{name}"
        if not IDENTITY_RE.fullmatch(name):
            raise ConfigError(f"{key}: malformed identity name")
        if not isinstance(entry, Mapping) or set(entry) - {"pins", "tenants"}:
            raise ConfigError(f"{key} must be a table with only pins and tenants")
        pins = entry.get("pins")
        if not isinstance(pins, list) or not pins or not all(
            is_pin(p) for p in pins
        ):
            raise ConfigError(f"{key}.pins must be a non-empty list of pins: lowercase sha256 "
                              "hex of the certificate, or spki:<base64 sha256 of its key>")
        tenants = entry.get("tenants")
        if not isinstance(tenants, list) or not all(
            isinstance(t, str) and TENANT_RE.fullmatch(t) for t in tenants
        ):
            raise ConfigError(f"{key}.tenants must be a list of tenant ids")
        for other in out.values():  # one certificate must not speak as two identities
            if other.pins & set(pins):
                raise ConfigError(f"{key}.pins: a pin is also pinned to identity {other.name!r}")
        out[name] = Identity(name, frozenset(pins), frozenset(tenants))
    return MappingProxyType(out)


def _operator_tenants(raw: Any, where: str) -> Mapping[str, str]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}operator_tenants must be a table")
    for operator, tenant in raw.items():
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            raise ConfigError(f"{where}operator_tenants.{operator} must be a tenant id")
    return MappingProxyType(dict(raw))
