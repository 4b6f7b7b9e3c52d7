"""The store interface (PROTOCOL.md §4 steps 12-14, §8): one atomic commit per request.

Both implementations (``sqlite.SqliteStore``, ``redis.RedisStore``) run the same
contract tests. ``commit`` is the only write on the request path: in one atomic step it
(12) checks the execution's owner and attestation anchor (setting both for a new
execution), (13) claims ``(identity, tenant_id, nonce)`` and (14) persists the record,
together with the accept's audit events in the audit outbox (``Commit.audit``). If any
part fails nothing is written, so a failed write never consumes a nonce.

The audit outbox (docs/AUDIT.md *Outbox*): an accepted commit also stores its audit
events under ``Commit.audit_owner`` (``<node_name>/<worker index>``), so no record can
exist without them even if the process dies before they reach the hash chain. The
owner chains them, then acknowledges them (``outbox_ack``); at start-up it reads what it
left (``outbox_read``) and chains what the chain does not hold yet.
"""

from __future__ import annotations

import abc
import asyncio
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ..logs import redact

if TYPE_CHECKING:  # the type only: the stores that fold import gateway.feedback.fold
    from gateway.feedback.fold import Fold


class StoreError(Exception):
    """The store could not be reached or could not write; the request fails closed.

    ``stage`` is ``"claim"`` when nothing could be decided (store unreachable: 503
    ``replay_store_unavailable``) and ``"write"`` when the claim could be decided but the
    record could not be written (503 ``store_unavailable``; the nonce is not consumed).
    """

    def __init__(self, stage: str, detail: str) -> None:
        detail = redact(detail)  # a driver's message may carry a URL with its password
        super().__init__(detail)
        self.stage = stage
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Anchor:
    """First attestation hash seen for ``(tenant_id, execution_fingerprint)``.

    The commit that anchors an execution also records its owner: the commit's identity
    (PROTOCOL.md §5 v1.1). Only that identity may later send for the execution.
    """

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
    #: the identity the record is listed under (``list_records(identity=…)``). A commit
    #: always lists it under ``Commit.identity`` (this must then be None or equal);
    #: ``put_record`` only when set.
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Commit:
    """The nonce is claimed per ``(identity, record.tenant_id, nonce)`` (§4.13 v1.1)."""

    identity: str
    nonce: str
    body_digest: str  # sha256 hex of the exact body bytes
    request_id: str
    now: int  # the request's captured "now" (Unix seconds)
    nonce_ttl_s: int
    record: Record
    anchor: Anchor | None  # None: no anchoring for this request
    #: The earliest gateway second at which this signed request could have been accepted:
    #: its timestamp − clock_skew_s. A request whose ``valid_from`` is at or before the
    #: start of the store's epoch is refused (``BEFORE_EPOCH``): its nonce may have been
    #: claimed in a past the store forgot. None: ``now − nonce_ttl_s``, a lower bound
    #: (nonce_ttl_s > 2 × clock_skew_s), so refusing more, never less.
    valid_from: int | None = None
    #: the accept's audit events (a JSON array, orjson), written by the same atomic step
    #: when the outcome is ACCEPTED (never on a refusal); None: no outbox entry
    audit: bytes | None = None
    #: whose outbox: ``<node_name>/<worker index>`` (:data:`OWNER_RE`); set with ``audit``
    audit_owner: str | None = None
    #: what ``record`` adds to its execution's facts (gateway/feedback/fold.py), computed
    #: by whoever built the record from the body it parsed and checked (``build_commit``:
    #: ``fold.body_fold``), so the store does not parse the record's bytes back. None: the
    #: store derives it from ``record.data`` (``fold_record``; also for kinds not folded)
    fold: Fold | None = None

    @property
    def tenant_id(self) -> str:
        return self.record.tenant_id

    @property
    def earliest(self) -> int:
        return self.now - self.nonce_ttl_s if self.valid_from is None else self.valid_from


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    ATTESTATION_MISMATCH = "attestation_mismatch"
    EXECUTION_NOT_OWNED = "execution_not_owned"
    REPLAYED = "replayed"
    #: the store lost its state (see docs/STORES.md "Store amnesia") and this request could
    #: have been accepted before the new epoch began: refused, nothing written
    BEFORE_EPOCH = "before_epoch"


