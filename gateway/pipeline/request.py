"""What the pipeline works on: the request the HTTP layer hands over and what is known
about it so far. Its own module, so ``pipeline`` and ``records`` both import it and
neither imports the other's caller."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.routes import Route


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What the HTTP layer hands over: exact bytes, headers and the TLS fingerprint."""

    route: Route
    headers: Any  # a case-insensitive multi-mapping (aiohttp's CIMultiDictProxy)
    body: bytes
    peer_cert_sha256: str | None  # sha256 of the peer leaf certificate's DER, from TLS
    request_id: str
    peer_spki_pin: str | None = None  # "spki:<b64 sha256 of its SubjectPublicKeyInfo>"


@dataclass(slots=True)
class Context:
    """What is known so far about a request; the caller audits it, accepted or not."""

    request_id: str
    identity: str | None = None
    kid: str | None = None
    tenant_id: str | None = None
    operator_id: str | None = None
    execution_fingerprint: str | None = None
    attestation_hash: str | None = None
    record_id: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    response: dict[str, Any] | None = None  # a feedback query's signed answer
    skipped_records: Any = None  # a query: stored records its answer had to leave out
    outbox: AuditOutbox | None = None  # the accept's audit events go with the commit


@dataclass(slots=True)
class AuditOutbox:
    """The accept's audit events, written by the store commit itself (docs/AUDIT.md
    *Outbox*): ``build(ctx)`` makes them once every check passed, just before the commit;
    after an accepted commit ``events`` holds them and ``ref`` the store's entry."""

    owner: str  # <node_name>/<worker index>
    build: Callable[[Context], list[dict[str, Any]]]
    events: list[dict[str, Any]] | None = None
    ref: Any = None
