"""Background jobs of one call, as the engine sees them: routing a caller's request to jobs, and
the one door their results come back through.

A result's speech is prepared as soon as it arrives; the floor policy picks the moment to say
it (``waiting`` / ``urgent`` feed ``FloorState``), and ``pop`` hands over the first one whose
speech is ready.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from presence.bot.jobs.types import JobResult
from presence.bot.reply import ReplyTask
from presence.events import Ev, EventLog

if TYPE_CHECKING:
    from presence.bot.jobs.call_jobs import CallJobs

Spawn = Callable[[Coroutine[Any, Any, Any], str], object]


class CallResults:
    def __init__(self, events: EventLog, make_reply: Callable[[str], ReplyTask], spawn: Spawn) -> None:
        self.events = events
        self.make_reply = make_reply
        self.spawn = spawn
        self.jobs: CallJobs | None = None  # set by the session when background jobs are on
        self._results: deque[tuple[JobResult, ReplyTask]] = deque()
        self._urgent: set[str] = set()
        self.routed: frozenset[str] = frozenset()  # kinds the last route() dispatched
        # results awaited by the call itself (a meeting's notes), never spoken
        self.collect: dict[str, asyncio.Future[JobResult]] = {}

    @property
    def waiting(self) -> bool:
        return bool(self._results)

    @property
    def urgent(self) -> bool:
        return any(r.job_id in self._urgent for r, _ in self._results)

    def replies(self) -> Iterator[ReplyTask]:
        return (reply for _, reply in self._results)

    def clear(self) -> None:
        self._results.clear()
        self._urgent.clear()

    def route(self, text: str, skip: frozenset[str] = frozenset()) -> str | None:
        """Dispatch the jobs the caller asked for (not those of a kind in ``skip``); returns
        what to say instead of a reply. ``routed`` keeps the kinds just dispatched."""
        jobs = self.jobs
        self.routed = frozenset()
        if jobs is None:
            return None
        if jobs.is_cancel_request(text) and jobs.unfinished():
            self.spawn(jobs.cancel_all("the caller said never mind"), "jobs-cancel")
            return "Okay, I've stopped that."
        requests = [r for r in jobs.route(text) if r.kind not in skip]
        if not requests:
            return None
        self.routed = frozenset(r.kind for r in requests)
        self._urgent.update(r.job_id for r in requests if r.urgent)
        self.spawn(jobs.dispatch(requests), "jobs-dispatch")
        for request in requests:
            self.events.emit(Ev.JOB_DISPATCHED, job_id=request.job_id, kind=request.kind)
        return jobs.acknowledgement(requests)

    def add(self, result: JobResult) -> bool:
        """A result came back; its speech starts rendering now. False: nothing to say."""
        waiting = self.collect.pop(result.job_id, None)
        if waiting is not None:
            if not waiting.done():
                waiting.set_result(result)
            return False
        text = self.jobs.speakable(result) if self.jobs is not None else ""
        if not text:
            return False
        self._results.append((result, self.make_reply(text)))
        return True

    def pop(self) -> tuple[JobResult, ReplyTask]:
        # The first result whose speech is ready goes first: no silence while another renders.
        ready = next((i for i, (_, r) in enumerate(self._results) if r.utterance.segments), 0)
        result, reply = self._results[ready]
        del self._results[ready]
        self._urgent.discard(result.job_id)
        self.events.emit(Ev.JOB_RESULT_INJECTED, job_id=result.job_id, kind=result.kind, ok=result.ok)
        return result, reply
