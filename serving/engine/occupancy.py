"""The time-weighted mean of a level since the previous reading: calls in a router's door, a
replica's core busy (0 or 1). What replicas report to Serve's autoscaler
(serving/app/autoscaling.py). Ray-free and grpc-free."""

from __future__ import annotations

import time


class TimeAverage:
    """``add(+1)`` / ``add(-1)`` as the level changes; ``mean()`` is its mean since the previous
    ``mean()`` (or since construction), the current stretch counted up to now."""

    def __init__(self) -> None:
        self.level = 0
        self._area = 0.0  # level x seconds since the previous reading
        self._since = self._at = time.monotonic()

    def _advance(self) -> None:
        now = time.monotonic()
        self._area += self.level * (now - self._at)
        self._at = now

    def add(self, delta: int) -> None:
        self._advance()
        self.level += delta

    def mean(self) -> float:
        self._advance()
        span = self._at - self._since
        mean = self._area / span if span > 0 else float(self.level)
        self._area, self._since = 0.0, self._at
        return mean
