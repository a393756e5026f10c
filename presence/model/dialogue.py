"""A generated call as arrays (``Dialogue``), cut into the engine's micro-turns
(``microturns``), and the ``FloorState`` the engine would hold at each of them
(``StateTracker``): what training, evaluation and the tests all read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presence.bot.caller_state import CallerState
from presence.model.configuration import EVENT_NAMES
from presence.seams import FloorState, MicroTurn, VideoFrame

MT_S = 0.2  # micro-turn
MT_SAMPLES = 3200


@dataclass
class Dialogue:
    """One generated call; per-micro-turn arrays have N = len(caller) // 3200 rows."""

    caller: np.ndarray  # (S,) float32 microphone mix
    bot: np.ndarray  # (S,) float32 the bot's output
    vad: np.ndarray  # (F,) float32 Silero probability per 20 ms frame
    lost: np.ndarray  # (F,) bool
    video: np.ndarray  # (N, 3, 64, 64) uint8 (zeros where no frame)
    video_mask: np.ndarray  # (N,) bool
    events: np.ndarray  # (N, E) float32
    actions: np.ndarray  # (N,) int64 index into FLOOR_ACTIONS
    vap: np.ndarray  # (N, bins, 2) float32, -1 = unknown
    alert: np.ndarray  # (N,) float32, -1 = no video
    meta: dict[str, Any] = field(default_factory=dict)
    # The end-of-turn teacher (model.teacher.eot_tracks): the answer as served, and as a target.
    eot: np.ndarray | None = None  # (N,) float32, -1 = none
    eot_target: np.ndarray | None = None  # (N,) float32, -1 = none

    @property
    def turns(self) -> int:
        return int(self.actions.shape[0])

    @property
    def bot_speaking(self) -> np.ndarray:
        return self.events[:, EVENT_NAMES.index("bot_speaking")] > 0

    @property
    def bot_held(self) -> np.ndarray:
        return self.events[:, EVENT_NAMES.index("bot_held")] > 0

    @property
    def reply_ready(self) -> np.ndarray:
        return self.events[:, EVENT_NAMES.index("reply_ready")] > 0

    def signals(self) -> dict[str, np.ndarray]:
        """The audio, VAD, loss and video arrays of ``inputs`` (no events)."""
        n = self.turns
        return {
            "caller_audio": self.caller[: n * MT_SAMPLES].reshape(n, MT_SAMPLES),
            "bot_audio": self.bot[: n * MT_SAMPLES].reshape(n, MT_SAMPLES),
            "caller_vad": self.vad[: n * 10].reshape(n, 10),
            "caller_lost": self.lost[: n * 10].reshape(n, 10).astype(np.float32),
            "video": self.video,
            "video_mask": self.video_mask,
        }

    def inputs(self) -> dict[str, np.ndarray]:
        """Arrays for ``PresenceInteractionModel.forward`` (no batch axis)."""
        return {**self.signals(), "events": self.all_events()}

    def all_events(self) -> np.ndarray:
        """(N, len(EVENT_NAMES)) event tokens as served: ``event_flags`` of the ``FloorState``
        that ``StateTracker`` steps (the engine's caller tracking, the teacher's answers, the
        words), so training reads exactly what a call gives the model."""
        from presence.model.inputs import event_flags

        tracker = StateTracker(self)
        return np.stack(
            [event_flags(turn.events, tracker.update(k, turn)) for k, turn in enumerate(microturns(self))]
        ).astype(np.float32)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp,
            caller=np.round(np.clip(self.caller, -1, 1) * 32767).astype(np.int16),
            bot=np.round(np.clip(self.bot, -1, 1) * 32767).astype(np.int16),
            vad=self.vad.astype(np.float16),
            lost=self.lost,
            video=self.video,
            video_mask=self.video_mask,
            events=self.events.astype(np.uint8),
            actions=self.actions.astype(np.int8),
            vap=self.vap.astype(np.float16),
            alert=self.alert.astype(np.int8),
            meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8),
            **({} if self.eot is None else {"eot": self.eot, "eot_target": self.eot_target}),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Dialogue:
        with np.load(path) as z:
            return cls(
                caller=z["caller"].astype(np.float32) / 32767.0,
                bot=z["bot"].astype(np.float32) / 32767.0,
                vad=z["vad"].astype(np.float32),
                lost=z["lost"].astype(bool),
                video=z["video"],
                video_mask=z["video_mask"].astype(bool),
                events=z["events"].astype(np.float32),
                actions=z["actions"].astype(np.int64),
                vap=z["vap"].astype(np.float32),
                alert=z["alert"].astype(np.float32),
                meta=json.loads(bytes(z["meta"]).decode()),
                eot=z["eot"].astype(np.float32) if "eot" in z else None,
                eot_target=z["eot_target"].astype(np.float32) if "eot_target" in z else None,
            )


