"""Audit event builders (PROTOCOL.md §7): flat, dotted Elastic Common Schema names.

Builders take explicit keyword arguments only — never a request, a header mapping or a
``**kwargs`` passthrough — so no event can carry a private key, a signing input or raw
body bytes. ``now`` is the caller's single clock reading for the request (Unix seconds).

Shape rules (docs/AUDIT.md):

* [v1.1] ECS :data:`ECS_VERSION`: every event has ``ecs.version``, ``event.kind`` =
  ``event``, ``event.category`` and ``event.type`` (JSON arrays of keywords; the types
  are ones ECS expects for the categories, :func:`event_types`), ``service.name`` and,
  when the caller knows it, ``service.node.name`` (the replica); the request's facts in
  ECS fields (``source.ip``/``source.port``, ``http.request.method``, ``url.path``,
  ``http.request.id``, ``tls.version``, ``organization.id``) when known;
* members ECS does not define are under ``fedgate.``; the pre-v1.1 names
  (:data:`LEGACY_ALIASES`) are still written, with the same value, for one release;
* ``tenant_id``, ``kid`` and ``execution_fingerprint`` are always present (``null`` when
  not known yet) because ``schemas/audit_event.schema.json`` requires them; every other
  optional member is omitted when its value is ``None``;
* ``event.id`` (ECS) is a fresh UUID per event: unique, so an event kept in the store's
  audit outbox is recognised in the chain after a crash (docs/AUDIT.md *Outbox*);
* ``prev_hash``/``fedgate.prev_hash``, ``event.sequence`` and ``hash``/``event.hash``
  are added by :func:`audit.seal.seal` when the event is appended.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

from audit.ecs import (
    ECS_VERSION,
    EMITTER_SERVICE,
    LEGACY_ALIASES,
    MAX_METHOD,
    MAX_PATH,
    SERVICE_NAME,
    bounded,
    event_types,
    ip,
    port,
)
from common.ids import uuid4_text

__all__ = ["FEEDBACK_CATEGORIES", "feedback_event", "handshake_event", "request_event",
           "rfc3339_ms"]

OUTCOMES = ("success", "failure")
_ACTION = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+$")
_MAX_MESSAGE = 512
_ALWAYS = ("tenant_id", "kid", "execution_fingerprint")  # required by the schema, nullable

#: §6 rejection code → ECS category (mirrors gateway/pipeline/errors.py: signature, key and
#: freshness failures are security events; tenant boundaries are ``iam``).
FEEDBACK_CATEGORIES: dict[str, str] = {
    "malformed_response": "web",
    "unsupported_algorithm": "authentication",
    "unknown_kid": "authentication",
    "invalid_signature": "authentication",
    "timestamp_out_of_window": "authentication",
    "nonce_not_bound": "authentication",
    "tenant_mismatch": "iam",
    "attestation_mismatch": "web",
    "replayed_nonce": "web",
}


def rfc3339_ms(now: float) -> str:
    """``2026-11-23T15:04:05.123Z``: UTC, milliseconds, truncated (never in the future)."""
    micros = round(now * 1_000_000)  # exact to the microsecond for any current time
    seconds, millis = divmod(micros // 1000, 1000)
    return f"{_utc_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)  # strftime once per second, not once per event
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _check(action: str, outcome: str, category: list[str], reason: str | None) -> None:
    if not isinstance(action, str) or not _dotted(action):
        raise ValueError(f"event.action {action!r} is not dotted lower-case words")
    if outcome not in OUTCOMES:
        raise ValueError(f"event.outcome must be one of {OUTCOMES}, not {outcome!r}")
    if not isinstance(category, list) or not category or not all(
        isinstance(c, str) and c for c in category
    ):
        raise ValueError("event.category must be a non-empty list of keywords")
    if outcome == "failure" and not reason:
        raise ValueError("a failure event needs event.reason (the error code)")


@functools.lru_cache(maxsize=512)  # the gateway's actions are a fixed handful
def _dotted(action: str) -> bool:
    return _ACTION.match(action) is not None


def _message(detail: str | None) -> str | None:
    if detail is None:
        return None
    detail = " ".join(str(detail).split())  # one line, whatever the caller passed
    return detail if len(detail) <= _MAX_MESSAGE else detail[: _MAX_MESSAGE - 3] + "..."


def _assemble(fields: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` members, except the ones the schema requires (kept as ``null``),
    add the pre-v1.1 alias of every v1.1 member present (:data:`LEGACY_ALIASES`) and a
    unique ``event.id``."""
    out = {k: v for k, v in fields.items() if v is not None}
    for old, new in LEGACY_ALIASES.items():
        if new in out:
            out[old] = out[new]
    for k in _ALWAYS:
        out.setdefault(k, None)
    out["event.id"] = uuid4_text()
    return out


