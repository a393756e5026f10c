"""Tiny job kinds: noop and echo for health checks; sleep and fail for tests and benchmarks only
(a worker serves them only with ``test_kinds``)."""

from __future__ import annotations

import asyncio
from typing import Any

from presence.bot.jobs.types import JobError, TransientJobError


async def noop(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {}


async def echo(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return dict(args)


async def sleep(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    seconds = args.get("seconds", 1.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 3600:
        raise JobError(f"sleep: seconds must be a number in [0, 3600], got {seconds!r}")
    await asyncio.sleep(float(seconds))
    return {"slept": float(seconds)}


async def fail(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Raises: ``transient`` true -> TransientJobError (retried), else a plain RuntimeError."""
    message = str(args.get("message", "requested failure"))
    if args.get("transient"):
        raise TransientJobError(message)
    raise RuntimeError(message)
