"""Batching across calls, and the floor policy that owns one slot of the shared model.

``ModelFloorPolicy`` is a ``seams.FloorPolicy`` that owns one slot of an ``InteractionStreamer``.
``step(turn, state)`` runs a forward of its own (batch of one) synchronously; ``await
decide(turn, state)`` goes through a ``BatchedScheduler``, which gathers the requests of every
call and runs ONE batched forward in an executor, so the event loop never waits on the model.
Every call's micro-turns end on one grid of the process clock (``clock.on_grid``, setting
``microturn_grid``), so the requests of a tick arrive together and the flush waits for no timer.

The engine awaits ``policy.decide(turn, state)`` every micro-turn (the one ``FloorPolicy``
protocol); ``on_frame`` stays synchronous (the hold reflex of ``RuleBasedPolicy``). One
``InteractionStreamer`` and one ``BatchedScheduler`` per checkpoint per process
(``shared_scheduler``), one ``ModelFloorPolicy`` per call (``build_model_policy``); the engine
calls ``policy.close()`` when the call ends, which fails the call's pending requests and frees its
slot (a request already in a batch is refused by its lease, never run on the slot's next call).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from presence.bot.policy import RuleBasedPolicy, RuleParams
from presence.config import Settings
from presence.model.inputs import TurnArrays, encode_turn
from presence.model.streaming import InteractionStreamer, ModelOutput
from presence.seams import Action, FloorState, MicroTurn


# ---------------------------------------------------------------------- batching across calls
@dataclass
class _Request:
    slot: int
    lease: int
    turn: MicroTurn
    state: FloorState
    future: asyncio.Future[ModelOutput]


@dataclass
class SchedulerStats:
    batches: int = 0
    requests: int = 0
    sizes: Counter[int] = field(default_factory=Counter)


class BatchedScheduler:
    """Gathers the step requests of all calls and runs one batched forward per flush.

    A flush happens as soon as every registered slot has a request pending, or ``max_wait_s``
    after the first pending request (calls tick on their own clocks, so a late call must not
    hold the others). The forward runs in a single-thread executor: the event loop never
    blocks on it, and requests arriving meanwhile form the next batch. Each request is
    encoded separately, so one call's bad micro-turn fails only that call's future.
    """

    def __init__(
        self,
        streamer: InteractionStreamer,
        max_wait_s: float = 0.02,
        executor: Executor | None = None,
    ) -> None:
        self.streamer = streamer
        self.max_wait_s = max_wait_s
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="presence-model")
        self._registered: set[int] = set()
        self._pending: list[_Request] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None
        self.stats = SchedulerStats()

    def register(self, slot: int) -> None:
        self._registered.add(slot)

    def unregister(self, slot: int) -> None:
        """The call of ``slot`` ended: its pending requests fail now, never run on a reused slot."""
        self._registered.discard(slot)
        for request in self._pending:
            if request.slot == slot and not request.future.done():
                request.future.set_exception(KeyError(f"model slot {slot} was freed (its call ended)"))
        self._pending = [r for r in self._pending if r.slot != slot]

    async def submit(self, slot: int, turn: MicroTurn, state: FloorState) -> ModelOutput:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ModelOutput] = loop.create_future()
        # The engine mutates its FloorState between ticks: keep this tick's values.
        self._pending.append(_Request(slot, self.streamer.lease(slot), turn, copy.copy(state), future))
        self._kick(loop)
        return await future

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._running is not None or not self._pending:
            return  # the batch in flight kicks again when it finishes
        pending = {r.slot for r in self._pending}
        if (self._registered and self._registered <= pending) or len(pending) >= self.streamer.max_slots:
            self._flush(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait_s, self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running is not None or not self._pending:
            return
        batch: list[_Request] = []
        rest: list[_Request] = []
        seen: set[int] = set()
        for request in self._pending:
            if request.future.done():
                continue  # its caller was cancelled
            # One micro-turn per slot per forward; a second (a tick overran) waits its turn.
            (rest if request.slot in seen else batch).append(request)
            seen.add(request.slot)
        self._pending = rest
        if batch:
            self._running = loop.create_task(self._run(batch, loop))

    async def _run(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self._work, batch)
            for request, result in zip(batch, results, strict=True):
                if request.future.done():
                    continue
                if isinstance(result, BaseException):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)
        except Exception as exc:  # the forward itself failed: every request learns why
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
        finally:
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.sizes[len(batch)] += 1
            self._running = None
            self._kick(loop)

    def _work(self, batch: list[_Request]) -> list[ModelOutput | BaseException]:
        results: list[ModelOutput | BaseException] = [ValueError("not run")] * len(batch)
        good: list[int] = []
        arrays: list[TurnArrays] = []
        for i, request in enumerate(batch):
            try:
                arrays.append(encode_turn(request.turn, request.state, self.streamer.config))
                good.append(i)
            except (ValueError, TypeError, KeyError) as exc:
                results[i] = exc
        # Under the streamer's lock from the lease check to the step: a call ending meanwhile
        # (its slot freed, maybe allocated again) fails only its own request.
        with self.streamer.lock:
            live = [i for i in good if self.streamer.holds(batch[i].slot, batch[i].lease)]
            for i in set(good) - set(live):
                results[i] = KeyError(f"model slot {batch[i].slot} was freed (its call ended)")
            if live:
                keep = set(live)
                outputs = self.streamer.step_encoded(
                    [batch[i].slot for i in live],
                    [a for i, a in zip(good, arrays, strict=True) if i in keep],
                    [batch[i].state for i in live],
                    [batch[i].turn.start for i in live],
                    [batch[i].lease for i in live],
                )
                for i, output in zip(live, outputs, strict=True):
                    results[i] = output
        return results

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._own_executor and isinstance(self._executor, ThreadPoolExecutor):
            self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------- the floor policy
class ModelFloorPolicy:
    """``seams.FloorPolicy`` backed by the interaction model; one per call, one slot each."""

    name = "model"

    def __init__(
        self,
        streamer: InteractionStreamer,
        *,
        call_id: str | None = None,
        rules: RuleParams | None = None,
        scheduler: BatchedScheduler | None = None,
    ) -> None:
        self.streamer = streamer
        self.scheduler = scheduler
        self.slot = streamer.allocate(call_id)
        # The per-frame hold reflex stays a rule: it must act within one 20 ms frame.
        self._reflex = RuleBasedPolicy(rules or RuleParams())
        self.last: ModelOutput | None = None
        if scheduler is not None:
            scheduler.register(self.slot)

    def step(self, turn: MicroTurn, state: FloorState) -> Action:
        """Synchronous single-call step (tests, offline evaluation, a one-call process)."""
        self.last = self.streamer.step([(self.slot, turn, state)])[0]
        return self.last.action

    async def decide(self, turn: MicroTurn, state: FloorState) -> Action:
        """The batched step: awaits this call's share of one forward over all calls."""
        if self.scheduler is None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.step, turn, copy.copy(state))
        self.last = await self.scheduler.submit(self.slot, turn, state)
        return self.last.action

    def on_frame(self, vad_prob: float, state: FloorState) -> Action | None:
        return self._reflex.on_frame(vad_prob, state)

    def on_evidence(self, state: FloorState) -> Action | None:
        return None  # the model decides on its own clock

    def needed_silence_ms(self, state: FloorState) -> float | None:
        return None

    def reset(self) -> None:
        self.streamer.reset(self.slot)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.unregister(self.slot)
        self.streamer.free(self.slot)


