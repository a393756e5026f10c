"""Per-listener mixes of a bot-hosted room: everyone hears everyone else, never themselves.

The SFU-less room of a few people: each participant's cleaned voice (the 16 kHz audio the VAD
and ASR hear, echo of the bot already taken out) is placed on the bot clock in a short
``FrameBuffer`` of its own, and each listener gets a track of their own that sums, frame by
frame, the bot's voice, every *other* participant and the interpretation channel of the
listener's language (over which the original speakers are ducked). All listeners read one
shared 20 ms frame clock: the bot's speech track and each channel are advanced once per frame
however many listen, so their sample counts (what was heard) stay true.

Cost is one 20 ms sum per listener and frame over at most ``max_peers`` sources: bounded by the
room's cap (larger meetings belong on an SFU).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from presence.clock import now
from presence.media.paced import FRAME_OUT, PacedAudioTrack
from presence.seams import FRAME_SAMPLES, OUT_SAMPLE_RATE

FRAME_S = FRAME_OUT / OUT_SAMPLE_RATE
# A voice starts playing once 60 ms of it wait (the scorer hands it over in batches), and never
# waits longer than 300 ms: what is older goes, as with a phone line that fell behind.
PRIME_SAMPLES = 3 * FRAME_SAMPLES
MAX_WAITING = 15 * FRAME_SAMPLES
HISTORY = 50  # frames (1 s) kept for listeners whose pacing runs a little behind the fastest

Source = Callable[[], np.ndarray]  # the next 20 ms at 48 kHz (a speech track's next_samples)


def _up3(audio16: np.ndarray) -> np.ndarray:
    """16 -> 48 kHz by linear interpolation: a voice over a call, no need for a filter bank."""
    x = np.arange(audio16.size * 3, dtype=np.float32) / 3.0
    return np.interp(x, np.arange(audio16.size, dtype=np.float32), audio16).astype(np.float32)


class VoiceQueue:
    """One participant's voice for the mixes: samples in order, as they were scored.

    Not placed by timestamp like the micro-turns' ``FrameBuffer``: after a stall of the loop
    the listeners' tracks catch up with frames back to back, and a buffer placed on the clock
    would hand those out as lost (1.3 s of a sentence gone in a test); here the voice is late
    for a moment instead, and never later than ``MAX_WAITING``. Loss inside the stream is filled
    before this (libopus concealment), so the order of samples is the stream's."""

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0
        self._playing = False
        self.dropped = 0  # samples let go because the queue was behind

    def push(self, audio: np.ndarray, *_: object) -> None:
        self._chunks.append(audio)
        self._size += audio.size
        while self._size > MAX_WAITING:
            old = self._chunks.popleft()
            self._size -= old.size
            self.dropped += old.size

    def pull(self) -> np.ndarray | None:
        """The next 20 ms at 16 kHz, or None while there is not enough to play."""
        if not self._playing and self._size < PRIME_SAMPLES:
            return None
        if self._size < FRAME_SAMPLES:
            self._playing = False  # ran dry: wait for a little again rather than stutter
            return None
        self._playing = True
        out = np.empty(FRAME_SAMPLES, dtype=np.float32)
        filled = 0
        while filled < FRAME_SAMPLES:
            chunk = self._chunks[0]
            take = min(chunk.size, FRAME_SAMPLES - filled)
            out[filled : filled + take] = chunk[:take]
            filled += take
            if take == chunk.size:
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[take:]
        self._size -= FRAME_SAMPLES
        return out


@dataclass(slots=True)
class Hearing:
    """What one listener hears besides the bot."""

    participant: str
    language: str | None = None  # they speak it and hear its interpretation channel (None: no interpreter)
    original: bool = True  # the other speakers' own voices (ducked under the interpretation)


@dataclass(slots=True)
class MixFrame:
    bot: np.ndarray
    voices: dict[str, np.ndarray] = field(default_factory=dict)  # participant -> 48 kHz frame
    channels: dict[str, np.ndarray] = field(default_factory=dict)  # language -> 48 kHz frame
    busy: set[str] = field(default_factory=set)  # languages whose channel is speaking


