"""glibc's allocator, tuned for a server that churns through video frames.

A video call decodes ~30 frames a second (hundreds of KB each) on aiortc's decoder thread and
converts a few on an executor thread. glibc raises its mmap threshold each time such a block
is freed, so later frames come from the per-thread heaps instead, which fragment and are
rarely given back: the server's memory grew in steps for the whole of a 10-minute video call.
A fixed threshold keeps frame-sized blocks in mmap (returned to the system on free), fewer
arenas bound the per-thread heaps, and an occasional ``malloc_trim`` hands back free pages.
Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's starting value, now fixed: a video frame is above it
ARENA_MAX = 4
TRIM_EVERY_S = 60.0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


def tune() -> bool:
    """Fix the mmap threshold and cap the arenas; True when glibc took both settings."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_ARENA_MAX, ARENA_MAX))
    if not ok:
        log.warning("glibc refused the allocator settings: memory may grow during video calls")
    return ok


def trim() -> bool:
    """Give free heap pages back to the system; True when some were released."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


async def trim_periodically(every_s: float = TRIM_EVERY_S) -> None:
    """``trim`` once every ``every_s`` seconds, on a worker thread (it walks the heaps)."""
    if _libc() is None:
        return
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(trim)
