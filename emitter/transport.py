"""The emitter's HTTP transport: pinned mTLS POSTs with a bounded answer (docs/EMITTER.md).

* :class:`ServerPins` pins the gateway certificate, checked after the TLS handshake and
  before a byte of the request is written.
* :func:`open_session` is the one session both ``fedgate emit`` and ``fedgate probe``
  use: the pins on the connector, the CA-verifying TLS 1.3 context on every request.
* :func:`post` sends exactly the given bytes (no redirect) and reads the answer in chunks,
  at most :data:`MAX_RESPONSE_BYTES`: a larger answer raises :class:`ResponseTooLarge`
  without being buffered. :func:`parse_json` turns the body into JSON or ``None``, never
  an exception (invalid, too deeply nested, ``NaN``/``Infinity``).
* :func:`classify` says what a failed attempt proves: the request was not sent, the
  gateway's TLS refused us (an operator must act), or it may have been delivered.
* :func:`backoff_delay` and :func:`retry_after` pace the retries.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp

from common.tls import server_cert_sha256_matches

RETRY_STATUSES = frozenset({429, 502, 503, 504})  # the gateway did not decide: try again
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # the gateway's answers are a few KiB (≤ 1000 adjustments)
_CHUNK = 64 * 1024

# TLS alerts that end a handshake: the gateway refused the session, so it never read a
# byte of the request (TLS 1.3 checks the client certificate after our side finished).
_HANDSHAKE_ALERT = re.compile(
    r"ALERT_(BAD_CERTIFICATE|UNSUPPORTED_CERTIFICATE|CERTIFICATE_\w+|UNKNOWN_CA|"
    r"ACCESS_DENIED|HANDSHAKE_FAILURE|PROTOCOL_VERSION|INSUFFICIENT_SECURITY)")


class ServerPins(aiohttp.Fingerprint):
    """aiohttp runs ``check`` right after the TLS handshake, before the request is
    written: a gateway certificate outside ``pins`` never sees a byte of it."""

    def __init__(self, pins: tuple[str, ...]) -> None:
        super().__init__(bytes(32))
        self.pins = pins

    def check(self, transport: asyncio.Transport) -> None:
        if not server_cert_sha256_matches(transport.get_extra_info("ssl_object"), self.pins):
            raise aiohttp.ServerFingerprintMismatch(b"", b"", "pinned gateway", 0)


class ResponseTooLarge(Exception):
    """The answer's body is over the cap; ``status`` is what its status line said."""

    def __init__(self, status: int, limit: int) -> None:
        super().__init__(f"answer body larger than {limit} bytes (status {status})")
        self.status, self.limit = status, limit


def backoff_delay(attempt: int, initial: float, cap: float, rng=random.random) -> float:
    """Exponential backoff, capped, with "equal jitter": in [d/2, d], d = initial·2^(n-1)."""
    delay = min(cap, initial * 2 ** (attempt - 1))
    return delay / 2 + rng() * delay / 2


def retry_after(headers: Any) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """The JSON value of ``raw``, or None (empty, invalid, nested too deeply, NaN)."""
    if not raw:
        return None
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


async def read_capped(resp: aiohttp.ClientResponse, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """The whole body, read in chunks; ResponseTooLarge (connection dropped) past ``limit``."""
    if resp.content_length is not None and resp.content_length > limit:
        resp.close()
        raise ResponseTooLarge(resp.status, limit)
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > limit:
            resp.close()
            raise ResponseTooLarge(resp.status, limit)
    return bytes(body)


async def post(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               body: bytes, *, ssl_context: ssl.SSLContext,
               limit: int = MAX_RESPONSE_BYTES) -> tuple[int, Any, Any]:
    """One POST of exactly these bytes: ``(status, parse_json(body), headers)``."""
    async with session.post(url, data=body, headers=headers, ssl=ssl_context,
                            allow_redirects=False) as resp:
        raw = await read_capped(resp, limit)
        return resp.status, parse_json(raw), resp.headers


async def get(session: aiohttp.ClientSession, url: str, *, ssl_context: ssl.SSLContext,
              limit: int = MAX_RESPONSE_BYTES) -> tuple[int, Any, Any]:
    """One GET (``fedgate probe``), same rules as :func:`post`: no redirect, answer capped."""
    async with session.get(url, ssl=ssl_context, allow_redirects=False) as resp:
        raw = await read_capped(resp, limit)
        return resp.status, parse_json(raw), resp.headers


def open_session(ssl_context: ssl.SSLContext, pins: tuple[str, ...],
                 timeout_s: float) -> aiohttp.ClientSession:
    """The emitter's HTTP session. With ``pins`` the connector checks the gateway
    certificate against them after the handshake (:class:`ServerPins`); the handshake
    itself always uses ``ssl_context``, which :func:`post`/:func:`get` pass on every
    request (a request without it would skip the CA check). No proxy from the environment."""
    connector = aiohttp.TCPConnector(ssl=ServerPins(pins) if pins else ssl_context)
    return aiohttp.ClientSession(connector=connector, trust_env=False,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed attempt proves. ``refused``: the gateway's certificate or TLS
    refused the session — not sent, and an operator must fix it; ``sent``: the request
    may have reached the gateway (its fate is unknown)."""

    code: str
    detail: str
    refused: bool = False
    sent: bool = True


TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientError, OSError, ResponseTooLarge)


def _tls_alert(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError) and _HANDSHAKE_ALERT.search(
                str(current.reason or current)):
            return current
        current = current.__cause__ or current.__context__
    return None


def classify(exc: BaseException) -> Failure:
    """The meaning of one of :data:`TRANSPORT_ERRORS` raised by :func:`post`."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return Failure("server_pin_mismatch", "the gateway certificate matches no "
                       "server_pins", refused=True, sent=False)
    if isinstance(exc, aiohttp.ClientSSLError):  # CA, hostname, TLS version, alert
        return Failure("tls_handshake_failed", str(exc), refused=True, sent=False)
    alert = _tls_alert(exc)
    if alert is not None:  # TLS 1.3: the gateway refused our certificate after our Finished
        return Failure("tls_handshake_failed", str(alert), refused=True, sent=False)
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        # no connection, so nothing written. A reset DURING the handshake lands here too:
        # it is what a TLS 1.2-only asyncio server does, but also what a gateway that dies
        # or restarts mid-handshake does — not provably a TLS refusal, so transient.
        return Failure("connect", f"connect: {exc}"[:300], sent=False)
    if isinstance(exc, ResponseTooLarge):
        return Failure("malformed_response", f"malformed_response: {exc}")
    return Failure("no_answer", f"no answer: {type(exc).__name__}")
