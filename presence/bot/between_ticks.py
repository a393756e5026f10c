"""The engine's decisions between micro-turns, where waiting for the next tick costs time.

Two paths run outside the 200 ms clock: the per-VAD-chunk reflex (a voice onset over the bot
holds it within one chunk, ``policy.on_frame``), and end-of-turn evidence (a turn-detector
answer, or the moment the silence it asked for is reached, may take the caller's turn at once,
``policy.on_evidence``). Both only set state and carry out an action; preparing and speaking
replies stays in the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np

from presence.bot.backends.factory import Backends
from presence.bot.caller_state import CallerState
from presence.bot.reply import plain_words
from presence.bot.turn_probe import TurnProbe, TurnProbeResult
from presence.clock import now
from presence.config import Settings
from presence.events import Ev, EventLog
from presence.media.speech import SpeechTrack
from presence.seams import Action, ChatMessage, Floor, FloorPolicy, FloorState, MicroTurn

log = logging.getLogger(__name__)


class BetweenTicks:
    """Mixed into ``Engine``; the attributes below are the engine's."""

    settings: Settings
    backends: Backends
    _pending: object | None
    _pending_text: asyncio.Future[str] | None
    state: FloorState
    policy: FloorPolicy
    track: SpeechTrack
    events: EventLog
    caller: CallerState
    probe: TurnProbe
    on_latency: Callable[[str, float], None] | None
    _thr: float
    _commit_when_ready: bool
    _evidence_timer: asyncio.TimerHandle | None
    # second_pass.py's; an annotation, not a stub: a stub here would shadow it in Engine's MRO
    _transcribe_turn: Callable[[], Awaitable[str]]

    def _apply(self, action: Action, turn: MicroTurn | None) -> None:
        raise NotImplementedError

    def _prepare_reply(self, text: str) -> None:
        raise NotImplementedError

    def _context(self, *extra: ChatMessage) -> list[ChatMessage]:
        raise NotImplementedError

    def _update_state_name(self) -> None:
        raise NotImplementedError

    def on_voice(self, participant: str, prob: float, t: float, audio: np.ndarray) -> None:
        """Per VAD chunk, straight from the reader: the barge-in reflex and the detector."""
        voiced = prob >= self._thr
        s = self.state
        s.bot_speaking = self.track.speaking
        overlap = self.caller.voice(participant, voiced, t)
        self.probe.push(participant, audio, voiced, t)
        if voiced:
            self._cancel_evidence_timer()
            s.eot_probability = None
        s.overlap_speech_ms = overlap if s.bot_speaking else 0.0
        action = self.policy.on_frame(prob, s)
        if action is not None and action.floor is Floor.HOLD and not self.track.held:
            self.track.hold()
            s.bot_held = True
            # Bot-side stop latency: from the first voiced chunk's arrival to the hold.
            stop_s = s.overlap_speech_ms / 1000
            self.events.emit(Ev.LATENCY, t, metric="barge_in_stop", ms=round(stop_s * 1000, 1))
            if self.on_latency is not None:
                self.on_latency("barge_in_stop", stop_s)

    def _on_probe(self, result: TurnProbeResult) -> None:
        if self.caller.utt_start is None:
            return
        self.events.emit(
            Ev.TURN_DETECTOR,
            probability=round(result.probability, 3),
            silence_ms=round(result.silence_ms, 1),
            ms=round((result.answered_at - result.asked_at) * 1000, 1),
            participant=result.participant,
            first=result.first,
        )
        # The answer at the first silent chunk carries the prosody; later ones drift up with
        # the silence itself, so by default they only stand in when the first was lost.
        if (
            self.settings.eot_detector_reading == "first"
            and not result.first
            and self.state.eot_probability is not None
        ):
            return
        self.state.eot_probability = result.probability
        self._on_evidence()

    async def _judge_words(self, text_future: asyncio.Future[str], text: str) -> None:
        """Ask the text detector whether the caller's words are a finished turn; then prepare
        the reply, unless they are not (the turn will wait, and a reply made now is likely wasted).

        "Unfinished" may be the streaming ASR's garbling ("what is the difference between a
        virus a"): then the transcriber's text of the turn so far gets a second opinion, while
        the first one holds the turn.
        """
        p = await self._judged(text_future, text)
        if p is not None and p < self.settings.eot_text_threshold and self.backends.transcriber is not None:
            clean = await self._transcribe_turn()
            if clean and plain_words(clean) != plain_words(text):
                p = await self._judged(text_future, clean)
        if (
            text_future is self._pending_text
            and not self._commit_when_ready
            and self._pending is None
            and (p is None or p >= self.settings.eot_text_threshold)
        ):
            self._prepare_reply(text)

    async def _judged(self, text_future: asyncio.Future[str], text: str) -> float | None:
        """One judgement, put in the state (None when stale or failed: the ASR went on)."""
        detector = self.backends.text_turn_detector
        assert detector is not None
        asked = now()
        try:
            p = await detector.end_of_turn(self._context(ChatMessage("user", text)))
        except Exception:
            log.exception("text end-of-turn detector failed; deciding without it")
            p = None
        if text_future is not self._pending_text or self._commit_when_ready:
            return None  # the caller went on, or the turn was taken meanwhile
        s = self.state
        s.text_eot_pending, s.text_eot_probability = False, p
        if p is not None:
            self.events.emit(
                Ev.TEXT_TURN_DETECTOR, probability=round(p, 3), ms=round((now() - asked) * 1000, 1)
            )
        self._on_evidence()
        return p

    def _on_evidence(self) -> None:
        """New evidence between ticks: take the turn now, or when its silence will be enough."""
        self._evidence_timer = None
        s = self.state
        if self.caller.utt_start is None or self._commit_when_ready:
            return
        s.bot_speaking = self.track.speaking
        # Silence on the chunk clock, which runs ahead of the micro-turns' playout-delayed one
        # (a voiced chunk since has already cancelled this timer and cleared the answer).
        s.caller_silence_ms = (now() - self.probe.last_voiced) * 1000
        action = self.policy.on_evidence(s)
        if action is not None:
            self._apply(action, None)
            self._update_state_name()
            return
        needed = self.policy.needed_silence_ms(s)
        if needed is not None and s.caller_spoke and needed > s.caller_silence_ms:
            delay = (needed - s.caller_silence_ms) / 1000
            self._evidence_timer = asyncio.get_running_loop().call_later(delay, self._on_evidence)

    def _cancel_evidence_timer(self) -> None:
        if self._evidence_timer is not None:
            self._evidence_timer.cancel()
            self._evidence_timer = None
