"""``fedgate emit`` input: streamed, item by item, and checked before anything is sent.

:func:`read_items` reads a binary stream in chunks and yields ``(where, value)`` one
item at a time — memory stays bounded by the largest item, not the file:

* a JSON array of objects (``[`` first): ``where`` is ``item N``;
* anything else: a sequence of JSON values separated by whitespace — JSON Lines, one
  (possibly pretty-printed) object, or several: ``where`` is ``line N`` (where it starts).

A stream that cannot be read on (invalid UTF-8 or JSON, nested too deeply, an item larger
than ``limit`` characters) raises :class:`InputError` naming the item. :func:`problem`
checks one item as the gateway will (PROTOCOL.md §3-§4 steps 2 and 7): an object, finite
numbers, 64-bit integers, a canonical form no larger than ``max_body_bytes``, the JSON
Schema of its route (``schemas/``, the gateway's own validators) and the rules the schema
cannot say (``schemas.semantics.check_semantics``).
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from schemas.canonical import dumps
from schemas.routes import Route
from schemas.semantics import check_semantics
from schemas.validate import SchemaError, Validators

CHUNK = 256 * 1024
_INT64 = (-(2**63), 2**63 - 1)
_PROBE_NONCE = "n" * 24  # as long as emitter.signing.new_nonce's
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's


class InputError(ValueError):
    """The input cannot be read on from ``where``."""


class _NotFinite:
    """Stands in, while parsing, for a number JSON cannot carry (NaN, Infinity, 1e400)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


_DECODER = json.JSONDecoder(parse_float=_float, parse_constant=_NotFinite)


class _Reader:
    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self.stream, self.limit = stream, limit
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def fill(self) -> bool:
        """Read one more chunk; False at the end of the stream."""
        if self.eof:
            return False
        chunk = self.stream.read(CHUNK)
        self.eof = not chunk
        try:
            text = self.utf8.decode(chunk, final=self.eof)
        except UnicodeDecodeError as exc:
            raise InputError(f"line {self.line}: not UTF-8 ({exc.reason})") from None
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        return not self.eof or bool(text)

    def advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end)."""
        while True:
            self.advance(_WHITESPACE.match(self.buf, self.pos).end())
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def value(self, where: str) -> Any:
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise InputError(f"{where}: nested too deeply") from None
            except json.JSONDecodeError as exc:
                if len(self.buf) - self.pos > 2 * self.limit + CHUNK:
                    raise InputError(f"{where}: larger than max_body_bytes ({self.limit}), "
                                     "or not JSON") from None
                if not self.fill():
                    raise InputError(f"{where}: not JSON ({exc.msg})") from None
                continue
            if end == len(self.buf) and not self.eof and not isinstance(value, (dict, list)):
                self.fill()  # a number or literal may go on in the next chunk
                continue
            self.advance(end)
            return value


def read_items(stream: BinaryIO, limit: int) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each item of ``stream`` (see the module docstring)."""
    r = _Reader(stream, limit)
    first = r.peek()
    if first == "":
        return
    if first != "[":
        while r.peek():
            where = f"line {r.line}"
            yield where, r.value(where)
        return
    r.advance(r.pos + 1)
    n = 0
    while True:
        nxt = r.peek()
        if nxt == "]":
            r.advance(r.pos + 1)
            if r.peek():
                raise InputError(f"line {r.line}: data after the closing ]")
            return
        if n:
            if nxt != ",":
                raise InputError(f"item {n + 1}: expected , or ] (line {r.line})")
            r.advance(r.pos + 1)
            r.peek()
        n += 1
        yield f"item {n}", r.value(f"item {n}")


def problem(value: Any, route: Route, max_body_bytes: int, validators: Validators,
            now: int) -> str | None:
    """Why the gateway would refuse this item as a body of ``route`` (one line), or None."""
    if not isinstance(value, dict):
        return "not a JSON object"
    bad = _unsendable_number(value)
    if bad is not None:
        return bad
    body = {**value, "timestamp": now, "nonce": _PROBE_NONCE}
    try:
        size = len(dumps(body))
    except (ValueError, TypeError, RecursionError) as exc:
        return f"cannot be signed ({type(exc).__name__})"
    if size > max_body_bytes:
        return f"body_too_large: {size} bytes signed, max_body_bytes is {max_body_bytes}"
    try:
        validators.validate(route.schema, body)
        check_semantics(route, body)
    except SchemaError as exc:
        return f"schema_violation at {exc.pointer or '/'}: {exc.message}"
    return None


def _unsendable_number(value: Any) -> str | None:
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, _NotFinite):
            return f"{current.text} is not a finite number"
        if isinstance(current, bool):
            continue
        if isinstance(current, int) and not _INT64[0] <= current <= _INT64[1]:
            return f"{current} is outside the 64-bit integer range"
        if isinstance(current, dict):
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return None
