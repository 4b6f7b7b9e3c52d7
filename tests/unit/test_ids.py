"""common/ids.py: the request, finding and audit event ids are random version-4 UUIDs,
written as ``str(uuid.uuid4())`` writes them."""

from __future__ import annotations

import random
import re
import uuid

import pytest

from common.ids import uuid4_text

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.mark.parametrize("raw", [bytes(16), b"\xff" * 16, bytes(range(16)),
                                 *(random.Random(n).randbytes(16) for n in range(200))])
def test_the_text_is_what_uuid_writes_for_the_same_bytes(raw: bytes) -> None:
    assert uuid4_text(raw) == str(uuid.UUID(bytes=raw, version=4))


def test_fresh_ids_are_version_4_and_distinct() -> None:
    ids = [uuid4_text() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        assert UUID4.fullmatch(text)
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_sixteen_bytes_only() -> None:
    with pytest.raises(ValueError):
        uuid4_text(b"\x00" * 15)
