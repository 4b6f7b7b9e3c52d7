"""The feedback answer (PROTOCOL.md §5-§6): adjustments, signed by ``feedback_kid``.

:class:`RulePolicy` turns the tenant's stored findings and graphs into adjustments with
the rules of :mod:`gateway.policy`; :class:`FeedbackIssuer` signs them (§6 input, the
tenant the query named), binds the response nonce to the query nonce
(``<query nonce>.<16 url-safe random chars>``) and records the whole response in the
store before handing it out: feedback that could not be recorded is never issued (503
``store_unavailable``). Without a policy the answer is an empty, still signed and bound,
``data`` array — the gateway never invents an adjustment. See docs/POLICY.md.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from keyring import PrivateKey
from schemas.signing import (
    FEEDBACK_SCHEMA_VERSION,
    SIGNATURE_ALGORITHM,
    feedback_signing_input,
)
from schemas.validate import Validators

from . import errors as E
from .policy import ACTION_RANK, Rule, evaluate, facts_from_records
from .store import Store, StoreError

log = logging.getLogger("fedgate.feedback")

Policy = Callable[[Store, str, int, int], Awaitable[list[dict[str, Any]]]]
MAX_RECORDS_PER_KIND = 10_000  # findings and graphs read per query (newest first)
MAX_BYTES_PER_KIND = 16 * 1024 * 1024  # ... and at most this much stored data per kind
PAGE = 16  # records fetched per store call: bounds the overshoot of the budget


async def no_adjustments(store: Store, tenant_id: str, limit: int, now: int) -> list[dict]:
    return []


def bound_nonce(query_nonce: str) -> str:
    return f"{query_nonce}.{secrets.token_urlsafe(12)}"  # 16 url-safe characters


def sign_feedback(key: PrivateKey, kid: str, *, tenant_id: str, data: list[dict[str, Any]],
                  signed_at: int, nonce: str, request_id: str) -> dict[str, Any]:
    message = feedback_signing_input(tenant_id, signed_at, nonce, FEEDBACK_SCHEMA_VERSION,
                                     kid, data)
    return {
        "request_id": request_id, "status": "accepted", "data": data, "errors": [],
        "signature": base64.b64encode(key.sign(message)).decode("ascii"),
        "kid": kid, "signature_algorithm": SIGNATURE_ALGORITHM, "signed_at": signed_at,
        "nonce": nonce, "schema_version": FEEDBACK_SCHEMA_VERSION,
    }


def _priority(adjustment: dict[str, Any]) -> tuple[int, str]:
    """Strongest action first, then by fingerprint: a ``limit`` cuts the weakest."""
    return -ACTION_RANK[adjustment["action"]], adjustment["execution_fingerprint"]


class RulePolicy:
    """The rules as a :data:`Policy`: ``await policy(store, tenant_id, limit, now)``."""

    def __init__(self, rules: Iterable[Rule], *, validators: Validators | None = None,
                 max_records: int = MAX_RECORDS_PER_KIND,
                 max_bytes: int = MAX_BYTES_PER_KIND) -> None:
        self.rules = tuple(rules)
        self.validators = validators or Validators()  # compiled once, here
        self.max_records = max_records
        self.max_bytes = max_bytes

    async def __call__(self, store: Store, tenant_id: str, limit: int,
                       now: int) -> list[dict[str, Any]]:
        findings = await self._records(store, "finding", tenant_id)
        graphs = await self._records(store, "graph", tenant_id)
        anchors = await self._anchors(store, tenant_id, [*findings, *graphs])
        adjustments = []
        for facts in facts_from_records(tenant_id, findings, graphs, anchors):
            adjustment = evaluate(self.rules, facts, now)
            if adjustment is not None:
                self.validators.validate("adjustment", adjustment)  # fail closed: a bug
                adjustments.append(adjustment)
        return sorted(adjustments, key=_priority)[:limit]

    async def _records(self, store: Store, kind: str, tenant_id: str) -> list[dict[str, Any]]:
        """The newest records first, in pages, within a count and a byte budget (a flood of
        large findings cannot make one query read the whole history); oldest first out."""
        records: list[dict[str, Any]] = []
        budget = self.max_bytes
        while len(records) < self.max_records and budget > 0:
            want = min(PAGE, self.max_records - len(records))
            page = await store.list_records(kind, tenant_id, want, newest_first=True,
                                            offset=len(records))
            for raw in page:
                if budget <= 0:
                    break
                budget -= len(raw)
                records.append(orjson.loads(raw))
            if len(page) < want:
                break
        return records[::-1]

    @staticmethod
    async def _anchors(store: Store, tenant_id: str, records: list[dict]) -> dict[str, str]:
        fingerprints = sorted({r["execution_fingerprint"] for r in records
                               if isinstance(r.get("execution_fingerprint"), str)})
        anchors = {}
        for fp in fingerprints:
            anchor = await store.get_anchor(tenant_id, fp)
            if anchor:
                anchors[fp] = anchor
        return anchors


class FeedbackIssuer:
    """Signs with exactly one key (``kid``); rotation is a configuration switch."""

    def __init__(self, store: Store, key: PrivateKey, kid: str,
                 policy: Policy = no_adjustments) -> None:
        self.store, self.key, self.kid, self.policy = store, key, kid, policy

    async def respond(self, ctx: Any, now: int) -> dict[str, Any]:
        """The signed answer to a verified query. Read-only: the pipeline stores it together
        with the query's nonce claim (one atomic write), so it is recorded before it is
        handed out and a failure here consumes nothing."""
        limit = ctx.body.get("limit", 100)
        try:
            data = (await self.policy(self.store, ctx.tenant_id, limit, now))[:limit]
        except StoreError as exc:
            log.warning("feedback: store read failed: %s", exc.detail)
            raise E.StoreUnavailable("the store could not be read") from exc
        return sign_feedback(self.key, self.kid, tenant_id=ctx.tenant_id, data=data,
                             signed_at=now, nonce=bound_nonce(ctx.body["nonce"]),
                             request_id=ctx.request_id)
