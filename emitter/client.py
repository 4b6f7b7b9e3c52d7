"""``EmitterClient``: sign, persist, deliver; query and verify feedback (docs/EMITTER.md).

Every telemetry or graph body is signed once, written to the outbox (durable) and then
delivered over mTLS (TLS 1.3, gateway certificate pinned when ``server_pins`` is set,
redirects never followed). Transient failures are retried with capped exponential
backoff and jitter, resending the **same** signed bytes; a 409 carrying ``duplicate_of``
means an earlier attempt already landed. Feedback answers pass §6 (``emitter.verify``)
and are applied once through the ledger (``emitter.ledger``); every verdict is audited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from audit import AuditLog, feedback_event
from gateway.config import ConfigError
from gateway.routes import GRAPH_PATH, QUERY_PATH, TELEMETRY_PATH
from gateway.tls import TlsConfigError, client_context, server_cert_sha256_matches
from keyring.ed25519 import PrivateKey, verify

from .ledger import Ledger
from .outbox import Outbox, OutboxItem
from .settings import EmitterSettings, check_url
from .signing import SignedBody, new_nonce, sign_request
from .verify import Expectation, FeedbackRejected, check_feedback, load_feedback_keyring

log = logging.getLogger("fedgate.emitter")

RETRY_STATUSES = frozenset({429, 502, 503, 504})  # the gateway did not decide: try again
MAYBE_LANDED_STATUSES = frozenset({502, 504})  # a proxy may have lost the upstream's 202


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """``outcome``: accepted | duplicate (delivered earlier) | queued (kept in the outbox,
    retried by ``flush``) | rejected (permanent) | refused (not sent: TLS/pin failure;
    kept in the outbox)."""

    outcome: str
    outbox_id: int | None
    status: int | None = None
    request_id: str | None = None
    finding_id: str | None = None
    duplicate_of: str | None = None
    error: str | None = None
    detail: str | None = None
    possible_duplicate: bool = False  # re-signed after an attempt that may have landed

    @property
    def delivered(self) -> bool:
        return self.outcome in ("accepted", "duplicate")


class QueryError(Exception):
    """The gateway did not answer a feedback query with 200 (or could not be reached)."""

    def __init__(self, status: int | None, code: str, detail: str = "") -> None:
        super().__init__(f"{status or '-'} {code}" + (f": {detail}" if detail else ""))
        self.status, self.code, self.detail = status, code, detail


class ServerPins(aiohttp.Fingerprint):
    """aiohttp runs ``check`` right after the TLS handshake, before the request is
    written: a gateway certificate outside ``pins`` never sees a byte of it."""

    def __init__(self, pins: tuple[str, ...]) -> None:
        super().__init__(bytes(32))
        self.pins = pins

    def check(self, transport: asyncio.Transport) -> None:
        if not server_cert_sha256_matches(transport.get_extra_info("ssl_object"), self.pins):
            raise aiohttp.ServerFingerprintMismatch(b"", b"", "pinned gateway", 0)


def backoff_delay(attempt: int, initial: float, cap: float, rng=random.random) -> float:
    """Exponential backoff, capped, with "equal jitter": in [d/2, d], d = initial·2^(n-1)."""
    delay = min(cap, initial * 2 ** (attempt - 1))
    return delay / 2 + rng() * delay / 2


def _retry_after(headers: Any) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


@dataclass(frozen=True, slots=True)
class _Verdict:
    result: DeliveryResult | None = None  # final; None: transient, try again
    resign: bool = False  # the gateway said timestamp_out_of_window
    wait: float = 0.0  # at least this long before the next attempt (Retry-After)


class EmitterClient:
    """Async context manager. ``signer``: anything with ``.sign(bytes) -> bytes`` and
    ``.public`` (an HSM handle); default: the PEM ``signing_key`` of the settings."""

    def __init__(self, settings: EmitterSettings, *, signer: Any = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        check_url(settings.url)  # refuse http:// even for settings built in code
        self.settings, self._clock, self._sleep = settings, clock, sleep
        self.signer = signer if signer is not None else self._load_signer()
        self._check_signer()
        self._ssl = self._tls_context()
        try:
            self.keyring = load_feedback_keyring(settings.feedback_keyring)
        except ValueError as exc:
            raise ConfigError(f"feedback_keyring: {exc}") from None
        if not settings.server_pins:
            log.warning("server_pins is empty: the gateway certificate is checked against "
                        "the CA only (pinning recommended)")
        self.outbox: Outbox | None = None
        self.ledger: Ledger | None = None
        self.audit: AuditLog | None = None
        self.session: aiohttp.ClientSession | None = None
        self.last_feedback = None
        self._inflight: set[int] = set()
        self._hold_until = 0.0  # monotonic: after an outage, new sends just queue

    # -- set-up ------------------------------------------------------------------------

    def _load_signer(self) -> PrivateKey:
        try:
            return PrivateKey.load(self.settings.signing_key)
        except ValueError as exc:
            raise ConfigError(f"signing_key: {exc}") from None

    def _check_signer(self) -> None:
        probe = b"fedgate emitter signer self-check"
        try:
            ok = verify(bytes(self.signer.public), self.signer.sign(probe), probe)
        except (AttributeError, TypeError) as exc:
            raise ConfigError(f"signing_key: not a signer (.sign/.public): {exc}") from None
        if not ok:
            raise ConfigError("signing_key: the signer's signature does not verify under "
                              "its public key")

    def _tls_context(self):
        s = self.settings
        try:
            return client_context(s.ca, s.cert, s.key)
        except TlsConfigError as exc:
            raise ConfigError(f"ca/cert/key: {exc}") from None

    async def open(self) -> EmitterClient:
        state = self.settings.state_dir
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.outbox = Outbox(state / "outbox.db", clock=self._clock)
        self.ledger = Ledger(state / "emitter.db")
        self.audit = AuditLog(state / "emitter-audit.jsonl")
        pins = self.settings.server_pins
        connector = aiohttp.TCPConnector(ssl=ServerPins(pins) if pins else self._ssl)
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                             trust_env=False)
        return self

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        for part in (self.outbox, self.ledger, self.audit):
            if part is not None:
                part.close()
        self.session = self.outbox = self.ledger = self.audit = None

    async def __aenter__(self) -> EmitterClient:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- signing and sending -----------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def sign(self, body: dict[str, Any]) -> SignedBody:
        """Fresh timestamp and nonce, the producer signature, canonical bytes."""
        return sign_request(self.signer, body, identity=self.settings.identity,
                            kid=self.settings.kid, timestamp=self._now(), nonce=new_nonce())

    async def send_telemetry(self, body: dict[str, Any]) -> DeliveryResult:
        return await self._send(TELEMETRY_PATH, body)

    async def send_graph(self, body: dict[str, Any]) -> DeliveryResult:
        return await self._send(GRAPH_PATH, body)

    async def _send(self, path: str, body: dict[str, Any]) -> DeliveryResult:
        signed = self.sign(body)  # ValueError: not JSON-serialisable (NaN, …)
        try:
            self._record_sent(path, body)
        except ValueError as exc:  # another attestation hash for a sent execution
            return DeliveryResult("rejected", None, error="attestation_mismatch",
                                  detail=str(exc))
        item = self.outbox.enqueue(signed, path)  # durable before the first send
        if time.monotonic() < self._hold_until:
            return _queued(item, "gateway unavailable recently; queued")
        return await self.deliver(item)

    def _record_sent(self, path: str, body: dict[str, Any]) -> None:
        """What this emitter sent for an execution: §6 step 8 checks feedback against it."""
        try:
            if path == TELEMETRY_PATH:
                fp = body["execution_hash"]
                att = body["payload"]["attributes"]["attestation_measurement_hash"]
            else:
                fp, att = body["execution_fingerprint"], body["attestation_measurement_hash"]
            tenant = body["tenant_id"]
        except (KeyError, TypeError):
            return  # malformed: the gateway will say why (422); nothing to remember
        if all(isinstance(v, str) for v in (tenant, fp, att)):
            self.ledger.record_sent(tenant, fp, att)

    async def flush(self) -> list[DeliveryResult]:
        """Retry every pending outbox row, oldest first (call on start-up). Stops trying
        at the first row the gateway cannot take now; the rest are reported queued."""
        results: list[DeliveryResult] = []
        down = False
        for item in self.outbox.pending():
            if item.id in self._inflight:
                continue
            if down:
                results.append(_queued(item, "gateway unavailable; not tried"))
                continue
            result = await self.deliver(item)
            down = result.outcome == "queued"
            results.append(result)
        return results

    async def deliver(self, item: OutboxItem) -> DeliveryResult:
        """Deliver one outbox row: retries with backoff, same bytes; re-signs (new
        timestamp and nonce) at most once when its timestamp has left the window."""
        self._inflight.add(item.id)
        try:
            result = await self._deliver(item)
        finally:
            self._inflight.discard(item.id)
        self._hold_until = (time.monotonic() + self.settings.backoff_max_s
                            if result.outcome == "queued" else 0.0)
        return result

    async def _deliver(self, item: OutboxItem) -> DeliveryResult:
        s = self.settings
        resigned = item.state != "pending"  # a final row is resent as is, never re-signed
        for attempt in range(1, s.max_attempts + 1):
            if not resigned and self._stale(item):
                item, resigned = self._resign(item), True
            verdict = await self._attempt(item)
            if verdict.result is not None:
                return verdict.result
            if verdict.resign:
                if resigned:  # fresh and still out of window: the clocks disagree
                    return self._refuse(item, "timestamp_out_of_window", "the gateway's "
                                        "clock disagrees with ours; fix it, then flush").result
                item, resigned = self._resign(item), True
                continue
            if attempt < s.max_attempts:
                delay = backoff_delay(attempt, s.backoff_initial_s, s.backoff_max_s)
                await self._sleep(min(s.backoff_max_s, max(delay, verdict.wait)))
        return _queued(self.outbox.get(item.id), "gateway unavailable; will retry")

    def _stale(self, item: OutboxItem) -> bool:
        """Too old to be inside the gateway's ±skew window when it arrives."""
        margin = max(1, self.settings.clock_skew_s // 6)
        return self._now() - item.timestamp > self.settings.clock_skew_s - margin

    def _resign(self, item: OutboxItem) -> OutboxItem:
        body = json.loads(item.body)
        new = self.outbox.resign(item.id, self.sign(body))
        if new.possible_duplicate:
            log.warning("outbox #%d re-signed as #%d after an attempt that may have been "
                        "accepted: a duplicate finding is possible", item.id, new.id)
        return new

    async def _attempt(self, item: OutboxItem) -> _Verdict:
        try:
            status, payload, headers = await self.post_raw(item.path, item.headers, item.body)
        except aiohttp.ServerFingerprintMismatch:
            return self._refuse(item, "server_pin_mismatch",
                                "the gateway certificate matches no server_pins")
        except aiohttp.ClientSSLError as exc:  # bad CA/hostname/TLS version: not sent
            return self._refuse(item, "tls_handshake_failed", str(exc))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self.outbox.record_attempt(item.id, f"connect: {exc}"[:300], maybe_accepted=False)
            return _Verdict()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = f"no answer: {type(exc).__name__}"
            self.outbox.record_attempt(item.id, error, maybe_accepted=True)
            return _Verdict()
        return self._judge(item, status, payload, headers)

    def _refuse(self, item: OutboxItem, code: str, detail: str) -> _Verdict:
        self.outbox.record_attempt(item.id, code, maybe_accepted=False)
        log.error("outbox #%d not sent: %s (%s); kept in the outbox", item.id, code, detail)
        return _Verdict(DeliveryResult("refused", item.id, error=code, detail=detail))

    def _judge(self, item: OutboxItem, status: int, payload: Any, headers: Any) -> _Verdict:
        body = payload if isinstance(payload, dict) else {}
        code, rid = body.get("error") or f"http_{status}", body.get("request_id")
        if status == 202:
            self.outbox.mark_delivered(item.id, rid)
            return _Verdict(DeliveryResult(
                "accepted", item.id, 202, rid, body.get("finding_id"),
                possible_duplicate=item.possible_duplicate))
        if status == 409 and isinstance(body.get("duplicate_of"), str):
            self.outbox.mark_delivered(item.id, body["duplicate_of"], 409)
            return _Verdict(DeliveryResult("duplicate", item.id, 409, rid,
                                           duplicate_of=body["duplicate_of"]))
        if status in RETRY_STATUSES:
            self.outbox.record_attempt(item.id, f"{status} {code}",
                                       maybe_accepted=status in MAYBE_LANDED_STATUSES)
            return _Verdict(wait=_retry_after(headers) if status == 429 else 0.0)
        if status == 401 and code == "timestamp_out_of_window":
            self.outbox.record_attempt(item.id, f"{status} {code}", maybe_accepted=False)
            return _Verdict(resign=True)
        if 300 <= status < 400:
            code = "redirect_refused"
        self.outbox.mark_rejected(item.id, status, code)
        return _Verdict(DeliveryResult("rejected", item.id, status, rid, error=code,
                                       detail=body.get("detail")))

    async def post_raw(self, path: str, headers: dict[str, str], body: bytes):
        """One POST of exactly these bytes over the pinned mTLS session: no outbox, no
        retry, no redirect. → ``(status, parsed JSON or None, response headers)``.
        (``deliver`` uses it; demos use it to show tampered and replayed requests.)"""
        async with self.session.post(self.settings.url + path, data=body, headers=headers,
                                     ssl=self._ssl, allow_redirects=False) as resp:
            raw = await resp.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = None
            return resp.status, payload, resp.headers

    # -- feedback (§6) -------------------------------------------------------------------

    async def query_feedback(self, tenant_id: str, operator_id: str,
                             limit: int = 100) -> list[dict[str, Any]]:
        """Ask for adjustments, verify (§6 1-8), claim the nonce and apply (step 9).
        Returns the newly applied adjustments; raises ``FeedbackRejected`` (audited,
        nothing applied) or ``QueryError`` (the gateway refused or was unreachable)."""
        body = {"operator_id": operator_id, "tenant_id": tenant_id, "limit": limit}
        signed, request_id, payload = await self._query(body)
        now = self._now()
        expect = Expectation(tenant_id, signed.headers["X-Telemetry-Nonce"],
                             self.ledger.sent_for(tenant_id))
        try:
            verified = check_feedback(payload, expect, keyring=self.keyring, now=now,
                                      skew_s=self.settings.clock_skew_s,
                                      legacy_unbound_nonce=self.settings.legacy_unbound_nonce)
            applied = self.ledger.apply(verified, now)
        except FeedbackRejected as exc:
            self._audit_feedback(request_id, tenant_id, payload, reason=exc.code,
                                 detail=exc.detail)
            raise
        self.last_feedback = verified
        self._audit_feedback(request_id, tenant_id, payload, applied=len(applied))
        return applied

    async def _query(self, body: dict[str, Any]):
        """POST a freshly signed query (re-signed per attempt: a query is a read)."""
        s, last = self.settings, "no attempt"
        for attempt in range(1, s.max_attempts + 1):
            signed, request_id = self.sign(body), str(uuid.uuid4())
            headers = {**signed.headers, "X-Request-Id": request_id}
            try:
                status, payload, _ = await self.post_raw(QUERY_PATH, headers, signed.body)
            except aiohttp.ServerFingerprintMismatch:
                raise QueryError(None, "server_pin_mismatch") from None
            except aiohttp.ClientSSLError as exc:
                raise QueryError(None, "tls_handshake_failed", str(exc)) from None
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                status, payload, last = None, None, type(exc).__name__
            if status == 200:
                return signed, request_id, payload
            if status is not None and status not in RETRY_STATUSES:
                err = payload if isinstance(payload, dict) else {}
                raise QueryError(status, err.get("error") or f"http_{status}",
                                 str(err.get("detail") or ""))
            last = f"{status} {last}" if status else last
            if attempt < s.max_attempts:
                await self._sleep(backoff_delay(attempt, s.backoff_initial_s, s.backoff_max_s))
        raise QueryError(None, "gateway_unavailable", last)

    def _audit_feedback(self, request_id: str, tenant_id: str, payload: Any, *,
                        reason: str | None = None, detail: str | None = None,
                        applied: int | None = None) -> None:
        body = payload if isinstance(payload, dict) else {}
        kid, nonce = _short(body.get("kid")), _short(body.get("nonce"))
        self.audit.append(feedback_event(
            outcome="failure" if reason else "success", request_id=request_id,
            reason=reason, status=200, tenant_id=tenant_id, kid=kid, nonce=nonce,
            adjustments=applied, detail=detail, now=self._clock()))


def _queued(item: OutboxItem, detail: str) -> DeliveryResult:
    return DeliveryResult("queued", item.id, error=item.last_error, detail=detail,
                          possible_duplicate=item.possible_duplicate)


def _short(value: Any) -> str | None:
    """A response member fit for the audit log (it came from the network: bounded)."""
    return value[:256] if isinstance(value, str) else None
