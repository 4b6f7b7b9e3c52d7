"""``dumps``'s fast-path gate (``_scan``: exact plain JSON types, ints in signed 64 bits;
orjson itself refuses non-str keys): ``dumps`` must stay byte-identical to the reference,
or raise the same error type, for every value however odd (subclasses, enums, non-str
keys, floats, ints at the edges of 64 bits); and ``dumps_known_readable`` (the audit
chain's write) answers only with bytes the stored-data reader reads back.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.canonical import dumps, dumps_known_readable, dumps_reference, load_stored


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class Count(int):
    pass


class Table(dict):
    pass


ODD = st.sampled_from([Colour.RED, Name("n"), Count(3), (1, 2), b"x", uuid.UUID(int=5),
                       float("nan"), float("inf"), 1e16, 1e-05, -0.0])
SCALARS = (st.none() | st.booleans() | st.text(max_size=4)
           | st.integers(-(2**65), 2**65)
           | st.sampled_from([-(2**63), -(2**63) - 1, 2**63, 2**64 - 1, 2**64])
           | st.floats(allow_nan=False, allow_infinity=False))
KEYS = st.text(max_size=3) | st.sampled_from([1, True, None, Name("k"), (1,), 2.5])


def containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return (st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=3), children, max_size=4)
            | st.dictionaries(KEYS, children, max_size=3)
            | st.dictionaries(st.text(max_size=3), children, max_size=3).map(Table)
            | st.lists(children, max_size=3).map(tuple))


PLAIN_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4)
                            | st.dictionaries(st.text(max_size=3), c, max_size=4),
                            max_leaves=25)
ANY_VALUES = st.recursive(SCALARS | ODD, containers, max_leaves=25)
SETTINGS = settings(max_examples=500, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def outcome(fn, value: Any) -> tuple:
    try:
        return ("ok", fn(value))
    except (TypeError, ValueError) as exc:
        return ("error", type(exc))


@SETTINGS
@given(ANY_VALUES | PLAIN_VALUES)
@example({"a": [1, {"b": 2**64}]})
@example({"a": [1, {"b": 2**64 - 1}]})  # orjson would write it: the reference does here
@example({"a": {1: "x"}})
@example({"k": {Name("k"): 1}})
@example([[[[[[[[Colour.RED]]]]]]]])
@example({"a": "x", "b": [True, None, "y"]})
def test_dumps_matches_the_reference_on_odd_values(value: Any) -> None:
    assert outcome(dumps, value) == outcome(dumps_reference, value)


# -- dumps_known_readable: the audit chain's write without a read-back -------------------

def read_back(value: Any) -> tuple:
    """What the chain did before: dumps, then the one reader of stored lines."""
    try:
        line = dumps(value)
        return ("ok", line, load_stored(line))
    except (TypeError, ValueError) as exc:  # CanonicalError is a ValueError
        return ("refused", type(exc))


@SETTINGS
@given(st.dictionaries(st.text(max_size=3), ANY_VALUES | PLAIN_VALUES, max_size=4)
       | ANY_VALUES)
@example({"n": 2**63})  # dumps writes it (< 2^64), the reader refuses it
@example({"n": -(2**63) - 1})
@example({"n": 2**63 - 1, "m": -(2**63)})
@example({"s": "\ud800"})  # a lone surrogate: escaped by the reference, refused on read
@example({"s": "é\x7f"})
@example({1: "x"})
@example([{"a": 1}])
def test_known_readable_bytes_are_what_the_reader_reads_back(value: Any) -> None:
    """When it answers, its bytes are dumps' bytes and the reader reads back exactly the
    value; when the reader would refuse the line, it never answers."""
    line = dumps_known_readable(value)
    before = read_back(value)
    if line is not None:
        assert before == ("ok", line, value)


def test_known_readable_answers_for_an_audit_event_and_steps_aside_otherwise() -> None:
    event = {"event.action": "telemetry.accepted", "http.response.status_code": 202,
             "event.category": ["web"], "kid": None, "ok": True, "n": 2**63 - 1}
    assert dumps_known_readable(event) == dumps(event)
    for value in ({"n": 2**63}, {"s": "\ud800"}, {"s": "é"}, {"f": 0.5}, {1: 1}, [1],
                  {"e": Colour.RED}):
        assert dumps_known_readable(value) is None, value