_SHARED: dict[str, BatchedScheduler] = {}
_SHARED_LOCK = threading.Lock()


def shared_scheduler(
    path: str | Path | None = None, max_slots: int = 64, device: str | None = None
) -> BatchedScheduler:
    """One streamer + scheduler per checkpoint per process (loaded lazily, offline): every
    call of the process steps in its batches."""
    key = str(Path(path).resolve()) if path else ""
    with _SHARED_LOCK:
        scheduler = _SHARED.get(key)
        if scheduler is None:
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            streamer = InteractionStreamer.from_pretrained(path, max_slots=max_slots, device=dev)
            scheduler = _SHARED[key] = BatchedScheduler(streamer)
        return scheduler


def batch_stats() -> SchedulerStats:
    """The batches of every shared scheduler of the process so far (a snapshot)."""
    total = SchedulerStats()
    with _SHARED_LOCK:
        for scheduler in _SHARED.values():
            total.batches += scheduler.stats.batches
            total.requests += scheduler.stats.requests
            total.sizes.update(scheduler.stats.sizes)
    return total


# Every size up to 64 (a CPU's worth of calls: exact medians, and "a forward served every call"
# is readable), then powers of two.
BATCH_BUCKETS = (*range(1, 65), 128, 256, 512, 1024)


class BatchSizeCollector:
    """``presence_model_batch_size``: calls served per batched forward, read at each scrape
    (the shared schedulers outlive any one app, so their stats are not pushed to a registry)."""

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import HistogramMetricFamily

        stats = batch_stats()
        cumulative = [(str(b), sum(n for size, n in stats.sizes.items() if size <= b)) for b in BATCH_BUCKETS]
        family = HistogramMetricFamily(
            "presence_model_batch_size", "Calls served per batched forward of the interaction model"
        )
        family.add_metric([], [*cumulative, ("+Inf", stats.batches)], sum_value=stats.requests)
        yield family


def build_model_policy(
    settings: Settings, call_id: str | None = None, scheduler: BatchedScheduler | None = None
) -> ModelFloorPolicy:
    """A ``ModelFloorPolicy`` for one call of a server configured by ``settings``."""
    path = settings.interaction_model or None
    scheduler = scheduler or shared_scheduler(path, max_slots=settings.max_calls)
    return ModelFloorPolicy(
        scheduler.streamer, call_id=call_id, rules=RuleParams.from_settings(settings), scheduler=scheduler
    )
