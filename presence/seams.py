"""The typed seams every part of Presence shares.

Small frozen dataclasses carry data across module boundaries; protocols name what a backend
must offer so that a VAD, ASR, responder, TTS or floor policy drops in without touching callers.
Heavy backends are synchronous (they run in executors); the async side adapts them.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000  # the bot's internal audio rate: mono float32 in [-1, 1]
FRAME_MS = 20  # the bot clock's audio frame
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 320
OUT_SAMPLE_RATE = 48_000  # what the speech track sends (Opus native rate)


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One sampled video frame, RGB uint8 (height, width, 3), stamped on the bot clock."""

    t: float
    participant: str
    rgb: np.ndarray

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


@dataclass(frozen=True, slots=True)
class MicroTurn:
    """Everything that happened in one fixed window of the bot clock (200 ms by default).

    ``caller_audio`` is the mix of every human participant, re-timed and gap-filled; ``lost``
    and ``vad`` hold one entry per 20 ms frame. ``bot_audio`` is what the bot played in the
    same window (16 kHz), so a model hears both sides. ``speaking`` names the participants whose
    voice activity crossed the threshold in this window.
    """

    call_id: str
    index: int
    start: float
    duration: float
    caller_audio: np.ndarray
    bot_audio: np.ndarray
    lost: np.ndarray
    vad: np.ndarray
    video: tuple[VideoFrame, ...] = ()
    speaking: tuple[str, ...] = ()
    events: tuple[str, ...] = ()

    @property
    def frames(self) -> int:
        return int(self.lost.shape[0])

    @property
    def end(self) -> float:
        return self.start + self.duration


class Floor(enum.StrEnum):
    """The floor decision of one micro-turn."""

    LISTEN = "listen"  # keep listening (the caller has or wants the floor)
    BACKCHANNEL = "backchannel"  # a short "mm-hm" over the caller, no turn taken
    SPEAK = "speak"  # take the turn: start the prepared reply
    CONTINUE = "continue"  # keep talking
    YIELD = "yield"  # stop talking at once and give the floor back
    INTERRUPT = "interrupt"  # talk over the caller for the bot's own reason (urgent result)
    HOLD = "hold"  # pause output, keep the position: the caller may be barging in
    RESUME = "resume"  # a false interruption: carry on from the held position


@dataclass(frozen=True, slots=True)
class Action:
    """A floor decision plus what it needs: a backchannel phrase, an utterance, a reason."""

    floor: Floor
    text: str | None = None
    reason: str | None = None


@dataclass(slots=True)
class FloorState:
    """What the policy knows about the call besides the current micro-turn (mutated by engine)."""

    bot_speaking: bool = False
    bot_held: bool = False
    reply_ready: bool = False
    caller_speech_ms: float = 0.0  # length of the caller's current speech run
    caller_silence_ms: float = 0.0  # length of the current silence after caller speech
    caller_spoke: bool = False  # the caller said something since the bot last took a turn
    overlap_speech_ms: float = 0.0  # caller speech while the bot talks or is held
    hold_speech_ms: float = 0.0  # caller speech since the current hold began (pauses included)
    partial_text: str = ""  # the streaming ASR partial of the current caller utterance
    # P(turn complete) from the TurnDetector for the current silence (None: not asked yet).
    eot_probability: float | None = None
    name_only: bool = False  # the words so far only call the bot ("Presence," ...): more is coming
    # P(turn complete) from the TextTurnDetector for the words at this silence; pending while asked.
    text_eot_probability: float | None = None
    text_eot_pending: bool = False
    # The speech over the bot sounds meant for someone else (a vocative, or off-axis level).
    side_talk: bool = False
    last_backchannel_at: float = -1e9
    result_waiting: bool = False  # a background job's result is ready to be woven in
    result_urgent: bool = False  # ...and it may interrupt the caller

    @property
    def speech_over_bot_ms(self) -> float:
        """How long the caller has spoken over the bot: the current overlap run, or all speech
        since the hold began when longer (a hold spans the caller's pauses)."""
        return max(self.overlap_speech_ms, self.hold_speech_ms)


