"""Per-operator rate limit (PROTOCOL.md §4 step 11, optional; off unless configured).

A fixed one-minute window per operator, in process memory: with ``--workers N`` each
worker enforces the limit on its own share, so the effective ceiling is up to N times
the configured value (documented in docs/PIPELINE.md). "now" is passed in.
"""

from __future__ import annotations


class RateLimiter:
    def __init__(self, per_minute: int, *, max_tracked: int = 100_000) -> None:
        self.per_minute = per_minute
        self.max_tracked = max_tracked
        self._window = -1
        self._counts: dict[str, int] = {}

    def check(self, operator: str, now: int) -> int:
        """Count one request; return 0 if allowed, else seconds until the next window."""
        window = now // 60
        if window != self._window:
            self._window, self._counts = window, {}
        count = self._counts.get(operator, 0) + 1
        if count > self.per_minute:
            return 60 - now % 60
        if len(self._counts) < self.max_tracked or operator in self._counts:
            self._counts[operator] = count
        return 0
