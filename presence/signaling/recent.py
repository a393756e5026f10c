"""A bounded map whose entries live a while: what a signaling peer may ask for again.

SIP answers a retransmitted request with the response it already sent and re-ACKs a 2xx that
comes again; a Twilio webhook's one-time stream token is good for a minute. Each keeps at most
``limit`` entries (the oldest go first: a flood costs no memory) for ``ttl_s`` seconds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from presence.clock import now

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    def __init__(self, ttl_s: float, limit: int, clock: Callable[[], float] = now) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self.clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: K, value: V) -> None:
        self._items[key] = (self.clock(), value)
        self._items.move_to_end(key)
        while self._items and (
            len(self._items) > self.limit or self.clock() - next(iter(self._items.values()))[0] >= self.ttl_s
        ):
            self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        entry = self._items.get(key)
        return entry[1] if entry is not None and self.clock() - entry[0] < self.ttl_s else None

    def pop(self, key: K) -> V | None:
        entry = self._items.pop(key, None)
        return entry[1] if entry is not None and self.clock() - entry[0] < self.ttl_s else None
