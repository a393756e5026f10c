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

Batching across calls and the floor policy over a slot: ``presence.model.scheduler``.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    # A yield needs this much caller speech over the bot (LiveKit's min_interruption_duration):
    # a backchannel is shorter than a barge-in, whatever the probabilities say.
    min_overlap_ms: float = 0.0
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
        overlap = state.speech_over_bot_ms
        # Side talk (the addressee's judgement, which the model does not see) never takes the
        # floor from the bot, whatever the policy: the rules keep it held too.
        if (
            yld / max(cont + yld, 1e-9) > p.yield_threshold
            and overlap >= p.min_overlap_ms
            and not state.side_talk
        ):
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
        if model.config.num_events > len(EVENT_NAMES):
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
        # Each allocation gets a new lease number: a request made for a slot's earlier call
        # (freed, handed to another call meanwhile) must not step the new call's cache.
        self._leases: dict[int, int] = {}
        self._allocations = 0
        self.lock = threading.RLock()
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
        with self.lock:
            if not self._free:
                raise RuntimeError(
                    f"all {self.max_slots} model slots are in use; raise max_slots or max_calls"
                )
            slot = heapq.heappop(self._free)
            self._owners[slot] = call_id
            self._allocations += 1
            self._leases[slot] = self._allocations
            self._reset(slot)
            return slot

    def holds(self, slot: int, lease: int) -> bool:
        """The slot is still allocated to the call that took ``lease``."""
        with self.lock:
            return self._leases.get(slot) == lease

    def lease(self, slot: int) -> int:
        """The slot's current allocation number (see ``forward_arrays``)."""
        with self.lock:
            self._check_slot(slot)
            return self._leases[slot]

    def reset(self, slot: int) -> None:
        """Forget everything a slot heard (the same call starts over)."""
        with self.lock:
            self._check_slot(slot)
            self._reset(slot)

    def free(self, slot: int) -> None:
        with self.lock:
            self._check_slot(slot)
            del self._owners[slot]
            del self._leases[slot]
            heapq.heappush(self._free, slot)

    @property
    def active_slots(self) -> list[int]:
        with self.lock:
            return sorted(self._owners)

    def turns_seen(self, slot: int) -> int:
        with self.lock:
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
        leases: Sequence[int] | None = None,
    ) -> list[ModelOutput]:
        probs, vap, alert = self.forward_arrays(slots, stack_turns(list(arrays)), leases)
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
        self, slots: Sequence[int], inputs: dict[str, np.ndarray], leases: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The raw step: probabilities (B, A), VAP (B, bins, 2), alert (B,) as numpy. With
        ``leases`` (from ``lease``), a slot freed and allocated again since is refused."""
        with self.lock:
            if len(set(slots)) != len(slots):
                raise ValueError("a batch may hold each slot once (one micro-turn per call per step)")
            for i, slot in enumerate(slots):
                self._check_slot(slot)
                if leases is not None and self._leases[slot] != leases[i]:
                    raise KeyError(f"model slot {slot} was freed and now serves another call")
            if self.cuda_graphs:
                packed = self._run_graph(list(slots), inputs)
            else:
                packed = self._run_eager(list(slots), inputs)
            self.steps += 1
            # The one device-to-host copy, under the lock: a CUDA graph's output is a static
            # buffer that the next replay (another thread's step) overwrites.
            out = packed.float().cpu().numpy()
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
