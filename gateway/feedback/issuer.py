"""The feedback answer (PROTOCOL.md §5-§6): adjustments, signed by ``feedback_kid``.

:class:`RulePolicy` turns the stored findings and graphs of the tenant that the querying
identity sent itself (§5 [v1.1]: an answer carries only the querying identity's
executions) into adjustments with the rules of :mod:`gateway.feedback.policy`. Records are read
with the gateway's own parser (:mod:`gateway.feedback.evidence`); one that cannot be used is left
out of the decision and reported in :attr:`Decision.skipped`, never a refusal.
:class:`FeedbackIssuer` signs them (§6 input, the tenant the query named), binds the
response nonce to the query nonce (``<query nonce>.<16 url-safe random chars>``) and
records the whole response in the store before handing it out: feedback that could not
be recorded is never issued (503 ``store_unavailable``). Without a policy the answer is
an empty, still signed and bound, ``data`` array — the gateway never invents an
adjustment. See docs/POLICY.md.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.pipeline import errors as E
from gateway.store import Store, StoreError
from keyring import PrivateKey
from keyring.signer import sign_async
from schemas.signing import (
    FEEDBACK_SCHEMA_VERSION,
    SIGNATURE_ALGORITHM,
    feedback_signing_input,
)
from schemas.validate import Validators

from .decide import StateRules, answer, decide
from .evidence import Evidence, SkipReport, Unusable, read_evidence
from .facts import ExecutionFacts, facts_from_records
from .fold import facts_from_states
from .policy import Rule, evaluate

log = logging.getLogger("fedgate.feedback")


@dataclass(slots=True)
class Decision:
    """A policy's answer: the adjustments, and the stored records it had to leave out."""

    adjustments: list[dict[str, Any]] = field(default_factory=list)
    skipped: SkipReport = field(default_factory=SkipReport)


#: ``await policy(store, tenant_id, limit, now, identity=...)`` → :class:`Decision`
Policy = Callable[..., Awaitable[Decision]]
MAX_EXECUTIONS = 10_000  # executions' facts read per query (most recently active first)
MAX_SKIPPED = 10_000  # unusable records reported per query (newest first)
MAX_RECORDS_PER_KIND = 10_000  # findings and graphs read per query (newest first)
MAX_BYTES_PER_KIND = 16 * 1024 * 1024  # ... and at most this much stored data per kind
PAGE = 16  # records fetched per store call: bounds the overshoot of the budget


async def no_adjustments(store: Store, tenant_id: str, limit: int, now: int, *,
                         identity: str) -> Decision:
    return Decision()


def bound_nonce(query_nonce: str) -> str:
    return f"{query_nonce}.{secrets.token_urlsafe(12)}"  # 16 url-safe characters


def sign_feedback(key: PrivateKey, kid: str, *, tenant_id: str, data: list[dict[str, Any]],
                  signed_at: int, nonce: str, request_id: str) -> dict[str, Any]:
    message = feedback_signing_input(tenant_id, signed_at, nonce, FEEDBACK_SCHEMA_VERSION,
                                     kid, data)
    return feedback_body(key.sign(message), kid, data=data, signed_at=signed_at, nonce=nonce,
                         request_id=request_id)


async def sign_feedback_async(key: Any, kid: str, *, tenant_id: str,
                              data: list[dict[str, Any]], signed_at: int, nonce: str,
                              request_id: str) -> dict[str, Any]:
    """``sign_feedback`` for the event loop: a PKCS#11 token signs in its own thread."""
    message = feedback_signing_input(tenant_id, signed_at, nonce, FEEDBACK_SCHEMA_VERSION,
                                     kid, data)
    try:
        signature = await sign_async(key, message)
    except ValueError as exc:  # the token failed (removed, logged out): nothing is consumed
        log.error("feedback (request %s) could not be signed: %s", request_id, exc)
        raise E.InternalError("the feedback could not be signed") from exc
    return feedback_body(signature, kid, data=data, signed_at=signed_at, nonce=nonce,
                         request_id=request_id)


def feedback_body(signature: bytes, kid: str, *, data: list[dict[str, Any]], signed_at: int,
                  nonce: str, request_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id, "status": "accepted", "data": data, "errors": [],
        "signature": base64.b64encode(signature).decode("ascii"),
        "kid": kid, "signature_algorithm": SIGNATURE_ALGORITHM, "signed_at": signed_at,
        "nonce": nonce, "schema_version": FEEDBACK_SCHEMA_VERSION,
    }


