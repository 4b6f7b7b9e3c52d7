"""Federation canonical JSON (PROTOCOL.md §3): vectors, edge cases and properties.

``dumps`` (orjson fast path) must be byte-identical to ``dumps_reference`` (the
definition); ``loads`` is the strict parser; ``parse_canonical`` is what the gateway
calls on a body and must say "canonical" exactly when the bytes equal the canonical form.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import uuid
from typing import Any

import pytest
from conftest import load_vectors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.canonical import (
    INT64_MAX,
    INT64_MIN,
    CanonicalError,
    dumps,
    dumps_reference,
    load_stored,
    loads,
    parse_canonical,
)

VECTORS = load_vectors("canonical_json.json")["cases"]

EXPECTED_VECTOR_NAMES = {
    "sorted_keys_compact",
    "empty_object",
    "non_ascii_escaped",
    "astral_surrogate_pair",
    "control_chars",
    "slash_not_escaped",
    "floats_python_repr",
    "int64_bounds",
    "int_beyond_64_bits_rejected",
    "int_just_beyond_int64_rejected",
    "key_order_by_code_point",
    "nested_arrays_keep_order",
    "duplicate_keys_rejected",
    "nan_rejected",
    "infinity_rejected",
    "trailing_garbage_rejected",
}


def tagged(value: Any) -> Any:
    """A structure that compares equal only if types and values match exactly.

    ``1 == 1.0`` and ``True == 1`` in Python; a canonical round trip must keep the
    JSON type, so compare tagged trees. Floats are tagged by ``repr`` (exact, keeps
    the sign of zero).
    """
    if value is None or isinstance(value, bool):
        return ("lit", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", [tagged(v) for v in value])
    if isinstance(value, dict):
        return ("dict", sorted((k, tagged(v)) for k, v in value.items()))
    raise TypeError(f"not a JSON value: {type(value)!r}")


# -- vectors ----------------------------------------------------------------------------

def test_vector_names_are_exactly_the_expected_set() -> None:
    names = [case["name"] for case in VECTORS]
    assert len(names) == len(set(names)), "duplicate vector names"
    assert set(names) == EXPECTED_VECTOR_NAMES


def test_every_vector_has_exactly_one_expectation() -> None:
    for case in VECTORS:
        assert ("canonical" in case) != ("error" in case), case["name"]


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_canonical_vector(case: dict) -> None:
    data = case["input"].encode("utf-8")
    if "error" in case:
        with pytest.raises(CanonicalError) as exc:
            loads(data)
        assert exc.value.code == case["error"]
        with pytest.raises(CanonicalError) as exc:
            parse_canonical(data)
        assert exc.value.code == case["error"]
        return

    canonical = case["canonical"].encode("utf-8")
    value = loads(data)
    assert dumps(value) == canonical
    assert dumps_reference(value) == canonical

    parsed, is_canonical = parse_canonical(canonical)
    assert is_canonical is True
    assert tagged(parsed) == tagged(value)

    parsed, is_canonical = parse_canonical(data)
    assert is_canonical is (data == canonical)
    assert tagged(parsed) == tagged(value)
    if data != canonical:
        assert is_canonical is False


# -- edge cases -------------------------------------------------------------------------

def _err(code: str) -> tuple[str, str]:
    return ("error", code)


def _ok(value: Any, is_canonical: bool) -> tuple[str, Any, bool]:
    return ("ok", value, is_canonical)


DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
BIG = 2**64
HUGE = -(3**200)

EDGE_CASES: list[tuple[str, bytes, tuple]] = [
    ("invalid_utf8_ff", b'{"a":"\xff"}', _err("invalid_utf8")),
    ("invalid_utf8_overlong_slash", b'{"a":"\xc0\xaf"}', _err("invalid_utf8")),
    ("invalid_utf8_encoded_surrogate", b'{"a":"\xed\xa0\x80"}', _err("invalid_utf8")),
    ("invalid_utf8_truncated", b'{"a":"\xe6\x97"}', _err("invalid_utf8")),
    # The codec accepts any JSON value; rejecting a non-object body is the pipeline's job.
    ("top_level_array", b"[1,2]", _ok([1, 2], True)),
    ("top_level_integer", b"3", _ok(3, True)),
    ("top_level_float", b"1.5", _ok(1.5, True)),
    ("top_level_string", b'"x"', _ok("x", True)),
    ("top_level_null", b"null", _ok(None, True)),
    ("top_level_integer_spaced", b"3 ", _ok(3, False)),
    ("lone_high_surrogate", b'{"a":"\\ud800"}', _err("malformed_json")),
    ("lone_low_surrogate", b'{"a":"\\udc00"}', _err("malformed_json")),
    ("reversed_surrogate_pair", b'{"a":"\\ude00\\ud83d"}', _err("malformed_json")),
    ("lone_surrogate_in_key", b'{"\\ud800":1}', _err("malformed_json")),
    ("lone_surrogate_in_nested_list", b'{"a":[["\\udfff"]]}', _err("malformed_json")),
    ("valid_surrogate_pair", b'{"a":"\\ud83d\\ude00"}', _ok({"a": "\U0001f600"}, True)),
    ("deep_array_100000", DEEP_ARRAY, _err("malformed_json")),
    ("deep_object_100000", DEEP_OBJECT, _err("malformed_json")),
    # [v1.1] integers are signed 64-bit: [-2^63, 2^63-1]; orjson alone would read up to
    # 2^64-1 as an int and beyond that as a float, so each side of each bound is a row.
    ("int_i64_max", b'{"n":9223372036854775807}', _ok({"n": INT64_MAX}, True)),
    ("int_i64_min", b"-9223372036854775808", _ok(INT64_MIN, True)),
    ("int_i64_max_plus_1", b'{"n":9223372036854775808}', _err("integer_out_of_range")),
    ("int_i64_min_minus_1", b'{"n":-9223372036854775809}', _err("integer_out_of_range")),
    ("int_u64_max", b"18446744073709551615", _err("integer_out_of_range")),
    ("int_u64_max_in_list", b'{"a":[1,18446744073709551615]}', _err("integer_out_of_range")),
    ("int_2_pow_64", b'{"n":%d}' % BIG, _err("integer_out_of_range")),
    ("int_minus_2_pow_64", b'{"n":%d}' % -BIG, _err("integer_out_of_range")),
    ("int_318_bits", b'{"n":%d}' % HUGE, _err("integer_out_of_range")),
    ("int_309_digits", b'{"free":' + b"9" * 309 + b"}", _err("integer_out_of_range")),
    ("int_i64_max_not_canonical", b'{"n": 9223372036854775807}', _ok({"n": INT64_MAX}, False)),
    ("minus_zero_int", b"-0", _ok(0, False)),
    ("long_digit_run_in_string", b'{"s":"12345678901234567890123"}',
     _ok({"s": "12345678901234567890123"}, True)),
    ("float_with_many_digits_is_a_float", b'{"f":1.2345678901234567e+30}',
     _ok({"f": 1.2345678901234567e30}, True)),
    # Judged by its length before int() runs (which refuses > 4300 digits): never a crash.
    ("int_5000_digits", b'{"n":' + b"7" * 5000 + b"}", _err("integer_out_of_range")),
    # 1e400 is valid JSON grammar but overflows to inf: not a finite number.
    ("overflow_1e400", b'{"a":1e400}', _err("non_finite_number")),
    ("overflow_minus_1e400", b'{"a":-1e400}', _err("non_finite_number")),
    ("overflow_1E400_top_level", b"1E400", _err("non_finite_number")),
    ("overflow_in_list", b"[1.0,1e999]", _err("non_finite_number")),
    ("underflow_to_zero_is_finite", b'{"a":1e-400}', _ok({"a": 0.0}, False)),
    ("nan_top_level", b"NaN", _err("non_finite_number")),
    ("infinity_positive", b'{"a":Infinity}', _err("non_finite_number")),
    ("duplicate_key_nested", b'{"a":{"b":1,"b":1}}', _err("duplicate_key")),
    ("duplicate_key_same_value_top", b'{"a":1,"a":1}', _err("duplicate_key")),
    ("empty_body", b"", _err("malformed_json")),
    ("whitespace_only", b" \n", _err("malformed_json")),
    ("two_values", b"{}{}", _err("malformed_json")),
    ("trailing_comma", b'{"a":1,}', _err("malformed_json")),
    ("single_quotes", b"{'a':1}", _err("malformed_json")),
    ("unquoted_key", b"{a:1}", _err("malformed_json")),
    ("raw_control_char_in_string", b'{"a":"x\x01"}', _err("malformed_json")),
    ("trailing_whitespace", b'{"a":1}\n', _ok({"a": 1}, False)),
    # RFC 8259 allows whitespace before a value, as after it: valid, just not canonical.
    ("leading_whitespace", b' {"a":1}', _ok({"a": 1}, False)),
    ("leading_newline", b'\n{"a":1}', _ok({"a": 1}, False)),
    ("uppercase_unicode_escape", b'{"a":"\\u00E9"}', _ok({"a": "\u00e9"}, False)),
    ("raw_utf8_not_escaped", '{"a":"\u00e9"}'.encode(), _ok({"a": "\u00e9"}, False)),
    ("raw_del_not_escaped", b'{"a":"\x7f"}', _ok({"a": "\x7f"}, False)),
    ("escaped_slash", b'{"a":"\\/"}', _ok({"a": "/"}, False)),
    ("exponent_form_of_int_float", b'{"a":1E2}', _ok({"a": 100.0}, False)),
    ("integral_float_kept_float", b'{"a":100.0}', _ok({"a": 100.0}, True)),
    ("negative_zero_float", b'{"a":-0.0}', _ok({"a": -0.0}, True)),
    ("unsorted_keys", b'{"b":1,"a":2}', _ok({"a": 2, "b": 1}, False)),
]


@pytest.mark.parametrize(
    ("data", "expected"), [(d, e) for _, d, e in EDGE_CASES], ids=[n for n, _, _ in EDGE_CASES]
)
def test_edge_case(data: bytes, expected: tuple) -> None:
    if expected[0] == "error":
        code = expected[1]
        with pytest.raises(CanonicalError) as exc:
            loads(data)
        assert exc.value.code == code, exc.value.detail
        with pytest.raises(CanonicalError) as exc:
            parse_canonical(data)
        assert exc.value.code == code, exc.value.detail
        return
    _, value, is_canonical = expected
    assert tagged(loads(data)) == tagged(value)
    parsed, canonical_flag = parse_canonical(data)
    assert tagged(parsed) == tagged(value)
    assert canonical_flag is is_canonical
    assert (dumps(value) == data) is is_canonical


def test_edge_case_names_unique() -> None:
    names = [n for n, _, _ in EDGE_CASES]
    assert len(names) == len(set(names))


def test_overflowing_number_is_never_accepted_as_inf() -> None:
    """Python's json turns 1e400 into inf; the strict parser must not let it through."""
    assert math.isinf(json.loads("1e400"))  # the trap this guards against
    for text in (b"1e400", b"-1e400", b'{"x":[1e400]}'):
        with pytest.raises(CanonicalError) as exc:
            loads(text)
        assert exc.value.code == "non_finite_number"


