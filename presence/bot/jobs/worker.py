"""The worker side: XREADGROUP loop, reclaim of dead consumers' jobs, retries, dead letters.

Delivery is at-least-once. The result is written and THEN the entry acknowledged, both inside
one Lua script, so a worker dying mid-job leaves an unacknowledged entry (reclaimed and re-run)
and never an acknowledged job without a result; a re-run's extra result is dropped by the
broker's de-duplication. A job runs only after one atomic check (``scripts.START``): the entry
still ours, not cancelled, not already finished, its call still live, its deadline not passed,
its delivery count within ``max_attempts``.

While a handler runs, the worker polls the cancel key and re-claims its own entry now and then
(XCLAIM with min-idle 0) so that long jobs are not mistaken for a dead consumer's by XAUTOCLAIM;
if it finds the entry owned by another worker (it stalled longer than idle_reclaim_ms), it
stops and leaves the job to the new owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis import exceptions as rexc

from presence.bot.jobs import scripts
from presence.bot.jobs.redisio import (
    DEFAULT_REDIS_URL,
    GROUP,
    Backoff,
    Keys,
    Reconnecting,
    is_nogroup,
)
from presence.bot.jobs.types import (
    BUILTIN_KINDS,
    DEFAULT_MAX_ARGS_BYTES,
    JobError,
    JobRequest,
    JobResult,
    JobStatus,
    TransientJobError,
    check_id,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class JobContext:
    """What a handler gets besides its args."""

    request: JobRequest
    worker: str
    options: Mapping[str, Any]  # worker configuration: docs_dir, think_url, ...
    delivery: int  # 1 on the first delivery
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def deadline(self) -> float:
        return self.request.deadline

    def remaining(self) -> float:
        return self.request.deadline - time.time()


class Handler(Protocol):
    def __call__(self, args: dict[str, Any], ctx: JobContext) -> Awaitable[dict[str, Any]]: ...


@dataclass(slots=True)
class WorkerStats:
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    dead: int = 0
    retried: int = 0
    reclaimed: int = 0
    malformed: int = 0
    deadline: int = 0
    dropped_jobs: int = 0  # not run: their call was not live
    dropped_results: int = 0  # ran, but the call had ended when the result was ready
    redelivered_finished: int = 0
    superseded: int = 0  # stale copies skipped or stopped: another worker had reclaimed them

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def default_consumer_name() -> str:
    """host-pid-random: unique even where every container's worker is PID 1 of the same host name."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """Serves the request streams of ``kinds`` with ``handlers`` until :meth:`stop`."""

    def __init__(
        self,
        redis_url: str = DEFAULT_REDIS_URL,
        kinds: Sequence[str] = (),
        handlers: Mapping[str, Handler] | None = None,
        consumer_name: str | None = None,
        idle_reclaim_ms: int = 30_000,
        max_attempts: int = 3,
        *,
        prefix: str = "presence",
        known_kinds: Collection[str] | None = BUILTIN_KINDS,
        options: Mapping[str, Any] | None = None,
        concurrency: int = 1,
        block_ms: int = 1_000,
        reclaim_interval_s: float | None = None,
        cancel_poll_s: float = 0.2,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
        result_maxlen: int = 1_000,
        dead_maxlen: int = 10_000,
        queue_maxlen: int = 10_000,
        state_ttl_s: int = 3_600,
        shutdown_grace_s: float = 10.0,
    ) -> None:
        handlers = dict(handlers or {})
        missing = [k for k in kinds if k not in handlers]
        if not kinds or missing:
            raise ValueError(f"worker needs kinds with handlers; missing handlers for {missing or 'all'}")
        if max_attempts < 1 or concurrency < 1:
            raise ValueError("max_attempts and concurrency must be at least 1")
        self.kinds = list(kinds)
        self.handlers = handlers
        self.name = consumer_name or default_consumer_name()
        self.idle_reclaim_ms = idle_reclaim_ms
        self.max_attempts = max_attempts
        self.keys = Keys(prefix)
        self.known_kinds = None if known_kinds is None else frozenset(known_kinds) | set(kinds)
        self.options = dict(options or {})
        self.concurrency = concurrency
        self.block_ms = block_ms
        self.reclaim_interval_s = (
            reclaim_interval_s if reclaim_interval_s is not None else max(0.1, idle_reclaim_ms / 2000)
        )
        self.heartbeat_s = max(0.05, idle_reclaim_ms / 3000)
        self.cancel_poll_s = cancel_poll_s
        self.max_args_bytes = max_args_bytes
        self.result_maxlen = result_maxlen
        self.dead_maxlen = dead_maxlen
        self.queue_maxlen = queue_maxlen
        self.state_ttl_s = state_ttl_s
        self.shutdown_grace_s = shutdown_grace_s
        self.stats = WorkerStats()
        # Workers wait for Redis as long as it takes; the broker side gives up after a budget.
        self._rc = Reconnecting(redis_url, name=f"worker {self.name}", backoff=Backoff(give_up_s=None))
        self._write_result_script = self._rc.redis.register_script(scripts.WRITE_RESULT)
        self._start_script = self._rc.redis.register_script(scripts.START)
        self._heartbeat_script = self._rc.redis.register_script(scripts.HEARTBEAT)
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._backlog: deque[tuple[str, str, str, Mapping[str, str]]] = deque()
        self._groups_generation = -1
        self._next_reclaim = 0.0
        self.started = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the worker to finish: no new jobs; in-flight ones get ``shutdown_grace_s``."""
        if not self._stop.is_set():
            log.info("worker %s: stopping", self.name)
        self._stop.set()

    async def run(self, *, install_signals: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        log.info(
            "worker %s: serving %s on %s (prefix %s)",
            self.name,
            ",".join(self.kinds),
            self._rc.shown_url,
            self.keys.prefix,
        )
        if "code" in self.kinds:  # once: which sandbox code jobs get, or that they are refused
            from presence.bot.jobs.code import sandbox_status

            status = await asyncio.to_thread(sandbox_status, self.options.get("code_sandbox", "auto"))
            level = logging.INFO if status.startswith("code jobs run") else logging.WARNING
            log.log(level, "worker %s: %s", self.name, status)
        try:
            await self._loop()
        finally:
            await self._drain()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await self._rc.close()
            log.info("worker %s: stopped %s", self.name, self.stats.as_dict())

    async def _drain(self) -> None:
        if not self._inflight:
            return
        _done, pending = await asyncio.wait(self._inflight, timeout=self.shutdown_grace_s)
        for task in pending:  # unacknowledged: another worker reclaims them
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.warning("worker %s: left %d unfinished job(s) for reclaim", self.name, len(pending))

    async def _ensure_groups(self) -> None:
        if self._groups_generation == self._rc.generation:
            return
        for kind in self.kinds:
            stream = self.keys.jobs(kind)
            try:
                # id 0: entries queued before any worker existed are served too
                await self._rc.call(
                    "xgroup create", lambda r, s=stream: r.xgroup_create(s, GROUP, id="0", mkstream=True)
                )
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_generation = self._rc.generation

    async def _loop(self) -> None:
        streams = {self.keys.jobs(kind): kind for kind in self.kinds}
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                await self._ensure_groups()
                self.started.set()
                free = self.concurrency - len(self._inflight)
                while free > 0 and self._backlog:
                    self._spawn(*self._backlog.popleft())
                    free -= 1
                if free <= 0:
                    await asyncio.wait({stop_wait, *self._inflight}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    if time.monotonic() >= self._next_reclaim:
                        self._next_reclaim = time.monotonic() + self.reclaim_interval_s
                        free -= await self._reclaim(streams, free)
                        if free <= 0:
                            continue
                    read = asyncio.ensure_future(
                        self._rc.call(
                            "xreadgroup",
                            lambda r, n=free: r.xreadgroup(
                                GROUP,
                                self.name,
                                dict.fromkeys(streams, ">"),
                                count=n,
                                block=min(self.block_ms, int(self.reclaim_interval_s * 1000) or 1),
                            ),
                        )
                    )
                    await asyncio.wait({read, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():
                        read.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await read
                        break
                    # COUNT applies per stream: entries beyond the free slots wait here, in
                    # order, rather than overshooting the concurrency limit.
                    for stream, entries in read.result() or []:
                        for entry_id, fields in entries:
                            item = (stream, streams[stream], entry_id, fields)
                            if free > 0:
                                self._spawn(*item)
                                free -= 1
                            else:
                                self._backlog.append(item)
                except rexc.ResponseError as exc:
                    if not is_nogroup(exc):
                        raise
                    log.warning("worker %s: consumer group missing (redis restarted?); recreating", self.name)
                    self._groups_generation = -1
        finally:
            stop_wait.cancel()

    async def _reclaim(self, streams: Mapping[str, str], free: int) -> int:
        """XAUTOCLAIM entries idle longer than idle_reclaim_ms (their consumer died)."""
        claimed = 0
        for stream, kind in streams.items():
            if claimed >= free:
                break
            reply = await self._rc.call(
                "xautoclaim",
                lambda r, s=stream, n=free - claimed: r.xautoclaim(
                    s, GROUP, self.name, min_idle_time=self.idle_reclaim_ms, start_id="0-0", count=n
                ),
            )
            entries = reply[1] if len(reply) > 1 else []
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:  # trimmed away while pending: nothing to run; the broker reports them
                log.warning(
                    "worker %s: %d pending entries of %s were trimmed", self.name, len(deleted), stream
                )
            for entry_id, fields in entries:
                if fields is None:
                    continue
                claimed += 1
                self.stats.reclaimed += 1
                await self._rc.call("stats", lambda r: r.hincrby(self.keys.stats, "reclaimed", 1))
                log.warning(
                    "worker %s: reclaimed %s %s from a dead or stalled consumer", self.name, stream, entry_id
                )
                self._spawn(stream, kind, entry_id, fields)
        return claimed

    def _spawn(self, stream: str, kind: str, entry_id: str, fields: Mapping[str, str]) -> None:
        task = asyncio.create_task(self._process(stream, kind, entry_id, fields))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        task.add_done_callback(_log_task_failure)

    # ------------------------------------------------------------------ one entry
    async def _process(self, stream: str, kind: str, entry_id: str, fields: Mapping[str, str]) -> None:
        raw = fields.get("job")
        try:
            if raw is None:
                raise JobError(f"malformed job entry: no 'job' field (fields: {sorted(fields)[:5]})")
            request = JobRequest.from_json(raw, kinds=self.known_kinds, max_args_bytes=self.max_args_bytes)
            if request.kind != kind:
                raise JobError(f"kind {request.kind!r} does not belong on the {kind!r} stream")
        except JobError as exc:
            self.stats.malformed += 1
            log.warning("worker %s: dead-lettering %s %s: %s", self.name, stream, entry_id, exc)
            await self._dead_letter(
                stream,
                entry_id,
                str(exc),
                raw if raw is not None else json.dumps(dict(fields)),
                _guess_job_id(raw),
            )
            await self._ack(stream, entry_id)
            return

        now = time.time()
        verdict, delivery, previous, detail = await self._rc.call(
            "start",
            lambda r: self._start_script(
                keys=[
                    self.keys.job(request.job_id),
                    self.keys.cancel(request.job_id),
                    self.keys.live,
                    stream,
                ],
                args=[
                    request.call_id,
                    self.name,
                    repr(now),
                    self.state_ttl_s,
                    self.max_attempts,
                    "1" if now >= request.deadline else "0",
                    GROUP,
                    entry_id,
                ],
            ),
        )
        delivery = int(delivery)
        if verdict == "not_owner":  # a stale copy: another worker reclaimed it while we stalled
            self.stats.superseded += 1
            log.warning(
                "worker %s: skipping %s %s: no longer ours (reclaimed by another worker)",
                self.name,
                stream,
                entry_id,
            )
            return
        if verdict == "cancel":
            if previous != JobStatus.CANCELLED:  # the broker already answered queued cancels
                self.stats.cancelled += 1
                await self._finish(
                    stream, entry_id, JobResult.failure(request, f"cancelled: {detail}", worker=self.name)
                )
            else:
                await self._ack(stream, entry_id)
            return
        if verdict == "finished":  # redelivery of a job whose result was written: just ack
            self.stats.redelivered_finished += 1
            await self._ack(stream, entry_id)
            return
        if verdict == "not_live":
            self.stats.dropped_jobs += 1
            log.info(
                "worker %s: dropping job %s: call %s is not live", self.name, request.job_id, request.call_id
            )
            await self._rc.call(
                "drop",
                lambda r: r.hset(
                    self.keys.job(request.job_id),
                    mapping={"status": "cancelled", "error": "cancelled: call not live"},
                ),
            )
            await self._ack(stream, entry_id)
            return
        if verdict == "deadline":
            self.stats.deadline += 1
            await self._finish(
                stream,
                entry_id,
                JobResult.failure(request, "deadline passed before the job started", worker=self.name),
            )
            return
        if verdict == "dead":
            error = detail or f"worker died or stalled on each of {delivery - 1} deliveries"
            await self._give_up(stream, entry_id, request, raw, error, delivery - 1)
            return

        started = time.time()
        ctx = JobContext(request=request, worker=self.name, options=self.options, delivery=delivery)
        try:
            value = await self._run(request, ctx, stream, entry_id)
        except TransientJobError as exc:
            error = f"{type(exc).__name__}: {exc}"
            if delivery >= self.max_attempts:
                await self._give_up(stream, entry_id, request, raw, error, delivery)
            else:
                await self._requeue(stream, entry_id, request, error)
            return
        except _Superseded as exc:  # no result, no ack: the new owner answers for the job
            self.stats.superseded += 1
            log.warning("worker %s: job %s was reclaimed by %s; stopped", self.name, request.job_id, exc)
            return
        except _Cancelled as exc:
            self.stats.cancelled += 1
            result = JobResult.failure(
                request, f"cancelled: {exc.reason}", worker=self.name, started_at=started
            )
        except _DeadlineExceeded:
            self.stats.failed += 1
            result = JobResult.failure(
                request,
                "deadline: the handler ran past the job's deadline",
                worker=self.name,
                started_at=started,
            )
        except asyncio.CancelledError:
            raise  # shutdown: leave it unacknowledged for reclaim
        except Exception as exc:
            self.stats.failed += 1
            log.info(
                "worker %s: job %s (%s) failed: %s: %s",
                self.name,
                request.job_id,
                request.kind,
                type(exc).__name__,
                exc,
            )
            result = JobResult.failure(
                request, f"{type(exc).__name__}: {exc}", worker=self.name, started_at=started
            )
        else:
            self.stats.done += 1
            result = JobResult(
                job_id=request.job_id,
                call_id=request.call_id,
                kind=request.kind,
                ok=True,
                value=value,
                error=None,
                started_at=started,
                finished_at=time.time(),
                worker=self.name,
            )
        await self._finish(stream, entry_id, result)

    async def _run(self, request: JobRequest, ctx: JobContext, stream: str, entry_id: str) -> dict[str, Any]:
        """Run the handler under the deadline; poll for cancellation; keep the entry claimed."""
        handler = self.handlers[request.kind]
        task: asyncio.Task[Any] = asyncio.ensure_future(handler(request.args, ctx))
        next_heartbeat = time.monotonic() + self.heartbeat_s
        try:
            while True:
                remaining = request.deadline - time.time()
                if remaining <= 0:
                    raise _DeadlineExceeded
                done, _ = await asyncio.wait({task}, timeout=min(remaining, self.cancel_poll_s))
                if done:
                    value = task.result()
                    if not isinstance(value, dict | str):
                        raise JobError(f"handler returned {type(value).__name__}, expected a dict")
                    return value  # type: ignore[return-value]
                heartbeat = time.monotonic() >= next_heartbeat
                if heartbeat:
                    next_heartbeat = time.monotonic() + self.heartbeat_s
                reason, owner, status, by = await self._poll(request, stream, entry_id, heartbeat=heartbeat)
                if owner and owner != self.name:
                    raise _Superseded(owner)
                if not owner and status in _FINISHED and by != self.name:
                    raise _Superseded(by)  # reclaimed, finished and acknowledged meanwhile
                if reason:
                    ctx.cancelled.set()
                    raise _Cancelled(reason)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _poll(
        self, request: JobRequest, stream: str, entry_id: str, *, heartbeat: bool
    ) -> tuple[str, str, str, str]:
        """(cancel reason, entry owner, job status, its worker), "" when unknown; and the
        heartbeat when asked."""
        # No retry loop here: while Redis is away the job keeps running and its deadline rules.
        try:
            reply = await self._heartbeat_script(
                keys=[self.keys.cancel(request.job_id), stream, self.keys.job(request.job_id)],
                args=[GROUP, entry_id, self.name, "1" if heartbeat else "0"],
            )
        except Exception as exc:
            log.debug("worker %s: poll failed: %s", self.name, exc)
            return "", "", "", ""
        reason, owner, status, by = (str(x or "") for x in reply)
        return reason, owner, status, by

    # ------------------------------------------------------------------ outcomes
    async def _finish(self, stream: str, entry_id: str, result: JobResult) -> None:
        """Write the result (only while its call is live), then acknowledge the entry.

        Both happen in one server-side script, result first: there is no window in which a
        crash leaves a written result unacknowledged or an acknowledged job without result.
        """
        written = await self._rc.call(
            "write result",
            lambda r: self._write_result_script(
                keys=[
                    self.keys.live,
                    self.keys.results(result.call_id),
                    self.keys.job(result.job_id),
                    stream,
                ],
                args=[
                    result.call_id,
                    result.to_json(),
                    self.result_maxlen,
                    result.status.value,
                    result.error or "",
                    repr(result.finished_at),
                    self.state_ttl_s,
                    self.name,
                    GROUP,
                    entry_id,
                ],
            ),
        )
        if written == -1:
            self.stats.superseded += 1
            log.warning(
                "worker %s: not writing the result of job %s: another worker took it over",
                self.name,
                result.job_id,
            )
            return
        if not written:
            self.stats.dropped_results += 1
            log.info(
                "worker %s: dropped result of job %s: call %s is not live",
                self.name,
                result.job_id,
                result.call_id,
            )
            await self._rc.call("stats", lambda r: r.hincrby(self.keys.stats, "dropped_results", 1))

    async def _ack(self, stream: str, entry_id: str) -> None:
        await self._rc.call("xack", lambda r: r.xack(stream, GROUP, entry_id))

    async def _requeue(self, stream: str, entry_id: str, request: JobRequest, error: str) -> None:
        """A transient failure: queue a fresh entry (attempt + 1), then ack the old one."""
        self.stats.retried += 1
        log.info("worker %s: job %s failed transiently (%s); retrying", self.name, request.job_id, error)
        retry = request.retry()

        async def write(r: Any) -> Any:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.job(request.job_id), mapping={"status": "queued", "error": error})
                pipe.xadd(stream, {"job": retry.to_json()}, maxlen=self.queue_maxlen, approximate=True)
                pipe.xack(stream, GROUP, entry_id)
                pipe.hincrby(self.keys.stats, "retried", 1)  # deployment-wide, for metrics
                return await pipe.execute()

        await self._rc.call("requeue", write)

    async def _give_up(
        self, stream: str, entry_id: str, request: JobRequest, raw: str, error: str, attempts: int
    ) -> None:
        """Out of attempts: dead-letter the job and tell the call it failed for good."""
        self.stats.dead += 1
        message = f"dead: {error} (after {attempts} attempt{'s' if attempts != 1 else ''})"
        log.warning("worker %s: job %s (%s) %s", self.name, request.job_id, request.kind, message)
        await self._dead_letter(stream, entry_id, message, raw, request.job_id, request.kind)
        await self._finish(stream, entry_id, JobResult.failure(request, message, worker=self.name))

    async def _dead_letter(
        self,
        stream: str,
        entry_id: str,
        error: str,
        payload: str,
        job_id: str | None,
        kind: str | None = None,
    ) -> None:
        fields = {
            "error": error,
            "payload": payload[: 256 * 1024],
            "source": f"{stream} {entry_id}",
            "job_id": job_id or "",
            "kind": kind or "",
            "worker": self.name,
            "at": repr(time.time()),
        }

        async def write(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                pipe.xadd(self.keys.dead, fields, maxlen=self.dead_maxlen, approximate=True)
                pipe.hincrby(self.keys.stats, "dead_letters", 1)  # deployment-wide, for metrics
                return await pipe.execute()

        await self._rc.call("dead letter", write)
        if job_id:
            with contextlib.suppress(rexc.RedisError):
                await self._rc.call(
                    "dead letter",
                    lambda r: r.hset(
                        self.keys.job(job_id), mapping={"status": "dead", "error": error, "worker": self.name}
                    ),
                )


class _DeadlineExceeded(Exception):
    """The job's deadline passed while its handler ran (distinct from a handler's TimeoutError)."""


_FINISHED = frozenset({"done", "failed", "dead"})


class _Superseded(Exception):
    """Another worker reclaimed the entry while this one stalled."""


class _Cancelled(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _guess_job_id(raw: str | None) -> str | None:
    """Best effort, for marking a malformed job's status hash dead."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
        job_id = data.get("job_id") if isinstance(data, dict) else None
        return check_id(job_id, "job_id")
    except (ValueError, JobError, AttributeError):
        return None


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("job task crashed", exc_info=task.exception())


