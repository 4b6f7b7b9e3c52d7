"""``EmitterClient``: sign, persist, deliver; query and verify feedback (docs/EMITTER.md).

Every telemetry or graph body is signed once, written to the outbox (durable) and then
delivered over mTLS (``emitter.transport``: TLS 1.3, gateway certificate pinned when
``server_pins`` is set, redirects never followed, answers capped) by the
``emitter.delivery.Deliveries`` half: ``maybe_accepted`` before each attempt, retries of
the **same** signed bytes, 409 ``duplicate_of`` counted as delivered. Feedback
queries (``emitter.feedback``) pass §6 (``emitter.verify``) and are applied once while in
force through the ledger (``emitter.ledger``); every verdict is audited.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from audit import AuditLog
from common.tls import TlsConfigError, client_context
from common.tomlfile import ConfigError
from keyring.ed25519 import verify
from keyring.signer import open_signer
from schemas.routes import GRAPH_PATH, TELEMETRY_PATH

from .batching import Batches
from .delivery import Deliveries, DeliveryResult, _execution, _queued
from .feedback import FeedbackQueries, QueryError
from .ledger import Ledger
from .outbox import Outbox
from .settings import EmitterSettings, check_url, private_file, secure_state_dir
from .signing import SignedBody, new_nonce, sign_request
from .transport import ServerPins, backoff_delay, open_session
from .verify import VerifiedFeedback, load_feedback_keyring

__all__ = ["DeliveryResult", "EmitterClient", "QueryError", "ServerPins", "backoff_delay"]

log = logging.getLogger("fedgate.emitter")

class EmitterClient(Batches, Deliveries, FeedbackQueries):
    """Async context manager. ``signer``: anything with ``.sign(bytes) -> bytes`` and
    ``.public`` (an HSM handle); default: the PEM ``signing_key`` of the settings.
    ``query_feedback`` comes from :class:`emitter.feedback.FeedbackQueries`."""

    def __init__(self, settings: EmitterSettings, *, signer: Any = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        check_url(settings.url)  # refuse http:// even for settings built in code
        self.settings, self._clock, self._sleep = settings, clock, sleep
        self.node = socket.gethostname() or None  # service.node.name of its audit events
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
        self.last_feedback: VerifiedFeedback | None = None
        self._inflight: set[int] = set()
        self._hold_until = 0.0  # monotonic: after an outage, new sends just queue

    # -- set-up ------------------------------------------------------------------------

    def _load_signer(self) -> Any:
        """The PEM file, or a session on the PKCS#11 token (``signing_key = "pkcs11:…"``;
        the private key stays in the token; the session lives as long as the process)."""
        try:
            return open_signer(self.settings.signing_key, self.settings.kid,
                               pkcs11=self.settings.pkcs11)
        except ValueError as exc:
            raise ConfigError(f"signing_key: {exc}") from None

    def _check_signer(self) -> None:
        probe = b"fedgate emitter signer self-check"
        try:
            ok = verify(bytes(self.signer.public), self.signer.sign(probe), probe)
        except (AttributeError, TypeError) as exc:
            raise ConfigError(f"signing_key: not a signer (.sign/.public): {exc}") from None
        except ValueError as exc:  # the token refused to sign
            raise ConfigError(f"signing_key: {exc}") from None
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
        state = secure_state_dir(self.settings.state_dir)  # settings may come from code
        self.outbox = Outbox(state / "outbox.db", clock=self._clock)
        self.ledger = Ledger(state / "emitter.db")
        private_file(state / "emitter-audit.jsonl")
        self.audit = AuditLog(state / "emitter-audit.jsonl")
        self.session = open_session(self._ssl, self.settings.server_pins,
                                    self.settings.request_timeout_s)
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
        execution = _execution(path, body)
        if execution is not None:  # only a hash the gateway ACCEPTED earlier binds
            anchored = self.ledger.sent_hash(execution[0], execution[1])
            if anchored is not None and anchored != execution[2].lower():
                return DeliveryResult("rejected", None, error="attestation_mismatch",
                                      detail="this execution was accepted with another "
                                      "attestation hash; the gateway would refuse it")
        item = self.outbox.enqueue(signed, path)  # durable before the first send
        if time.monotonic() < self._hold_until:
            return _queued(item, "gateway unavailable recently; queued")
        return await self.deliver(item)

    async def flush(self) -> list[DeliveryResult]:
        """Retry every pending outbox row, oldest first (call on start-up). Each row is
        re-read before it is tried (another task may have settled it). Stops trying at
        the first row the gateway cannot take now; the rest are reported queued."""
        results: list[DeliveryResult] = []
        down = False
        for item_id in self.outbox.pending_ids():
            item = self.outbox.get(item_id)
            if item.state != "pending" or item.id in self._inflight:
                continue
            if down:
                results.append(_queued(item, "gateway unavailable; not tried"))
                continue
            result = await self.deliver(item)
            down = result.outcome == "queued"
            results.append(result)
        return results