def request_event(
    *,
    action: str,
    outcome: str,
    category: list[str],
    status: int,
    request_id: str,
    reason: str | None = None,
    identity: str | None = None,
    peer_sha256: str | None = None,
    tenant_id: str | None = None,
    kid: str | None = None,
    execution_fingerprint: str | None = None,
    attestation_hash: str | None = None,
    detail: str | None = None,
    source_ip: str | None = None,
    source_port: int | None = None,
    method: str | None = None,
    path: str | None = None,
    tls_version: str | None = None,
    node: str | None = None,
    now: float,
) -> dict[str, Any]:
    """One gateway decision: ``telemetry.accepted``, ``query.rejected``, ``feedback.issued``...

    [v1.1] ``source_ip``/``source_port``: the TCP peer; ``method`` and ``path`` (the
    request target's path, still percent-encoded, at most 1024 characters): the HTTP
    request line; ``tls_version``: ECS form (``1.3``); ``node``: ``service.node.name``,
    the replica (``[server] node_name``). Each is omitted when ``None`` (unknown)."""
    _check(action, outcome, category, reason)
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"http.response.status_code {status!r} is not an HTTP status")
    if not request_id:
        raise ValueError("request_id is required")
    return _assemble({
        "@timestamp": rfc3339_ms(now),
        "ecs.version": ECS_VERSION,
        "event.kind": "event",
        "event.action": action,
        "event.outcome": outcome,
        "event.category": list(category),
        "event.type": event_types(category, outcome, status),
        "event.reason": reason,
        "http.request.id": request_id,
        "http.request.method": bounded(method, MAX_METHOD),
        "url.path": bounded(path, MAX_PATH),
        "http.response.status_code": status,
        "source.ip": ip(source_ip),
        "source.port": port(source_port),
        "tls.version": tls_version,
        "tls.version_protocol": "tls" if tls_version else None,
        "tls.client.hash.sha256": peer_sha256,
        "organization.id": tenant_id,
        "service.name": SERVICE_NAME,
        "service.node.name": node,
        "fedgate.service_identity": identity,
        "fedgate.kid": kid,
        "fedgate.execution_fingerprint": execution_fingerprint,
        "fedgate.attestation_measurement_hash": attestation_hash,
        "message": _message(detail),
    })