@runtime_checkable
class FloorPolicy(Protocol):
    """Decides the floor once per micro-turn, with two faster paths between micro-turns.

    ``step`` is the synchronous decision (tests, offline evaluation); ``decide`` is what the
    engine awaits every micro-turn (a learned policy batches it with every other call's);
    ``on_frame`` is the per-VAD-chunk reflex for holds; ``on_evidence`` may take the caller's
    turn when new evidence (a turn-detector answer, the needed silence) lands between ticks.
    """

    name: str

    def step(self, turn: MicroTurn, state: FloorState) -> Action: ...

    async def decide(self, turn: MicroTurn, state: FloorState) -> Action: ...

    def on_frame(self, vad_prob: float, state: FloorState) -> Action | None: ...

    def on_evidence(self, state: FloorState) -> Action | None: ...

    def needed_silence_ms(self, state: FloorState) -> float | None: ...

    def close(self) -> None: ...


@runtime_checkable
class VAD(Protocol):
    """Voice activity of one audio stream; stateful, so one instance per stream."""

    chunk_samples: int

    def probability(self, chunk: np.ndarray) -> float:
        """Speech probability of exactly ``chunk_samples`` samples of 16 kHz float32 audio."""
        ...

    def reset(self) -> None: ...


@runtime_checkable
class EchoCanceller(Protocol):
    """Takes the bot's own voice out of one caller's audio; stateful, so one per stream.

    ``near`` is the caller's audio, ``far`` the reference the bot played over the same instants
    (the canceller finds the echo path delay itself), both float32 at ``sample_rate`` and a
    whole number of ``frame_samples`` long. Blocking; the reader runs it in an executor.
    """

    name: str
    sample_rate: int
    frame_samples: int

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...


@runtime_checkable
class TurnDetector(Protocol):
    """End of turn from the sound of the speech: P(the speaker's turn is complete).

    Stateless and shared by every call (blocking; run in an executor). ``audio`` is the
    speaker's recent audio, 16 kHz float32, ending at the moment asked about (the first
    silence after speech); a backend uses as much of its tail as it needs.
    """

    name: str

    def probability(self, audio: np.ndarray) -> float: ...


@runtime_checkable
class TextTurnDetector(Protocol):
    """End of turn from the words: P(the caller's last message is a finished turn), judged by
    a language model in the context of the call (LiveKit's turn detector works this way).

    ``messages`` is the call's context ending with the caller's words so far. Awaited; the
    backend runs its model off the event loop.
    """

    name: str

    async def end_of_turn(self, messages: Sequence[ChatMessage]) -> float: ...


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    final: bool
    words: tuple[tuple[str, float, float], ...] = ()  # (word, start s, end s) when known


@runtime_checkable
class StreamingASR(Protocol):
    """Partials while the caller speaks; one instance per stream."""

    def start(self) -> None: ...

    def accept(self, audio: np.ndarray) -> Transcript | None:
        """Feed 16 kHz float32 audio; return a new partial when the hypothesis changed."""
        ...

    def finish(self) -> Transcript: ...


@runtime_checkable
class Transcriber(Protocol):
    """A whole-utterance pass (the accurate final text of a turn)."""

    def transcribe(self, audio: np.ndarray) -> Transcript: ...


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str


@runtime_checkable
class Responder(Protocol):
    """Streams the reply text for a conversation, delta by delta."""

    name: str

    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]: ...

    async def prefill(self, messages: Sequence[ChatMessage]) -> None:
        """Get ready for a reply to ``messages`` plus a caller line, off the reply path (a
        local model evaluates the new prompt front into its cache; others do nothing)."""
        ...


@runtime_checkable
class Translator(Protocol):
    """Text from ``source`` to ``target`` language (ISO 639-1 codes), one segment at a time
    (blocking; run in an executor). A segment is a clause or sentence of committed speech."""

    source: str
    target: str

    def translate(self, text: str) -> str: ...

    def close(self) -> None: ...


@runtime_checkable
class TTS(Protocol):
    """Synthesises text to mono float32 chunks at ``sample_rate`` (blocking; run in executor)."""

    sample_rate: int
    language: str

    def synthesize(self, text: str) -> Iterator[np.ndarray]: ...


@dataclass(frozen=True, slots=True)
class CallEvent:
    """A timestamped event on the bot clock; the same names everywhere (see events.py)."""

    name: str
    t: float
    call_id: str
    data: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"type": "event", "name": self.name, "t": self.t, "call": self.call_id, **self.data}
