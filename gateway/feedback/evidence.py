"""Stored findings and graphs read back for the policy engine (PROTOCOL.md §3, §5).

Every stored record is read with :func:`schemas.canonical.load_stored` — the gateway's
own parser, so a record is readable exactly when its bytes would have been accepted —
and then checked member by member into an :class:`Evidence`. A record that cannot be
used (written by an older version, edited, corrupted) raises :class:`Unusable` naming a
reason from :data:`SKIP_REASONS`; the policy leaves it out of the decision and reports
it (metric and audit event), so one bad record never denies a tenant its feedback.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from schemas.canonical import CanonicalError, load_stored
from schemas.routes import SIGNED_ROUTES
from schemas.validate import SchemaError, Validators

#: Why a stored record was left out: a bounded label set (metrics, audit).
UNREADABLE_RECORD = "unreadable_record"  # the record's JSON fails the strict parser
BAD_MEMBER = "bad_member"  # an evidence member is missing or of the wrong type
#: body_b64 is not base64 of a strict JSON object matching its kind's JSON Schema
UNREADABLE_BODY = "unreadable_body"
SKIP_REASONS = (UNREADABLE_RECORD, BAD_MEMBER, UNREADABLE_BODY)

_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
#: the JSON Schema a stored body of each kind was accepted under (finding → telemetry)
BODY_SCHEMAS = {r.record_kind: r.schema for r in SIGNED_ROUTES.values() if r.anchors}
_MAX_IDS = 5  # record ids kept per report: enough to find them, bounded


class Unusable(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class Evidence:
    """The members of a stored finding or graph the policy engine relies on, checked."""

    kind: str  # "finding" | "graph"
    identity: str  # the service identity that sent it (§5 [v1.1]: answers are scoped to it)
    tenant_id: str
    execution_fingerprint: str  # lower-case hex
    attestation_hash: str  # lower-case hex, as signed in the request
    received_at: int  # gateway clock, Unix seconds
    body: dict[str, Any]  # the exact signed request body, parsed


def _member(record: dict[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if type(value) is not kind:
        raise Unusable(BAD_MEMBER, f"{name} is missing or not a {kind.__name__}")
    return value


def _hex64(record: dict[str, Any], name: str) -> str:
    value = _member(record, name, str)
    if not _HEX64_RE.fullmatch(value):
        raise Unusable(BAD_MEMBER, f"{name} is not 64 hex digits")
    return value.lower()


def read_evidence(kind: str, raw: bytes, *, validators: Validators | None) -> Evidence:
    """One stored record of ``kind``; :class:`Unusable` when the policy cannot use it.

    The signed body is checked against its kind's JSON Schema with ``validators``
    (compiled once at start-up): the policy reads its members by their schema'd types,
    and a body of the wrong shape (written by an older version, edited) is left out
    like any other unusable record, never a TypeError (500). ``validators`` None: the
    record was just built by this gateway from a body it checked (the commit's fold,
    :mod:`gateway.feedback.fold`): the check is not repeated."""
    try:
        record = load_stored(raw)
    except CanonicalError as exc:
        raise Unusable(UNREADABLE_RECORD, exc.code) from None
    identity = _member(record, "identity", str)
    tenant_id = _member(record, "tenant_id", str)
    fingerprint = _hex64(record, "execution_fingerprint")
    attestation = _hex64(record, "attestation_measurement_hash")
    received_at = _member(record, "received_at", int)
    encoded = _member(record, "body_b64", str)
    try:
        body = load_stored(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError) as exc:  # CanonicalError is a ValueError
        raise Unusable(UNREADABLE_BODY, getattr(exc, "code", "not base64")) from None
    schema = BODY_SCHEMAS.get(kind)
    if schema is None:
        raise Unusable(UNREADABLE_BODY, f"no body schema for kind {kind!r}")
    if validators is None:
        return Evidence(kind, identity, tenant_id, fingerprint, attestation, received_at, body)
    try:
        validators.validate(schema, body)
    except SchemaError as exc:  # the pointer, never the body's own text
        raise Unusable(UNREADABLE_BODY, f"not a {schema} body at {exc.pointer or '/'}") from None
    return Evidence(kind, identity, tenant_id, fingerprint, attestation, received_at, body)


def record_id(kind: str, raw: bytes) -> str | None:
    """The record's own id when it can still be read (for the report), else None."""
    try:
        value = load_stored(raw).get(f"{kind}_id")
    except CanonicalError:
        return None
    return value if isinstance(value, str) and len(value) <= 64 else None


@dataclass(slots=True)
class SkipReport:
    """Records left out of one decision: counts by reason and the first few ids."""

    counts: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)

    def add(self, kind: str, raw: bytes, reason: str) -> None:
        self.add_id(kind, record_id(kind, raw) or "?", reason)

    def add_id(self, kind: str, rid: str, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.ids) < _MAX_IDS:
            self.ids.append(f"{kind} {rid}")

    def __bool__(self) -> bool:
        return bool(self.counts)

    def summary(self) -> str:
        total = sum(self.counts.values())
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        more = " ..." if total > len(self.ids) else ""
        return (f"{total} stored record(s) left out of the feedback decision ({reasons}): "
                f"{', '.join(self.ids)}{more}")
