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
import dataclasses
import inspect
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from presence.bot.jobs.broker import JobBroker
from presence.bot.jobs.redisio import DEFAULT_REDIS_URL, Backoff, RedisUnavailable, redact
from presence.bot.jobs.router import RuleToolRouter, ToolRouter, is_cancel_request
from presence.bot.jobs.speech import acknowledgement, speakable
from presence.bot.jobs.types import BUILTIN_KINDS, JobError, JobRequest, JobResult, JobStatus
from presence.bot.jobs.worker import Worker, default_consumer_name, worker_from_settings

if TYPE_CHECKING:
    from presence.config import Settings
    from presence.signaling.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_KINDS: tuple[str, ...] = ("search", "code", "think")
Deliver = Callable[[JobResult], object]  # may return an awaitable: it is then run as a task
ChangeListener = Callable[[dict[str, str]], None]


class JobsUnavailable(RuntimeError):
    """``jobs=redis`` and no Redis answered (or a private one could not be started)."""


async def ping_redis(url: str, timeout_s: float = 0.5) -> str | None:
    """None when a Redis answers PING at ``url`` within ``timeout_s``, else why not."""
    client = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        await asyncio.wait_for(client.ping(), timeout_s * 2)
    except Exception as exc:  # refused, timeout, auth, not Redis at all: all mean "not usable"
        return f"{type(exc).__name__}: {redact(str(exc))}" if str(exc) else type(exc).__name__
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return None


def find_redis_server(explicit: str | None = None) -> str | None:
    """The redis-server binary: ``explicit`` if executable, else on PATH or in /usr(/local)/bin."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    return next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A throwaway ``redis-server`` on 127.0.0.1: nothing on disk, gone with its owner.

    Under Linux it is started through ``setpriv --pdeathsig TERM`` when available, so it does not
    outlive a server that is killed without running :meth:`stop`.
    """

    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: str) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    async def start(
        cls, binary: str, *, port: int | None = None, attempts: int = 3, ready_timeout_s: float = 5.0
    ) -> PrivateRedis:
        workdir = tempfile.mkdtemp(prefix="presence-redis-")
        problem = ""
        for _ in range(attempts if port is None else 1):
            chosen = port or free_port()
            argv = [
                binary,
                *("--port", str(chosen), "--bind", "127.0.0.1", "--protected-mode", "yes"),
                *("--save", "", "--appendonly", "no", "--dir", workdir, "--daemonize", "no"),
                *("--loglevel", "warning", "--logfile", os.path.join(workdir, "redis.log")),
            ]
            setpriv = shutil.which("setpriv")
            if setpriv:
                argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
            proc = _spawn(argv, os.path.join(workdir, "stderr.log"))
            server = cls(proc, chosen, workdir)
            end = time.monotonic() + ready_timeout_s
            while time.monotonic() < end and proc.poll() is None:
                if await ping_redis(server.url, 0.2) is None:
                    return server
                await asyncio.sleep(0.02)
            problem = server._log_tail()
            await server.stop(remove_dir=False)
            if "in use" not in problem:  # a port race is worth another try; anything else is not
                break
        shutil.rmtree(workdir, ignore_errors=True)
        raise JobsUnavailable(
            f"could not start {binary}: {problem.strip()[-300:] or 'it did not answer PING'}"
        )

    def _log_tail(self) -> str:
        out = []
        for name in ("stderr.log", "redis.log"):
            with contextlib.suppress(OSError):
                out.append(Path(self.workdir, name).read_text(errors="replace")[-500:])
        return "\n".join(o for o in out if o.strip())

    async def stop(self, *, remove_dir: bool = True) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            end = time.monotonic() + 3.0
            while self.proc.poll() is None and time.monotonic() < end:
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        if remove_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _spawn(argv: list[str], stderr_path: str) -> subprocess.Popen[bytes]:
    # Own session: a Ctrl-C in the terminal must not stop Redis before the worker is done.
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )


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


# ---------------------------------------------------------------------- one call
@dataclass(slots=True)
class _Job:
    job_id: str
    kind: str
    title: str
    status: JobStatus
    summary: str
    dispatched_at: float  # monotonic

    def as_dict(self) -> dict[str, str]:
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "status": self.status.value,
            "summary": self.summary,
            "title": self.title,
        }


