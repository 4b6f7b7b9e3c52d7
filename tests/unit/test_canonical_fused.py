"""The one-walk fast path (issue 9) agrees with the three walks it replaced.

Before issue 9 a body was walked three times in Python: ``dumps`` → ``_plain``, then
``_ints_in_range``, then the pipeline's ``too_deep``. ``three_walks`` below is that
composition, copied from the code it replaced: the oracle. ``parse_canonical_bounded``
must give the same value, canonical flag, depth verdict, error code and error detail
for every input, and ``parse_canonical`` the same first two.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.canonical import (
    INT64_MAX,
    INT64_MIN,
    CanonicalError,
    dumps,
    dumps_reference,
    loads,
    parse_canonical,
    parse_canonical_bounded,
    too_deep,
)

MAX_DEPTH = 32  # gateway/pipeline/pipeline.py


# -- the oracle: the old composition, verbatim ---------------------------------------------

def _ints_in_range(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int:
            if not INT64_MIN <= item <= INT64_MAX:
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _old_parse_canonical(data: bytes) -> tuple[Any, bool]:
    try:
        fast = orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError):
        fast = None
    else:
        try:
            if dumps(fast) == data and _ints_in_range(fast):
                return fast, True
        except (ValueError, RecursionError):
            pass
    value = loads(data)
    try:
        return value, dumps(value) == data
    except (ValueError, RecursionError) as exc:
        raise CanonicalError("malformed_json", f"cannot serialise: {exc}") from None


def three_walks(data: bytes, limit: int) -> tuple[Any, bool, bool]:
    value, canonical = _old_parse_canonical(data)
    return value, canonical, too_deep(value, limit)


# -- comparing outcomes ------------------------------------------------------------------

def same_json(a: Any, b: Any) -> bool:
    """Exact equality of two parsed JSON values: types too (1, 1.0 and True differ), the
    sign of zero, and iterative (values may nest a thousand deep)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if type(x) is dict:
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif type(x) is list:
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif type(x) is float:
            if repr(x) != repr(y):
                return False
        elif x != y:
            return False
    return True


def outcome(fn, *args: Any) -> tuple:
    try:
        value, *flags = fn(*args)
    except CanonicalError as exc:
        return ("error", exc.code, exc.detail), None
    return ("ok", *flags), value


def assert_agrees(data: bytes, limit: int) -> tuple:
    """The fused parser against the oracle on ``data``; returns the outcome."""
    old, old_value = outcome(three_walks, data, limit)
    new, new_value = outcome(parse_canonical_bounded, data, limit)
    assert new == old, data[:200]
    assert same_json(new_value, old_value), data[:200]
    two, two_value = outcome(parse_canonical, data)  # the same, less the depth verdict
    assert two == (old[:2] if old[0] == "ok" else old)
    assert same_json(two_value, old_value)
    return new


# -- the new API --------------------------------------------------------------------------

def nest(levels: int, inner: bytes = b"1", kind: str = "list") -> bytes:
    """``levels`` containers around ``inner``: canonical bytes."""
    head, tail = (b"[", b"]") if kind == "list" else (b'{"k":', b"}")
    return head * levels + inner + tail * levels


@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("limit", [1, 2, 5, MAX_DEPTH])
def test_bounded_reports_depth_at_and_one_over_the_limit(kind: str, limit: int) -> None:
    at, over = nest(limit, kind=kind), nest(limit + 1, kind=kind)
    value, canonical, deep = parse_canonical_bounded(at, limit)
    assert (canonical, deep) == (True, False)
    assert dumps(value) == at
    value, canonical, deep = parse_canonical_bounded(over, limit)
    assert (canonical, deep) == (True, True)
    assert dumps(value) == over
    # the same on the strict path (a body that is not canonical: a space)
    assert parse_canonical_bounded(at + b" ", limit)[1:] == (False, False)
    assert parse_canonical_bounded(over + b" ", limit)[1:] == (False, True)


def test_bounded_counts_containers_not_scalars() -> None:
    for data, depth in [(b"1", 0), (b'"x"', 0), (b"null", 0), (b"[]", 1), (b"{}", 1),
                        (b'{"a":[]}', 2), (b'{"a":"[[[[["}', 1), (b'[1,[2,[3]],{}]', 3)]:
        assert parse_canonical_bounded(data, depth)[2] is False, data
        if depth:
            assert parse_canonical_bounded(data, depth - 1)[2] is True, data


def test_bounded_without_a_limit_is_never_too_deep() -> None:
    for data in (nest(300), nest(300, b" 1"), nest(MAX_DEPTH + 1, kind="object"), b"1"):
        value, canonical = parse_canonical(data)
        assert parse_canonical_bounded(data, None)[1:] == (canonical, False)


