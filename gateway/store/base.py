"""The store interface (PROTOCOL.md §4 steps 12-14, §8): one atomic commit per request.

Both implementations (``sqlite.SqliteStore``, ``redis.RedisStore``) run the same
contract tests. ``commit`` is the only write on the request path: in one atomic step it
(12) checks/sets the attestation anchor, (13) claims ``(identity, nonce)`` and (14)
persists the record. If any part fails nothing is written, so a failed write never
consumes a nonce.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import StrEnum


class StoreError(Exception):
    """The store could not be reached or could not write; the request fails closed.

    ``stage`` is ``"claim"`` when nothing could be decided (store unreachable: 503
    ``replay_store_unavailable``) and ``"write"`` when the claim could be decided but the
    record could not be written (503 ``store_unavailable``; the nonce is not consumed).
    """

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(detail)
        self.stage = stage
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Anchor:
    """First attestation hash seen for ``(tenant_id, execution_fingerprint)``."""

    tenant_id: str
    execution_fingerprint: str
    attestation_hash: str


@dataclass(frozen=True, slots=True)
class Record:
    """What is persisted for an accepted request.

    ``kind`` is ``finding`` (telemetry), ``graph`` or ``query`` (feedback query);
    ``record_id`` is unique within the kind; ``data`` is the canonical JSON of the
    stored record (for a finding: the exact signed bytes and evidence, §5).
    """

    kind: str
    record_id: str
    tenant_id: str
    execution_fingerprint: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    identity: str
    nonce: str
    body_digest: str  # sha256 hex of the exact body bytes
    request_id: str
    now: int  # the request's captured "now" (Unix seconds)
    nonce_ttl_s: int
    record: Record
    anchor: Anchor | None  # None: no anchoring for this request


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    ATTESTATION_MISMATCH = "attestation_mismatch"
    REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class CommitResult:
    outcome: Outcome
    #: REPLAYED: request id of the accepted request when its body digest equals this one.
    duplicate_of: str | None = None
    #: ATTESTATION_MISMATCH: the hash already anchored.
    anchored_hash: str | None = None


class Store(abc.ABC):
    """Async store; created once at start-up, closed at shutdown."""

    url: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema; raise StoreError if unreachable or unsafe."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the store answers now (for /readyz); never raises."""

    @abc.abstractmethod
    async def commit(self, commit: Commit) -> CommitResult:
        """Steps 12-14 as one atomic step; raise StoreError on failure (nothing written)."""

    @abc.abstractmethod
    async def put_record(self, record: Record, now: int) -> None:
        """Durably store a record outside any request claim (e.g. issued feedback).

        Raise StoreError("write") if it cannot be written or the id is taken.
        """

    @abc.abstractmethod
    async def is_claimed(self, identity: str, nonce: str, now: int) -> bool:
        """True when ``(identity, nonce)`` holds an unexpired claim (read-only)."""

    @abc.abstractmethod
    async def get_record(self, kind: str, record_id: str) -> bytes | None: ...

    @abc.abstractmethod
    async def get_anchor(self, tenant_id: str, execution_fingerprint: str) -> str | None: ...

    @abc.abstractmethod
    async def list_records(self, kind: str, tenant_id: str, limit: int = 1000, *,
                           newest_first: bool = False, offset: int = 0) -> list[bytes]:
        """Records of one kind for one tenant, oldest first (or newest first), paged by
        ``offset``/``limit`` (for the policy engine, which reads newest first in pages)."""
