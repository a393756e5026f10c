"""The one clock of the process: monotonic seconds. Everything stamps time with ``now()``."""

from __future__ import annotations

import asyncio
import math
import time


def now() -> float:
    return time.monotonic()


async def sleep_until(deadline: float) -> None:
    """Sleep until ``deadline`` on the bot clock (returns at once when it has passed)."""
    delay = deadline - now()
    if delay > 0:
        await asyncio.sleep(delay)


def on_grid(t: float, step: float) -> float:
    """The first multiple of ``step`` at or after ``t``: every call's micro-turns end on the
    same grid of the process clock, so one batched forward of a learned policy serves them all
    (calls ticking on their own phases rarely meet inside a batching window)."""
    return math.ceil(t / step - 1e-9) * step
