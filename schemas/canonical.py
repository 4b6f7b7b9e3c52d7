"""Federation canonical JSON (PROTOCOL.md §3).

The canonical form is, by definition, the output of::

    json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
               allow_nan=False).encode("utf-8")

``dumps_reference`` is exactly that. ``dumps`` is a fast path (orjson) that falls
back to the reference whenever orjson's output could differ from it: any float (orjson
prints ``0.00001`` where Python prints ``1e-05``), any non-ASCII text or DEL (orjson
emits them raw), and any integer beyond 64 bits (orjson refuses them). It is checked
byte-for-byte against the reference on every vector and under hypothesis.

``loads`` is the strict parser: invalid UTF-8, duplicate keys, NaN/Infinity, lone
surrogates, integers outside signed 64 bits, trailing data and absurd nesting are all
rejected with a named code. ``parse_canonical`` is what the gateway calls on a body:
orjson first (fast), and only when the body is not already canonical the strict parser,
to name the failure. On that fast path ONE iterative walk over what orjson read
(``_scan``) decides what would otherwise take three: whether orjson may re-serialise it
(no float), whether every integer lies in signed 64 bits, and how deep containers nest;
``parse_canonical_bounded`` hands that depth to the gateway's body parser, which then
needs no walk of its own (issue 9). ``load_stored`` is what every LATER reader of
stored bytes calls (policy engine, audit chain, exports): the same parser, so whatever
the gateway accepted is readable again, and whatever a later reader refuses the gateway
refused too.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

__all__ = ["INT64_MAX", "INT64_MIN", "CanonicalError", "dumps", "dumps_known_readable",
           "dumps_reference", "load_stored", "loads", "parse_canonical",
           "parse_canonical_bounded", "too_deep"]

#: Parser failure codes (vectors/canonical_json.json names the first three).
MALFORMED = "malformed_json"
DUPLICATE_KEY = "duplicate_key"
NON_FINITE = "non_finite_number"
INVALID_UTF8 = "invalid_utf8"
INTEGER_RANGE = "integer_out_of_range"
NOT_OBJECT = "not_an_object"

#: PROTOCOL.md §3 [v1.1]: integers are signed 64-bit, what every later reader can hold.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT64_DIGITS = 20  # "-9223372036854775808": no in-range integer has a longer text


class CanonicalError(ValueError):
    """A JSON text the strict parser refuses; ``code`` names why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


# -- serialiser -------------------------------------------------------------------------

def dumps_reference(obj: Any) -> bytes:
    """The definition of the canonical form (PROTOCOL.md §3)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("utf-8")


# verdicts of _scan (on what orjson.loads returned, or on a value to serialise)
_PLAIN = 0      # dict/list/str/int/bool/None only, every int in signed 64 bits
_NOT_PLAIN = 1  # also a float (or another type): only the reference serialiser judges it
_BIG_INT = 2    # an int outside signed 64 bits: the strict parser refuses the body


def _scan(value: Any) -> tuple[int, int]:
    """``(verdict, depth)`` of a parsed JSON value in ONE iterative walk, level by level.

    ``depth`` counts container levels as :func:`too_deep` does (0 for a scalar, 1 for a
    flat object). Strings are never descended and scalars never pushed: each level's
    values are gathered in C (``list.extend``), then one pass over them checks the
    integers and keeps the containers for the next level. Keys are not looked at:
    orjson's keys are always ``str``, and for :func:`dumps` orjson refuses any other key
    (the reference then judges). Only exact types are plain (an enum, a ``str`` or
    ``dict`` subclass is not). Stops at the first integer outside 64 bits.
    """
    verdict, depth, items = _PLAIN, 0, [value]
    while True:
        boxes: list[Any] = []
        keep = boxes.append
        for item in items:
            kind = type(item)
            if kind is str:
                continue
            if kind is int:
                if not INT64_MIN <= item <= INT64_MAX:
                    return _BIG_INT, depth
            elif kind is dict or kind is list:
                keep(item)
            elif kind is not bool and item is not None:
                verdict = _NOT_PLAIN
        if not boxes:
            return verdict, depth
        depth += 1
        items = []
        gather = items.extend
        for box in boxes:
            gather(box.values() if type(box) is dict else box)


def _fast(obj: Any) -> bytes | None:
    """orjson's bytes when they are the canonical bytes, else None."""
    try:
        out = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # e.g. nesting deeper than orjson's limit (254)
        return None
    if out.isascii() and b"\x7f" not in out:
        return out
    return None


def dumps(obj: Any) -> bytes:
    """Canonical bytes of ``obj``; byte-identical to :func:`dumps_reference` (and raises
    where it raises)."""
    # only plain JSON types (exact dict/list/str/int/bool/None, ints in signed 64 bits) go
    # to orjson: it prints floats differently, writes NaN as null, and serialises UUIDs,
    # datetimes and dataclasses that the reference refuses; ints in [2^63, 2^64) and
    # non-str keys (orjson refuses them: _fast is None) take the reference too
    if _scan(obj)[0] == _PLAIN:
        out = _fast(obj)
        if out is not None:
            return out
    return dumps_reference(obj)


# -- strict parser ----------------------------------------------------------------------

