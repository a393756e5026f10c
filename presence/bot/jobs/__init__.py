"""Durable background jobs over Redis Streams: the broker (call side), workers and job kinds.

Quick use::

    broker = JobBroker(settings.redis_url or DEFAULT_REDIS_URL)
    await broker.open_call(call_id)
    job_id = await broker.submit(JobRequest.new(call_id, "search", {"query": "opening hours"}))
    async for result in broker.results(call_id):
        ...
    await broker.cancel_call(call_id)

In the server: ``bridge = await JobBridge.start(settings, metrics)`` picks or starts a Redis and
a worker (see ``bridge.py``); per call ``calls = await bridge.open_call(call_id, deliver)``, then
``calls.route(text)``, ``await calls.dispatch(requests)``, ``acknowledgement`` and ``speakable``.

Workers: ``presence worker --kinds search,code,think``, i.e. ``await run_worker(settings,
["search", "code", "think"])``. Handlers of the kinds live in
``search.py``, ``code.py`` and ``think.py`` and are imported only by workers that serve them.
"""

# after the above: the bridge builds on all of them
from presence.bot.jobs.bridge import JobBridge
from presence.bot.jobs.broker import LOST_ERROR, JobBroker
from presence.bot.jobs.call_jobs import CallJobs
from presence.bot.jobs.redis_server import JobsUnavailable
from presence.bot.jobs.redisio import DEFAULT_REDIS_URL, GROUP, Backoff, Keys, RedisUnavailable
from presence.bot.jobs.router import RuleToolRouter, ToolRouter, is_cancel_request
from presence.bot.jobs.speech import acknowledgement, speakable
from presence.bot.jobs.types import (
    BUILTIN_KINDS,
    DEFAULT_MAX_ARGS_BYTES,
    DeadLetter,
    JobError,
    JobRequest,
    JobResult,
    JobStatus,
    TransientJobError,
)
from presence.bot.jobs.worker import Handler, JobContext, Worker, WorkerStats, run_worker

__all__ = [
    "BUILTIN_KINDS",
    "DEFAULT_MAX_ARGS_BYTES",
    "DEFAULT_REDIS_URL",
    "GROUP",
    "LOST_ERROR",
    "Backoff",
    "CallJobs",
    "DeadLetter",
    "Handler",
    "JobBridge",
    "JobBroker",
    "JobContext",
    "JobError",
    "JobRequest",
    "JobResult",
    "JobStatus",
    "JobsUnavailable",
    "Keys",
    "RedisUnavailable",
    "RuleToolRouter",
    "ToolRouter",
    "TransientJobError",
    "Worker",
    "WorkerStats",
    "acknowledgement",
    "is_cancel_request",
    "run_worker",
    "speakable",
]