# ---------------------------------------------------------------------- entry points


def worker_from_settings(
    settings: Any,
    kinds: Sequence[str],
    *,
    url: str = "",
    docs_dir: str = "",
    consumer_name: str | None = None,
    prefix: str = "presence",
    options: Mapping[str, Any] | None = None,
    concurrency: int = 1,
    shutdown_grace_s: float = 10.0,
) -> Worker:
    """A worker for ``kinds`` as :class:`presence.config.Settings` and ``options`` (which win)
    say: the documents folder (default: the bundled docs/), the think model, and the options
    ``test_kinds``, ``concurrency``, ``idle_reclaim_ms``, ``max_attempts``, ``shutdown_grace_s``."""
    from presence.bot.jobs.kinds import load_handlers, options_from_settings, resolve_docs_dir

    opts = options_from_settings(settings)
    configured = docs_dir or opts.get("docs_dir", "")
    if configured or "search" in kinds:
        resolved = resolve_docs_dir(configured)  # empty: the bundled docs/ folder
        if resolved:
            opts["docs_dir"] = resolved
            if "search" in kinds and not os.path.isdir(resolved):
                log.warning("jobs: the search documents folder %s does not exist", resolved)
    opts.update(options or {})
    return Worker(
        url or getattr(settings, "redis_url", "") or DEFAULT_REDIS_URL,
        kinds,
        load_handlers(kinds, test_kinds=bool(opts.get("test_kinds"))),
        consumer_name,
        prefix=prefix,
        options=opts,
        idle_reclaim_ms=int(opts.get("idle_reclaim_ms", 30_000)),
        max_attempts=int(opts.get("max_attempts", 3)),
        concurrency=int(opts.get("concurrency", concurrency)),
        shutdown_grace_s=float(opts.get("shutdown_grace_s", shutdown_grace_s)),
    )


async def run_worker(
    settings: Any,
    kinds: list[str],
    *,
    docs_dir: str = "",
    consumer_name: str | None = None,
    prefix: str = "presence",
    options: Mapping[str, Any] | None = None,
) -> None:
    """The worker process (``presence worker --kinds search,code,think``): serves until SIGTERM.

    Prints ``presence worker NAME: ready ...`` on stdout once its consumer groups exist.
    """
    worker = worker_from_settings(
        settings, kinds, docs_dir=docs_dir, consumer_name=consumer_name, prefix=prefix, options=options
    )

    async def announce() -> None:
        await worker.started.wait()
        where = worker._rc.shown_url
        print(f"presence worker {worker.name}: ready, kinds {','.join(kinds)} on {where}", flush=True)

    ready = asyncio.create_task(announce())
    try:
        await worker.run(install_signals=True)
    finally:
        ready.cancel()
