"""The verification pipeline: PROTOCOL.md §4, top to bottom.

``Pipeline.process`` walks the numbered checks in the protocol's order; the first
failure raises the ``GatewayError`` of its code. Steps 2-11 only read (the request, the
configuration and the keyring, all loaded at start-up); steps 12-14 are the single
atomic store call, so nothing is written and no nonce is consumed unless every
read-only check has passed. "now" is captured once by the caller and passed down.
Step 1 (route, method) belongs to the HTTP router; step 0 (TLS) to the TLS context.
The identities, pins, operator map and keyring are one immutable ``Trust`` (trust.py),
swapped whole on ``SIGHUP`` or a revocation; a request reads it once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.tls import pin_matches
from gateway.config.config import SecurityConfig
from gateway.store import Commit, CommitResult, Outcome, Store, StoreError
from gateway.store.batcher import CommitBatcher
from keyring import Key, Keyring, KeySelectionError, candidate_keys, verify
from keyring.keys import KID_RE
from schemas.canonical import CanonicalError, loads, parse_canonical_bounded, too_deep
from schemas.routes import GRAPH_SCHEMA_VERSION, IDENTITY_RE, Route
from schemas.semantics import check_semantics
from schemas.signing import request_signing_input
from schemas.validate import SchemaError, Validators

from . import errors as E
from . import records
from .ratelimit import RateLimiter
from .request import Context, SignedRequest
from .trust import Trust

log = logging.getLogger("fedgate.pipeline")
TIMESTAMP_RE = re.compile(r"0|[1-9][0-9]{0,17}")  # Unix seconds: no sign, no leading zeros
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{8,128}")
SIGNATURE_RE = re.compile(r"[A-Za-z0-9+/]{86}==")  # standard padded base64 of 64 bytes
HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
MAX_DEPTH = 32  # protocol bodies nest 4-5 levels; free members get generous room


class Pipeline:
    """Built once at start-up from the configuration, keyring, validators and store."""

    def __init__(
        self, config: SecurityConfig, keyring: Keyring, validators: Validators, store: Store,
        *, store_timer: Callable[[float], None] | None = None,
        group_observe: Callable[[int], None] | None = None,
        respond: Callable[[Context, int], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.trust = Trust.build(config, keyring)  # swapped whole: reload(), revoke()
        self.respond = respond  # builds a feedback answer (read-only), see gateway/feedback
        self.store_timer = store_timer  # observes the commit's latency (metrics)
        self.validators = validators
        self.store = store
        # concurrent requests' commits coalesced into one group commit per tick (issue 9)
        self.committer: Store | CommitBatcher = CommitBatcher(
            store, observe=group_observe) if getattr(store, "groups_commits", False) else store
        self.limiter = RateLimiter(config.rate_limit_per_minute) if (
            config.rate_limit_per_minute) else None

    @property
    def config(self) -> SecurityConfig:
        return self.trust.config

    @property
    def keyring(self) -> Keyring:
        """The keyring in force: the file's keys, revoked ones marked revoked."""
        return self.trust.keyring

    def reload(self, config: SecurityConfig, keyring: Keyring) -> None:
        """New identities, pins, operator map and keyring (``SIGHUP``): one assignment."""
        self.trust = self.trust.with_files(config, keyring)

    def revoke(self, revoked: frozenset[str]) -> None:
        """The store's whole revoked set (the kill switch): one assignment."""
        self.trust = self.trust.with_revoked(revoked)

    async def process(self, req: SignedRequest, now: int, ctx: Context,
                      trust: Trust | None = None, identity: str | None = None) -> Context:
        """Run §4 steps 2-14 on ``req``; return the filled context or raise GatewayError.
        ``trust``: the bundle the caller already judged the headers against (read once
        per request); else the one in force now. ``identity``: see ``prepare``."""
        commit = await self.prepare(req, now, ctx, trust, identity)
        outbox_ref = await self.commit(commit)
        ctx.record_id = commit.record.record_id
        if ctx.outbox is not None:
            ctx.outbox.ref = outbox_ref
        return ctx

    async def prepare(self, req: SignedRequest, now: int, ctx: Context,
                      trust: Trust | None = None, identity: str | None = None) -> Commit:
        """§4 steps 2-11 (read-only) on ``req``: the ``Commit`` of steps 12-14 that
        ``commit`` then makes, or GatewayError. The batch route prepares every item in a
        tight loop, then commits them together (gateway/pipeline/batch.py).

        ``identity``: what :func:`check_head` returned for these very headers (their
        content type, identity and pins) and this ``trust``, when the caller ran it (the
        HTTP routes do, before reading a body; a batch item inherits the envelope's): the
        two checks are not run again. None: both are judged here."""
        trust = trust or self.trust
        cfg = trust.config
        # §4.2 content type (unless check_head judged it), size, non-empty body
        if identity is None:
            check_content_type(req.headers)
        if len(req.body) > cfg.max_body_bytes:
            raise E.BodyTooLarge(f"body exceeds max_body_bytes ({cfg.max_body_bytes})")
        if not req.body:
            raise E.EmptyBody("the request body is empty")
        # §4.3 identity: declared, known, pinned to the TLS session's certificate
        ctx.identity = identity if identity is not None else check_identity(
            cfg, req.headers, req.peer_cert_sha256, req.peer_spki_pin)
        # §4.4 signature headers well-formed; timestamp inside ±clock_skew_s
        ts_text, nonce, signature, kid = signature_headers(req.headers)
        check_timestamp_window(int(ts_text), now, cfg.clock_skew_s)
        # §4.5 candidate keys: explicit kid, or the identity's keys valid now
        try:
            keys = candidate_keys(trust.keyring, ctx.identity, kid, now)
        except KeySelectionError as exc:
            cls = E.UnknownKid if exc.code == "unknown_kid" else E.KeyNotValid
            raise cls(exc.detail) from None
        # §4.6 Ed25519 over the exact bytes received (never re-serialised)
        key = verify_signature(keys, signature, request_signing_input(ts_text, nonce, req.body))
        ctx.kid = key.kid
        # §4.7 strict parse, canonical form, JSON Schema
        body = self.parse_body(req.route, req.body)
        ctx.body = body
        ctx.execution_fingerprint, ctx.attestation_hash = records.execution_binding(req.route, body)
        # §4.8 body ↔ header binding
        check_header_body_binding(req.route, body, ts_text, nonce)
        ctx.tenant_id, ctx.operator_id = body["tenant_id"], body["operator_id"]
        # §4.9 tenant boundaries: operator, identity and key domain
        check_mapping(cfg, ctx.identity, key, ctx.tenant_id, ctx.operator_id)
        # §4.10 schema-version allow-list
        check_schema_version(cfg, req.route, body)
        # §4.11 per-operator rate limit (optional, off unless configured)
        if self.limiter is not None and (wait := self.limiter.check(ctx.operator_id, now)):
            raise E.RateLimited("too many requests for this operator", retry_after=wait)
        # §5 a feedback query's answer is computed (read-only) before the single write and
        # stored with the nonce claim, so a failed answer never consumes the nonce
        if req.route.kind == "query" and self.respond is not None:
            # §4.13 (early) a replayed query is refused before its answer is computed: a
            # read-only look at the claim; the claim at commit stays the authority
            await self.refuse_claimed(ctx, nonce, hashlib.sha256(req.body).hexdigest(), now)
            ctx.response = await self.respond(ctx, now)
        # §4.12-14 (``commit``) owner and attestation anchor, claim the nonce, persist:
        # one atomic step (with the accept's audit events in the same step, when
        # ctx.outbox is set)
        return records.build_commit(req, body, ctx, now, cfg, signature)

    def parse_body(self, route: Route, raw: bytes) -> dict[str, Any]:
        try:
            if self.config.require_canonical_body:  # one walk decides the depth too
                body, canonical, deep = parse_canonical_bounded(raw, MAX_DEPTH)
            else:
                body, canonical = loads(raw), True
                deep = too_deep(body, MAX_DEPTH)
        except CanonicalError as exc:
            raise E.MalformedJson(f"the body is not strict JSON: {exc.detail}") from None
        if not isinstance(body, dict):
            raise E.MalformedJson("the body must be a JSON object")
        if deep:
            raise E.MalformedJson(f"the body nests deeper than {MAX_DEPTH} levels")
        if not canonical:
            raise E.NonCanonicalBody("the body is not in canonical JSON form (PROTOCOL.md §3)")
        try:
            self.validators.validate(route.schema, body)
        except SchemaError as exc:  # the pointer, never the body's own text
            raise E.SchemaViolation(f"the body does not match the {route.schema} schema",
                                    pointer=exc.pointer) from None
        try:
            check_semantics(route, body)
        except SchemaError as exc:
            raise E.SchemaViolation(exc.message, pointer=exc.pointer) from None
        return body

    async def refuse_claimed(self, ctx: Context, nonce: str, digest: str, now: int) -> None:
        try:
            claim = await self.store.get_claim(ctx.identity, ctx.tenant_id, nonce, now)
        except StoreError as exc:  # the cause is logged by the app (throttled)
            raise E.ReplayStoreUnavailable("the replay store is unavailable") from exc
        if claim is not None:
            duplicate = claim.request_id if claim.body_digest == digest else None
            raise_replayed(duplicate)

    async def commit(self, commit: Commit) -> Any:
        """§4.12-14: one atomic store call; its outbox entry's reference when accepted,
        else the refusal's GatewayError."""
        started = time.perf_counter()
        try:
            result: CommitResult | StoreError = await self.committer.commit(commit)
        except StoreError as exc:
            result = exc
        finally:
            if self.store_timer is not None:
                self.store_timer(time.perf_counter() - started)
        return judge_commit(result)

    async def commit_many(self, commits: list[Commit]) -> list[E.GatewayError | Accepted]:
        """The commits of one batch (``Store.commit_many``: each atomic on its own, the
        first in order wins a conflict): per commit, its GatewayError or ``Accepted``."""
        started = time.perf_counter()
        try:
            results = await self.store.commit_many(commits)
        finally:
            if self.store_timer is not None:
                self.store_timer(time.perf_counter() - started)
        out: list[E.GatewayError | Accepted] = []
        for result in results:
            try:
                out.append(Accepted(judge_commit(result)))
            except E.GatewayError as exc:
                out.append(exc)
        return out


