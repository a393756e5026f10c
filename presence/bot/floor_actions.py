"""Carrying out the floor policy's actions: the engine's side of each ``Floor`` value.

Every tick's action and a SPEAK decided between ticks (no micro-turn) come here. Speaking a
reply is committing one prepared by the engine; yielding cancels and flushes it, keeping the cut
utterance for a resume after a false interruption; hold and resume only touch the speech track.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np

from presence.bot.asr_feed import ASRFeed
from presence.bot.backends.factory import Backends
from presence.bot.caller_state import CallerState
from presence.bot.policy import RESULT
from presence.bot.reply import ReplyTask, synthesize
from presence.bot.results import CallResults
from presence.bot.turn_probe import TurnProbe
from presence.clock import now
from presence.config import Settings
from presence.events import Ev, EventLog
from presence.media.microturn import MicroTurnAssembler
from presence.media.speech import SpeechTrack, Utterance
from presence.seams import Action, Floor, FloorState, MicroTurn

if TYPE_CHECKING:
    from collections.abc import Coroutine

# Backchannel audio, synthesised once per (TTS instance, text).
_BC_CLIPS: dict[tuple[int, str], np.ndarray] = {}


class FloorActions:
    """Mixed into ``Engine``; the attributes below are the engine's."""

    settings: Settings
    backends: Backends
    state: FloorState
    track: SpeechTrack
    events: EventLog
    assembler: MicroTurnAssembler
    caller: CallerState
    probe: TurnProbe
    asr: ASRFeed
    results: CallResults
    _live: ReplyTask | None
    _pending_text: asyncio.Future[str] | None
    _commit_when_ready: bool
    _turn_end_t: float | None
    _cut: Utterance | None
    _cut_at: float
    _side_talk: str | None
    _state_name: str

    if TYPE_CHECKING:  # the engine's and BetweenTicks' own

        def _spawn(self, coro: Coroutine[object, object, object], name: str) -> asyncio.Task[object]: ...
        def _speak_result(self) -> None: ...
        def _start_prepare(self) -> None: ...
        def _text_ready(self, fut: asyncio.Future[str]) -> None: ...
        def _cancel_evidence_timer(self) -> None: ...
        def _end_caller_utterance(self) -> None: ...

    def _apply(self, action: Action, turn: MicroTurn | None) -> None:
        """Carry out an action: every tick's, and a SPEAK decided between ticks (no turn)."""
        floor = action.floor
        # Taking the floor with no caller turn pending can only mean saying a waiting result
        # (a learned policy does not give the rule policy's reason).
        if floor is Floor.SPEAK and (
            action.reason == RESULT or (self.results.waiting and self.caller.utt_start is None)
        ):
            if self.results.waiting:
                self._speak_result()
        elif floor is Floor.INTERRUPT:
            if self.results.waiting:
                self.events.emit(Ev.BARGE_IN_DETECTED, reason=action.reason or "", by="bot")
                self._speak_result()
        elif floor is Floor.SPEAK:
            if self._commit_when_ready or self.caller.utt_start is None:
                return  # already taken (waiting for the ASR's final text), or nothing to answer
            self._cancel_evidence_timer()
            self.probe.armed = False
            self.events.emit(
                Ev.END_OF_TURN_DECIDED,
                silence_ms=round(self.state.caller_silence_ms, 1),
                probability=self.state.eot_probability,
                between_ticks=turn is None,
            )
            self._turn_end_t = self.caller.last_voiced
            if self._pending_text is None:
                self._start_prepare()
            self._commit_when_ready = True
            if self._pending_text is not None and self._pending_text.done():
                self._text_ready(self._pending_text)
        elif floor is Floor.BACKCHANNEL:
            # The clip says the setting's text, whatever text the policy named (the model's
            # checkpoint stores its own): the event reports what the caller heard.
            text = self.settings.backchannel_text
            clip = _BC_CLIPS.get((id(self.backends.tts), text))
            # Among several people the talk is mostly to each other: an "uh-huh" there intrudes.
            alone = len(self.assembler.participants) <= 1
            if clip is not None and turn is not None and alone and self.track.backchannel(clip, text):
                self.state.last_backchannel_at = turn.start
        elif floor is Floor.YIELD:
            self.events.emit(Ev.BARGE_IN_DETECTED, reason=action.reason or "")
            if self._live is not None and not self._live.done:
                self._spawn(self._live.cancel(), "cancel-reply")
            cut = self.track.flush()
            if cut is not None and cut.started_at is not None:
                self._cut, self._cut_at = cut, now()
            self.state.overlap_speech_ms = 0.0
            self.caller.clear_overlap()
        elif floor is Floor.HOLD:
            self.track.hold()
        elif floor is Floor.RESUME:
            if self._side_talk is not None:
                self.events.emit(Ev.NOT_ADDRESSED, text=self.state.partial_text, reason=self._side_talk)
            self.track.resume()
            self.asr.drop()  # the backchannel's words are not a turn
            self._end_caller_utterance()
            self.state.overlap_speech_ms = 0.0
            self.caller.clear_overlap()

    def _update_state_name(self) -> None:
        cur = self.track.current
        if cur is not None and cur.started_at is not None and not self.track.held:
            name = "speaking"
        elif self._commit_when_ready or (self.track.speaking and not self.track.held):
            name = "thinking"
        else:
            name = "listening"
        self._set_state(name)

    def _set_state(self, name: str) -> None:
        if name != self._state_name:
            self._state_name = name
            self.events.emit(Ev.STATE, state=name)

    async def _load_backchannel(self) -> None:
        key = (id(self.backends.tts), self.settings.backchannel_text)
        if key not in _BC_CLIPS:
            _BC_CLIPS[key] = await synthesize(self.backends.tts, key[1])
