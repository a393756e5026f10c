"""Bridges from blocking code to the event loop.

Heavy backends (LLM, TTS, ASR) are synchronous; the bot's clock runs on asyncio and must never
stall. :func:`iterate_in_thread` is the one adapter that turns a blocking iterator into an async
iterator; :func:`run_blocking` does the same for a single call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a producer waiting for queue room re-checks the stop flag


class _Done:
    """Marks the end of the producer's iterator."""


class _Raised:
    """Carries an exception from the producer thread to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = _Done()

_executors: dict[str, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def log_this_drop(count: int) -> bool:
    """Whether the ``count``-th drop under load gets a log line: the 1st, the 100th and every
    1000th, so an overloaded call says so without a line per frame."""
    return count in (1, 100) or count % 1000 == 0


def media_executor() -> ThreadPoolExecutor:
    """The process's executor for per-frame media work (resampling, echo cancellation, VAD).

    Apart from the loop's default executor, where a turn's blocking calls (ASR, TTS, an LLM)
    hold threads for hundreds of milliseconds: frames queued behind them arrive late for
    every call. One thread per core: this work is short and never waits on anything.
    """
    return _shared_executor("media", os.cpu_count() or 2)


def interpret_executor() -> ThreadPoolExecutor:
    """The interpreter's whisper passes: two threads for the whole process, apart from the
    loop's default executor (replies' TTS and LLM) so neither starves the other's queue."""
    return _shared_executor("interpret", 2)


def _shared_executor(name: str, workers: int) -> ThreadPoolExecutor:
    """One executor of this name per process, made on first use."""
    with _executors_lock:
        if name not in _executors:
            _executors[name] = ThreadPoolExecutor(workers, thread_name_prefix=f"presence-{name}")
        return _executors[name]


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


async def run_blocking(fn: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
    """Run ``fn(*args)`` in ``executor`` (the loop's default one if None) and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args))


async def watch_loop_lag(
    observe: Callable[[float], None], every_s: float = 0.1, warn_s: float = 0.5, quiet_s: float = 30.0
) -> None:
    """Sleep ``every_s`` again and again and observe how late each wake-up came.

    A starved loop answers nothing on time: the ICE consent checks of every call (aioice waits
    500 ms for an answer) fail, and six in a row end the call. Lags past ``warn_s`` are logged,
    at most once per ``quiet_s``, with the worst lag since the last warning.
    """
    loop = asyncio.get_running_loop()
    worst, warned = 0.0, float("-inf")
    while True:
        t = loop.time()
        await asyncio.sleep(every_s)
        lag = max(0.0, loop.time() - t - every_s)
        observe(lag)
        worst = max(worst, lag)
        if worst > warn_s and loop.time() - warned > quiet_s:
            log.warning("event loop lag %.2f s: the process has more work than it keeps up with", worst)
            worst, warned = 0.0, loop.time()


def run(main: Coroutine[Any, Any, T], event_loop: str = "uvloop") -> T:
    """``asyncio.run`` on the chosen loop; uvloop where it is installed (not on Windows).

    Why uvloop for a media server: asyncio's datagram transport reads one datagram per socket
    per loop iteration. With ten calls on two cores an iteration took longer than the 20 ms
    between a caller's packets, so their sockets filled in the kernel, the STUN answers queued
    behind seconds of audio, and aioice ended call after call when consent checks timed out.
    libuv reads up to 32 per wake-up.
    """
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: running on asyncio's own loop")
        else:
            return uvloop.run(main)
    return asyncio.run(main)