def test_deep_nesting_never_raises_recursion_error() -> None:
    for data in (DEEP_ARRAY, DEEP_OBJECT, b"[" * 100_000, b'{"a":' * 100_000):
        for fn in (loads, parse_canonical):
            try:
                fn(data)
            except CanonicalError as exc:
                assert exc.code == "malformed_json"
            else:  # pragma: no cover - reaching here is the failure
                pytest.fail(f"{fn.__name__} accepted {data[:8]!r}… nested 100000 deep")


@dataclasses.dataclass
class _Record:
    x: int = 1


class _PlainEnum(enum.Enum):
    A = "a"


# Values the reference serialiser refuses. ``dumps`` must refuse them the same way, not
# print what orjson would (``null`` for NaN/inf, ISO strings for dates, ...): a feedback
# signature over ``null`` where the data held NaN would be a signed lie.
NOT_JSON: list[tuple[str, Any, type[Exception]]] = [
    ("inf", math.inf, ValueError),
    ("minus_inf", -math.inf, ValueError),
    ("nan", math.nan, ValueError),
    ("uuid", uuid.UUID(int=1), TypeError),
    ("datetime", datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), TypeError),
    ("date", datetime.date(2026, 1, 1), TypeError),
    ("dataclass", _Record(), TypeError),
    ("plain_enum", _PlainEnum.A, TypeError),
    ("bytes", b"x", TypeError),
    ("set", {1}, TypeError),
]


