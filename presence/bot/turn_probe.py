"""Asking the audio end-of-turn detector, per call, at the moments that matter.

Every VAD chunk of every participant passes through ``push``: the chunk goes into that
participant's ring of recent audio (the detector hears the speaker's own voice, not the room's
mix), and at the first silent chunk after speech (then again while the silence lasts, at most
every ``interval_s``) the detector runs in an executor on the speaker's last seconds. One query
is in flight per call at most; an answer that comes after the caller spoke again is stale and
dropped. With ``repeat=False`` (the engine reads only the first answer of a silence) one answer
per silence is enough, and asking again would only take a core from the reply. Nothing here
runs in the micro-turn tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from presence.aio import run_blocking
from presence.clock import now
from presence.media.audio import AudioTail
from presence.seams import TurnDetector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TurnProbeResult:
    probability: float
    participant: str
    silence_ms: float  # silence (chunk clock) when the audio was taken
    first: bool  # asked at the first silent chunk after speech (the prosody's own answer)
    asked_at: float
    answered_at: float


class TurnProbe:
    def __init__(
        self,
        detector: TurnDetector | None,
        on_result: Callable[[TurnProbeResult], None],
        *,
        window_s: float = 8.0,
        interval_s: float = 0.1,
        max_silence_s: float = 3.0,
        repeat: bool = True,
    ) -> None:
        self.detector = detector
        self.on_result = on_result
        self.window_s = window_s
        self.interval_s = interval_s
        self.max_silence_s = max_silence_s
        self.repeat = repeat
        self._answered_gen = -1  # the voice generation the last answer was for
        self.armed = False  # the engine arms it while a caller utterance is open and the bot is quiet
        self.queries = 0
        self.failures = 0
        self._rings: dict[str, AudioTail] = {}
        self._last_voiced: dict[str, float] = {}
        self._speaker: str | None = None
        self._voice_gen = 0  # bumped on every voiced chunk: an answer from before is stale
        self._asked_gen = -1
        self._last_query = -1e9
        self._task: asyncio.Task[None] | None = None

    @property
    def last_voiced(self) -> float:
        return max(self._last_voiced.values(), default=-1e9)

    def push(self, participant: str, audio: np.ndarray, voiced: bool, t: float) -> None:
        self._rings.setdefault(participant, AudioTail(self.window_s)).push(audio)
        if voiced:
            self._last_voiced[participant] = t
            self._speaker = participant
            self._voice_gen += 1
            return
        self._maybe_ask(t)

    def _maybe_ask(self, t: float) -> None:
        if self.detector is None or not self.armed or self._speaker is None:
            return
        if self._task is not None and not self._task.done():
            return
        silence = t - self.last_voiced
        if silence > self.max_silence_s:
            return
        first = self._asked_gen != self._voice_gen  # the first silent chunk after speech
        if not first and (
            t - self._last_query < self.interval_s
            or (not self.repeat and self._answered_gen == self._voice_gen)
        ):
            return
        ring = self._rings.get(self._speaker)
        audio = ring.chunks() if ring is not None else []
        if not audio:
            return
        self._asked_gen = self._voice_gen
        self._last_query = t
        self._task = asyncio.get_running_loop().create_task(
            self._ask(self._speaker, audio, silence * 1000, t, self._voice_gen, first), name="turn-probe"
        )

    async def _ask(
        self, speaker: str, chunks: list[np.ndarray], silence_ms: float, t: float, gen: int, first: bool
    ) -> None:
        detector = self.detector
        assert detector is not None
        self.queries += 1
        try:
            p = await run_blocking(lambda: detector.probability(np.concatenate(chunks)))
        except Exception:
            self.failures += 1
            if self.failures in (1, 10) or self.failures % 100 == 0:
                log.exception("turn detector failed (%d times); deciding on silence and words", self.failures)
            return
        if gen != self._voice_gen or not self.armed:
            return  # the caller spoke again, or the turn was taken meanwhile
        self._answered_gen = gen
        self.on_result(TurnProbeResult(float(p), speaker, silence_ms, first, t, now()))

    def remove_participant(self, participant: str) -> None:
        self._rings.pop(participant, None)
        self._last_voiced.pop(participant, None)
        if self._speaker == participant:
            self._speaker = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
