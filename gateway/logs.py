"""Operator logs (docs/LOGGING.md): one configuration for stdlib ``logging`` and structlog.

``configure`` installs one handler on the root logger whose ``ProcessorFormatter`` renders
every record — aiohttp's, asyncio's, ``fedgate.*`` stdlib loggers and the structlog
loggers of :func:`get_logger` — as one JSON object per line (``json``) or one readable
line (``console``: ``key=value`` without Python quotes). Every rendered line goes through
:func:`redact`: a ``scheme://user:password@`` form, and the configured store password,
never reach a log. The audit trail (audit/) is for the SIEM; these lines are for operators.

:class:`Throttle` logs a repeating failure (a store outage) once, then at most one summary
line every ``interval_s``, then one line when it recovers. :class:`AccessLogger` is the
optional access log (one line per HTTP request, no headers, no bodies).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from aiohttp.abc import AbstractAccessLogger

from common.tomlfile import ConfigError

FORMATS = ("console", "json")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
KEYS = frozenset({"format", "level", "access"})
ACCESS_LOGGER = "fedgate.access"
_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s'\"]*@")  # to the last '@'
_FIRST = ("timestamp", "level", "logger", "message")


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]`` of the config file; ``fedgate serve`` flags override each member."""

    format: str = "console"
    level: str = "info"
    access: bool = False

    def merged(self, overrides: Mapping[str, Any] | None) -> LogSettings:
        """These settings with every override that is not None."""
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        return replace(self, **given)


def from_table(table: Mapping[str, Any]) -> LogSettings:
    """The ``[log]`` table, checked: unknown keys and bad values are ``ConfigError``."""
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise ConfigError(f"unknown key {'log.' + unknown[0]!r}")
    fmt, level = table.get("format", "console"), table.get("level", "info")
    if fmt not in FORMATS:
        raise ConfigError(f"log.format must be one of {', '.join(FORMATS)}")
    if level not in LEVELS:
        raise ConfigError(f"log.level must be one of {', '.join(LEVELS)}")
    access = table.get("access", False)
    if not isinstance(access, bool):
        raise ConfigError("log.access must be true or false")
    return LogSettings(format=fmt, level=level, access=access)


# -- redaction ----------------------------------------------------------------------------

_secrets: tuple[str, ...] = ()


def url_secrets(url: str) -> tuple[str, ...]:
    """The password (and its %-decoded form) a store URL carries, if any."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ()
    return tuple({password, unquote(password)}) if password else ()


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without URL credentials (``redis://user:pw@h`` → ``redis://***@h``) and
    without any of ``secrets`` (nor the ones :func:`configure` was given)."""
    text = _CREDENTIALS.sub(r"\1***@", text)
    for secret in (*secrets, *_secrets):
        if secret:
            text = text.replace(secret, "***")
    return text


def _redact_values(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if not isinstance(value, (int, float, bool, type(None))):
            event[key] = redact(str(value))
    return event


def _json_order(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event["message"] = event.pop("event", "")
    event["pid"] = os.getpid()
    return {**{k: event.pop(k) for k in _FIRST if k in event}, **event}


_BARE = re.compile(r"[^\s\"'=\\]+")


def _value(value: Any) -> str:
    """logfmt: a bare word as is, anything else in double quotes (JSON escapes)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def _console(_: Any, __: str, event: dict[str, Any]) -> str:
    """``<timestamp> <level> <logger>: <message> key=value …`` (+ a traceback below)."""
    head = [event.pop("timestamp", ""), event.pop("level", ""), event.pop("logger", "") + ":",
            str(event.pop("event", ""))]
    exc = event.pop("exception", None)
    line = " ".join([*head, *(f"{k}={_value(v)}" for k, v in event.items())])
    return f"{line}\n{exc}" if exc else line


# -- configuration ------------------------------------------------------------------------

_PRE_CHAIN: list[Callable] = [
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
_state: dict[str, Any] = {"format": None}


def configure(settings: LogSettings, *, secrets: Iterable[str] = (),
              stream: Any = None) -> None:
    """Route every log record of this process to ``stream`` (stderr) in ``settings``'
    format, at ``settings.level`` and above (the access log, when enabled, at info)."""
    global _secrets
    _secrets = tuple(s for s in secrets if s)
    json_mode = settings.format == "json"
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_PRE_CHAIN, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_values,
            *([_json_order, structlog.processors.JSONRenderer()] if json_mode
              else [_console]),
        ])
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[settings.level])
    # an access log that was asked for is shown whatever the level; otherwise never
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if settings.access else logging.CRITICAL + 1)
    logging.captureWarnings(True)
    _state["format"] = settings.format


def is_json() -> bool:
    return _state["format"] == "json"


def get_logger(name: str) -> Any:
    """A structlog logger on the stdlib logger ``name`` (so :func:`configure` formats it;
    unconfigured, e.g. in ``fedgate demo``, stdlib's defaults apply)."""
    return structlog.wrap_logger(
        logging.getLogger(name), wrapper_class=structlog.stdlib.BoundLogger,
        processors=[structlog.stdlib.filter_by_level, *_PRE_CHAIN,
                    structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter])


# -- a repeating failure: first line, summaries, recovery -------------------------------

def describe(exc: BaseException | str) -> dict[str, str]:
    """``cause`` (its message, redacted) and ``cause_type`` (the innermost exception's
    class, e.g. ``ConnectionError``, ``ResponseError``, ``OperationalError``)."""
    if isinstance(exc, str):
        return {"cause": redact(exc)}
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
    return {"cause": redact(text), "cause_type": type(inner).__name__}


class Throttle:
    """The first failure at ``level``; while failures go on, one line per ``interval_s``
    at most, counting the ones not logged; one info line at the first success after."""

    def __init__(self, logger: Any, event: str, *, level: int = logging.WARNING,
                 interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.event, self.level = logger, event, level
        self.interval_s, self.clock = interval_s, clock
        self.failures = 0  # since the last success
        self.unlogged = 0  # since the last line
        self.logged_at: float | None = None

    def failed(self, cause: BaseException | str, **fields: Any) -> None:
        self.failures += 1
        now = self.clock()
        if self.logged_at is not None and now - self.logged_at < self.interval_s:
            self.unlogged += 1
            return
        if self.logged_at is not None:
            fields["repeated"] = self.unlogged  # failures since the previous line
            fields["failures"] = self.failures
        self.logger.log(self.level, self.event, **describe(cause), **fields)
        self.logged_at, self.unlogged = now, 0

    def recovered(self) -> None:
        if self.failures:
            self.logger.info(f"{self.event}: recovered", failures=self.failures)
            self.failures, self.unlogged, self.logged_at = 0, 0, None


# -- the access log -----------------------------------------------------------------------

class AccessLogger(AbstractAccessLogger):
    """One line per HTTP request: method, path, status, duration, request id, peer.
    Never headers (they carry signatures) nor bodies. aiohttp calls ``log``."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.out = get_logger(logger.name)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: Any, response: Any, time: float) -> None:
        self.out.info("request", method=request.method, path=request.path[:200],
                      status=response.status, duration_ms=round(time * 1000, 3),
                      request_id=response.headers.get("X-Request-Id"),
                      peer=request.remote, bytes=response.body_length)