@dataclass(frozen=True, slots=True)
class Accepted:
    """A batch item's accepted commit: its audit outbox entry's reference (or None)."""

    outbox_ref: Any


def judge_commit(result: CommitResult | StoreError) -> Any:
    """What the store said about one commit, as §4's answer (raise) or accepted (return
    the outbox entry's reference)."""
    if isinstance(result, StoreError):
        if result.stage == "claim":
            raise E.ReplayStoreUnavailable("the replay store is unavailable") from result
        raise E.StoreUnavailable("the store could not persist the request") from result
    if result.outcome is Outcome.BEFORE_EPOCH:  # docs/STORES.md "Store amnesia"
        raise E.ReplayStoreUnavailable(
            "the replay store lost its state; a request signed before it recovered "
            "cannot be judged — re-sign it with a fresh timestamp")
    if result.outcome is Outcome.EXECUTION_NOT_OWNED:
        raise E.ExecutionNotOwned("this execution belongs to another service identity")
    if result.outcome is Outcome.ATTESTATION_MISMATCH:
        raise E.AttestationMismatch(
            "attestation_measurement_hash differs from the hash anchored for this execution"
        )
    if result.outcome is Outcome.REPLAYED:
        raise_replayed(result.duplicate_of)
    return result.outbox_ref


