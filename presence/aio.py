"""Bridges from blocking code to the event loop.

Heavy backends (LLM, TTS, ASR) are synchronous; the bot's clock runs on asyncio and must never
stall. :func:`iterate_in_thread` is the one adapter that turns a blocking iterator into an async
iterator; :func:`run_blocking` does the same for a single call.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

_POLL_S = 0.05  # how often a producer waiting for queue room re-checks the stop flag


class _Done:
    """Marks the end of the producer's iterator."""


class _Raised:
    """Carries an exception from the producer thread to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = _Done()


async def iterate_in_thread(
    make_iter: Callable[[], Iterator[T]],
    executor: Executor | None = None,
    maxsize: int = 64,
) -> AsyncIterator[T]:
    """Run a blocking iterator in an executor thread and yield its items on the event loop.

    ``make_iter`` is called in the thread too, so blocking set-up stays off the loop. At most
    ``maxsize`` items wait for the consumer (the producer blocks, not the loop). An exception
    raised by the iterator is re-raised here. When the consumer stops early (``aclose()``,
    ``break``, cancellation) a stop flag is set; the producer checks it between items, stops,
    and closes its iterator in its own thread.
    """
    if maxsize < 1:
        raise ValueError("maxsize must be at least 1")
    loop = asyncio.get_running_loop()
    # An unbounded asyncio queue plus a semaphore counting free slots: the thread blocks on the
    # semaphore (with a timeout, so it sees the stop flag) and never touches the loop's queue
    # except through call_soon_threadsafe.
    queue: asyncio.Queue[Any] = asyncio.Queue()
    room = threading.Semaphore(maxsize)
    stop = threading.Event()

    def deliver(item: Any) -> bool:
        while not room.acquire(timeout=_POLL_S):
            if stop.is_set():
                return False
        if stop.is_set():
            return False
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()
            return False
        return True

    def produce() -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = make_iter()
            for item in iterator:
                if stop.is_set() or not deliver(item):
                    return
            deliver(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            deliver(_Raised(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()  # generators run their cleanup (e.g. free a model lock) here
                except Exception:
                    pass

    future = loop.run_in_executor(executor, produce)
    # produce() never raises, but a cancelled/failed future must not log "never retrieved".
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        while True:
            item = await queue.get()
            room.release()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        room.release()  # wake a producer waiting for room so it sees the flag at once


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in the loop's default executor and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args))
