"""§4.7 on the whole pipeline: strict parse, object, depth, canonical form, in that order.

Since issue 9 the depth comes from the parser's own walk (``parse_canonical_bounded``)
instead of a second ``too_deep`` walk; each row names the status, code and detail the
pipeline gave before, on a real SQLite store, with the body at, and one over, the
32-level limit on the fast (canonical) and the strict (non-canonical) path.
"""

from __future__ import annotations

import copy

import pytest
from lab import PIN, Lab, body_for, raw_signed

from gateway.pipeline.pipeline import MAX_DEPTH
from schemas.canonical import dumps
from schemas.routes import TELEMETRY_PATH

ATTRIBUTES_DEPTH = 3  # body → payload → attributes: the open member's level


def deep_body(levels: int, leaf: object = 1) -> bytes:
    """A schema-valid telemetry body whose containers nest exactly ``levels`` deep."""
    body = body_for(TELEMETRY_PATH)
    free: object = leaf
    for _ in range(levels - ATTRIBUTES_DEPTH):
        free = [free]
    body["payload"] = copy.deepcopy(body["payload"])
    body["payload"]["attributes"]["free"] = free
    body.update(timestamp=1_795_000_000, nonce="nonce-raw-0001")
    return dumps(body)


DEEPER = f"the body nests deeper than {MAX_DEPTH} levels"
ACCEPTED = (202, None, None)

# name → (raw body, config overrides, (status, code, detail))
ROWS = {
    "at_limit_canonical": (deep_body(MAX_DEPTH), {}, ACCEPTED),
    "over_limit_canonical": (deep_body(MAX_DEPTH + 1), {}, (422, "malformed_json", DEEPER)),
    # depth is judged before the canonical form
    "at_limit_not_canonical": (deep_body(MAX_DEPTH) + b"\n", {},
                               (422, "non_canonical_body",
                                "the body is not in canonical JSON form (PROTOCOL.md §3)")),
    "over_limit_not_canonical": (deep_body(MAX_DEPTH + 1) + b"\n", {},
                                 (422, "malformed_json", DEEPER)),
    # an integer beyond 64 bits is a parse failure, before the depth
    "over_limit_u64_int": (deep_body(MAX_DEPTH + 1, 2**64 - 1), {},
                           (422, "malformed_json", "the body is not strict JSON: integer "
                            "18446744073709551615 is outside signed 64 bits")),
    "at_limit_int64_max": (deep_body(MAX_DEPTH, 2**63 - 1), {}, ACCEPTED),
    "at_limit_float": (deep_body(MAX_DEPTH, 1e-05), {}, ACCEPTED),
    "over_limit_float": (deep_body(MAX_DEPTH + 1, 1e-05), {}, (422, "malformed_json", DEEPER)),
    "at_limit_non_ascii": (deep_body(MAX_DEPTH, "\u00e9\x7f"), {}, ACCEPTED),
    # deeper than orjson re-serialises (254)
    "deeper_than_orjson_writes": (deep_body(300), {}, (422, "malformed_json", DEEPER)),
    # the object check comes before the depth
    "deep_top_level_array": (b"[" * 40 + b"]" * 40, {},
                             (422, "malformed_json", "the body must be a JSON object")),
    # require_canonical_body off: the strict parser, then the same depth verdict
    "lenient_at_limit": (deep_body(MAX_DEPTH) + b"\n", {"require_canonical_body": False},
                         ACCEPTED),
    "lenient_over_limit": (deep_body(MAX_DEPTH + 1) + b"\n", {"require_canonical_body": False},
                           (422, "malformed_json", DEEPER)),
}


@pytest.fixture
def store_url(sqlite_url: str) -> str:
    """conftest's ``store`` on SQLite alone: the parser does not depend on the store."""
    return sqlite_url


@pytest.mark.parametrize("name", list(ROWS))
async def test_depth_row(store, name: str) -> None:
    raw, config, expected = ROWS[name]
    lab = Lab(store, **config)
    status, code, exc = await lab.send(*raw_signed(raw), peer=PIN)
    assert (status, code, getattr(exc, "detail", None)) == expected