def test_bounded_raises_where_parse_canonical_raises() -> None:
    for data in (b'{"n":9223372036854775808}', b'{"a":1,"a":1}', b"[1e400]", b"{"):
        with pytest.raises(CanonicalError) as old:
            parse_canonical(data)
        with pytest.raises(CanonicalError) as new:
            parse_canonical_bounded(data, MAX_DEPTH)
        assert (new.value.code, new.value.detail) == (old.value.code, old.value.detail)


# -- edge cases: every branch of the fast path ---------------------------------------------

EDGES: dict[str, bytes] = {
    "lab_like": b'{"a":{"b":{"c":[1,"x",true,null]}},"t":1795445569}',
    "int64_max": b"[9223372036854775807]",
    "int64_min": b"[-9223372036854775808]",
    "int64_max_plus_1": b"[9223372036854775808]",
    "int64_min_minus_1": b"[-9223372036854775809]",
    "u64_max": b'{"n":18446744073709551615}',
    "u64_max_deep": b"[" * 40 + b"18446744073709551615" + b"]" * 40,
    "2_pow_64": b"[18446744073709551616]",
    "minus_2_pow_64": b"[-18446744073709551616]",
    "int_400_digits": b"[" + b"9" * 400 + b"]",
    "int_5000_digits_top": b"7" * 5000,
    # orjson and Python print some floats alike (1e+16), some not (0.00001 vs 1e-05)
    "float_big": b'{"f":1e+16}',
    "float_big_no_plus": b'{"f":1e16}',
    "float_small_python_form": b'{"f":1e-05}',
    "float_small_orjson_form": b'{"f":0.00001}',
    "float_tiny_python_form": b"[1.5e-07]",
    "float_tiny_orjson_form": b"[1.5e-7]",
    "float_plain": b'{"f":1.5}',
    "float_deep": b"[" * 40 + b"1.5" + b"]" * 40,
    "float_and_u64": b"[1.5,18446744073709551615]",
    "float_integral": b"[100.0]",
    "float_minus_zero": b"[-0.0]",
    "non_ascii_escaped": b'{"a":"\\u00e9"}',
    "non_ascii_raw": '{"a":"\u00e9"}'.encode(),
    "non_ascii_escaped_uppercase": b'{"a":"\\u00E9"}',
    "astral_escaped": b'{"a":"\\ud83d\\ude00"}',
    "del_escaped": b'{"a":"\\u007f"}',
    "del_raw": b'{"a":"\x7f"}',
    "del_in_key_escaped": b'{"\\u007f":1}',
    "lone_surrogate": b'{"a":"\\ud800"}',
    "duplicate_keys": b'{"a":1,"a":1}',
    "duplicate_keys_deep": b"[" * 40 + b'{"a":1,"a":1}' + b"]" * 40,
    "unsorted": b'{"b":1,"a":2}',
    "spaced": b'{"a": 1}',
    "trailing_newline": b'{"a":1}\n',
    "invalid_utf8": b'{"a":"\xff"}',
    "nan": b"[NaN]",
    "overflow": b"[1e400]",
    "empty": b"",
    "torn": b'{"a":',
    "top_scalar_int": b"3",
    "top_scalar_string": b'"[[["',
    "top_scalar_float": b"1.5",
    "top_null": b"null",
    "top_true": b"true",
    "empty_containers": b'{"a":[],"b":{},"c":[[],{}]}',
    "wide": b"[" + b",".join(b"%d" % i for i in range(1000)) + b"]",
}
# orjson re-serialises at most 254 levels and reads at most 1024; json's C scanner and
# encoder stop at the recursion limit (~1000): every side of each boundary
for levels in (253, 254, 255, 256, 500, 990, 1000, 1023, 1024, 1025, 1100, 100_000):
    EDGES[f"list_{levels}"] = nest(levels)
    EDGES[f"object_{levels}"] = nest(levels, kind="object")
    EDGES[f"list_{levels}_spaced"] = nest(levels, b" 1")
    EDGES[f"list_{levels}_u64"] = nest(levels, b"18446744073709551615")
    EDGES[f"list_{levels}_float"] = nest(levels, b"1.5")
    EDGES[f"list_{levels}_unclosed"] = b"[" * levels
