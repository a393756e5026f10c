"""The one clock of the process: monotonic seconds. Everything stamps time with ``now()``."""

from __future__ import annotations

import asyncio
import time


def now() -> float:
    return time.monotonic()


async def sleep_until(deadline: float) -> None:
    """Sleep until ``deadline`` on the bot clock (returns at once when it has passed)."""
    delay = deadline - now()
    if delay > 0:
        await asyncio.sleep(delay)