@dataclass(frozen=True, slots=True)
class Claim:
    """A live nonce claim: the digest of the accepted body and its request id."""

    body_digest: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked producer key (the kill switch, gateway/store/revocations.py)."""

    kid: str
    revoked_at: int  # Unix seconds, the revoking command's clock
    reason: str


@dataclass(frozen=True, slots=True)
class CommitResult:
    outcome: Outcome
    #: REPLAYED: request id of the accepted request when its body digest equals this one.
    duplicate_of: str | None = None
    #: ATTESTATION_MISMATCH: the hash already anchored.
    anchored_hash: str | None = None
    #: ACCEPTED with ``Commit.audit``: the outbox entry's reference (for ``outbox_ack``)
    outbox_ref: Any = None


#: an outbox owner: ``<node_name>/<worker index>`` (node names as [server] node_name)
OWNER_RE = re.compile(r"[A-Za-z0-9._-]{1,253}/[0-9]{1,6}")


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or OWNER_RE.fullmatch(owner) is None:
        raise ValueError(f"invalid audit outbox owner {owner!r} (want <node_name>/<index>)")
    return owner


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One accepted commit's audit events, not yet acknowledged."""

    ref: Any  # the store's reference, for ``outbox_ack``
    owner: str
    events: bytes  # a JSON array of event objects, as the commit wrote it


def conflict_deps(commits: Sequence[Commit]) -> list[set[int]]:
    """Per commit, the earlier commits (indexes) it must be decided after: the last one
    before it with the same nonce claim ``(identity, tenant, nonce)``, and, when an
    execution is claimed with more than one (attestation hash, owner) among them, the
    last one before it on that execution. Unrelated commits depend on nothing."""
    last: dict[tuple[str, ...], int] = {}
    claims: dict[tuple[str, str], set[tuple[str, str]]] = {}  # execution → (hash, owner)
    for c in commits:
        if c.anchor is not None:
            claims.setdefault((c.tenant_id, c.anchor.execution_fingerprint), set()).add(
                (c.anchor.attestation_hash, c.identity))
    deps = []
    for i, c in enumerate(commits):
        keys = [("nonce", c.identity, c.tenant_id, c.nonce)]
        execution = None if c.anchor is None else (c.tenant_id,
                                                   c.anchor.execution_fingerprint)
        if execution is not None and len(claims[execution]) > 1:
            keys.append(("anchor", *execution))
        deps.append({last[k] for k in keys if k in last})
        last.update(dict.fromkeys(keys, i))
    return deps