def _title(request: JobRequest) -> str:
    args = request.args
    if request.kind == "search":
        return f"search: {args.get('query', '')}"[:80]
    if request.kind == "code":
        code = str(args.get("code", ""))
        match = re.search(r"print\((.*)\)\s*$", code)
        return f"calculate: {match.group(1) if match else code.splitlines()[0] if code else ''}"[:80]
    if request.kind == "think":
        return f"think: {args.get('prompt', '')}"[:80]
    return request.kind


class CallJobs:
    """The jobs of one call: route, dispatch, cancel, a table for the page, and result delivery."""

    is_cancel_request = staticmethod(is_cancel_request)

    def __init__(self, bridge: JobBridge, call_id: str, deliver: Deliver, router: ToolRouter) -> None:
        self.call_id = call_id
        self.router = router
        self.stats: Counter[str] = Counter()
        self._bridge = bridge
        self._broker = bridge.broker
        self._deliver = deliver
        self._jobs: dict[str, _Job] = {}  # dispatch order
        self._handled: set[str] = set()  # job ids whose result was handled: dedupe
        self._listeners: list[ChangeListener] = []
        self._pump: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def _start(self) -> None:
        self._pump = asyncio.create_task(self._run_pump(), name=f"jobs-results-{self.call_id}")

    # ------------------------------------------------------------------ routing
    def route(self, text: str) -> list[JobRequest]:
        """The jobs the caller's words ask for ([] for none, and for "never mind")."""
        try:
            routes = self.router.route(text)
        except Exception:  # a broken router must not break the call
            log.exception("jobs: call %s: the tool router failed on %r", self.call_id, text[:80])
            return []
        return [
            JobRequest.new(self.call_id, kind, args, timeout_s=self._bridge.timeout_s, urgent=urgent)
            for kind, args, urgent in routes
        ]

    acknowledgement = staticmethod(acknowledgement)
    speakable = staticmethod(speakable)

    # ------------------------------------------------------------------ dispatch
    async def dispatch(self, requests: Sequence[JobRequest]) -> list[str]:
        """Queue ``requests`` (deadline: now + job_timeout_s). Returns the ids queued; a request
        that could not be queued is delivered at once as a failure (the caller was promised an
        answer)."""
        if self._closed:
            log.warning("jobs: call %s is closed; not dispatching %d job(s)", self.call_id, len(requests))
            return []
        fresh = []
        for request in requests:
            if request.job_id in self._jobs:
                continue
            request = dataclasses.replace(
                request, call_id=self.call_id, deadline=time.time() + self._bridge.timeout_s
            )
            job = _Job(request.job_id, request.kind, _title(request), JobStatus.QUEUED, "", time.monotonic())
            job.summary = job.title
            self._jobs[job.job_id] = job  # before the submit: a fast result must find it
            self._notify(job)
            fresh.append(request)
        outcomes = await asyncio.gather(*(self._broker.submit(r) for r in fresh), return_exceptions=True)
        queued = []
        for request, outcome in zip(fresh, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                error = (
                    "the job queue is not reachable"
                    if isinstance(outcome, RedisUnavailable | ConnectionError | OSError)
                    else str(outcome)
                    if isinstance(outcome, JobError)
                    else f"{type(outcome).__name__}: {outcome}"
                )
                log.warning("jobs: call %s: could not queue %s job: %s", self.call_id, request.kind, outcome)
                self._on_result(JobResult.failure(request, error, worker="bridge"))
                continue
            queued.append(request.job_id)
            self.stats["dispatched"] += 1
        if queued:
            self._ensure_poller()
        return queued

    async def cancel_all(self, reason: str = "caller said never mind") -> int:
        """Cancel every unfinished job of this call; their results are never delivered."""
        targets = [job for job in self._jobs.values() if not job.status.terminal]
        for job in targets:
            self._set(job, JobStatus.CANCELLED, "cancelled")
        outcomes = await asyncio.gather(
            *(self._broker.cancel(job.job_id, reason) for job in targets), return_exceptions=True
        )
        for job, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.warning("jobs: call %s: cancelling %s failed: %s", self.call_id, job.job_id, outcome)
        self.stats["cancelled"] += len(targets)
        return len(targets)

    def unfinished(self) -> int:
        """Jobs queued or running: "never mind" means something only while this is > 0."""
        return sum(1 for job in self._jobs.values() if not job.status.terminal)

    # ------------------------------------------------------------------ the page feed
    def jobs(self) -> list[dict[str, str]]:
        """job_id, kind, status (queued/running/done/failed/cancelled), summary, title."""
        return [job.as_dict() for job in self._jobs.values()]

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call ``callback(job dict)`` on every status change; returns a remover."""
        self._listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return remove

    def _set(self, job: _Job, status: JobStatus, summary: str | None = None) -> None:
        if status is JobStatus.DEAD:
            status = JobStatus.FAILED  # the page and the engine need not tell them apart
        changed = status is not job.status or (summary is not None and summary != job.summary)
        job.status = status
        if summary is not None:
            job.summary = summary
        if changed:
            self._notify(job)

    def _notify(self, job: _Job) -> None:
        snapshot = job.as_dict()
        for listener in list(self._listeners):
            try:
                listener(snapshot)
            except Exception:
                log.exception("jobs: call %s: an on_change listener failed", self.call_id)

    # ------------------------------------------------------------------ results
    def _on_result(self, result: JobResult) -> None:
        job = self._jobs.get(result.job_id)
        if job is None:  # not dispatched by this call (another broker's, or forged)
            self.stats["foreign"] += 1
            log.debug("jobs: call %s: ignoring result of unknown job %s", self.call_id, result.job_id)
            return
        if result.job_id in self._handled:
            self.stats["duplicates"] += 1
            return
        self._handled.add(result.job_id)
        if self._closed:
            self.stats["after_close"] += 1
            return
        if job.status is JobStatus.CANCELLED or result.status is JobStatus.CANCELLED:
            self._set(job, JobStatus.CANCELLED, "cancelled")
            return
        text = speakable(result)
        self._set(job, result.status, text)
        self._bridge._observe(time.monotonic() - job.dispatched_at)
        self.stats["delivered"] += 1
        try:
            out = self._deliver(result)
            if inspect.isawaitable(out):
                task = asyncio.ensure_future(out)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:
            log.exception("jobs: call %s: deliver() failed for job %s", self.call_id, result.job_id)

    async def _run_pump(self) -> None:
        while not self._closed:
            try:
                async for result in self._broker.results(self.call_id, block_ms=self._bridge.block_ms):
                    self._on_result(result)
                return  # the broker ended the call
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone past the retry budget: keep trying, slowly
                log.warning("jobs: call %s: reading results failed (%s); retrying", self.call_id, exc)
                await asyncio.sleep(1.0)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_running(), name=f"jobs-status-{self.call_id}")

    async def _poll_running(self) -> None:
        """queued -> running for the page: one HGET per queued job, every ``status_poll_s``, only
        while some job is still queued. The first look waits a period: quick jobs never need one."""
        try:
            while not self._closed:
                await asyncio.sleep(self._bridge.status_poll_s)
                queued = [job for job in self._jobs.values() if job.status is JobStatus.QUEUED]
                if not queued:
                    return
                statuses = await asyncio.gather(
                    *(self._broker.status(job.job_id) for job in queued), return_exceptions=True
                )
                for job, status in zip(queued, statuses, strict=True):
                    if status is JobStatus.RUNNING and job.status is JobStatus.QUEUED:
                        self._set(job, JobStatus.RUNNING)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("jobs: call %s: status poll stopped: %s", self.call_id, exc)

    # ------------------------------------------------------------------ end
    async def close(self, reason: str = "call ended") -> None:
        """End the call's jobs: cancel the unfinished ones, stop delivering. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for job in self._jobs.values():
            if not job.status.terminal:
                self._set(job, JobStatus.CANCELLED, "cancelled")
        try:
            await asyncio.wait_for(self._broker.cancel_call(self.call_id, reason), 5.0)
        except Exception as exc:  # Redis away: the workers drop the jobs at their deadline
            log.warning(
                "jobs: call %s: could not cancel its jobs in Redis: %s",
                self.call_id,
                exc or type(exc).__name__,
            )
            self._broker.forget_call(self.call_id)
        for task in (self._pump, self._poller, *self._tasks):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._pump, self._poller, *self._tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._bridge._calls.pop(self.call_id, None)


__all__ = [
    "DEFAULT_KINDS",
    "CallJobs",
    "JobBridge",
    "JobsUnavailable",
    "PrivateRedis",
    "RuleToolRouter",
    "ToolRouter",
    "acknowledgement",
    "find_redis_server",
    "is_cancel_request",
    "ping_redis",
    "speakable",
]
