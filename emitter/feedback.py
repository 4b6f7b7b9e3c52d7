"""The feedback half of ``EmitterClient``: query, verify (§6) and apply (docs/EMITTER.md).

:class:`FeedbackQueries` is a mixin; it uses the client's ``settings``, ``keyring``,
``ledger``, ``audit``, ``sign``, ``post_raw``, ``_now``, ``_clock`` and ``_sleep``. A
query is re-signed per attempt (it is a read). A 200 answer is verified by
:func:`emitter.verify.check_feedback` and applied by :meth:`emitter.ledger.Ledger.apply`;
an answer that cannot even be read or checked (over the size cap, not JSON, anything a
hostile answer could provoke) is ``malformed_response``. Every verdict is audited.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from audit import feedback_event
from schemas.routes import QUERY_PATH

from .transport import (
    RETRY_STATUSES,
    TRANSPORT_ERRORS,
    ResponseTooLarge,
    backoff_delay,
    classify,
)
from .verify import (
    SKIP_UNKNOWN_EXECUTION,
    Expectation,
    FeedbackRejected,
    VerifiedFeedback,
    check_feedback,
)

log = logging.getLogger("fedgate.emitter")
#: at most this many skipped fingerprints are named in one audit event or log line
MAX_NAMED_SKIPS = 100


class QueryError(Exception):
    """The gateway did not answer a feedback query with 200 (or could not be reached)."""

    def __init__(self, status: int | None, code: str, detail: str = "") -> None:
        super().__init__(f"{status or '-'} {code}" + (f": {detail}" if detail else ""))
        self.status, self.code, self.detail = status, code, detail


class FeedbackQueries:
    last_feedback: VerifiedFeedback | None = None
    node: str | None = None  # service.node.name of the audit events (the client's host)

    async def query_feedback(self, tenant_id: str, operator_id: str,
                             limit: int = 100) -> list[dict[str, Any]]:
        """Ask for adjustments, verify (§6 1-8), claim the nonce and apply (step 9).
        Returns the newly applied adjustments (``last_feedback.skipped``: the ones for
        executions this emitter never sent, audited and logged); raises
        ``FeedbackRejected`` (audited, nothing applied) or ``QueryError`` (the gateway
        refused or was unreachable)."""
        body = {"operator_id": operator_id, "tenant_id": tenant_id, "limit": limit}
        signed, request_id, payload, problem = await self._query(body)
        now = self._now()
        expect = Expectation(tenant_id, signed.headers["X-Telemetry-Nonce"],
                             self.ledger.sent_for(tenant_id), limit=limit)
        try:
            if problem is not None:
                raise FeedbackRejected("malformed_response", problem)
            verified = self._verify(payload, expect, now)
            applied = self.ledger.apply(verified, now)
        except FeedbackRejected as exc:
            self._audit_feedback(request_id, tenant_id, payload, reason=exc.code,
                                 detail=exc.detail)
            raise
        self.last_feedback = verified
        skipped = [text(fp) or "" for fp in verified.skipped_executions[:MAX_NAMED_SKIPS]]
        if verified.skipped:  # §6 step 8 [v1.1]: not applied, but never silent
            log.warning("feedback %s: skipped %d adjustment(s) for execution(s) this emitter "
                        "never sent (%s): %s", request_id, len(verified.skipped),
                        SKIP_UNKNOWN_EXECUTION, ", ".join(skipped))
        self._audit_feedback(request_id, tenant_id, payload, applied=len(applied),
                             skipped=skipped)
        return applied

    def _verify(self, payload: Any, expect: Expectation, now: int) -> VerifiedFeedback:
        """§6 1-8; whatever else a hostile answer might provoke is malformed_response."""
        try:
            return check_feedback(payload, expect, keyring=self.keyring, now=now,
                                  skew_s=self.settings.clock_skew_s,
                                  legacy_unbound_nonce=self.settings.legacy_unbound_nonce)
        except FeedbackRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - fail closed, audited by the caller
            raise FeedbackRejected("malformed_response", "the answer could not be checked "
                                   f"({type(exc).__name__})") from None

    async def _query(self, body: dict[str, Any]):
        """POST a freshly signed query (re-signed per attempt: a query is a read).
        → ``(signed, request_id, payload, problem)``; ``problem``: why a 200 answer
        cannot be read (too large), else None."""
        s, last = self.settings, "no attempt"
        for attempt in range(1, s.max_attempts + 1):
            signed, request_id = self.sign(body), str(uuid.uuid4())
            headers = {**signed.headers, "X-Request-Id": request_id}
            try:
                status, payload, _ = await self.post_raw(QUERY_PATH, headers, signed.body)
            except ResponseTooLarge as exc:
                if exc.status == 200:
                    return signed, request_id, None, str(exc)
                status, payload = exc.status, None
            except TRANSPORT_ERRORS as exc:
                failure = classify(exc)
                if failure.refused:
                    raise QueryError(None, failure.code, failure.detail) from None
                status, payload, last = None, None, type(exc).__name__
            if status == 200:
                return signed, request_id, payload, None
            if status is not None and status not in RETRY_STATUSES:
                err = payload if isinstance(payload, dict) else {}
                raise QueryError(status, text(err.get("error")) or f"http_{status}",
                                 text(err.get("detail")) or "")
            last = f"{status} {last}" if status else last
            if attempt < s.max_attempts:
                await self._sleep(backoff_delay(attempt, s.backoff_initial_s, s.backoff_max_s))
        raise QueryError(None, "gateway_unavailable", last)

    def _audit_feedback(self, request_id: str, tenant_id: str, payload: Any, *,
                        reason: str | None = None, detail: str | None = None,
                        applied: int | None = None, skipped: list[str] | None = None) -> None:
        body = payload if isinstance(payload, dict) else {}
        kid, nonce = text(body.get("kid")), text(body.get("nonce"))
        self.audit.append(feedback_event(
            outcome="failure" if reason else "success", request_id=request_id,
            reason=reason, status=200, tenant_id=tenant_id, kid=kid, nonce=nonce,
            adjustments=applied, skipped=skipped, detail=detail, method="POST",
            path=QUERY_PATH, node=self.node, now=self._clock()))


def text(value: Any) -> str | None:
    """A string member of an answer, bounded (it came from the network), else None."""
    return value[:256] if isinstance(value, str) else None