class Store(abc.ABC):
    """Async store; created once at start-up, closed at shutdown."""

    url: str
    #: new epochs this process saw begin: the store had lost its state (or was brand new)
    amnesia_count: int = 0
    #: called once per new epoch (the gateway counts it in fedgate_store_amnesia_total)
    on_amnesia: Callable[[], None] | None = None

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

    #: True when ``commit_many`` sends a group of commits in one round trip / one
    #: transaction (``CommitBatcher`` then coalesces concurrent requests' commits)
    groups_commits: bool = False

    def check_commit(self, commit: Commit) -> None:
        """Raise ValueError for a commit the store can never run (a programming error),
        before it joins a group: it must fail alone. By default every commit can run."""
        return None

    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult | StoreError]:
        """The commits of one batch request, each atomic on its own (not all or nothing):
        per commit, its result or the StoreError that failed it. Where two commits could
        decide each other (the same nonce; the same execution with different attestation
        hashes or owners) the first in order is decided first (:func:`conflict_deps`), so
        the batch's answer does not depend on timing. This default runs the others
        concurrently; a store may do the whole batch in one round trip instead (same
        contract: redis.py, sqlite.py)."""
        for c in commits:  # a commit no store could run: refused before any is sent
            self.check_commit(c)
        tasks: list[asyncio.Future] = []
        for c, deps in zip(commits, conflict_deps(commits), strict=True):
            after = {tasks[i] for i in deps}
            tasks.append(asyncio.ensure_future(self._commit_after(c, after)))
        return list(await asyncio.gather(*tasks))

    async def _commit_after(self, commit: Commit,
                            after: set[asyncio.Future]) -> CommitResult | StoreError:
        if after:
            await asyncio.wait(after)
        try:
            return await self.commit(commit)
        except StoreError as exc:
            return exc

    @abc.abstractmethod
    async def put_record(self, record: Record, now: int) -> None:
        """Durably store a record outside any request claim (e.g. issued feedback).

        Raise StoreError("write") if it cannot be written or the id is taken.
        """

    @abc.abstractmethod
    async def outbox_owners(self, node: str) -> set[str]:
        """The owners ``<node>/<k>`` that have outbox entries (start-up recovery)."""

    @abc.abstractmethod
    async def outbox_read(self, owner: str) -> list[OutboxEntry]:
        """``owner``'s unacknowledged entries, oldest first within a tenant."""

    @abc.abstractmethod
    async def outbox_ack(self, refs: list[Any]) -> None:
        """Delete these entries (their events are in the chain); unknown refs are ignored."""

    @abc.abstractmethod
    async def get_claim(self, identity: str, tenant_id: str, nonce: str,
                        now: int) -> Claim | None:
        """The unexpired claim of ``(identity, tenant_id, nonce)``, or one made before v1.1
        for ``(identity, nonce)`` (read-only); None when the nonce is free."""

    async def is_claimed(self, identity: str, tenant_id: str, nonce: str, now: int) -> bool:
        """True when the nonce holds an unexpired claim (read-only), see ``get_claim``."""
        return await self.get_claim(identity, tenant_id, nonce, now) is not None

    @abc.abstractmethod
    async def get_record(self, kind: str, record_id: str, tenant_id: str) -> bytes | None:
        """The record ``(kind, record_id)`` of ``tenant_id``; None if absent or another
        tenant's (records live in their tenant's key space)."""

    @abc.abstractmethod
    async def get_anchor(self, tenant_id: str, execution_fingerprint: str) -> str | None: ...

    @abc.abstractmethod
    async def get_anchor_owner(self, tenant_id: str, execution_fingerprint: str) -> str | None:
        """The identity that owns the execution; None when it has no anchor or its owner
        is unknown (an anchor from before v1.1 with no record to take it from: owned by
        nobody, refused for everyone)."""

    @abc.abstractmethod
    async def list_records(self, kind: str, tenant_id: str, limit: int = 1000, *,
                           newest_first: bool = False, offset: int = 0,
                           identity: str | None = None) -> list[bytes]:
        """Records of one kind for one tenant, oldest first (or newest first), paged by
        ``offset``/``limit`` (for the policy engine, which reads newest first in pages).

        ``identity``: only the records that identity committed (``Commit.identity``),
        read through an index of their own — never by filtering the tenant's records, so
        another identity's records cost nothing. Records stored with ``put_record`` have
        no identity unless ``Record.identity`` names one."""

    @abc.abstractmethod
    async def list_facts(self, tenant_id: str, identity: str,
                         limit: int) -> list[tuple[str, Any, str | None, str | None]]:
        """The facts of ``identity``'s ``limit`` most recently active executions
        (gateway/feedback/fold.py, kept up to date by ``commit`` and ``put_record``):
        ``(execution_fingerprint:attestation_hash, state (JSON, or decoded), anchored
        hash or None, owner or None)`` per row; no record is read."""

    @abc.abstractmethod
    async def list_skipped(self, tenant_id: str, identity: str,
                           limit: int) -> list[tuple[str, str, str]]:
        """``(kind, record id, reason)`` of records listed under ``identity`` that could
        not be folded into facts (unusable: older version, edited), newest first."""

    # -- the kill switch (gateway/store/revocations.py) ---------------------------------
    @abc.abstractmethod
    async def revoke_key(self, kid: str, reason: str, now: int) -> Revocation:
        """Mark ``kid`` revoked for every gateway sharing the store, for good (the first
        revocation's time and reason stand), and signal it; return what is stored.
        Raise StoreError if it cannot be written."""

    @abc.abstractmethod
    async def revoked_keys(self) -> Mapping[str, Revocation]:
        """Every revoked kid; StoreError if the set cannot be read (fail closed)."""

    @abc.abstractmethod
    def revocation_signals(self) -> AsyncIterator[None]:
        """Yield whenever the revoked set may have changed (and once at the start); runs
        until cancelled, never raises for an outage (the caller's periodic re-read bounds
        what a lost signal can cost)."""
