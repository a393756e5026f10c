"""One call's background jobs (:class:`CallJobs`): route the caller's words to jobs, dispatch
them, cancel them, keep a table for the page, and deliver each result once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from presence.bot.jobs.redisio import RedisUnavailable
from presence.bot.jobs.router import ToolRouter, is_cancel_request
from presence.bot.jobs.speech import acknowledgement, speakable
from presence.bot.jobs.types import JobError, JobRequest, JobResult, JobStatus

if TYPE_CHECKING:
    from presence.bot.jobs.bridge import JobBridge

log = logging.getLogger(__name__)

Deliver = Callable[[JobResult], object]  # may return an awaitable: it is then run as a task
ChangeListener = Callable[[dict[str, str]], None]


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
