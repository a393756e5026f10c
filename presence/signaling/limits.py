"""A small per-client token bucket for offers, bounded in memory.

Each client address gets a bucket of ``burst`` offers that refills at ``rate_per_min``; an offer
that finds it empty is refused with the seconds until the next one is allowed (``Retry-After``).
Buckets live in an LRU of at most ``max_keys`` addresses: the least recently seen is dropped
first, which at worst hands a flood of distinct addresses a fresh bucket each, never memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        rate_per_min: float,
        burst: int,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = max(0.0, rate_per_min) / 60.0  # 0 = unlimited
        self.burst = max(1, int(burst))
        self.max_keys = max(1, max_keys)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """0.0 when ``key`` may go ahead (one token spent), else the seconds until it may."""
        if not self.enabled:
            return 0.0
        t = self.clock()
        tokens, at = self._buckets.pop(key, (float(self.burst), t))
        tokens = min(float(self.burst), tokens + (t - at) * self.rate_per_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate_per_s
        self._buckets[key] = (tokens, t)  # re-inserted last: the most recently seen
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