@pytest.mark.parametrize(
    ("value", "error"), [(v, e) for _, v, e in NOT_JSON], ids=[n for n, _, _ in NOT_JSON]
)
def test_dumps_refuses_what_the_reference_refuses(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        dumps_reference({"a": value})
    with pytest.raises(error):
        dumps({"a": value})
    with pytest.raises(error):
        dumps([value])


# -- properties -------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
INT64 = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
SCALARS = (
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS, lambda c: st.lists(c) | st.dictionaries(TEXT, c), max_leaves=30
)

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(JSON_VALUES)
def test_property_fast_dumps_equals_reference(value: Any) -> None:
    assert dumps(value) == dumps_reference(value)


@PROPERTY_SETTINGS
@given(JSON_VALUES)
def test_property_canonical_bytes_parse_back_as_canonical(value: Any) -> None:
    canonical = dumps_reference(value)
    parsed, is_canonical = parse_canonical(canonical)
    assert is_canonical is True
    assert tagged(parsed) == tagged(value)
    assert tagged(loads(dumps(value))) == tagged(value)


@PROPERTY_SETTINGS
@given(JSON_VALUES)
def test_property_non_canonical_renderings_are_detected(value: Any) -> None:
    canonical = dumps_reference(value)
    renderings = [
        json.dumps(value, indent=1).encode("utf-8"),
        json.dumps(value, sort_keys=False, separators=(",", ":")).encode("utf-8"),
        json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        ),
        json.dumps(value, sort_keys=True).encode("utf-8"),
    ]
    for text in renderings:
        parsed, is_canonical = parse_canonical(text)
        assert is_canonical is (text == canonical), text
        assert tagged(parsed) == tagged(value)


