"""The outbound speech track: 20 ms frames paced on the bot clock, full duplex.

Replies are ``Utterance`` objects whose segments (a sentence or clause of text plus its audio at
48 kHz) arrive while earlier ones play. The track answers to the floor decisions within one
frame: ``flush`` drops everything (barge-in), ``hold``/``resume`` pause and continue at the same
sample (a possible barge-in that may turn out to be a backchannel), and ``backchannel`` mixes a
short clip over silence. It counts every sample it sends, so ``heard_text`` can cut the bot's
transcript at what the caller actually heard.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from presence.clock import now
from presence.events import Ev
from presence.media.audio import decimate_3
from presence.media.echo import ReferenceBuffer
from presence.media.microturn import FrameBuffer
from presence.media.paced import FRAME_OUT, PacedAudioTrack
from presence.seams import OUT_SAMPLE_RATE

# Audio sent but still in flight or in the caller's jitter buffer when we stop is not heard.
HEARD_LAG_S = 0.1

EventSink = Callable[..., object]  # EventLog.emit-compatible: (name, t=None, **data)

_ids = itertools.count(1)


@dataclass(slots=True)
class Segment:
    text: str
    audio: np.ndarray  # float32 mono at 48 kHz


@dataclass
class Utterance:
    """One reply of the bot, filled segment by segment while it plays."""

    id: int = field(default_factory=lambda: next(_ids))
    segments: list[Segment] = field(default_factory=list)
    complete: bool = False  # no more segments will be added
    sent: int = 0  # samples sent so far
    started_at: float | None = None
    ended_at: float | None = None
    flushed: bool = False
    _seg: int = 0
    _offset: int = 0

    def add(self, text: str, audio: np.ndarray) -> None:
        self.segments.append(Segment(text, audio.astype(np.float32, copy=False)))

    def finish(self) -> None:
        self.complete = True

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments).strip()

    @property
    def total(self) -> int:
        return sum(s.audio.size for s in self.segments)

    @property
    def exhausted(self) -> bool:
        return self.complete and self._seg >= len(self.segments)

    def take(self, n: int) -> tuple[np.ndarray, list[str]]:
        """Up to ``n`` samples from the current position; also the texts of segments begun."""
        out = np.zeros(n, dtype=np.float32)
        begun: list[str] = []
        filled = 0
        while filled < n and self._seg < len(self.segments):
            seg = self.segments[self._seg]
            if self._offset == 0:
                begun.append(seg.text)
            part = seg.audio[self._offset : self._offset + n - filled]
            out[filled : filled + part.size] = part
            filled += part.size
            self._offset += part.size
            if self._offset >= seg.audio.size:
                self._seg += 1
                self._offset = 0
        self.sent += filled
        return out[:filled], begun

    def remainder(self) -> Utterance:
        """What is left after a cut, restarting the sentence that was cut off."""
        rest = Utterance(segments=list(self.segments[self._seg :]))
        rest.complete = self.complete
        return rest

    def heard_text(self, lag_samples: int = int(HEARD_LAG_S * OUT_SAMPLE_RATE)) -> str:
        """The words the caller heard: whole segments, then a share of the one cut off."""
        heard = max(0, self.sent - (lag_samples if self.flushed else 0))
        words: list[str] = []
        for seg in self.segments:
            if heard >= seg.audio.size:
                words.extend(seg.text.split())
                heard -= seg.audio.size
                continue
            seg_words = seg.text.split()
            if seg.audio.size and heard > 0:
                words.extend(seg_words[: int(len(seg_words) * heard / seg.audio.size)])
            break
        return " ".join(words)


class SpeechTrack(PacedAudioTrack):
    def __init__(
        self,
        emit: EventSink,
        bot_buffer: FrameBuffer | None = None,
        reference: ReferenceBuffer | None = None,
    ) -> None:
        super().__init__()
        self.emit = emit
        self.bot_buffer = bot_buffer
        # The echo cancellers' far end: every frame as sent, at its scheduled send time.
        self.reference = reference
        self.queue: deque[Utterance] = deque()
        self.current: Utterance | None = None
        self.held = False
        self.frames_sent = 0
        self._overlay = np.zeros(0, dtype=np.float32)
        self._on_end: list[Callable[[Utterance], None]] = []

    # ------------------------------------------------------------------ control (event loop)
    @property
    def speaking(self) -> bool:
        """True while an utterance is playing, held, or waiting for its next segment."""
        return self.current is not None or bool(self.queue)

    def on_utterance_end(self, callback: Callable[[Utterance], None]) -> None:
        self._on_end.append(callback)

    def play(self, utterance: Utterance) -> None:
        self.queue.append(utterance)

    def flush(self) -> Utterance | None:
        """Stop now: the next frame is silence. Returns the utterance that was cut."""
        cut = self.current
        for utt in ([cut] if cut else []) + list(self.queue):
            utt.flushed = True
        self.queue.clear()
        self.held = False
        self._overlay = np.zeros(0, dtype=np.float32)
        if cut is not None:
            self._finish_current(now())
        self.emit(Ev.PLAYBACK_FLUSHED, heard=cut.heard_text() if cut else "")
        return cut

    def hold(self) -> None:
        if not self.held and self.speaking:
            self.held = True
            self.emit(Ev.PLAYBACK_HELD)

    def resume(self) -> None:
        if self.held:
            self.held = False
            self.emit(Ev.PLAYBACK_RESUMED)

    def backchannel(self, clip48: np.ndarray, text: str) -> bool:
        """Mix a short clip over silence; refused while the bot is talking."""
        if self.speaking or self._overlay.size:
            return False
        self._overlay = clip48.astype(np.float32, copy=False)
        self.emit(Ev.BACKCHANNEL_EMITTED, text=text)
        return True

    # ------------------------------------------------------------------ media (aiortc pulls)
    def next_samples(self) -> np.ndarray:
        samples = self._next_samples()
        self.frames_sent += 1
        if self.bot_buffer is not None or self.reference is not None:
            audio16 = decimate_3(samples)
            if self.bot_buffer is not None:
                self.bot_buffer.push(audio16, 1.0 if samples.any() else 0.0)
            if self.reference is not None:
                self.reference.write(audio16, self.frame_time)
        return samples

    def _next_samples(self) -> np.ndarray:
        t = now()
        out = np.zeros(FRAME_OUT, dtype=np.float32)
        if self.current is None and self.queue and not self.held:
            self.current = self.queue.popleft()
        utt = self.current
        if utt is not None and not self.held:
            audio, begun = utt.take(FRAME_OUT)
            if audio.size:
                out[: audio.size] = audio
                if utt.started_at is None:
                    utt.started_at = t
                    self.emit(Ev.BOT_FIRST_PACKET_SENT, t, utterance=utt.id)
                    self.emit(Ev.BOT_SPEECH_START, t, utterance=utt.id)
                for text in begun:
                    self.emit(Ev.CAPTION, t, who="bot", text=text, final=True, utterance=utt.id)
            if utt.exhausted:
                self._finish_current(t)
        if self._overlay.size:
            part = self._overlay[:FRAME_OUT]
            out[: part.size] += part
            self._overlay = self._overlay[FRAME_OUT:]
        return np.clip(out, -1.0, 1.0)

    def _finish_current(self, t: float) -> None:
        utt = self.current
        if utt is None:
            return
        self.current = None
        utt.ended_at = t
        if utt.started_at is not None:
            self.emit(Ev.BOT_SPEECH_END, t, utterance=utt.id, flushed=utt.flushed)
        for callback in self._on_end:
            callback(utt)
