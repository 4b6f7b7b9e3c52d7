"""One audit event → one RFC 5424 syslog message, framed by octet counting (RFC 6587).

::

    <PRI>1 TIMESTAMP HOSTNAME fedgate - MSGID [fedgate@32473 seq="N" hash="H"] MSG

* PRI = facility * 8 + severity; the severity follows from the event (:func:`severity`);
* TIMESTAMP is the event's ``@timestamp`` (RFC 3339, UTC, milliseconds), ``-`` if absent;
* MSGID is ``event.action`` (at most 32 printable US-ASCII characters, else ``-``);
* STRUCTURED-DATA carries the chain position and hash (``fedgate@32473``: 32473 is the
  enterprise number RFC 5612 reserves for documentation; replace it if you own one);
* MSG is the audit line itself, byte for byte (canonical JSON: ASCII only, no newline),
  so the SIEM can recompute the hash chain from what it received.

Framing (RFC 6587 §3.4.1, also what RFC 5425 uses over TLS): ``LEN SP MESSAGE`` with LEN
the message's length in octets, decimal, no leading zero. No trailer: a message may hold
any byte, the receiver never scans for a delimiter.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["FACILITIES", "SD_ID", "frame", "rfc5424", "severity"]

FACILITIES = {name: code for code, name in enumerate((
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "ntp", "audit", "alert", "clock",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7"))}
SD_ID = "fedgate@32473"
APP_NAME = "fedgate"

# RFC 5424 §6.2.1 severities
ERROR, WARNING, NOTICE, INFO = 3, 4, 5, 6
#: failures in these ECS categories are security events: warning
SECURITY_CATEGORIES = frozenset({"authentication", "iam", "intrusion_detection"})

_PRINTUSASCII = re.compile(r"[\x21-\x7e]+")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")


def severity(event: dict[str, Any]) -> int:
    """informational for a success; for a failure: error when the gateway answered 5xx
    (it failed, not the peer), warning for authentication/iam categories (a bad signature,
    an unknown key, a tenant boundary), notice for any other refusal."""
    if event.get("event.outcome") != "failure":
        return INFO
    status = event.get("http.response.status_code")
    if isinstance(status, int) and status >= 500:
        return ERROR
    category = event.get("event.category")
    categories = [category] if isinstance(category, str) else (category or [])
    if SECURITY_CATEGORIES.intersection(c for c in categories if isinstance(c, str)):
        return WARNING
    return NOTICE


def _field(value: Any, limit: int) -> str:
    """A header field: 1..limit printable US-ASCII characters, else the NILVALUE ``-``."""
    if isinstance(value, str) and len(value) <= limit and _PRINTUSASCII.fullmatch(value):
        return value
    return "-"


def _sd_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def rfc5424(event: dict[str, Any], line: bytes, *, hostname: str, facility: int,
            sequence: int) -> bytes:
    """The RFC 5424 message for ``event`` whose audit line (no newline) is ``line``."""
    if b"\n" in line:
        raise ValueError("an audit line has no newline inside")
    timestamp = event.get("@timestamp")
    if not (isinstance(timestamp, str) and _TIMESTAMP.fullmatch(timestamp)):
        timestamp = "-"
    sd = f'[{SD_ID} seq="{sequence}" hash="{_sd_value(event.get("hash", ""))}"]'
    header = (f"<{facility * 8 + severity(event)}>1 {timestamp} {_field(hostname, 255)} "
              f"{APP_NAME} - {_field(event.get('event.action'), 32)} {sd} ")
    return header.encode("ascii") + line


def frame(message: bytes) -> bytes:
    """RFC 6587 octet counting: ``LEN SP MESSAGE``."""
    return b"%d %s" % (len(message), message)