def microturns(d: Dialogue, call_id: str = "synthetic") -> list[MicroTurn]:
    """The dialogue as the engine's micro-turns (what a FloorPolicy receives)."""
    arrays = d.signals()
    out = []
    for k in range(d.turns):
        video: tuple[VideoFrame, ...] = ()
        if d.video_mask[k]:
            video = (VideoFrame(k * MT_S, "caller", np.ascontiguousarray(d.video[k].transpose(1, 2, 0))),)
        arrived = any(k * MT_S <= r < (k + 1) * MT_S for r, _ in d.meta["urgent"])
        events = ("job_result_injected",) if arrived else ()
        out.append(
            MicroTurn(
                call_id=call_id,
                index=k,
                start=k * MT_S,
                duration=MT_S,
                caller_audio=arrays["caller_audio"][k],
                bot_audio=arrays["bot_audio"][k],
                lost=d.lost[k * 10 : (k + 1) * 10],
                vad=arrays["caller_vad"][k],
                video=video,
                speaking=("caller",) if (arrays["caller_vad"][k] >= 0.5).any() else (),
                events=events,
            )
        )
    return out


class StateTracker:
    """The engine's ``FloorState`` over a scripted dialogue: the caller fields come from the
    very ``CallerState`` the engine steps (``presence.bot.caller_state``), bot speaking/held/
    reply-ready from the script. The utterance ends when the bot takes the turn, or when a
    held bot resumes (the backchannel path), as in the engine. ``partial_text`` gets the
    script's words 0.6 s late, like a streaming ASR's partials."""

    def __init__(self, d: Dialogue, threshold: float = 0.5, asr_delay_s: float = 0.6) -> None:
        self.d = d
        self.asr_delay = asr_delay_s
        self.state = FloorState()
        self.caller = CallerState(threshold)
        self._prev_bot = False
        self._prev_held = False
        self._words: list[tuple[float, str]] = []
        for s, e, text in d.meta["utterances"]:
            words = text.split()
            for i, w in enumerate(words):
                self._words.append((s + (e - s) * (i + 1) / len(words), w))
        self._words.sort()

    def update(self, k: int, turn: MicroTurn) -> FloorState:
        s, d = self.state, self.d
        bot, held = bool(d.bot_speaking[k]), bool(d.bot_held[k])
        if (bot and not self._prev_bot) or (self._prev_held and not held and bot):
            self.caller.end_utterance()
        s.bot_speaking, s.bot_held = bot, held
        self.caller.step(turn, s)
        utt_start = self.caller.utt_start
        if utt_start is not None:
            heard = turn.end - self.asr_delay
            s.partial_text = " ".join(w for t, w in self._words if utt_start - 0.1 <= t <= heard)
        else:
            s.partial_text = ""
        s.eot_probability = None if d.eot is None or d.eot[k] < 0 else float(d.eot[k])
        s.reply_ready = bool(d.reply_ready[k])
        s.result_waiting = bool(d.events[k, EVENT_NAMES.index("result")])
        s.result_urgent = bool(d.events[k, EVENT_NAMES.index("result_urgent")])
        self._prev_bot, self._prev_held = bot, held
        return s
