"""audit/syslog.py (RFC 5424 + RFC 6587 octet counting) and the [audit.syslog] table."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit import request_event
from audit.syslog import frame, rfc5424, severity
from common.tomlfile import ConfigError
from gateway.config.syslog_config import parse_syslog
from tests.unit.test_audit_chain import NOW, make_event


def failure(category: str, status: int) -> dict:
    return request_event(action="query.rejected", outcome="failure", category=[category],
                         status=status, request_id="r", reason="x", now=NOW)


@pytest.mark.parametrize(("event", "expected"), [
    (make_event(0), 6),  # success: informational
    (failure("authentication", 401), 4),  # bad signature, unknown key: warning
    (failure("iam", 403), 4),  # tenant boundary: warning
    (failure("web", 400), 5),  # other refusal: notice
    (failure("database", 503), 3),  # the gateway failed: error
])
def test_severity(event: dict, expected: int) -> None:
    assert severity(event) == expected


def test_message_layout_and_octet_counting() -> None:
    event = {**make_event(1), "hash": "ab" * 32}
    line = b'{"x":"a b ] \\" \\\\"}'
    msg = rfc5424(event, line, hostname="gw-1", facility=13, sequence=7)
    assert msg == (b'<108>1 2026-11-23T14:52:50.163Z gw-1 fedgate - telemetry.rejected '
                   b'[fedgate@32473 seq="7" hash="' + b"ab" * 32 + b'"] ' + line)
    framed = frame(msg)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(msg) and rest == msg
    assert frame(b"\xc3\xa9") == b"2 \xc3\xa9"  # octets, not characters


def test_fields_that_do_not_fit_become_nilvalues() -> None:
    event = {"event.action": "a." + "x" * 40, "@timestamp": "yesterday"}
    msg = rfc5424(event, b"{}", hostname="has space", facility=16, sequence=1)
    assert msg.startswith(b"<134>1 - - fedgate - - [fedgate@32473 seq=\"1\"")
    with pytest.raises(ValueError):
        rfc5424(event, b"{}\n{}", hostname="h", facility=16, sequence=1)


# -- [audit.syslog] ----------------------------------------------------------------------

@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    return tmp_path


def parse(base: Path, **table):
    return parse_syslog(table, base, base / "audit.jsonl")


def test_defaults(files: Path) -> None:
    tls = parse(files, host="siem.example", ca="ca.crt")
    assert (tls.transport, tls.port, tls.server_name, tls.facility) == ("tls", 6514,
                                                                        "siem.example", 16)
    assert tls.ca == files / "ca.crt" and tls.state_path == files / "audit.jsonl.ship-state.json"
    tcp = parse(files, host="siem", transport="tcp", state_path="s/ship.json", facility="audit")
    assert (tcp.port, tcp.ca, tcp.server_name, tcp.facility) == (514, None, None, 13)
    assert tcp.state_path == files / "s" / "ship.json"


@pytest.mark.parametrize(("table", "message"), [
    ({"host": "h", "ca": "ca.crt", "hots": 1}, "unknown key 'audit.syslog.hots'"),
    ({"ca": "ca.crt"}, "audit.syslog.host is required"),
    ({"host": "h"}, 'audit.syslog.ca is required with transport = "tls"'),
    ({"host": "h", "transport": "udp"}, "audit.syslog.transport must be"),
    ({"host": "h", "transport": "tcp", "ca": "ca.crt"}, 'audit.syslog.ca applies only to'),
    ({"host": "h", "ca": "ca.crt", "port": "6514"}, "audit.syslog.port must be an integer"),
    ({"host": "h", "ca": "ca.crt", "port": 0}, "audit.syslog.port must be an integer"),
    ({"host": "h", "ca": "missing.crt"}, "audit.syslog.ca: no such file"),
    ({"host": "h", "ca": "ca.crt", "client_cert": "c.crt"}, "client_cert and client_key go"),
    ({"host": "h", "ca": "ca.crt", "facility": "local9"}, "audit.syslog.facility must be"),
    ({"host": "h", "ca": "ca.crt", "hostname": "a b"}, "audit.syslog.hostname must be"),
    ({"host": "h", "ca": "ca.crt", "batch_max_events": 0}, "batch_max_events must be"),
    ({"host": "h", "ca": "ca.crt", "ack_timeout_s": 0}, "ack_timeout_s must be"),
    ({"host": "h", "ca": "ca.crt", "poll_interval_s": True}, "poll_interval_s must be"),
    ({"host": "h", "ca": "ca.crt", "backoff_initial_s": 5, "backoff_max_s": 1},
     "backoff_max_s must be at least backoff_initial_s"),
    ({"host": "h", "ca": "ca.crt", "state_path": "audit.jsonl"}, "must not be the audit file"),
])
def test_refused(files: Path, table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse(files, **table)
    assert message in str(info.value)
