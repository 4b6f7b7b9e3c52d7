"""A bounded memo keyed by a facts state's own bytes (issue 9: the feedback query).

A feedback query reads one facts state per execution (gateway/feedback/fold.py) and
most of them have not changed since the previous query of the same identity: a commit
that folds a record into a state rewrites its bytes, every other state reads back
byte for byte as before. :class:`ByContent` remembers what was worked out from a state
(:mod:`gateway.feedback.decide`: which rule decides it, its target) under the state's
bytes themselves — not under a version, a time or the execution — so a changed state is
simply another key and is worked out afresh: nothing stale can be served, however the
commits and the queries interleave (they share no lock; a query reads whatever bytes
the store holds at that moment and gets exactly what those bytes decide).

Bounded in memory by the bytes of the keys it holds (plus a fixed charge per entry):
two generations of at most half the budget each. A hit in the older one moves the entry
to the newer; when the newer is full the older is dropped whole and the newer becomes
the older. So the states the queries keep reading stay, and anything not read for a
whole generation goes. A key larger than half the budget is never kept. A lookup is
one dict lookup (the bytes' hash, then one comparison of equal keys): ~0.3 µs for an
800-byte state, against ~4 µs to decode it and ~3 µs to try the rules on it.

Values must not be tracked by the cyclic GC (tuples of str, int, float, None are
untracked once collected): a memo of thousands of tracked objects would swell the
oldest generation and make its full collections slower.
"""

from __future__ import annotations

from typing import Any

#: bytes charged per entry on top of its key's length: the key's bytes object header,
#: its dict slot, the value tuple and its strings (~240 measured with tracemalloc for a
#: decide.StateRules entry, rounded up)
ENTRY_OVERHEAD = 256


class ByContent:
    """``bytes`` → value, at most ``max_bytes`` of keys (+ :data:`ENTRY_OVERHEAD` each)."""

    __slots__ = ("newer", "older", "held", "half")

    def __init__(self, max_bytes: int) -> None:
        self.newer: dict[bytes, Any] = {}
        self.older: dict[bytes, Any] = {}
        self.held = 0  # bytes charged to ``newer``
        self.half = max(0, max_bytes) // 2

    def get(self, key: bytes) -> Any:
        """The value remembered for ``key``, or None."""
        value = self.newer.get(key)
        if value is None and self.older:
            value = self.older.pop(key, None)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key: bytes, value: Any) -> None:
        if key in self.newer:
            self.newer[key] = value
            return
        cost = len(key) + ENTRY_OVERHEAD
        if cost > self.half:
            return
        if self.held + cost > self.half:  # the newer is full: the older goes
            self.older, self.newer, self.held = self.newer, {}, 0
        else:
            self.older.pop(key, None)
        self.newer[key] = value
        self.held += cost

    def __len__(self) -> int:
        return len(self.newer) + len(self.older)

    @property
    def charged(self) -> int:
        """Bytes charged to both generations (at most the budget)."""
        return self.held + sum(len(k) + ENTRY_OVERHEAD for k in self.older)
