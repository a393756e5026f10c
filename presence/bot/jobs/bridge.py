"""The call-side door for background jobs: one :class:`JobBridge` per server, one
:class:`CallJobs` per call.

Choosing a Redis (``settings.jobs``):

* ``off``: :meth:`JobBridge.start` returns None; calls run without background jobs.
* ``auto`` (the default, embedded): the first Redis that answers a PING of ``settings.redis_url``
  (when set) or ``redis://127.0.0.1:6379/0``; if none does, a PRIVATE ``redis-server`` on a free
  127.0.0.1 port (no persistence, stopped by :meth:`JobBridge.close`). In auto mode the bridge
  ALWAYS runs one in-process :class:`~presence.bot.jobs.worker.Worker` for search, code and think,
  so that jobs work out of the box; it joins the same consumer group as any external workers
  (work is shared, never done twice). With no redis-server binary and no Redis answering, it
  logs a warning and returns None: calls still work, without jobs.
* ``redis`` (a deployment): the Redis URL must answer, else :class:`JobsUnavailable` says how to
  get one. NO in-process worker: run ``presence worker --kinds search,code,think`` next to it;
  a warning is logged when no worker is attached yet (jobs would then time out and be reported).

Per call: ``calls = await bridge.open_call(call_id, deliver)``; ``calls.route(text)`` turns the
caller's words into job requests, ``await calls.dispatch(requests)`` queues them, and
``deliver(result)`` is called on the event loop once per job this call dispatched (done or
failed, never cancelled ones, never after :meth:`CallJobs.close`). :func:`acknowledgement` and
:func:`speakable` give the words to say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from presence.bot.jobs.broker import JobBroker
from presence.bot.jobs.call_jobs import CallJobs, Deliver
from presence.bot.jobs.redis_server import (
    JobsUnavailable,
    PrivateRedis,
    find_redis_server,
    ping_redis,
)
from presence.bot.jobs.redisio import DEFAULT_REDIS_URL, Backoff
from presence.bot.jobs.router import RuleToolRouter, ToolRouter
from presence.bot.jobs.types import BUILTIN_KINDS
from presence.bot.jobs.worker import Worker, default_consumer_name, worker_from_settings
from presence.config import redact

if TYPE_CHECKING:
    from presence.config import Settings
    from presence.signaling.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_KINDS: tuple[str, ...] = ("search", "code", "think")


# ---------------------------------------------------------------------- the bridge
class JobBridge:
    """The server's job layer: one broker, maybe an in-process worker and a private Redis."""

    def __init__(
        self,
        broker: JobBroker,
        *,
        url: str,
        prefix: str,
        mode: str,
        kinds: Sequence[str],
        timeout_s: float,
        metrics: Metrics | None = None,
        router: ToolRouter | None = None,
        sample_interval_s: float = 2.0,
        block_ms: int = 1_000,
        status_poll_s: float = 0.5,
        open_timeout_s: float = 3.0,
    ) -> None:
        self.broker = broker
        self.url = url
        self.prefix = prefix
        self.mode = mode  # "redis" (an existing server) or "private" (one we started)
        self.kinds = list(kinds)
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.router: ToolRouter = router or RuleToolRouter()
        self.sample_interval_s = sample_interval_s
        self.block_ms = block_ms
        self.status_poll_s = status_poll_s
        self.open_timeout_s = open_timeout_s
        self.worker: Worker | None = None
        self.redis_server: PrivateRedis | None = None
        self.stats: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=10_000)  # dispatch -> delivery, seconds
        self._worker_task: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._calls: dict[str, CallJobs] = {}
        self._depths: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._closed = False

    # ------------------------------------------------------------------ start
    @classmethod
    async def start(
        cls,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        probe_url: str = DEFAULT_REDIS_URL,
        prefix: str = "presence",
        worker_kinds: Sequence[str] = DEFAULT_KINDS,
        worker_options: Mapping[str, Any] | None = None,
        redis_server: str | None = None,
        router: ToolRouter | None = None,
        backoff: Backoff | None = None,
        ping_timeout_s: float = 0.5,
        sample_interval_s: float = 2.0,
    ) -> JobBridge | None:
        """Set up jobs as ``settings.jobs`` says (see the module doc); None when they are off.

        ``probe_url`` is the local Redis tried in auto mode, ``redis_server`` the binary for a
        private one (default: found on PATH), ``worker_options`` extra options for the in-process
        worker (e.g. ``think_fn``: the bot's local model; ``concurrency``; ``idle_reclaim_ms``).
        """
        mode = settings.jobs
        if mode == "off":
            log.info("jobs: off (PRESENCE_JOBS=off): calls run without background jobs")
            return None
        if mode not in ("auto", "redis"):
            raise ValueError(f"jobs must be auto, redis or off, got {mode!r}")
        # Submits give up after this (then the call hears a failure); workers retry forever.
        backoff = backoff or Backoff(initial_s=0.05, max_s=1.0, give_up_s=15.0)
        kinds = frozenset(BUILTIN_KINDS) | set(worker_kinds)
        if mode == "redis":
            url = settings.redis_url or probe_url
            problem = await ping_redis(url, ping_timeout_s)
            if problem is not None:
                raise JobsUnavailable(
                    f"jobs=redis, but no Redis answered at {redact(url)} ({problem}). Start one "
                    "(install redis-server, e.g. `apt-get install redis-server`, and run it), point "
                    "PRESENCE_REDIS_URL at a running Redis, use PRESENCE_JOBS=auto for a private "
                    "redis-server, or PRESENCE_JOBS=off to run calls without background jobs."
                )
            log.info(
                "jobs: using Redis at %s (jobs=redis: no in-process worker; run `presence worker "
                "--kinds %s` beside this server)",
                redact(url),
                ",".join(worker_kinds),
            )
            bridge = cls(
                JobBroker(
                    url, prefix=prefix, kinds=kinds, backoff=backoff, max_connections=_pool_size(settings)
                ),
                url=url,
                prefix=prefix,
                mode="redis",
                kinds=worker_kinds,
                timeout_s=settings.job_timeout_s,
                metrics=metrics,
                router=router,
                sample_interval_s=sample_interval_s,
            )
            try:
                await bridge._warn_if_no_workers()
                bridge._begin()
            except BaseException:
                await bridge.close()
                raise
            return bridge

        # auto: an answering Redis, else a private one; always an in-process worker
        url = ""
        for candidate in dict.fromkeys(u for u in (settings.redis_url, probe_url) if u):
            problem = await ping_redis(candidate, ping_timeout_s)
            if problem is None:
                url = candidate
                break
            # an explicitly configured URL that does not answer deserves a warning
            level = logging.WARNING if candidate == settings.redis_url else logging.INFO
            log.log(level, "jobs: no Redis answered at %s (%s)", redact(candidate), problem)
        private: PrivateRedis | None = None
        if url:
            log.info(
                "jobs: using Redis at %s with an in-process worker for %s",
                redact(url),
                ",".join(worker_kinds),
            )
        else:
            binary = find_redis_server(redis_server)
            if binary is None:
                log.warning(
                    "jobs: no Redis answered and no redis-server binary was found (%s): calls run "
                    "WITHOUT background jobs. Install redis-server, set PRESENCE_REDIS_URL, or set "
                    "PRESENCE_JOBS=off to silence this.",
                    redis_server or "looked on PATH, /usr/bin, /usr/local/bin",
                )
                return None
            try:
                private = await PrivateRedis.start(binary)
            except JobsUnavailable as exc:
                log.warning("jobs: %s: calls run WITHOUT background jobs", exc)
                return None
            url = private.url
            log.info(
                "jobs: no Redis answered; started a private redis-server on 127.0.0.1:%d and an "
                "in-process worker for %s",
                private.port,
                ",".join(worker_kinds),
            )
        bridge = cls(
            JobBroker(url, prefix=prefix, kinds=kinds, backoff=backoff, max_connections=_pool_size(settings)),
            url=url,
            prefix=prefix,
            mode="private" if private else "redis",
            kinds=worker_kinds,
            timeout_s=settings.job_timeout_s,
            metrics=metrics,
            router=router,
            sample_interval_s=sample_interval_s,
        )
        bridge.redis_server = private
        try:
            await bridge._start_worker(settings, worker_kinds, worker_options or {})
            bridge._begin()
        except BaseException:
            await bridge.close()
            raise
        return bridge

    async def _start_worker(self, settings: Settings, kinds: Sequence[str], extra: Mapping[str, Any]) -> None:
        worker = worker_from_settings(
            settings,
            kinds,
            url=self.url,
            consumer_name=f"{default_consumer_name()}-inproc",
            prefix=self.prefix,
            options=extra,
            concurrency=4,  # several at once: a long think job must not hold up a quick search
            shutdown_grace_s=2.0,
        )
        task = asyncio.create_task(worker.run(), name="jobs-worker")
        started = asyncio.ensure_future(worker.started.wait())
        await asyncio.wait({task, started}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            worker.stop()
            if task.done():
                task.result()  # raises why it died
            task.cancel()
            raise JobsUnavailable("the in-process job worker did not start within 15 s")
        self.worker, self._worker_task = worker, task
        if "docs_dir" in worker.options:
            log.info("jobs: search indexes %s", worker.options["docs_dir"])

    async def _warn_if_no_workers(self) -> None:
        cutoff_ms = 60_000  # a live worker blocks for at most 15 s between reads
        idle = []
        for kind in self.kinds:
            consumers = await self.broker.consumers(kind)
            if not any(int(c.get("idle", cutoff_ms)) < cutoff_ms for c in consumers):
                idle.append(kind)
        if idle:
            log.warning(
                "jobs: no worker serves %s yet: their jobs will time out until one runs "
                "(`presence worker --kinds %s`)",
                ",".join(idle),
                ",".join(self.kinds),
            )

    def _begin(self) -> None:
        self._sampler = asyncio.create_task(self._sample_loop(), name="jobs-metrics")

    # ------------------------------------------------------------------ calls
    async def open_call(
        self, call_id: str, deliver: Deliver, *, router: ToolRouter | None = None
    ) -> CallJobs:
        """Open ``call_id`` for jobs; ``deliver(result)`` gets each of its results once, on the loop."""
        if self._closed:
            raise RuntimeError("the job bridge is closed")
        if call_id in self._calls:
            raise ValueError(f"call {call_id} already has its jobs open")
        calls = CallJobs(self, call_id, deliver, router or self.router)
        try:
            # bounded: a call must not wait out Redis's retry budget before it is answered
            await asyncio.wait_for(self.broker.open_call(call_id), self.open_timeout_s)
        except (TimeoutError, ConnectionError, OSError) as exc:  # RedisUnavailable included
            self.broker.forget_call(call_id)
            why = (
                f"did not answer within {self.open_timeout_s:g} s"
                if isinstance(exc, TimeoutError)
                else "is unreachable"
            )
            raise JobsUnavailable(
                f"Redis at {redact(self.url)} {why}: no background jobs for this call"
            ) from exc
        except BaseException:
            self.broker.forget_call(call_id)
            raise
        self._calls[call_id] = calls
        calls._start()
        return calls

    # ------------------------------------------------------------------ metrics
    @property
    def queue_depth(self) -> dict[str, int]:
        """Jobs queued or running per kind, as last sampled (every ``sample_interval_s``)."""
        return dict(self._depths)

    async def sample(self) -> dict[str, int]:
        """Refresh the queue depths and the retry/dead-letter counters from Redis now."""
        depths = {kind: await self.broker.queue_depth(kind) for kind in self.kinds}
        self._depths = depths
        counts = await self.broker.counters()
        counts["resubmitted"] = self.broker.stats["resubmitted"]
        deltas: Counter[str] = Counter()
        for key in ("retried", "reclaimed", "resubmitted", "dead_letters"):
            now = counts.get(key, 0)
            before = self._counts.get(key, 0 if key == "resubmitted" else None)  # ours start at 0
            if before is None:
                deltas[key] = 0  # first look at a shared Redis: a baseline, not news
            elif now < before:
                deltas[key] = now  # the Redis restarted empty
            else:
                deltas[key] = now - before
            self._counts[key] = now
        if self.metrics is not None:
            for kind, depth in depths.items():
                self.metrics.job_queue_depth.labels(kind).set(depth)
            retries = deltas["retried"] + deltas["reclaimed"] + deltas["resubmitted"]
            if retries:
                self.metrics.job_retries.inc(retries)
            if deltas["dead_letters"]:
                self.metrics.job_dead_letters.inc(deltas["dead_letters"])
        return depths

    async def _sample_loop(self) -> None:
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the gauges keep their last value
                log.debug("jobs: metrics sample failed: %s", exc)
            await asyncio.sleep(self.sample_interval_s)

    def _observe(self, seconds: float) -> None:
        self.latencies.append(seconds)
        if self.metrics is not None:
            self.metrics.job_latency.observe(seconds)

    def describe(self) -> dict[str, Any]:
        """For /healthz and logs."""
        return {
            "mode": self.mode,
            "redis": redact(self.url),
            "prefix": self.prefix,
            "in_process_worker": self.worker is not None,
            "kinds": self.kinds,
            "queue_depth": self.queue_depth,
            "calls": len(self._calls),
        }

    # ------------------------------------------------------------------ stop
    async def close(self) -> None:
        """Close every call, then stop the worker and the Redis this bridge started."""
        if self._closed:
            return
        self._closed = True
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sampler
        for calls in list(self._calls.values()):
            with contextlib.suppress(Exception):
                await calls.close("server shutting down")
        if self.worker is not None and self._worker_task is not None:
            self.worker.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self._worker_task), self.worker.shutdown_grace_s + 5)
            except (TimeoutError, Exception) as exc:
                log.warning("jobs: in-process worker did not stop cleanly: %s", exc or type(exc).__name__)
                self._worker_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._worker_task
        await self.broker.close()
        if self.redis_server is not None:
            await self.redis_server.stop()
            log.info("jobs: stopped the private redis-server on 127.0.0.1:%d", self.redis_server.port)

    async def __aenter__(self) -> JobBridge:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _pool_size(settings: Settings) -> int:
    # every open call holds one connection in XREAD BLOCK; leave room for submits and polls
    return max(32, int(getattr(settings, "max_calls", 32)) + 16)


__all__ = ["DEFAULT_KINDS", "JobBridge"]
