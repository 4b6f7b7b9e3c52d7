"""Coverage-guided fuzz of the canonical JSON parser (issue 10, docs/RESILIENCE.md "fuzz").

    .venv/bin/python bench/fuzz_canonical.py [-runs=200000] [-max_len=4096] [CORPUS_DIR]

atheris (libFuzzer) drives ``schemas.canonical`` (instrumented) with byte strings, seeded
with the canonical-JSON vectors. For every input the property is:

* ``parse_canonical``, ``loads`` and ``load_stored`` either raise ``CanonicalError`` with
  one of the documented codes, or return a value: never another exception;
* ``parse_canonical`` and ``loads`` agree (both refuse, or both give the same value,
  JSON types included) and ``load_stored`` agrees with both (an object, else
  ``not_an_object``);
* an accepted value agrees with the reference parser (``json.loads``), and
  ``parse_canonical`` says "canonical" exactly when ``dumps(value) == input``;
  ``parse_canonical_bounded`` (the gateway's call) gives the same value and verdict,
  and a depth verdict equal to ``too_deep`` at each of a few limits.

A violation raises, so libFuzzer stops and writes the input to ``crash-*``. At the end,
the counts by outcome are printed as ``fuzz_canonical: {...}`` (after the ``-runs``-th
input).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["schemas"]):
    from schemas import canonical
    from schemas.canonical import (
        CanonicalError,
        dumps,
        load_stored,
        loads,
        parse_canonical,
        parse_canonical_bounded,
        too_deep,
    )

CODES = {canonical.MALFORMED, canonical.DUPLICATE_KEY, canonical.NON_FINITE,
         canonical.INVALID_UTF8, canonical.INTEGER_RANGE}
COUNTS: Counter = Counter()


def tagged(value):
    """Equal only when JSON types and values match (1 vs 1.0 vs True; -0.0 vs 0.0)."""
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
    raise AssertionError(f"not a JSON value: {type(value)!r}")


def outcome(fn, data: bytes):
    try:
        return "ok", fn(data)
    except CanonicalError as exc:
        if exc.code not in CODES | {canonical.NOT_OBJECT}:
            raise AssertionError(f"undocumented code {exc.code!r}") from exc
        return exc.code, None
    except RecursionError:
        raise AssertionError("RecursionError escaped") from None


def check(data: bytes) -> None:
    parsed = outcome(parse_canonical, data)
    strict = outcome(loads, data)
    stored = outcome(load_stored, data)
    if parsed[0] != strict[0]:
        raise AssertionError(f"parse_canonical {parsed[0]} but loads {strict[0]}")
    if parsed[0] != "ok":
        if stored[0] != parsed[0]:
            raise AssertionError(f"load_stored {stored[0]} but parse_canonical {parsed[0]}")
        COUNTS[parsed[0]] += 1
        return
    value, is_canonical = parsed[1]
    if tagged(value) != tagged(strict[1]):
        raise AssertionError("parse_canonical and loads read different values")
    if tagged(json.loads(data.decode("utf-8"))) != tagged(value):
        raise AssertionError("disagrees with the reference parser (json.loads)")
    for limit in (0, 2, 32):  # the gateway's call: the same verdicts, plus the depth's
        bounded = parse_canonical_bounded(data, limit)
        if tagged(bounded[0]) != tagged(value) or bounded[1] != is_canonical or \
                bounded[2] != too_deep(value, limit):
            raise AssertionError(f"parse_canonical_bounded(data, {limit}) disagrees")
    out = dumps(value)
    if is_canonical != (out == data):
        raise AssertionError(f"canonical={is_canonical} but dumps(value) == input is "
                             f"{out == data}")
    if isinstance(value, dict):
        if stored[0] != "ok" or tagged(stored[1]) != tagged(value):
            raise AssertionError("load_stored refused or changed an accepted object")
    elif stored[0] != canonical.NOT_OBJECT:
        raise AssertionError(f"load_stored {stored[0]} for a non-object")
    COUNTS["canonical" if is_canonical else "accepted, not canonical"] += 1


RUNS = [0]  # -runs=N: libFuzzer exits without running atexit, so report at the Nth input


def test_one_input(data: bytes) -> None:
    check(data)
    if sum(COUNTS.values()) == RUNS[0]:
        report()


def seed_corpus() -> str:
    corpus = Path(tempfile.mkdtemp(prefix="fuzz-canonical-"))
    cases = json.loads((ROOT / "tests/vectors/canonical_json.json").read_text())["cases"]
    for i, case in enumerate(cases):
        for key in ("input", "canonical"):
            if isinstance(case.get(key), str):
                (corpus / f"{i}-{key}").write_bytes(case[key].encode("utf-8", "surrogatepass"))
    return str(corpus)


def report() -> None:
    print(f"fuzz_canonical: {json.dumps(dict(COUNTS.most_common()))} "
          f"(inputs: {sum(COUNTS.values())})", flush=True)


def main() -> None:
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(seed_corpus())
    RUNS[0] = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("-runs=")), 0)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
