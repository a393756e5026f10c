"""Durable background jobs over Redis Streams: the broker (call side), workers and job kinds.

Quick use::

    broker = JobBroker(settings.redis_url or DEFAULT_REDIS_URL)
    await broker.open_call(call_id)
    job_id = await broker.submit(JobRequest.new(call_id, "search", {"query": "opening hours"}))
    async for result in broker.results(call_id):
        ...
    await broker.cancel_call(call_id)

Workers: ``await run_worker(settings, ["search", "code", "think"])`` or
``python -m presence.bot.jobs --kinds search,code,think``. Handlers of the kinds live in
``search.py``, ``code.py`` and ``think.py`` and are imported only by workers that serve them.
"""

from presence.bot.jobs.broker import LOST_ERROR, JobBroker
from presence.bot.jobs.redisio import DEFAULT_REDIS_URL, GROUP, Backoff, Keys, RedisUnavailable
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
    "DeadLetter",
    "Handler",
    "JobBroker",
    "JobContext",
    "JobError",
    "JobRequest",
    "JobResult",
    "JobStatus",
    "Keys",
    "RedisUnavailable",
    "TransientJobError",
    "Worker",
    "WorkerStats",
    "run_worker",
]
