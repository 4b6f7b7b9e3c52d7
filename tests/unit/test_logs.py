"""gateway/logs.py: rendering, redaction, the failure throttle (the process tests are in
tests/integration/test_serve_logs.py)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway import logs
from gateway.store import StoreError


@pytest.fixture
def configured():
    """``configure`` into a buffer; the root logger and the module's state restored after."""
    root, access = logging.getLogger(), logging.getLogger(logs.ACCESS_LOGGER)
    saved = (list(root.handlers), root.level, access.level, dict(logs._state), logs._secrets)
    buf = io.StringIO()

    def setup(**kw) -> io.StringIO:
        secrets = kw.pop("secrets", ())
        logs.configure(logs.LogSettings(**kw), secrets=secrets, stream=buf)
        return buf

    yield setup
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    access.setLevel(saved[2])
    logs._state.update(saved[3])
    logs._secrets = saved[4]


def test_json_renders_stdlib_and_structlog_records_alike(configured) -> None:
    buf = configured(format="json", level="info", secrets=["pw-123"])
    logging.getLogger("aiohttp.server").warning("bad request from %s (pw-123)", "1.2.3.4")
    logs.get_logger("fedgate.store").error("store unavailable", cause="redis://u:pw@h down",
                                           n=3)
    logs.get_logger("fedgate.audit").debug("telemetry.accepted")  # below the level
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert list(first)[:4] == ["timestamp", "level", "logger", "message"]
    assert (first["level"], first["logger"], first["message"]) == (
        "warning", "aiohttp.server", "bad request from 1.2.3.4 (***)")
    assert (second["level"], second["logger"], second["message"], second["cause"],
            second["n"]) == ("error", "fedgate.store", "store unavailable",
                             "redis://***@h down", 3)


def test_console_is_one_line_without_python_quotes(configured) -> None:
    buf = configured(format="console", level="debug")
    logs.get_logger("fedgate.x").debug("hello", word="plain", text="two words", quote="it's",
                                       flag=True, none=None)
    line, = buf.getvalue().splitlines()
    assert line.split(" ", 1)[1] == ('debug fedgate.x: hello word=plain text="two words" '
                                     'quote="it\'s" flag=true none=null')


def test_access_logger_is_off_unless_enabled_whatever_the_level(configured) -> None:
    configured(level="debug")
    assert not logging.getLogger(logs.ACCESS_LOGGER).isEnabledFor(logging.INFO)
    configured(level="error", access=True)
    assert logging.getLogger(logs.ACCESS_LOGGER).isEnabledFor(logging.INFO)


@pytest.mark.parametrize("text, want", [
    ("connecting to redis://user:s3cr3t@10.0.0.1:6379/0",
     "connecting to redis://***@10.0.0.1:6379/0"),
    ("redis://u:s3cr3t@unencoded@h/0 x@y", "redis://***@h/0 x@y"),
    ("rediss://:s3cr3t@host:6380", "rediss://***@host:6380"),
    ("'redis://u:p%40ss@h/0'", "'redis://***@h/0'"),
    ("no url here", "no url here"),
    ("redis://host:6379/0", "redis://host:6379/0"),
])
def test_redact_url_credentials(text, want) -> None:
    assert logs.redact(text) == want
    assert "s3cr3t" not in logs.redact(text)


def test_store_error_detail_never_carries_a_url_password() -> None:
    err = StoreError("claim", "Redis is unavailable (redis://fedgate:hunter2@h:1/0)")
    assert "hunter2" not in err.detail and "hunter2" not in str(err)


def test_url_secrets_and_redaction_of_the_bare_password() -> None:
    secrets = logs.url_secrets("redis://fedgate:p%40ss-word@h:1/0")
    assert set(secrets) == {"p%40ss-word", "p@ss-word"}
    assert logs.redact("AUTH p@ss-word failed", secrets) == "AUTH *** failed"
    assert logs.url_secrets("redis://h:1/0") == () == logs.url_secrets("sqlite:////x.db")


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[int | str, str, dict]] = []

    def log(self, level: int, event: str, **kw) -> None:
        self.lines.append((level, event, kw))

    def info(self, event: str, **kw) -> None:
        self.lines.append(("info", event, kw))


def test_throttle_first_line_then_one_summary_per_interval_then_recovery() -> None:
    now, rec = [100.0], Recorder()
    throttle = logs.Throttle(rec, "store unavailable", interval_s=30, clock=lambda: now[0])
    cause = StoreError("claim", "Redis is unavailable (ConnectionError: refused)")
    cause.__cause__ = ConnectionRefusedError(111, "refused")
    for t in (100, 101, 110, 129.9, 130, 131):
        now[0] = t
        throttle.failed(cause, request_id=f"r{t}")
    throttle.recovered()
    throttle.recovered()  # nothing more to say
    assert rec.lines == [
        (logging.WARNING, "store unavailable",
         {"cause": "Redis is unavailable (ConnectionError: refused)",
          "cause_type": "ConnectionRefusedError", "request_id": "r100"}),
        (logging.WARNING, "store unavailable",
         {"cause": "Redis is unavailable (ConnectionError: refused)",
          "cause_type": "ConnectionRefusedError", "request_id": "r130", "repeated": 3,
          "failures": 5}),
        ("info", "store unavailable: recovered", {"failures": 6}),
    ]
