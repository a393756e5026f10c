"""Streaming inference: per-call slots over one shared model, batched across calls.

``InteractionStreamer`` owns a preallocated :class:`~presence.model.modeling.StreamCache` with
``max_slots`` call slots (plus one scratch slot that padding rows write to). Each call takes a
slot (``allocate``), and every micro-turn ``step`` advances a batch of slots by one micro-turn in
one forward. The cache is a ring of ``window_turns`` micro-turns per slot plus a few memory
averages, so memory and step time per call are constant over a call of any length. On CUDA the
step is captured once per batch-size bucket (1, 2, 4, ... up to ``max_slots``) into a CUDA graph
over static buffers: a replay is a handful of host-to-device copies, one graph launch and one
device-to-host copy of the results, no host syncs inside. On CPU the very same
``forward_step`` runs eagerly.

``ModelFloorPolicy`` is a ``seams.FloorPolicy`` that owns one slot. ``step(turn, state)`` runs a
forward of its own (batch of one) synchronously; ``await decide(turn, state)`` goes through a
``BatchedScheduler``, which gathers the requests of every call that arrive within a short
window and runs ONE batched forward in an executor, so the event loop never waits on the model.

The engine awaits ``policy.decide(turn, state)`` every micro-turn (the one ``FloorPolicy``
protocol); ``on_frame`` stays synchronous (the hold reflex of ``RuleBasedPolicy``). Create one
``InteractionStreamer`` and one ``BatchedScheduler`` per process (``shared_scheduler``), one
``ModelFloorPolicy`` per call (``build_model_policy``); the engine calls ``policy.close()`` when
the call ends so that its slot is freed.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from presence.bot.policy import RuleBasedPolicy, RuleParams
from presence.config import Settings
from presence.model.configuration import EVENT_NAMES, FLOOR_ACTIONS
from presence.model.inputs import TurnArrays, encode_turn, stack_turns
from presence.model.modeling import PresenceInteractionModel
from presence.seams import Action, Floor, FloorState, MicroTurn

_IDX = {name: i for i, name in enumerate(FLOOR_ACTIONS)}


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """What the model says about one micro-turn of one call."""

    action: Action
    probs: dict[str, float]  # softmax over FLOOR_ACTIONS
    vap: np.ndarray  # (vap_bins, 2) voice-activity probabilities ahead: [:, 0] caller, [:, 1] bot
    alert: float  # probability that the video shows something the bot should react to


@dataclass(frozen=True, slots=True)
class DecodeParams:
    """How probabilities become an ``Action`` (only actions valid in the state are eligible)."""

    speak_threshold: float = 0.5  # share of SPEAK among the not-speaking actions
    yield_threshold: float = 0.5  # share of YIELD among continue/yield
    interrupt_threshold: float = 0.5
    backchannel_threshold: float = 0.5
    resume_silence_ms: float = 200.0  # a held bot resumes once the caller is this quiet
    backchannel_gap_s: float = 4.0
    backchannel_text: str = "mm-hm"


def decode_params_of(config: object) -> DecodeParams:
    """The thresholds calibrated at training time (``config.decode_params``), else defaults."""
    saved = getattr(config, "decode_params", None) or {}
    known = set(DecodeParams.__dataclass_fields__)
    return DecodeParams(**{k: v for k, v in dict(saved).items() if k in known})


def decide_action(probs: np.ndarray, state: FloorState, turn_start: float, p: DecodeParams) -> Action:
    """Pick the action from the model's probabilities, constrained by what the state allows:
    continue/yield while the bot talks (HOLD/RESUME when the reflex holds it), listen/speak/
    backchannel/interrupt otherwise."""
    if state.bot_speaking or state.bot_held:
        cont, yld = float(probs[_IDX["continue"]]), float(probs[_IDX["yield"]])
        if yld / max(cont + yld, 1e-9) > p.yield_threshold:
            return Action(Floor.YIELD, reason="model: barge-in")
        if state.bot_held:
            # The model says "not a real barge-in": resume once the caller is quiet again.
            if state.caller_silence_ms >= p.resume_silence_ms:
                return Action(Floor.RESUME, reason="model: backchannel or noise")
            return Action(Floor.HOLD)
        return Action(Floor.CONTINUE)
    names = ("listen", "backchannel", "speak", "interrupt")
    sub = np.array([probs[_IDX[n]] for n in names], dtype=np.float64)
    sub = sub / max(float(sub.sum()), 1e-9)
    share = dict(zip(names, sub.tolist(), strict=True))
    if share["interrupt"] > p.interrupt_threshold:
        return Action(Floor.INTERRUPT, reason="model: urgent result")
    # SPEAK needs something to answer: the engine prepares a reply from the caller's words.
    if share["speak"] > p.speak_threshold and state.caller_spoke:
        return Action(Floor.SPEAK, reason="model: end of turn")
    if (
        share["backchannel"] > p.backchannel_threshold
        and turn_start - state.last_backchannel_at >= p.backchannel_gap_s
    ):
        return Action(Floor.BACKCHANNEL, text=p.backchannel_text)
    return Action(Floor.LISTEN)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    slots: torch.Tensor
    output: torch.Tensor


class InteractionStreamer:
    """Per-call slots with a ring-buffer KV cache over one shared model. Thread-safe."""

    def __init__(
        self,
        model: PresenceInteractionModel,
        max_slots: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool | None = None,
        decode: DecodeParams | None = None,
    ) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be at least 1")
        if model.config.num_events != len(EVENT_NAMES):
            raise ValueError(
                f"the model reads {model.config.num_events} event tokens, this code makes "
                f"{len(EVENT_NAMES)} ({', '.join(EVENT_NAMES)}): retrain or use a matching checkpoint"
            )
        dev = torch.device(device) if device is not None else model.device
        self.model = model.to(device=dev, dtype=dtype).eval() if dtype else model.to(dev).eval()
        self.config = model.config
        self.device = dev
        self.max_slots = max_slots
        self.scratch = max_slots  # padding rows of a CUDA-graph bucket write here
        self.cache = self.model.new_cache(max_slots + 1, dev)
        self.decode = decode or decode_params_of(self.config)
        self._free = list(range(max_slots))
        heapq.heapify(self._free)
        self._owners: dict[int, str | None] = {}
        self._lock = threading.RLock()
        use_graphs = dev.type == "cuda" and torch.cuda.is_available()
        self.cuda_graphs = use_graphs if cuda_graphs is None else (cuda_graphs and use_graphs)
        self._graphs: dict[int, _Graph] = {}
        self._pool: object = None
        self.steps = 0

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs: object) -> InteractionStreamer:
        from presence.model import load_pretrained

        return cls(load_pretrained(path), **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ slots
    def allocate(self, call_id: str | None = None) -> int:
        """Take a free slot (lowest first), reset, for a new call."""
        with self._lock:
            if not self._free:
                raise RuntimeError(
                    f"all {self.max_slots} model slots are in use; raise max_slots or max_calls"
                )
            slot = heapq.heappop(self._free)
            self._owners[slot] = call_id
            self._reset(slot)
            return slot

    def reset(self, slot: int) -> None:
        """Forget everything a slot heard (the same call starts over)."""
        with self._lock:
            self._check_slot(slot)
            self._reset(slot)

    def free(self, slot: int) -> None:
        with self._lock:
            self._check_slot(slot)
            del self._owners[slot]
            heapq.heappush(self._free, slot)

    @property
    def active_slots(self) -> list[int]:
        with self._lock:
            return sorted(self._owners)

    def turns_seen(self, slot: int) -> int:
        with self._lock:
            self._check_slot(slot)
            return int(self.cache.count[slot].item())

    def _reset(self, slot: int) -> None:
        self.cache.reset_(torch.tensor([slot], device=self.device))

    def _check_slot(self, slot: int) -> None:
        if slot not in self._owners:
            raise KeyError(f"model slot {slot} is not allocated")

    @property
    def bytes_per_slot(self) -> int:
        return self.cache.nbytes // (self.max_slots + 1)

    # ------------------------------------------------------------------ stepping
    def step(self, batch: Sequence[tuple[int, MicroTurn, FloorState]]) -> list[ModelOutput]:
        """Advance each (slot, micro-turn, floor state) by one micro-turn, in one forward."""
        if not batch:
            return []
        arrays = [encode_turn(turn, state, self.config) for _, turn, state in batch]
        return self.step_encoded(
            [slot for slot, _, _ in batch],
            arrays,
            [state for _, _, state in batch],
            [turn.start for _, turn, _ in batch],
        )

    def step_encoded(
        self,
        slots: Sequence[int],
        arrays: Sequence[TurnArrays],
        states: Sequence[FloorState],
        starts: Sequence[float],
    ) -> list[ModelOutput]:
        probs, vap, alert = self.forward_arrays(slots, stack_turns(list(arrays)))
        return [
            ModelOutput(
                action=decide_action(probs[i], states[i], starts[i], self.decode),
                probs=dict(zip(FLOOR_ACTIONS, probs[i].tolist(), strict=True)),
                vap=vap[i],
                alert=float(alert[i]),
            )
            for i in range(len(slots))
        ]

    def forward_arrays(
        self, slots: Sequence[int], inputs: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The raw step: probabilities (B, A), VAP (B, bins, 2), alert (B,) as numpy."""
        with self._lock:
            if len(set(slots)) != len(slots):
                raise ValueError("a batch may hold each slot once (one micro-turn per call per step)")
            for slot in slots:
                self._check_slot(slot)
            if self.cuda_graphs:
                packed = self._run_graph(list(slots), inputs)
            else:
                packed = self._run_eager(list(slots), inputs)
            self.steps += 1
        out = packed.float().cpu().numpy()  # the step's one device-to-host copy
        a, bins = self.config.num_actions, self.config.vap_bins
        return out[:, :a], out[:, a : a + 2 * bins].reshape(-1, bins, 2), out[:, -1]

    def _tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in inputs.items()}

    def _pack(self, action: torch.Tensor, vap: torch.Tensor, alert: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(action.float(), dim=-1)
        return torch.cat(
            (probs, torch.sigmoid(vap.float()).flatten(1), torch.sigmoid(alert.float())[:, None]), dim=1
        )

    def _run_eager(self, slots: list[int], inputs: dict[str, np.ndarray]) -> torch.Tensor:
        idx = torch.tensor(slots, device=self.device, dtype=torch.long)
        # Calls that step together usually hold slots 0..n-1 (lowest-first allocation): then
        # the cache is read through views, not gathered.
        run = (
            (slots[0], slots[0] + len(slots))
            if slots == list(range(slots[0], slots[0] + len(slots)))
            else None
        )
        action, vap, alert = self.model.forward_step(self.cache, idx, **self._tensors(inputs), contiguous=run)
        return self._pack(action, vap, alert)

    # ------------------------------------------------------------------ CUDA graphs
    def bucket(self, n: int) -> int:
        size = 1
        while size < n:
            size *= 2
        return min(size, self.max_slots) if n <= self.max_slots else n

    def _run_graph(self, slots: list[int], inputs: dict[str, np.ndarray]) -> torch.Tensor:
        n = len(slots)
        size = self.bucket(n)
        g = self._graphs.get(size) or self._capture(size)
        g.slots.fill_(self.scratch)
        g.slots[:n].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        for name, value in inputs.items():
            host = torch.from_numpy(np.ascontiguousarray(value))
            g.inputs[name][:n].copy_(host, non_blocking=True)
            g.inputs[name][n:].zero_()
        g.graph.replay()
        return g.output[:n]

    def _static_inputs(self, size: int) -> dict[str, torch.Tensor]:
        c, dev = self.config, self.device
        return {
            "caller_audio": torch.zeros(size, c.samples_per_turn, device=dev),
            "bot_audio": torch.zeros(size, c.samples_per_turn, device=dev),
            "caller_vad": torch.zeros(size, c.frames_per_turn, device=dev),
            "caller_lost": torch.zeros(size, c.frames_per_turn, device=dev),
            "video": torch.zeros(size, 3, c.image_size, c.image_size, device=dev, dtype=torch.uint8),
            "video_mask": torch.zeros(size, device=dev, dtype=torch.bool),
            "events": torch.zeros(size, c.num_events, device=dev),
        }

    def _capture(self, size: int) -> _Graph:
        inputs = self._static_inputs(size)
        slots = torch.full((size,), self.scratch, device=self.device, dtype=torch.long)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (allocator, kernels) on the scratch slot only
            for _ in range(2):
                self._pack(*self.model.forward_step(self.cache, slots, **inputs))
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._pack(*self.model.forward_step(self.cache, slots, **inputs))
        self._reset_scratch()
        g = _Graph(graph=graph, inputs=inputs, slots=slots, output=output)
        self._graphs[size] = g
        return g

    def _reset_scratch(self) -> None:
        self.cache.reset_(torch.tensor([self.scratch], device=self.device))

    def warmup(self, sizes: Sequence[int] | None = None) -> None:
        """Capture the CUDA graphs ahead of the first calls (no-op on CPU)."""
        if not self.cuda_graphs:
            return
        size = 1
        for n in sizes or []:
            self._capture(self.bucket(n))
        while not sizes and size <= self.max_slots:
            self._capture(size)
            size *= 2


# ---------------------------------------------------------------------- batching across calls
@dataclass
class _Request:
    slot: int
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
        self._registered.discard(slot)

    async def submit(self, slot: int, turn: MicroTurn, state: FloorState) -> ModelOutput:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ModelOutput] = loop.create_future()
        # The engine mutates its FloorState between ticks: keep this tick's values.
        self._pending.append(_Request(slot, turn, copy.copy(state), future))
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
        active = set(self.streamer.active_slots)
        for i, request in enumerate(batch):
            try:
                if request.slot not in active:
                    raise KeyError(f"model slot {request.slot} is not allocated")
                arrays.append(encode_turn(request.turn, request.state, self.streamer.config))
                good.append(i)
            except (ValueError, TypeError, KeyError) as exc:
                results[i] = exc
        if good:
            outputs = self.streamer.step_encoded(
                [batch[i].slot for i in good],
                arrays,
                [batch[i].state for i in good],
                [batch[i].turn.start for i in good],
            )
            for i, output in zip(good, outputs, strict=True):
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


_SHARED: dict[str, object] = {}
_SHARED_LOCK = threading.Lock()


def shared_scheduler(
    path: str | Path | None = None, max_slots: int = 64, device: str | None = None
) -> BatchedScheduler:
    """One streamer + scheduler per process (loaded lazily, offline, from the checkpoint)."""
    with _SHARED_LOCK:
        scheduler = _SHARED.get("scheduler")
        if scheduler is None:
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            streamer = InteractionStreamer.from_pretrained(path, max_slots=max_slots, device=dev)
            scheduler = _SHARED["scheduler"] = BatchedScheduler(streamer)
        return scheduler  # type: ignore[return-value]


def build_model_policy(
    settings: Settings, call_id: str | None = None, scheduler: BatchedScheduler | None = None
) -> ModelFloorPolicy:
    """A ``ModelFloorPolicy`` for one call of a server configured by ``settings``."""
    scheduler = scheduler or shared_scheduler(max_slots=settings.max_calls)
    return ModelFloorPolicy(
        scheduler.streamer, call_id=call_id, rules=RuleParams.from_settings(settings), scheduler=scheduler
    )