class RoomMix:
    """The shared frame clock and the sources of one room's mixes."""

    def __init__(self, bot: Source, duck_db: float = -14.0) -> None:
        self.bot = bot
        self.duck = float(10 ** (duck_db / 20))
        self.people: dict[str, Hearing] = {}  # each participant speaks and listens
        self.voices: dict[str, VoiceQueue] = {}
        self.channels: dict[str, tuple[Source, Callable[[], bool]]] = {}  # language -> (next, busy)
        self.listeners: dict[str, MixTrack] = {}  # participant -> their track (the newest)
        self._frames: deque[tuple[int, MixFrame]] = deque(maxlen=HISTORY)
        self._t0: float | None = None

    # ------------------------------------------------------------------ sources (event loop)
    def add(self, hearing: Hearing) -> VoiceQueue:
        """A participant: their voice goes into the others' mixes (the queue their reader
        fills); ``hearing`` says what they hear, and in which language they speak."""
        self.people[hearing.participant] = hearing
        buffer = self.voices[hearing.participant] = VoiceQueue()
        return buffer

    def remove(self, participant: str) -> None:
        self.people.pop(participant, None)
        self.voices.pop(participant, None)
        self.listeners.pop(participant, None)

    def add_channel(self, language: str, source: Source, busy: Callable[[], bool]) -> None:
        self.channels[language] = (source, busy)

    def listen(self, participant: str) -> MixTrack:
        track = self.listeners[participant] = MixTrack(self, self.people[participant])
        return track

    # ------------------------------------------------------------------ the frame clock
    def frame(self, index: int) -> tuple[int, MixFrame]:
        """Frame ``index`` of the room (computing it, and any before it, on first demand);
        a listener asking for one older than the history gets the oldest kept."""
        last = self._frames[-1][0] if self._frames else index - 1
        if index > last:
            # A listener far ahead (a stall) skips frames rather than bursting them out.
            for i in range(max(last + 1, index - HISTORY + 1), index + 1):
                self._frames.append((i, self._compute()))
        first = self._frames[0][0]
        return self._frames[max(0, index - first)] if index >= first else self._frames[0]

    def current_index(self) -> int:
        if self._t0 is None:
            self._t0 = now()
        return math.floor((now() - self._t0) / FRAME_S)

    def _compute(self) -> MixFrame:
        out = MixFrame(bot=self.bot())
        for name, queue in self.voices.items():
            audio = queue.pull()
            if audio is not None:
                out.voices[name] = _up3(audio)
        for language, (source, busy) in self.channels.items():
            out.channels[language] = source()
            if busy():
                out.busy.add(language)
        return out

    def mix(self, frame: MixFrame, hearing: Hearing) -> np.ndarray:
        out = frame.bot.copy()
        lang = hearing.language
        channel = frame.channels.get(lang) if lang else None
        if channel is not None:
            out += channel
        ducked = lang in frame.busy
        for name, voice in frame.voices.items():
            if name == hearing.participant:
                continue
            speaks = self.people[name].language if name in self.people else None
            same = lang is None or speaks is None or speaks == lang
            if same:
                out += voice  # a speaker of the listener's own language needs no interpreter
            elif hearing.original:
                out += voice * (self.duck if ducked else 1.0)
        return np.clip(out, -1.0, 1.0)


class MixTrack(PacedAudioTrack):
    """One listener's audio: paced like every outbound track, filled from the room's frames."""

    def __init__(self, room: RoomMix, hearing: Hearing) -> None:
        super().__init__()
        self.room = room
        self.hearing = hearing
        self._index: int | None = None
        # Room frames this listener let go to stay live: a loop that stalls often (a loaded
        # machine) leaves the paced track behind the room's clock, and each catch-up cuts audio.
        self.skipped = 0
        self.cuts: deque[tuple[float, int]] = deque(maxlen=256)  # (bot clock, frames) of the latest

    def next_samples(self) -> np.ndarray:
        if self._index is None:
            self._index = self.room.current_index()
        else:
            self._index += 1
            # A listener that fell behind the room's clock by more than its history catches up.
            behind = self.room.current_index() - HISTORY // 2 - self._index
            if behind > 0:
                self.skipped += behind
                self.cuts.append((now(), behind))
                self._index += behind
        self._index, frame = self.room.frame(self._index)
        return self.room.mix(frame, self.hearing)