def raise_replayed(duplicate_of: str | None) -> None:
    extra = {"duplicate_of": duplicate_of} if duplicate_of else {}
    raise E.ReplayedNonce("this nonce was already used by this identity for this tenant",
                          **extra)


# -- the checks, each small and pure ------------------------------------------------------

def one_header(headers: Any, name: str, error: type[E.GatewayError]) -> str | None:
    """The single value of a header; a repeated header is ambiguous and refused."""
    values = headers.getall(name, [])
    if len(values) > 1:
        raise error(f"header {name} appears more than once")
    return values[0] if values else None


def check_content_type(headers: Any) -> None:
    value = one_header(headers, "Content-Type", E.UnsupportedMediaType) or ""
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        raise E.UnsupportedMediaType("Content-Type must be application/json")
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "charset" and val.strip().strip('"').lower() not in (
            "utf-8", "utf8"
        ):
            raise E.UnsupportedMediaType("the only charset accepted is utf-8")


def check_head(cfg: SecurityConfig, headers: Any, content_length: int | None,
               peer_fp: str | None, peer_spki: str | None = None, *,
               max_bytes: int | None = None) -> str:
    """§4.2-3 on what the headers allow, before a byte of the body is read (so a client
    whose certificate is pinned to no identity never holds a body read): content type
    and encoding, Content-Length against max_body_bytes and zero, then the identity.
    A chunked body (no Content-Length) has its size judged while it is read, after this.
    ``Pipeline.process`` judges the same again on the whole body. ``max_bytes``: the
    batch route's limit (``max_batch_bytes``) instead of ``max_body_bytes``."""
    check_content_type(headers)
    encoding = one_header(headers, "Content-Encoding", E.UnsupportedMediaType) or "identity"
    if encoding.strip().lower() != "identity":
        raise E.UnsupportedMediaType("Content-Encoding is not accepted (send identity)")
    limit, name = ((cfg.max_body_bytes, "max_body_bytes") if max_bytes is None
                   else (max_bytes, "max_batch_bytes"))
    if content_length is not None and content_length > limit:
        raise E.BodyTooLarge(f"body exceeds {name} ({limit})")
    if content_length == 0:
        raise E.EmptyBody("the request body is empty")
    return check_identity(cfg, headers, peer_fp, peer_spki)