class RulePolicy:
    """The rules as a :data:`Policy`.

    By default the rules look at the per-execution facts the store keeps up to date at
    commit time (:mod:`gateway.feedback.fold`): one small row per execution, at most
    ``max_executions`` (the most recently active), never a record body, tested as it is
    (:mod:`gateway.feedback.decide`: no ExecutionFacts is built). Given a record
    budget (``max_records`` and/or ``max_bytes``) it reads the stored records instead,
    newest first within that budget: the reference the facts are checked against."""

    def __init__(self, rules: Iterable[Rule], *, validators: Validators | None = None,
                 max_records: int | None = None, max_bytes: int | None = None,
                 max_executions: int = MAX_EXECUTIONS) -> None:
        self.rules = tuple(rules)
        self.validators = validators or Validators()  # compiled once, here
        self.from_records = max_records is not None or max_bytes is not None
        self.max_records = MAX_RECORDS_PER_KIND if max_records is None else max_records
        self.max_bytes = MAX_BYTES_PER_KIND if max_bytes is None else max_bytes
        self.max_executions = max_executions
        self.state_rules = StateRules(self.rules)

    async def __call__(self, store: Store, tenant_id: str, limit: int, now: int, *,
                       identity: str) -> Decision:
        decision = Decision()
        if self.from_records:
            facts = await self.facts_from_records(store, tenant_id, identity,
                                                  decision.skipped)
            decision.adjustments = self.answer(facts, limit, now)
        else:
            rows = await self.rows_from_store(store, tenant_id, identity, decision.skipped)
            decision.adjustments = decide(self.state_rules, tenant_id, identity, rows,
                                          limit, now)
        for adjustment in decision.adjustments:  # fail closed: a bug
            self.validators.validate("adjustment", adjustment)
        return decision

    def answer(self, facts: Iterable[ExecutionFacts], limit: int,
               now: int) -> list[dict[str, Any]]:
        """The adjustments for ``facts``: strongest action first, then by fingerprint,
        the first ``limit`` (the reference ``decide`` answers the same as)."""
        adjustments = (evaluate(self.rules, one, now) for one in facts)
        return answer((a for a in adjustments if a is not None), limit)

    async def rows_from_store(self, store: Store, tenant_id: str, identity: str,
                              skipped: SkipReport) -> list[Any]:
        """The facts states the store keeps per execution (``Store.list_facts``: at most
        ``max_executions``, the most recently active); the records it could not fold
        go to ``skipped``."""
        for kind, rid, reason in await store.list_skipped(tenant_id, identity, MAX_SKIPPED):
            skipped.add_id(kind, rid, reason)
        return await store.list_facts(tenant_id, identity, self.max_executions)

    async def facts_from_store(self, store: Store, tenant_id: str, identity: str,
                               skipped: SkipReport) -> list[ExecutionFacts]:
        """The facts the store keeps per execution, as ExecutionFacts (the reference)."""
        rows = await self.rows_from_store(store, tenant_id, identity, skipped)
        return facts_from_states(tenant_id, identity, rows)

    async def facts_from_records(self, store: Store, tenant_id: str, identity: str,
                                 skipped: SkipReport) -> list[ExecutionFacts]:
        """The reference: the facts computed from the stored records themselves."""
        findings = await self._records(store, "finding", tenant_id, identity, skipped)
        graphs = await self._records(store, "graph", tenant_id, identity, skipped)
        anchors = await self._anchors(store, tenant_id, identity, [*findings, *graphs])
        return facts_from_records(tenant_id, findings, graphs, anchors)

    async def _records(self, store: Store, kind: str, tenant_id: str, identity: str,
                       skipped: SkipReport) -> list[Evidence]:
        """``identity``'s usable records, newest first, in pages, within a count and a
        byte budget (a flood of large records cannot make one query read the whole
        history); returned oldest first. Unusable records go to ``skipped``.

        Only ``identity``'s own records are read (the store's per-identity index) and
        charged to the budget: another identity of the tenant cannot crowd them out."""
        records: list[Evidence] = []
        budget, offset = self.max_bytes, 0
        while len(records) < self.max_records and budget > 0:
            page = await store.list_records(kind, tenant_id, PAGE, newest_first=True,
                                            offset=offset, identity=identity)
            offset += len(page)
            for raw in page:
                if budget <= 0 or len(records) >= self.max_records:
                    break
                budget -= len(raw)
                try:
                    record = read_evidence(kind, raw, validators=self.validators)
                except Unusable as exc:
                    skipped.add(kind, raw, exc.reason)
                    continue
                if record.identity == identity:
                    records.append(record)
            if len(page) < PAGE:
                break
        return records[::-1]

    @staticmethod
    async def _anchors(store: Store, tenant_id: str, identity: str,
                       records: list[Evidence]) -> dict[str, str]:
        """The anchored hash of each execution ``identity`` owns (§5 v1.1): an execution
        anchored by another identity, or whose owner is unknown, gets no adjustment."""
        fingerprints = sorted({r.execution_fingerprint for r in records})
        anchors = {}
        for fp in fingerprints:
            if await store.get_anchor_owner(tenant_id, fp) != identity:
                continue
            anchor = await store.get_anchor(tenant_id, fp)
            if anchor:
                anchors[fp] = anchor
        return anchors


class FeedbackIssuer:
    """Signs with exactly one key (``kid``); rotation is a configuration switch."""

    def __init__(self, store: Store, key: Any, kid: str,
                 policy: Policy = no_adjustments) -> None:
        self.store, self.key, self.kid, self.policy = store, key, kid, policy

    async def respond(self, ctx: Any, now: int) -> dict[str, Any]:
        """The signed answer to a verified query. Read-only: the pipeline stores it together
        with the query's nonce claim (one atomic write), so it is recorded before it is
        handed out and a failure here consumes nothing."""
        limit = ctx.body.get("limit", 100)
        try:
            decision = await self.policy(self.store, ctx.tenant_id, limit, now,
                                         identity=ctx.identity)
        except StoreError as exc:  # the cause is logged by the app (throttled)
            raise E.StoreUnavailable("the store could not be read") from exc
        if decision.skipped:
            log.warning("feedback (request %s): %s", ctx.request_id, decision.skipped.summary())
            ctx.skipped_records = decision.skipped
        data = decision.adjustments[:limit]
        return await sign_feedback_async(self.key, self.kid, tenant_id=ctx.tenant_id,
                                         data=data, signed_at=now,
                                         nonce=bound_nonce(ctx.body["nonce"]),
                                         request_id=ctx.request_id)