def feedback_event(
    *,
    outcome: str,
    request_id: str,
    reason: str | None = None,
    status: int | None = None,
    tenant_id: str | None = None,
    kid: str | None = None,
    nonce: str | None = None,
    adjustments: int | None = None,
    skipped: list[str] | None = None,
    detail: str | None = None,
    method: str | None = None,
    path: str | None = None,
    node: str | None = None,
    now: float,
) -> dict[str, Any]:
    """The emitter's §6 verdict on one feedback response.

    ``skipped`` [v1.1]: execution fingerprints whose adjustments a verified answer
    carried but the emitter never sent (§6 step 8): ``fedgate.feedback.skipped`` (count),
    ``fedgate.feedback.skipped_executions`` and ``fedgate.feedback.skip_reason`` =
    ``unknown_execution`` (and their pre-v1.1 names without ``fedgate.``).

    ``feedback.applied`` on success, ``feedback.rejected`` with ``reason`` = the §6 code
    otherwise; the category follows from the code (:data:`FEEDBACK_CATEGORIES`). The
    response ``nonce`` is not secret and is recorded as ``fedgate.feedback.nonce``.

    [v1.1] ECS: ``method``/``path`` are the emitter's own query (``http.request.*``,
    ``url.path``), ``node`` its host (``service.node.name``), ``service.name`` is
    ``fedgate-emitter``. There is no ``source.*`` nor ``tls.*``: the emitter is the
    client of this exchange, so the TCP peer is the gateway (ECS ``destination``), and its
    transport does not hand the connection's address or TLS version to this layer.
    """
    if outcome == "success":
        if reason is not None:
            raise ValueError("a success event carries no event.reason")
        action, category = "feedback.applied", ["web"]
    else:
        if reason not in FEEDBACK_CATEGORIES:
            raise ValueError(f"unknown §6 rejection code {reason!r}")
        action, category = "feedback.rejected", [FEEDBACK_CATEGORIES[reason]]
    _check(action, outcome, category, reason)
    if not request_id:
        raise ValueError("request_id is required")
    return _assemble({
        "@timestamp": rfc3339_ms(now),
        "ecs.version": ECS_VERSION,
        "event.kind": "event",
        "event.action": action,
        "event.outcome": outcome,
        "event.category": category,
        "event.type": event_types(category, outcome, status),
        "event.reason": reason,
        "http.request.id": request_id,
        "http.request.method": bounded(method, MAX_METHOD),
        "url.path": bounded(path, MAX_PATH),
        "http.response.status_code": status,
        "organization.id": tenant_id,
        "service.name": EMITTER_SERVICE,
        "service.node.name": node,
        "fedgate.kid": kid,
        "fedgate.feedback.nonce": nonce,
        "fedgate.feedback.adjustments": adjustments,
        "fedgate.feedback.skipped": len(skipped) if skipped else None,
        "fedgate.feedback.skipped_executions": list(skipped) if skipped else None,
        "fedgate.feedback.skip_reason": "unknown_execution" if skipped else None,
        "message": _message(detail),
    })


def handshake_event(
    *,
    reason: str,
    request_id: str,
    source_ip: str | None,
    source_port: int | None,
    tls_version: str | None = None,
    node: str | None = None,
    suppressed: dict[str, int] | None = None,
    suppressed_other_sources: dict[str, int] | None = None,
    detail: str | None = None,
    now: float,
) -> dict[str, Any]:
    """[v1.1] ``tls.handshake_failed``: one refused TLS handshake (no HTTP request exists,
    so ``request_id`` is one the gateway made up). ``suppressed``: failures from the same
    source not written since its previous event, by reason (``fedgate.suppressed`` is
    their sum); ``suppressed_other_sources``: the same for failures of sources the
    limiter's table had to forget (gateway/http/tlsaudit.py).

    [v1.1] ECS: ``event.type`` ``connection``/``denied`` (network) and ``start`` (an
    authentication attempt that failed); ``node`` is ``service.node.name``. No
    ``http.*`` nor ``url.path``: no HTTP request was read; ``tls.version`` only once TLS
    1.3 was negotiated (a reason in ``AFTER_VERSION`` of gateway/http/tlsaudit.py)."""
    _check("tls.handshake_failed", "failure", ["network", "authentication"], reason)
    if not request_id:
        raise ValueError("request_id is required")
    others = sum(suppressed_other_sources.values()) if suppressed_other_sources else 0
    return _assemble({
        "@timestamp": rfc3339_ms(now),
        "ecs.version": ECS_VERSION,
        "event.kind": "event",
        "event.action": "tls.handshake_failed",
        "event.outcome": "failure",
        "event.category": ["network", "authentication"],
        "event.type": event_types(["network", "authentication"], "failure"),
        "event.reason": reason,
        "request_id": request_id,
        "source.ip": ip(source_ip),
        "source.port": port(source_port),
        "tls.version": tls_version,
        "tls.version_protocol": "tls" if tls_version else None,
        "service.name": SERVICE_NAME,
        "service.node.name": node,
        "fedgate.suppressed": sum(suppressed.values()) if suppressed else 0,
        "fedgate.suppressed_reasons": dict(sorted(suppressed.items())) if suppressed else None,
        "fedgate.suppressed_other_sources": others or None,
        "fedgate.suppressed_other_reasons": (dict(sorted(suppressed_other_sources.items()))
                                             if others else None),
        "message": _message(detail),
    })
