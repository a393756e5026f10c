"""The call side of the job layer: submit, cancel, and read results, over Redis Streams.

Layout (``prefix`` defaults to ``presence``):

* ``{prefix}:jobs:{kind}``        request stream, consumer group ``workers``, MAXLEN ~ trimmed
* ``{prefix}:results:{call_id}``  results of one call, MAXLEN ~ trimmed, expires when idle
* ``{prefix}:dead``               dead letters (malformed entries, jobs out of attempts)
* ``{prefix}:job:{job_id}``       status hash (status, kind, call_id, deliveries, error, ...)
* ``{prefix}:cancel:{job_id}``    present = cancelled, value = reason
* ``{prefix}:calls:live``         set of live calls; workers drop work and results of others

Nothing is silently lost. The broker remembers every job it submitted until its result has been
yielded. After a reconnect it re-checks them: a job whose status hash is gone (the server
restarted; this Redis keeps nothing on disk) is resubmitted while its deadline has not passed
(``on_lost="resubmit"``, the default, because a restart is usually shorter than a job's budget)
and reported failed with ``"lost: redis restarted"`` otherwise, or always with
``on_lost="fail"``. Independently, a job with no result ``result_grace_s`` after its deadline is
reported failed (``"timeout: ..."``): that covers a worker-less kind or a trimmed queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import exceptions as rexc

from presence.bot.jobs import scripts
from presence.bot.jobs.redisio import DEFAULT_REDIS_URL, GROUP, Backoff, Keys, Reconnecting
from presence.bot.jobs.types import (
    BUILTIN_KINDS,
    DEFAULT_MAX_ARGS_BYTES,
    DeadLetter,
    JobError,
    JobRequest,
    JobResult,
    JobStatus,
    check_id,
    check_kind,
)

log = logging.getLogger(__name__)

LOST_ERROR = "lost: redis restarted"
_SEEN_KEEP = 10_000  # job ids remembered per call for de-duplication


@dataclass(slots=True)
class _CallState:
    last_id: str = "0-0"
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    local: deque[JobResult] = field(default_factory=deque)  # results made up by the broker
    closed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class JobBroker:
    """Submits jobs and streams back their results, exactly once per job id."""

    def __init__(
        self,
        redis_url: str = DEFAULT_REDIS_URL,
        *,
        prefix: str = "presence",
        kinds: Collection[str] | None = BUILTIN_KINDS,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
        queue_maxlen: int = 10_000,
        result_maxlen: int = 1_000,
        state_ttl_s: int = 3_600,
        ended_ttl_s: int = 120,
        on_lost: Literal["resubmit", "fail"] = "resubmit",
        result_grace_s: float = 5.0,
        backoff: Backoff | None = None,
        name: str = "broker",
        max_connections: int = 32,
    ) -> None:
        if on_lost not in ("resubmit", "fail"):
            raise ValueError(f"on_lost must be 'resubmit' or 'fail', got {on_lost!r}")
        self.keys = Keys(prefix)
        self.kinds = frozenset(kinds) if kinds is not None else None
        self.max_args_bytes = max_args_bytes
        self.queue_maxlen = queue_maxlen
        self.result_maxlen = result_maxlen
        self.state_ttl_s = state_ttl_s
        self.ended_ttl_s = ended_ttl_s
        self.on_lost = on_lost
        self.result_grace_s = result_grace_s
        self.stats: Counter[str] = Counter()
        # Each results() iterator holds a connection in XREAD BLOCK: size the pool for the calls.
        self._rc = Reconnecting(redis_url, name=name, backoff=backoff, max_connections=max_connections)
        self._pending: dict[str, JobRequest] = {}  # submitted, result not yet yielded
        self._submitting: set[str] = set()  # submit() still writing these
        self._calls: dict[str, _CallState] = {}
        self._live: set[str] = set()  # calls this broker opened; re-announced after a restart
        self._recovered_generation = 0
        self._seen_restarts = 0
        self._recover_lock = asyncio.Lock()
        self._cancel_script = self._rc.redis.register_script(scripts.CANCEL)

    # ------------------------------------------------------------------ calls
    async def open_call(self, call_id: str) -> None:
        """Mark a call live: workers only run jobs and deliver results for live calls."""
        check_id(call_id, "call_id")
        self._live.add(call_id)
        self._state(call_id).closed = False
        await self._rc.call("open_call", lambda r: r.sadd(self.keys.live, call_id))

    async def cancel_call(self, call_id: str, reason: str = "call ended") -> int:
        """End a call: unmark it live, cancel its unfinished jobs, let its keys expire.

        Returns how many of its jobs were unfinished (queued or running) when it ended.
        """
        check_id(call_id, "call_id")
        self._live.discard(call_id)
        job_ids: list[str] = sorted(
            await self._rc.call("cancel_call", lambda r: r.smembers(self.keys.call_jobs(call_id)))
        )

        async def statuses(r: Any) -> list[str | None]:
            async with r.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(self.keys.job(job_id), "status")
                return await pipe.execute()

        before = await self._rc.call("cancel_call", statuses) if job_ids else []
        unfinished = sum(1 for s in before if s in (JobStatus.QUEUED, JobStatus.RUNNING))
        # Not live first: from here on no worker starts a job or writes a result for it.
        await self._rc.call("cancel_call", lambda r: r.srem(self.keys.live, call_id))
        for job_id in job_ids:
            await self.cancel(job_id, reason)
        ttl = self.ended_ttl_s

        async def expire(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                pipe.expire(self.keys.results(call_id), ttl)
                pipe.expire(self.keys.call_jobs(call_id), ttl)
                return await pipe.execute()

        await self._rc.call("cancel_call", expire)
        self._drop_local(call_id)
        return unfinished

    def forget_call(self, call_id: str) -> None:
        """Drop a call's local state without Redis (when :meth:`cancel_call` could not reach it):
        no overdue failures are made up for it and its results() iterator ends."""
        self._live.discard(call_id)
        self._drop_local(call_id)

    def _drop_local(self, call_id: str) -> None:
        """Forget a call's pending jobs and end its results() iterator."""
        for job_id in [j for j, req in self._pending.items() if req.call_id == call_id]:
            del self._pending[job_id]
        state = self._calls.pop(call_id, None)
        if state is not None:
            state.closed = True
            state.wake.set()

    # ------------------------------------------------------------------ jobs
    async def submit(self, request: JobRequest) -> str:
        """Queue a job; raises :class:`JobError` for an invalid one. Returns its job id."""
        request.validate(kinds=self.kinds, max_args_bytes=self.max_args_bytes)
        await self._maybe_recover()
        # Recorded before the write: a restart right after it must still find this job. While
        # the write (and its retries) is in flight, recovery leaves the job alone: the write
        # itself lands it on whichever server answers.
        self._pending[request.job_id] = request
        self._submitting.add(request.job_id)
        try:
            await self._enqueue(request)
        except BaseException:
            self._pending.pop(request.job_id, None)
            raise
        finally:
            self._submitting.discard(request.job_id)
        self.stats["submitted"] += 1
        return request.job_id

    async def _enqueue(self, request: JobRequest) -> None:
        keys, ttl = self.keys, self.state_ttl_s
        status = {
            "status": JobStatus.QUEUED.value,
            "kind": request.kind,
            "call_id": request.call_id,
            "deadline": repr(request.deadline),
            "attempt": request.attempt,
            "submitted_at": repr(time.time()),
            "urgent": int(request.urgent),
        }

        async def write(r: Any) -> Any:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(keys.job(request.job_id), mapping=status)
                pipe.expire(keys.job(request.job_id), ttl)
                pipe.sadd(keys.call_jobs(request.call_id), request.job_id)
                if request.call_id in self._live:
                    # A submit that waited out a restart can land before recovery re-announces
                    # the call; a worker would then drop the job as "call not live", unreported.
                    pipe.sadd(keys.live, request.call_id)
                pipe.expire(keys.call_jobs(request.call_id), ttl)
                pipe.xadd(
                    keys.jobs(request.kind),
                    {"job": request.to_json()},
                    maxlen=self.queue_maxlen,
                    approximate=True,
                )
                return await pipe.execute()

        await self._rc.call(f"submit {request.kind}", write)

    async def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Cancel a queued or running job. False when it is unknown or already finished.

        A queued job gets its ``cancelled`` result at once; a running one when its worker
        notices (within its poll interval) and stops the handler.
        """
        check_id(job_id, "job_id")
        info: dict[str, str] = await self._rc.call("cancel", lambda r: r.hgetall(self.keys.job(job_id)))
        if not info:
            return False
        call_id, kind = info.get("call_id", ""), info.get("kind", "")
        now = time.time()
        result = JobResult(
            job_id=job_id,
            call_id=call_id or "unknown",
            kind=kind,
            ok=False,
            value={},
            error=f"cancelled: {reason}",
            started_at=now,
            finished_at=now,
            worker="broker",
        )
        outcome = await self._rc.call(
            "cancel",
            lambda r: self._cancel_script(
                keys=[
                    self.keys.job(job_id),
                    self.keys.cancel(job_id),
                    self.keys.live,
                    self.keys.results(call_id or "unknown"),
                ],
                args=[reason, self.state_ttl_s, call_id, result.to_json(), self.result_maxlen],
            ),
        )
        if outcome:
            self.stats["cancelled"] += 1
        return bool(outcome)

    async def status(self, job_id: str) -> JobStatus | None:
        """The job's status, or None when Redis does not know it (never submitted, or expired)."""
        value = await self._rc.call("status", lambda r: r.hget(self.keys.job(job_id), "status"))
        return JobStatus(value) if value else None

    async def info(self, job_id: str) -> dict[str, str]:
        """The whole status hash of a job (status, kind, call_id, deliveries, error, worker, ...)."""
        return await self._rc.call("info", lambda r: r.hgetall(self.keys.job(job_id)))

    async def queue_depth(self, kind: str) -> int:
        """Jobs of ``kind`` not yet finished by a worker: undelivered (lag) plus pending."""
        check_kind(kind, self.kinds)
        stream = self.keys.jobs(kind)

        async def depth(r: Any) -> int:
            try:
                groups = await r.xinfo_groups(stream)
            except rexc.ResponseError:  # no such stream yet
                return 0
            for group in groups:
                if group.get("name") == GROUP:
                    lag = group.get("lag")
                    if lag is None:  # Redis can't tell after trims/deletes: count the stream
                        lag = max(0, await r.xlen(stream) - int(group.get("entries-read") or 0))
                    return int(lag) + int(group.get("pending", 0))
            return int(await r.xlen(stream))  # no worker has attached yet: all of it waits

        return await self._rc.call("queue_depth", depth)

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The newest ``count`` dead letters, newest first."""
        entries = await self._rc.call(
            "dead_letters", lambda r: r.xrevrange(self.keys.dead, "+", "-", count=count)
        )
        letters = []
        for entry_id, fields in entries:
            letters.append(
                DeadLetter(
                    entry_id=entry_id,
                    error=fields.get("error", ""),
                    payload=fields.get("payload", ""),
                    source=fields.get("source", ""),
                    job_id=fields.get("job_id") or None,
                    kind=fields.get("kind") or None,
                    at=float(fields.get("at", 0) or 0),
                )
            )
        return letters

    async def counters(self) -> dict[str, int]:
        """Deployment-wide counters the workers keep in ``{prefix}:stats`` (retried, reclaimed,
        dead_letters, dropped_results); empty after a restart of a Redis without persistence."""
        raw: dict[str, str] = await self._rc.call("counters", lambda r: r.hgetall(self.keys.stats))
        return {k: int(v) for k, v in raw.items() if str(v).lstrip("-").isdigit()}

    async def consumers(self, kind: str) -> list[dict[str, Any]]:
        """The worker consumers attached to ``kind``'s stream (name, pending, idle ms ...)."""
        check_kind(kind, self.kinds)
        stream = self.keys.jobs(kind)

        async def read(r: Any) -> list[dict[str, Any]]:
            try:
                return list(await r.xinfo_consumers(stream, GROUP))
            except rexc.ResponseError:  # no stream or no group yet: no worker ever attached
                return []

        return await self._rc.call("consumers", read)

    @property
    def pending(self) -> dict[str, JobRequest]:
        """Jobs submitted by this broker whose result has not been yielded yet (read-only view)."""
        return dict(self._pending)

    # ------------------------------------------------------------------ results
    async def results(self, call_id: str, *, block_ms: int = 1_000) -> AsyncIterator[JobResult]:
        """Yield the results of a call as they arrive, each job id at most once.

        Runs until the call is ended with :meth:`cancel_call` or the consumer stops iterating.
        Reads with XREAD BLOCK from the last seen entry id, so a reconnect resumes where it
        left off; after a server restart it re-reads from the start (duplicates are dropped).
        Use one iterator per call per broker.
        """
        check_id(call_id, "call_id")
        state = self._state(call_id)
        key = self.keys.results(call_id)
        while True:
            await self._maybe_recover()
            self._sweep_overdue()
            while state.local:
                result = state.local.popleft()
                if self._accept(state, result):
                    yield result
            if state.closed:
                return
            state.wake.clear()
            # Blocking read raced with a local wake-up (a made-up result or the call ending).
            read = asyncio.ensure_future(
                self._rc.call(
                    "results",
                    lambda r: r.xread({key: state.last_id}, count=100, block=block_ms),
                )
            )
            waker = asyncio.ensure_future(state.wake.wait())
            try:
                await asyncio.wait({read, waker}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # the consumer went away: leave no read behind
                read.cancel()
                raise
            finally:
                waker.cancel()
            if not read.done():  # woken locally: drop the read, serve the local results
                read.cancel()
                await asyncio.wait({read})
                continue
            for _stream, entries in read.result() or []:
                for entry_id, fields in entries:
                    state.last_id = entry_id
                    try:
                        result = JobResult.from_json(fields.get("result", ""))
                    except JobError as exc:
                        self.stats["malformed_results"] += 1
                        log.warning("call %s: skipping malformed result %s: %s", call_id, entry_id, exc)
                        continue
                    if self._accept(state, result):
                        yield result

    def _state(self, call_id: str) -> _CallState:
        state = self._calls.get(call_id)
        if state is None:
            state = self._calls[call_id] = _CallState()
        return state

    def _accept(self, state: _CallState, result: JobResult) -> bool:
        if result.job_id in state.seen:
            self.stats["duplicates"] += 1
            log.debug("dropping duplicate result of job %s", result.job_id)
            return False
        state.seen[result.job_id] = None
        if len(state.seen) > _SEEN_KEEP:
            state.seen.popitem(last=False)
        self._pending.pop(result.job_id, None)
        self.stats["results"] += 1
        return True

    def _report(self, request: JobRequest, error: str) -> None:
        """Hand a made-up failure to the call's results() iterator."""
        self._pending.pop(request.job_id, None)
        state = self._state(request.call_id)
        state.local.append(JobResult.failure(request, error, worker="broker"))
        state.wake.set()

    def _sweep_overdue(self) -> None:
        cutoff = time.time() - self.result_grace_s
        for request in [r for r in self._pending.values() if r.deadline < cutoff]:
            self.stats["overdue"] += 1
            log.warning(
                "job %s (%s) has no result %.1f s after its deadline",
                request.job_id,
                request.kind,
                self.result_grace_s,
            )
            self._report(request, f"timeout: no result within {self.result_grace_s:g} s of the deadline")

    # ------------------------------------------------------------------ recovery
    async def _maybe_recover(self) -> None:
        if self._rc.generation == self._recovered_generation:
            return
        async with self._recover_lock:
            generation = self._rc.generation
            if generation == self._recovered_generation:
                return
            await self._recover()
            self._recovered_generation = generation

    async def _recover(self) -> None:
        """After a reconnect: re-announce live calls and account for every pending job."""
        if self._rc.restarts != self._seen_restarts:
            self._seen_restarts = self._rc.restarts
            for state in self._calls.values():
                state.last_id = "0-0"  # the result streams are new; their ids may be lower
        if self._live:
            live = sorted(self._live)
            await self._rc.call("recover", lambda r: r.sadd(self.keys.live, *live))
        pending = [r for r in self._pending.values() if r.job_id not in self._submitting]
        if not pending:
            return

        # "call_id" is written only by submit: a hash a worker re-created after the restart
        # (a delivery count, a result dropped before the call was re-announced) has none.
        async def exists(r: Any) -> list[int]:
            async with r.pipeline(transaction=False) as pipe:
                for request in pending:
                    pipe.hexists(self.keys.job(request.job_id), "call_id")
                return await pipe.execute()

        found = await self._rc.call("recover", exists)
        now = time.time()
        lost = [req for req, present in zip(pending, found, strict=True) if not present]
        for request in lost:
            if self.on_lost == "resubmit" and request.deadline > now:
                retry = request.retry()
                self._pending[request.job_id] = retry
                await self._enqueue(retry)
                self.stats["resubmitted"] += 1
                log.warning("job %s (%s) was lost with redis; resubmitted", request.job_id, request.kind)
            else:
                self.stats["lost"] += 1
                log.warning("job %s (%s) was lost with redis; reported failed", request.job_id, request.kind)
                self._report(request, LOST_ERROR)
        if lost:
            log.warning("recovered %d of %d pending jobs after a redis restart", len(lost), len(pending))

    async def ping(self) -> bool:
        return bool(await self._rc.call("ping", lambda r: r.ping()))

    async def close(self) -> None:
        await self._rc.close()

    async def __aenter__(self) -> JobBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