def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CanonicalError(DUPLICATE_KEY, f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _no_constants(name: str) -> Any:
    raise CanonicalError(NON_FINITE, f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 overflows to inf: not a finite number
        raise CanonicalError(NON_FINITE, f"{text[:32]} overflows a double")
    return value


def _int64(text: str) -> int:
    """A JSON integer in [−2^63, 2^63−1]; the length is judged before ``int()`` runs."""
    value = int(text) if len(text) <= _INT64_DIGITS else None
    if value is None or not INT64_MIN <= value <= INT64_MAX:
        shown = text if len(text) <= 32 else f"{text[:16]}...({len(text)} digits)"
        raise CanonicalError(INTEGER_RANGE, f"integer {shown} is outside signed 64 bits")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs_no_duplicates, parse_constant=_no_constants,
    parse_float=_finite_float, parse_int=_int64,
)
_JSON_WS = " \t\r\n"  # RFC 8259 insignificant whitespace, as json.loads skips it
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: Any) -> None:
    """Reject lone surrogates (\\ud800 escapes without a pair): not Unicode text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                raise CanonicalError(MALFORMED, "lone UTF-16 surrogate in a string")
        elif isinstance(item, dict):
            for key, sub in item.items():
                stack.append(key)
                stack.append(sub)
        elif isinstance(item, list):
            stack.extend(item)


def loads(data: bytes) -> Any:
    """Parse ``data`` strictly; raise :class:`CanonicalError` naming the first fault."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanonicalError(INVALID_UTF8, f"body is not UTF-8 (byte {exc.start})") from None
    start = len(text) - len(text.lstrip(_JSON_WS))
    try:
        value, end = _DECODER.raw_decode(text, start)
    except CanonicalError:
        raise
    except json.JSONDecodeError as exc:
        raise CanonicalError(MALFORMED, f"invalid JSON: {exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise CanonicalError(MALFORMED, "JSON nested too deeply") from None
    except ValueError as exc:  # e.g. int too long for int(): never a crash
        raise CanonicalError(MALFORMED, f"invalid JSON: {exc}") from None
    if text[end:].strip(_JSON_WS):
        raise CanonicalError(MALFORMED, f"trailing data at {end}")
    # strict UTF-8 decoding refuses encoded surrogates, so a lone one can only come from
    # a \u escape: text without any skips the walk (a 300 KB batch envelope of base64)
    if "\\u" in text:
        _check_text(value)
    return value


def too_deep(value: Any, limit: int) -> bool:
    """True when containers nest more than ``limit`` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, dict | list))
    return False


def dumps_known_readable(obj: Any) -> bytes | None:
    """Canonical bytes of the object ``obj`` when one walk proves that
    :func:`load_stored` reads them back (plain JSON types, every int in signed 64 bits,
    orjson's ASCII output: no lone surrogate), else None: then :func:`dumps` and a
    :func:`load_stored` of its bytes judge. The audit chain writes every line through
    this (never a line its readers refuse) without parsing each line back."""
    if type(obj) is not dict or _scan(obj)[0] != _PLAIN:
        return None
    return _fast(obj)  # None for a non-str key, past 254 levels, non-ASCII text or DEL


def parse_canonical_bounded(data: bytes, max_depth: int | None) -> tuple[Any, bool, bool]:
    """:func:`parse_canonical` plus ``too_deep(value, max_depth)`` (False when
    ``max_depth`` is None): ``(value, canonical, too_deep)``, the depth taken from the
    same walk on the fast path (the gateway's body parser, issue 9). Raises exactly where
    :func:`parse_canonical` raises."""
    try:
        fast = orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError):
        pass
    else:
        # orjson.loads yields only JSON types and finite floats; ints outside
        # [-2^63, 2^64) it reads as floats.
        verdict, depth = _scan(fast)
        if verdict != _BIG_INT:  # else the strict parser names the failure
            try:
                # dumps(fast) without walking again: orjson's bytes for a plain value
                # (_fast: None past orjson's 254 levels, or for non-ASCII text or DEL),
                # else the reference's
                out = _fast(fast) if verdict == _PLAIN else None
                if (out if out is not None else dumps_reference(fast)) == data:
                    # max(.., 0): a scalar (depth 0) is never too deep, as in too_deep
                    return fast, True, max_depth is not None and depth > max(max_depth, 0)
            except (ValueError, RecursionError):
                pass
    value = loads(data)
    try:
        canonical = dumps(value) == data
    except (ValueError, RecursionError) as exc:
        raise CanonicalError(MALFORMED, f"cannot serialise: {exc}") from None
    return value, canonical, max_depth is not None and too_deep(value, max_depth)


def parse_canonical(data: bytes) -> tuple[Any, bool]:
    """Parse a body and tell whether it is byte-identical to its canonical form.

    Fast path: orjson accepts only valid UTF-8, finite numbers and no trailing data;
    a body equal to the canonical form of what orjson read cannot hold duplicate keys
    (canonical output never repeats a key). orjson reads integers up to 2^64−1 as ints
    (beyond that as floats, which never re-serialise to the same bytes), so one walk
    (:func:`_scan`, ~3 µs for a 2 KB body) checks them against 64 bits and finds any
    float (orjson prints some unlike the reference) before orjson re-serialises.
    Everything else goes through :func:`loads`, so failures carry the strict parser's
    code.
    """
    value, canonical, _ = parse_canonical_bounded(data, None)
    return value, canonical


def load_stored(data: bytes) -> dict[str, Any]:
    """The one reader of stored JSON: records, their signed bodies, audit lines.

    Exactly the gateway's parser (:func:`parse_canonical`: the orjson fast path for the
    canonical bytes the gateway writes, the strict parser for anything else) plus "a
    JSON object at the top". Raises :class:`CanonicalError`; never anything else.
    """
    try:
        value, _ = parse_canonical(data)
    except CanonicalError:
        raise
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. ``data`` not bytes
        raise CanonicalError(MALFORMED, f"unreadable: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise CanonicalError(NOT_OBJECT, "the top-level JSON value is not an object")
    return value
