"""[v1.1] The Elastic Common Schema vocabulary of fedgate's audit events (PROTOCOL.md §7).

The events follow the ECS field reference of :data:`ECS_VERSION`; the part of it they
use (field types, and the allowed values of ``event.kind``, ``event.category``,
``event.type`` and ``event.outcome``) is vendored in tests/data/ecs_flat_subset.json and
every kind of event the gateway and the emitter write is checked against it
(tests/integration/test_audit_ecs.py). Here: the version, the service names, which
``event.type`` a decision of each ``event.category`` gets, the pre-v1.1 names still
written beside their ECS or ``fedgate.`` names, and the small normalisers of the values
that came from the network (``source.ip``, ``source.port``, method, path).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

__all__ = ["ECS_VERSION", "EMITTER_SERVICE", "EXPECTED_TYPES", "LEGACY_ALIASES",
           "MAX_METHOD", "MAX_PATH", "SERVICE_NAME", "bounded", "event_types", "ip", "port",
           "service_event", "tls_version"]

#: the ECS release whose field reference the events follow (tests/data/ecs_flat_subset.json)
ECS_VERSION = "8.11.0"
SERVICE_NAME = "fedgate"  # service.name of the gateway's events
EMITTER_SERVICE = "fedgate-emitter"  # service.name of the emitter's own events
#: ECS 8.11 ``event.category`` → the ``event.type`` values it expects (the categories
#: fedgate uses; checked against the vendored ECS reference in tests/integration/test_audit_ecs.py)
EXPECTED_TYPES: dict[str, frozenset[str]] = {
    "authentication": frozenset({"start", "end", "info"}),
    "configuration": frozenset({"access", "change", "creation", "deletion", "info"}),
    "database": frozenset({"access", "change", "info", "error"}),
    "iam": frozenset({"admin", "change", "creation", "deletion", "group", "info", "user"}),
    "network": frozenset({"access", "allowed", "connection", "denied", "end", "info",
                          "protocol", "start"}),
    "web": frozenset({"access", "error", "info"}),
}
#: pre-v1.1 member → its v1.1 name; both are written, same value, for one release
LEGACY_ALIASES: dict[str, str] = {
    "request_id": "http.request.id",
    "service.identity": "fedgate.service_identity",
    "tenant_id": "organization.id",
    "kid": "fedgate.kid",
    "execution_fingerprint": "fedgate.execution_fingerprint",
    "attestation_measurement_hash": "fedgate.attestation_measurement_hash",
    "feedback.nonce": "fedgate.feedback.nonce",
    "feedback.adjustments": "fedgate.feedback.adjustments",
    "feedback.skipped": "fedgate.feedback.skipped",
    "feedback.skipped_executions": "fedgate.feedback.skipped_executions",
    "feedback.skip_reason": "fedgate.feedback.skip_reason",
    "prev_hash": "fedgate.prev_hash",  # written by audit.seal.seal
    "hash": "event.hash",  # written by audit.seal.seal
}
MAX_PATH = 1024  # url.path bound (the request target came from the network)
MAX_METHOD = 32


def event_types(category: list[str], outcome: str, status: int | None = None) -> list[str]:
    """ECS ``event.type`` of a decision in ``category``: ``web`` → ``access`` (plus
    ``error`` when the gateway answered 5xx), ``authentication`` → ``start`` (an attempt
    to authenticate; the outcome says how it went), ``iam`` → ``info``, ``database`` →
    ``error`` on a failure (else ``access``), ``network`` → ``connection`` (plus
    ``denied`` on a failure), ``configuration`` → ``change``."""
    if not all(type(c) is str for c in category):
        raise ValueError("event.category must be a list of keywords")
    return list(_event_types(tuple(category), outcome == "failure",
                             bool(status and status >= 500)))


@functools.lru_cache(maxsize=256)  # a handful of combinations: worked out once each
def _event_types(category: tuple[str, ...], failed: bool, server_error: bool
                 ) -> tuple[str, ...]:
    types: list[str] = []
    for c in category:
        if c not in EXPECTED_TYPES:
            raise ValueError(f"event.category {c!r} has no event.type mapping")
        types += {"web": ["access"] + (["error"] if server_error else []),
                  "authentication": ["start"], "iam": ["info"],
                  "database": ["error"] if failed else ["access"],
                  "network": ["connection"] + (["denied"] if failed else []),
                  "configuration": ["change"]}[c]
    return tuple(dict.fromkeys(types))


def ip(value: str | None) -> str | None:
    """``source.ip`` (ECS type ``ip``): an address, zone id dropped; else None (a peer
    that is no IP socket, such as a Unix socket path, has no source.ip)."""
    if not isinstance(value, str):
        return None
    return _ip(value)


@functools.lru_cache(maxsize=4096)  # one parse per peer address, not one per event
def _ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.split("%", 1)[0]))
    except ValueError:
        return None


def port(value: int | None) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535
    return value if ok else None


def bounded(value: str | None, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def tls_version(version: str | None) -> str | None:
    """``ssl.SSLObject.version()`` (``TLSv1.3``) in ECS form (``1.3``); None if unknown."""
    if isinstance(version, str) and version.startswith("TLSv") and len(version) <= 16:
        return version[4:]
    return None


def service_event(timestamp: str, action: str) -> dict[str, Any]:
    """The ECS members of an event of the audit log itself (``audit.checkpoint``,
    ``audit.rotated``: category ``configuration``, type ``change``). No HTTP request, no
    peer, no replica name (a checkpoint may be written by ``fedgate audit rotate``)."""
    return {"@timestamp": timestamp, "ecs.version": ECS_VERSION, "event.kind": "event",
            "event.action": action, "event.outcome": "success",
            "event.category": ["configuration"], "event.type": ["change"],
            "service.name": SERVICE_NAME}
