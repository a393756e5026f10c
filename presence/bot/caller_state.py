"""The caller's side of the floor as one streaming state, stepped once per micro-turn.

``CallerState.step(turn, state)`` is the only place where the engine's ``FloorState`` learns
about the caller's speech (the utterance's speech and silence, overlap with the bot, speech
since a hold began), and ``presence.model.dialogue.StateTracker`` steps the same object over its
training dialogues, so the features a policy is trained on are the features it is served.
Between micro-turns, ``voice()`` keeps per-participant voiced runs for the hold reflex, which
must act within one VAD chunk rather than wait for the next tick.
"""

from __future__ import annotations

from dataclasses import dataclass

from presence.seams import FRAME_MS, FloorState, MicroTurn

_FRAME_S = FRAME_MS / 1000
QUIET_FRAMES_TO_END_RUN = 5  # ~100 ms of unvoiced frames end an overlap run (word gaps don't)
QUIET_CHUNKS_TO_END_RUN = 3  # the same ~100 ms in 32 ms VAD chunks (the reflex path)
SPEECH_END_HANGOVER_S = 0.16
RESUMED_S = 0.1
STALE_RUN_S = 0.3  # a run whose participant sent no VAD chunk for this long is over (left, stalled)


@dataclass(slots=True)
class CallerStep:
    """What one micro-turn changed: the engine turns these into ASR work and events."""

    onset: float | None = None  # a new utterance began at this bot-clock time
    continued: bool = False  # voiced frames in an utterance that was already open
    speech_start: float | None = None  # caller_speech_start / _end events (with hangover)
    speech_end: float | None = None


@dataclass(slots=True)
class _Run:
    """A voiced run: it starts at a voiced unit and ends after ``quiet_units`` unvoiced ones."""

    quiet_units: int
    start: float | None = None
    quiet: int = 0
    seen: float = 0.0

    def update(self, voiced: bool, t: float) -> None:
        self.seen = t
        if voiced:
            if self.start is None:
                self.start = t
            self.quiet = 0
        else:
            self.quiet += 1
            if self.quiet >= self.quiet_units:
                self.start = None


class CallerState:
    """Speech runs, silences and overlap of the caller(s) on the bot clock."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.utt_start: float | None = None
        self.last_voiced = -1e9
        self.in_speech = False
        self.heard_at = -1e9  # the last voiced VAD chunk (the reflex path's clock)
        self._run = _Run(QUIET_FRAMES_TO_END_RUN)  # frame-based overlap run (the policy's feature)
        self._runs: dict[str, _Run] = {}  # chunk-based runs per participant (the reflex)

    def reset(self) -> None:
        self.__init__(self.threshold)  # type: ignore[misc]

    # ------------------------------------------------------------------ per micro-turn
    def step(self, turn: MicroTurn, state: FloorState) -> CallerStep:
        """Advance over one micro-turn; writes the caller fields of ``state``."""
        out = CallerStep()
        voiced = turn.vad >= self.threshold
        for i in range(voiced.size):
            t = turn.start + i * _FRAME_S
            if voiced[i]:
                if self.utt_start is None:
                    self.utt_start = t
                    out.onset = t
                elif out.onset is None:
                    out.continued = True
                if not self.in_speech:
                    self.in_speech = True
                    out.speech_start = t
                self.last_voiced = t + _FRAME_S
            self._run.update(bool(voiced[i]), t)
        if self.utt_start is not None:
            state.caller_speech_ms = (self.last_voiced - self.utt_start) * 1000
            silence = turn.end - self.last_voiced
            # The chunk reader hears a resumed sentence a playout delay before the tick does:
            # a pause it already heard end is no pause to take the turn in. (Its voice within
            # RESUMED_S of the tick's is the same speech, heard after the VAD's own delay.)
            if self.heard_at - self.last_voiced > RESUMED_S:
                silence = min(silence, turn.end - self.heard_at)
            state.caller_silence_ms = max(0.0, silence * 1000)
        else:
            state.caller_speech_ms = 0.0
            state.caller_silence_ms = 1e9
        if self.in_speech and turn.end - self.last_voiced >= SPEECH_END_HANGOVER_S:
            self.in_speech = False
            out.speech_end = self.last_voiced
        state.caller_spoke = self.utt_start is not None
        if state.bot_speaking and self._run.start is not None:
            state.overlap_speech_ms = (turn.end - self._run.start) * 1000
        else:
            state.overlap_speech_ms = 0.0
        # Speech since the hold began, across the caller's pauses: "Wait, stop." is one barge-in.
        state.hold_speech_ms = state.hold_speech_ms + FRAME_MS * int(voiced.sum()) if state.bot_held else 0.0
        return out

    def end_utterance(self) -> None:
        """The caller's utterance is over (the bot took the turn, or resumed over it)."""
        self.utt_start = None

    def clear_overlap(self) -> None:
        self._run.start = None
        for run in self._runs.values():
            run.start = None

    # ------------------------------------------------------------------ per VAD chunk
    def voice(self, participant: str, voiced: bool, t: float) -> float:
        """One VAD chunk of one participant; returns the overlap (ms) the reflex should see:
        from the earliest live run's start, +20 ms (a run that just began holds one frame)."""
        self._runs.setdefault(participant, _Run(QUIET_CHUNKS_TO_END_RUN)).update(voiced, t)
        if voiced:
            self.heard_at = t
        starts = [r.start for r in self._runs.values() if r.start is not None and t - r.seen < STALE_RUN_S]
        return (t - min(starts)) * 1000 + 20 if starts else 0.0

    def remove_participant(self, participant: str) -> None:
        # A participant who left mid-speech must not leave a run that holds the bot for good.
        self._runs.pop(participant, None)