for levels in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1):
    for kind in ("list", "object"):
        EDGES[f"{kind}_{levels}"] = nest(levels, kind=kind)
        EDGES[f"{kind}_{levels}_spaced"] = nest(levels, b" 1", kind)
        EDGES[f"{kind}_{levels}_int64_max"] = nest(levels, b"9223372036854775807", kind)
        EDGES[f"{kind}_{levels}_int64_max_plus_1"] = nest(levels, b"9223372036854775808",
                                                           kind)
        EDGES[f"{kind}_{levels}_int64_min"] = nest(levels, b"-9223372036854775808", kind)
        EDGES[f"{kind}_{levels}_int64_min_minus_1"] = nest(levels, b"-9223372036854775809",
                                                            kind)
        EDGES[f"{kind}_{levels}_non_ascii"] = nest(levels, b'"\\u00e9"', kind)
        EDGES[f"{kind}_{levels}_non_ascii_raw"] = nest(levels, '"\u00e9"'.encode(), kind)
        EDGES[f"{kind}_{levels}_float"] = nest(levels, b"1e+16", kind)

LIMITS = (0, 1, 2, 3, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 254, 255, 1024, -1)


@pytest.mark.parametrize("data", EDGES.values(), ids=EDGES)
def test_edge_agrees_with_three_walks(data: bytes) -> None:
    for limit in LIMITS:
        assert_agrees(data, limit)


def test_edges_reach_every_outcome() -> None:
    """The table is not vacuous: it has canonical, non-canonical, deep and every code."""
    seen = set()
    for data in EDGES.values():
        got = assert_agrees(data, MAX_DEPTH)
        seen.add(got[:2] if got[0] == "error" else got)
    assert {("ok", True, False), ("ok", True, True), ("ok", False, False),
            ("ok", False, True)} <= seen
    assert {("error", code) for code in ("malformed_json", "duplicate_key",
                                         "non_finite_number", "invalid_utf8",
                                         "integer_out_of_range")} <= seen


# -- properties ----------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)
INTS = (st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN - 1, INT64_MAX + 1,
                           2**64 - 1, 2**64, -(2**64), 0]))
SCALARS = (st.none() | st.booleans() | INTS | TEXT
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from([1e16, 1e-5, 1e22, -0.0, 100.0, 5e-324]))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(TEXT, c, max_size=4), max_leaves=20)


def wrap(value: Any, levels: int, kind: str) -> Any:
    for _ in range(levels):
        value = [value] if kind == "list" else {"k": value}
    return value


def renderings(value: Any) -> list[bytes]:
    out = [
        dumps_reference(value),
        json.dumps(value, separators=(",", ":")).encode(),  # unsorted
        json.dumps(value, sort_keys=True, separators=(",", ":"),
                   ensure_ascii=False).encode(),  # raw non-ASCII / DEL
        json.dumps(value, sort_keys=True).encode(),  # spaced
    ]
    # orjson's floats; it refuses ints beyond 64 bits and nesting deeper than it writes
    with contextlib.suppress(orjson.JSONEncodeError):
        out.append(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
    return out


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(VALUES, st.integers(0, 40), st.sampled_from(["list", "object"]),
       st.integers(-1, 40))
@example({"a": [1]}, MAX_DEPTH - 2, "object", MAX_DEPTH)  # exactly at the limit
@example({"a": [1]}, MAX_DEPTH - 1, "object", MAX_DEPTH)  # one over
@example([INT64_MAX + 1], 3, "list", 4)
@example({"f": 1e-05}, 0, "list", 1)
def test_property_fused_agrees_with_three_walks(value: Any, levels: int, kind: str,
                                                limit: int) -> None:
    for data in renderings(wrap(value, levels, kind)):
        assert_agrees(data, limit)


@SETTINGS
@given(VALUES, st.data())
def test_property_mutated_bytes_agree(value: Any, data: st.DataObject) -> None:
    """Byte-level damage to a canonical body: every error path, both parsers alike."""
    raw = bytearray(dumps_reference(value))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from(b' "[]{}:,\\0123456789.eE+-\x7f\xc3\xa9\xff'))
        if action == "insert":
            raw.insert(at, byte)
        elif at < len(raw):
            if action == "delete":
                del raw[at]
            else:
                raw[at] = byte
    assert_agrees(bytes(raw), data.draw(st.integers(0, 6)))


@SETTINGS
@given(st.binary(max_size=64))
def test_property_arbitrary_bytes_agree(data: bytes) -> None:
    assert_agrees(data, 2)


def test_oracle_sees_what_it_must() -> None:
    """Guard on the guard: the oracle really distinguishes the cases the tests rely on."""
    assert three_walks(b"[[1]]", 1)[1:] == (True, True)
    assert three_walks(b"[[1]]", 2)[1:] == (True, False)
    assert three_walks(b'{"f":0.00001}', 5)[1] is False  # orjson's form of 1e-05
    assert three_walks(b'{"f":1e-05}', 5)[1] is True
    assert three_walks(b'{"a":"\\u007f"}', 5)[1] is True
    assert not same_json(1, 1.0) and not same_json(0.0, -0.0) and not same_json(1, True)
    assert not same_json({"a": [1]}, {"a": [2]}) and same_json([{"a": -0.0}], [{"a": -0.0}])
