"""Where audit events go: the chained file for the SIEM, one summary line for humans.

Built once at start-up. The file line is the canonical JSON the chain hashes, so it is
rendered by :class:`audit.chain.AuditLog`, not by a structlog renderer; structlog only
writes the short human summary (by default to stderr at INFO; the gateway passes its own
logger and ``level="debug"``: a decision per request is not an operator's log line). A
failed append raises: the caller decides (the gateway fails closed), nothing is dropped
silently.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import structlog

from audit.chain import AuditLog

__all__ = ["AuditSink", "stderr_logger"]

# Members copied into the human summary; never the whole event.
_SUMMARY = (
    ("outcome", "event.outcome"),
    ("reason", "event.reason"),
    ("status", "http.response.status_code"),
    ("request_id", "request_id"),
    ("identity", "service.identity"),
    ("tenant_id", "tenant_id"),
)


def stderr_logger() -> Any:
    """A structlog logger writing ``key=value`` lines to stderr at INFO and above."""
    return structlog.wrap_logger(
        structlog.PrintLogger(file=sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )


class AuditSink:
    """``emit(event)``: append to the chained file (durably), then log a summary."""

    def __init__(self, path: Path | str, *, fsync: bool = True, logger: Any = None,
                 level: str = "info", checkpoints: Any = None) -> None:
        self.log = AuditLog(path, fsync=fsync, checkpoints=checkpoints)
        self.logger = logger if logger is not None else stderr_logger()
        self.level = level  # the logger's method the summary is written with

    def emit(self, event: dict[str, Any]) -> None:
        self._summary(self.log.append(event))

    def emit_many(self, events: list[dict[str, Any]]) -> list[Any]:
        """:meth:`emit` for a batch (``AuditLog.append_many``: one write, one fsync);
        each event's chained body or its ``AuditError``."""
        out = self.log.append_many(events)
        for chained in out:
            if isinstance(chained, dict):
                self._summary(chained)
        return out

    def _summary(self, chained: dict[str, Any]) -> None:
        summary = {name: chained[key] for name, key in _SUMMARY if chained.get(key) is not None}
        getattr(self.logger, self.level)(chained.get("event.action", "audit"),
                                         hash=chained["hash"][:16], **summary)

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> AuditSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
