"""Hash-chained JSON audit events a SIEM can ingest (PROTOCOL.md §7, docs/AUDIT.md)."""

from audit.chain import AuditError, AuditLog
from audit.events import feedback_event, handshake_event, request_event
from audit.sinks import AuditSink
from audit.verify import VerifyResult, verify_file

__all__ = [
    "AuditError",
    "AuditLog",
    "AuditSink",
    "VerifyResult",
    "feedback_event",
    "handshake_event",
    "request_event",
    "verify_file",
]
