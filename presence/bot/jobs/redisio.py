"""Redis plumbing shared by the broker and the workers: key names, a client and a retry wrapper.

redis-py's own retries are switched off so that every lost connection surfaces here, is logged
once per outage and retried with backoff. A restarted server is noticed on the first new
connection by its ``run_id``: redis-py may reconnect silently when it hands out a pooled
connection, so comparing the server identity is the only reliable restart signal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from presence.config import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
GROUP = "workers"  # the consumer group on every request stream

# Errors that mean "the server is (temporarily) not there"; everything else is a real error.
RETRYABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError (server still loading)
    rexc.TimeoutError,
    ConnectionError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class Keys:
    """Every key name of one deployment; ``prefix`` keeps tests and tenants apart."""

    prefix: str = "presence"

    def jobs(self, kind: str) -> str:
        return f"{self.prefix}:jobs:{kind}"

    def results(self, call_id: str) -> str:
        return f"{self.prefix}:results:{call_id}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def call_jobs(self, call_id: str) -> str:
        return f"{self.prefix}:call:{call_id}:jobs"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def live(self) -> str:
        return f"{self.prefix}:calls:live"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float = 0.05
    max_s: float = 2.0
    give_up_s: float | None = 30.0  # None: retry forever (workers)


class RedisUnavailable(ConnectionError):
    """Redis stayed unreachable for longer than the retry budget."""


class Reconnecting:
    """One Redis client plus ``call()``, which retries connection failures with backoff.

    ``generation`` goes up whenever the server was found restarted (new ``run_id``) or came back
    after an outage; owners compare it with the generation they last recovered for.
    """

    def __init__(
        self,
        url: str = DEFAULT_REDIS_URL,
        *,
        name: str = "jobs",
        backoff: Backoff | None = None,
        socket_timeout_s: float = 10.0,
        max_connections: int = 32,
    ) -> None:
        self.url = url or DEFAULT_REDIS_URL
        self.shown_url = redact(self.url)  # for every log line and error: never the password
        self.name = name
        self.backoff = backoff or Backoff()
        self.generation = 0
        self.restarts = 0
        self.outages = 0
        self.run_id: str | None = None
        self._down_since: float | None = None
        # A blocking pool: a burst of calls waits for a free connection instead of failing
        # with "Too many connections" (which is no outage and must not look like one).
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=max_connections,
            timeout=None,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),  # our own wrapper retries, visibly
            socket_connect_timeout=2.0,
            socket_timeout=socket_timeout_s,
            redis_connect_func=self._on_connect,
        )
        self.redis: Redis = Redis(connection_pool=pool)

    async def _on_connect(self, conn: AbstractConnection) -> None:
        await conn.on_connect()
        await conn.send_command("INFO", "server")
        info = await conn.read_response()
        run_id = _parse_run_id(info)
        if run_id and self.run_id and run_id != self.run_id:
            self.restarts += 1
            self.generation += 1
            log.warning(
                "%s: redis at %s restarted (run_id %s -> %s); in-memory job state is gone",
                self.name,
                self.shown_url,
                self.run_id[:8],
                run_id[:8],
            )
        if run_id:
            self.run_id = run_id

    async def call(self, what: str, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """Run ``fn(redis)``; on a lost connection log, back off and retry until the budget ends."""
        delay = self.backoff.initial_s
        first_failure: float | None = None
        while True:
            try:
                result = await fn(self.redis)
            except RETRYABLE as exc:
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                if self._down_since is None:
                    self._down_since = now
                    self.outages += 1
                    log.warning(
                        "%s: redis at %s unreachable during %s: %s; retrying",
                        self.name,
                        self.shown_url,
                        what,
                        redact(str(exc)),
                    )
                else:
                    log.debug("%s: still unreachable during %s: %s", self.name, what, redact(str(exc)))
                give_up = self.backoff.give_up_s
                if give_up is not None and now - first_failure >= give_up:
                    raise RedisUnavailable(
                        f"redis at {self.shown_url} unreachable for {now - first_failure:.1f} s during "
                        f"{what}: {redact(str(exc))}"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff.max_s)
                continue
            if self._down_since is not None:
                log.warning(
                    "%s: redis at %s reachable again after %.2f s",
                    self.name,
                    self.shown_url,
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
                self.generation += 1  # re-check state even if the server kept its data
            return result

    async def close(self) -> None:
        await self.redis.aclose()


def _parse_run_id(info: Any) -> str | None:
    if isinstance(info, dict):
        value = info.get("run_id")
        return str(value) if value else None
    if isinstance(info, bytes):
        info = info.decode(errors="replace")
    if isinstance(info, str):
        for line in info.splitlines():
            if line.startswith("run_id:"):
                return line.split(":", 1)[1].strip()
    return None


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, rexc.ResponseError) and "NOGROUP" in str(exc)