def check_identity(cfg: SecurityConfig, headers: Any, peer_fp: str | None,
                   peer_spki: str | None = None) -> str:
    """§4.3: the claimed identity's pins name the TLS session's leaf certificate, by its
    sha256 (``peer_fp``) or, for an ``spki:`` pin, its SPKI hash (``peer_spki``); the
    legacy ``X-Client-Cert-Sha256`` header, if sent, must equal ``peer_fp``."""
    name = one_header(headers, "X-Service-Identity", E.IdentityRejected)
    if name is None or not IDENTITY_RE.fullmatch(name):
        raise E.IdentityRejected("X-Service-Identity is missing or malformed")
    identity = cfg.identities.get(name)
    if identity is None:
        raise E.IdentityRejected("unknown service identity")
    if peer_fp is None or not pin_matches(identity.pins, peer_fp, peer_spki):
        raise E.IdentityRejected("the client certificate is not pinned to this identity")
    # One certificate speaks as one identity: its sha256 may be pinned to one identity
    # and its SPKI hash to another (the configuration check compares pin strings only).
    owners = {cfg.pin_owners.get(pin) for pin in (peer_fp, peer_spki) if pin is not None}
    if owners - {None} != {name}:
        others = sorted(o for o in owners if o is not None and o != name)
        log.error("identity_rejected: the client certificate %s is pinned to several "
                  "identities (%s); fix identities.*.pins", peer_fp, ", ".join(
                      sorted({name, *others})))
        raise E.IdentityRejected("the client certificate is pinned to more than one "
                                 f"identity ({', '.join(sorted({name, *others}))}); "
                                 "refused for all of them")
    legacy = one_header(headers, "X-Client-Cert-Sha256", E.IdentityRejected)
    if legacy is not None and not (
        HEX64_RE.fullmatch(legacy.strip())
        and hmac.compare_digest(legacy.strip().lower().encode(), peer_fp.encode())
    ):
        raise E.IdentityRejected("X-Client-Cert-Sha256 does not match the TLS session")
    return name


def signature_headers(headers: Any) -> tuple[str, str, bytes, str | None]:
    bad = E.MalformedSignatureHeaders
    ts = one_header(headers, "X-Telemetry-Timestamp", bad)
    nonce = one_header(headers, "X-Telemetry-Nonce", bad)
    sig = one_header(headers, "X-Telemetry-Signature", bad)
    kid = one_header(headers, "X-Telemetry-Key-Id", bad)
    if ts is None or not TIMESTAMP_RE.fullmatch(ts):
        raise bad("X-Telemetry-Timestamp must be Unix seconds (ASCII digits)")
    if nonce is None or not NONCE_RE.fullmatch(nonce):
        raise bad("X-Telemetry-Nonce is missing or malformed")
    if sig is None or not SIGNATURE_RE.fullmatch(sig):
        raise bad("X-Telemetry-Signature must be padded base64 of 64 bytes")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise bad("X-Telemetry-Signature is not base64") from None
    if kid is not None and not KID_RE.fullmatch(kid):
        raise bad("X-Telemetry-Key-Id is malformed")
    return ts, nonce, raw, kid


def check_timestamp_window(ts: int, now: int, skew: int) -> None:
    if abs(now - ts) > skew:
        raise E.TimestampOutOfWindow(f"timestamp is more than {skew} s from the gateway clock")


def verify_signature(keys: tuple[Key, ...], signature: bytes, message: bytes) -> Key:
    for key in keys:
        if verify(key.public, signature, message):
            return key
    raise E.InvalidSignature("the signature does not verify")


def check_header_body_binding(route: Route, body: Mapping[str, Any], ts: str, nonce: str) -> None:
    if body["timestamp"] != int(ts) or body["nonce"] != nonce:
        raise E.HeaderBodyMismatch("body timestamp/nonce differ from the signed headers")
    meta = body.get("signed_metadata")
    if meta is not None and any(meta[k] != body[k] for k in ("tenant_id", "operator_id",
                                                              "campaign_id")):
        raise E.HeaderBodyMismatch("signed_metadata differs from the top-level members")


def check_mapping(cfg: SecurityConfig, identity: str, key: Key, tenant: str, operator: str) -> None:
    if cfg.operator_tenants.get(operator) != tenant:
        raise E.MappingViolation("the operator is not mapped to this tenant")
    if tenant not in cfg.identities[identity].tenants:
        raise E.MappingViolation("the service identity may not send for this tenant")
    if tenant not in key.tenants:
        raise E.MappingViolation("the signing key's tenant domain excludes this tenant")


def check_schema_version(cfg: SecurityConfig, route: Route, body: Mapping[str, Any]) -> None:
    if route.kind == "telemetry":
        version = body["payload"]["attributes"]["schema_version"]
        if version not in cfg.allowed_schema_versions:
            raise E.SchemaVersionNotAllowed("payload.attributes.schema_version is not allowed")
    elif route.kind == "graph" and body["schema_version"] != GRAPH_SCHEMA_VERSION:
        raise E.SchemaVersionNotAllowed(f"schema_version must be {GRAPH_SCHEMA_VERSION}")


