"""The batch route's work (PROTOCOL.md §5 ``POST /internal/v1/telemetry/batch``, v1.1).

The envelope is not signed: it is parsed strictly and must have exactly the documented
shape (:func:`parse_envelope`; else one error for the whole request, nothing stored).
Each item is then a single ``POST /internal/v1/telemetry`` of its own: a
``SignedRequest`` whose headers are the envelope's ``Content-Type`` /
``X-Service-Identity`` / ``X-Client-Cert-Sha256`` plus the item's timestamp, nonce,
signature and kid, and whose body is the item's exact signed bytes. :func:`run_batch`
runs §4 steps 2-11 (``Pipeline.prepare``) on every item in a tight loop, then the
commits of the items that passed together (``Pipeline.commit_many``: each atomic on its
own, the first in item order wins a conflict, e.g. two items with one nonce). Every
item gets its own request id (``<batch request id>.<index>``), stored in its evidence and
named in its audit event.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from schemas.canonical import CanonicalError, loads
from schemas.routes import TELEMETRY
from schemas.validate import json_pointer

from . import errors as E
from .pipeline import Pipeline
from .request import AuditOutbox, Context, SignedRequest
from .trust import Trust

ITEM_MEMBERS = ("timestamp", "nonce", "signature", "kid", "body_b64")
REQUIRED = ("timestamp", "nonce", "signature", "body_b64")
#: envelope headers every item inherits (the rest of an item's headers are its own)
INHERITED = ("Content-Type", "X-Service-Identity", "X-Client-Cert-Sha256")
ITEM_ID_PREFIX = 120  # an item's request id stays within X-Request-Id's 128 characters


@dataclass(frozen=True, slots=True)
class Item:
    """One signed event of the envelope, as sent (judged per item, like headers)."""

    timestamp: str
    nonce: str
    signature: str
    kid: str | None
    body: bytes

    def headers(self, inherited: list[tuple[str, str]]) -> CIMultiDict:
        pairs = [*inherited, ("X-Telemetry-Timestamp", self.timestamp),
                 ("X-Telemetry-Nonce", self.nonce), ("X-Telemetry-Signature", self.signature)]
        if self.kid is not None:
            pairs.append(("X-Telemetry-Key-Id", self.kid))
        return CIMultiDict(pairs)


@dataclass(slots=True)
class ItemOutcome:
    """One item's decision: ``error`` None means accepted (``ctx.record_id`` is its
    finding); else the GatewayError a single request would have been answered with."""

    index: int
    ctx: Context
    error: E.GatewayError | None = None

    @property
    def status(self) -> int:
        return 202 if self.error is None else self.error.status

    def result(self) -> dict[str, Any]:
        """Its member of the answer's ``results`` (PROTOCOL.md §5, docs/PROTOCOL.md)."""
        out: dict[str, Any] = {"index": self.index, "status": self.status,
                               "request_id": self.ctx.request_id}
        if self.error is None:
            out["finding_id"] = self.ctx.record_id
            return out
        out["error"], out["detail"] = self.error.error, self.error.detail
        for name in ("duplicate_of", "pointer", "retry_after"):
            if name in self.error.extra:
                out[name] = self.error.extra[name]
        return out


def parse_envelope(raw: bytes, max_items: int) -> list[Item]:
    """The envelope's items, or 422 ``malformed_json`` (not strict JSON, not an object)
    / ``schema_violation`` with the pointer of the first member that breaks the shape."""
    try:
        envelope = loads(raw)
    except CanonicalError as exc:
        raise E.MalformedJson(f"the body is not strict JSON: {exc.detail}") from None
    if not isinstance(envelope, dict):
        raise E.MalformedJson("the body must be a JSON object")
    for name in envelope:
        if name != "items":
            raise _shape(f"unknown member {name[:64]!r} in the batch envelope", [name])
    items = envelope.get("items")
    if not isinstance(items, list):
        raise _shape("the batch envelope needs an array 'items'",
                     ["items"] if "items" in envelope else [])
    if not 1 <= len(items) <= max_items:
        raise _shape(f"a batch has 1 to max_batch_items ({max_items}) items, "
                     f"not {len(items)}", ["items"])
    return [_item(value, i) for i, value in enumerate(items)]


def _item(value: Any, i: int) -> Item:
    where = ["items", i]
    if not isinstance(value, dict):
        raise _shape("a batch item must be an object", where)
    for name in value:
        if name not in ITEM_MEMBERS:
            raise _shape(f"unknown member {name[:64]!r} in a batch item", [*where, name])
    for name in ITEM_MEMBERS:
        if name not in value:
            if name in REQUIRED:
                raise _shape(f"a batch item needs {name!r}", where)
        elif not isinstance(value[name], str):
            raise _shape(f"{name!r} must be a string", [*where, name])
    try:
        body = base64.b64decode(value["body_b64"], validate=True)
    except (binascii.Error, ValueError):
        raise _shape("'body_b64' is not standard padded base64",
                     [*where, "body_b64"]) from None
    return Item(value["timestamp"], value["nonce"], value["signature"], value.get("kid"),
                body)


def _shape(detail: str, path: list[str | int]) -> E.SchemaViolation:
    return E.SchemaViolation(detail, pointer=json_pointer(path))


def item_request_id(batch_request_id: str, index: int) -> str:
    return f"{batch_request_id[:ITEM_ID_PREFIX]}.{index}"


async def run_batch(pipeline: Pipeline, items: list[Item], headers: Any,
                    peer: str | None, peer_spki: str | None, batch_request_id: str,
                    now: int, trust: Trust | None = None,
                    outbox: Callable[[], AuditOutbox] | None = None,
                    identity: str | None = None) -> list[ItemOutcome]:
    """Every item through §4 steps 2-14 on its own, with one ``now`` and one ``trust``
    (the bundle the envelope's identity was judged against); in item order. ``outbox``
    makes each item's audit outbox: an accepted item's event is stored by its commit.
    ``identity``: what ``check_head`` judged the envelope's headers to be with ``trust``
    (an item's content type and identity headers are the envelope's: not judged again
    per item, ``Pipeline.prepare``); None: judged per item."""
    inherited = [(name, value) for name in INHERITED for value in headers.getall(name, [])]
    outcomes, commits = [], []
    for index, item in enumerate(items):
        outcome = ItemOutcome(index, Context(item_request_id(batch_request_id, index)))
        outcome.ctx.outbox = outbox() if outbox is not None else None
        req = SignedRequest(TELEMETRY, item.headers(inherited), item.body, peer,
                            outcome.ctx.request_id, peer_spki)
        try:
            commits.append((outcome, await pipeline.prepare(req, now, outcome.ctx, trust,
                                                            identity)))
        except E.GatewayError as exc:
            outcome.error = exc
        outcomes.append(outcome)
    if commits:
        results = await pipeline.commit_many([commit for _, commit in commits])
        for (outcome, commit), result in zip(commits, results, strict=True):
            if isinstance(result, E.GatewayError):
                outcome.error = result
                continue
            outcome.ctx.record_id = commit.record.record_id
            if outcome.ctx.outbox is not None:
                outcome.ctx.outbox.ref = result.outbox_ref
    return outcomes
