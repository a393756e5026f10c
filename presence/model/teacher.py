"""The end-of-turn teacher over a dialogue: smart-turn's P(turn complete) where the engine has it.

The engine asks the audio detector at the first silent VAD chunk after caller speech
(``bot.turn_probe``, ``eot_detector_reading="first"``) and its answer lands on
``FloorState.eot_probability`` until the caller speaks again. ``eot_tracks`` replays that over a
generated dialogue, so the model is trained on the very input it is served (``inputs.event_flags``
turns the field into the ``eot_asked`` / ``eot_complete`` event tokens), and gives a second track
for distillation: the same answer from the silence's first micro-turn on, before it arrives, so the
model learns to hear what the teacher hears in the audio itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from presence.model.dialogue import Dialogue

FRAME_S = 0.02
MT_FRAMES = 10  # 20 ms frames per 200 ms micro-turn
ANSWER_DELAY_S = 0.1  # one smart-turn run on a busy core (60-120 ms measured)
MIN_SPEECH_FRAMES = 3  # a voiced blip shorter than 60 ms is not speech the probe would judge
NONE = -1.0


class EndOfTurnModel(Protocol):
    def probability(self, audio: np.ndarray) -> float: ...


def eot_tracks(
    caller: np.ndarray, vad: np.ndarray, turns: int, detector: EndOfTurnModel, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(served, target), both (turns,) float32, ``NONE`` where absent.

    ``served[k]``: the answer the engine holds at the end of micro-turn k (asked at the first
    unvoiced 20 ms frame after speech, known ``ANSWER_DELAY_S`` later, dropped at the next voiced
    frame). ``target[k]``: that silence's answer on every micro-turn that ends inside it.
    """
    voiced = np.asarray(vad, dtype=np.float32) >= threshold
    frames = min(voiced.size, turns * MT_FRAMES)
    served = np.full(turns, NONE, np.float32)
    target = np.full(turns, NONE, np.float32)
    run = 0
    f = 0
    while f < frames:
        if voiced[f]:
            run += 1
            f += 1
            continue
        if run < MIN_SPEECH_FRAMES:
            run = 0
            f += 1
            continue
        run = 0
        end = f
        while end < frames and not voiced[end]:
            end += 1  # the silence lasts frames [f, end)
        p = float(detector.probability(caller[: (f + 1) * 320]))
        known = (f + 1) * FRAME_S + ANSWER_DELAY_S
        for k in range(f // MT_FRAMES, min(turns, -(-end // MT_FRAMES))):
            t_end = (k + 1) * MT_FRAMES
            if t_end > end:
                break  # the caller spoke again inside this micro-turn: the answer was dropped
            target[k] = p
            if (k + 1) * MT_FRAMES * FRAME_S >= known:
                served[k] = p
        f = end
    return served, target


_DETECTOR: list[EndOfTurnModel] = []


def with_teacher(d: Dialogue, detector: EndOfTurnModel | None = None) -> Dialogue:
    """Fill ``d.eot`` / ``d.eot_target`` (in place) with smart-turn's answers; returns ``d``."""
    if detector is None:
        if not _DETECTOR:
            from presence.bot.backends.turn import SmartTurnDetector

            _DETECTOR.append(SmartTurnDetector())
        detector = _DETECTOR[0]
    d.eot, d.eot_target = eot_tracks(d.caller, d.vad, d.turns, detector)
    return d