@PROPERTY_SETTINGS
@given(st.dictionaries(TEXT, SCALARS, min_size=2))
def test_property_unsorted_object_is_not_canonical(value: dict) -> None:
    reordered = dict(sorted(value.items(), reverse=True))  # keys distinct: order differs
    text = json.dumps(reordered, sort_keys=False, separators=(",", ":")).encode("ascii")
    assert text != dumps_reference(value)
    parsed, is_canonical = parse_canonical(text)
    assert is_canonical is False
    assert tagged(parsed) == tagged(value)


BEYOND_INT64 = (st.integers(min_value=INT64_MAX + 1)
                | st.integers(max_value=INT64_MIN - 1)
                | st.sampled_from([INT64_MAX + 1, INT64_MIN - 1, 2**64 - 1, 2**64]))


@PROPERTY_SETTINGS
@given(JSON_VALUES, BEYOND_INT64)
def test_property_integer_beyond_64_bits_is_refused_everywhere(value: Any, big: int) -> None:
    """Wherever an out-of-range integer hides, both paths refuse it with the same code
    (the serialiser still writes it: it is the §3 definition, not a gate)."""
    for doc in ({"big": big, "other": value}, {"a": [value, {"b": big}]}):
        data = dumps_reference(doc)
        assert dumps(doc) == data
        for read in (loads, parse_canonical, load_stored):
            with pytest.raises(CanonicalError) as exc:
                read(data)
            assert exc.value.code == "integer_out_of_range"


# -- load_stored: what every later reader calls --------------------------------------------

STORED_ROWS: dict[str, tuple[bytes, str | None]] = {
    "canonical_object": (b'{"a":1,"b":[true,null]}', None),
    "non_canonical_object_still_strict_json": (b'{"b":1, "a":2}', None),
    "int_beyond_64_bits": (b'{"n":' + b"9" * 309 + b"}", "integer_out_of_range"),
    "u64_range_int": (b'{"n":18446744073709551615}', "integer_out_of_range"),
    "duplicate_key": (b'{"a":1,"a":2}', "duplicate_key"),
    "nan": (b'{"a":NaN}', "non_finite_number"),
    "invalid_utf8": (b'{"a":"\xff"}', "invalid_utf8"),
    "top_level_array": (b"[1]", "not_an_object"),
    "top_level_null": (b"null", "not_an_object"),
    "empty": (b"", "malformed_json"),
    "torn": (b'{"a":', "malformed_json"),
}


@pytest.mark.parametrize(("data", "code"), STORED_ROWS.values(), ids=STORED_ROWS)
def test_load_stored(data: bytes, code: str | None) -> None:
    if code is None:
        assert load_stored(data) == loads(data)
        return
    with pytest.raises(CanonicalError) as exc:
        load_stored(data)
    assert exc.value.code == code
