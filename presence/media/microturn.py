"""Re-timing inbound audio on the bot clock and assembling fixed-length micro-turns.

Network audio arrives in bursts, late, or not at all (``presence.media.opus_plc`` fills lost
packets upstream when libopus is there). The bot never trusts arrival order as time: each
stream's frames are placed by their sample position (from RTP timestamps) and handed to the bot
clock after an adaptive playout delay, and the assembler takes exactly ``micro_turn_ms / 20``
frames per stream on every tick. Frames missing at their tick become silence marked lost.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from presence.clock import now
from presence.seams import FRAME_MS, FRAME_SAMPLES, MicroTurn, VideoFrame


@dataclass(slots=True)
class Pulled:
    audio: np.ndarray  # (n * FRAME_SAMPLES,)
    lost: np.ndarray  # (n,) bool
    vad: np.ndarray  # (n,) float32


class FrameBuffer:
    """One stream's audio placed on the bot clock by its own sample position.

    Frame ``k`` (20 ms) of a stream is due on the bot clock at ``base + (k + 1) * 20 ms + delay``:
    ``base`` is the earliest arrival seen in the last few seconds (the fastest path through
    the network and decoder), ``delay`` the spread of recent arrivals around it (a playout
    delay that adapts to jitter, between 20 ms and ``max_delay``). Each tick takes the ``n``
    frames that are due; one that has not arrived by then is silence marked lost, and when it
    comes later it is dropped. Positions come from RTP timestamps, so a packet lost in the
    network is a lost frame and never shifts the audio after it. When the path gets slower for
    good (a stall, a backlog upstream), every frame comes after its tick; after ``RESYNC``
    late frames in a row the stream is re-timed from the next one instead of being lost for good.
    """

    WINDOW = 250  # frames of arrival history (5 s): follows clock drift, forgets old spikes
    RESYNC = 15  # late frames in a row (300 ms) that mean the stream's latency itself went up

    def __init__(self, max_delay: float, min_delay: float = 0.02) -> None:
        self.max_delay = max(min_delay, max_delay)
        self.min_delay = min_delay
        self._frames: dict[int, tuple[np.ndarray, float]] = {}
        self._partial = np.zeros(0, dtype=np.float32)
        self._write = 0  # stream sample position just past the last pushed sample
        self._vad = 0.0
        self._offsets: deque[float] = deque(maxlen=self.WINDOW)  # arrival - frame end offset
        self._next: int | None = None  # index of the next frame to hand out
        self.delay = min_delay
        self.late = 0  # frames that came after their tick (dropped)
        self.resyncs = 0  # times the stream was re-timed after a run of late frames
        self._late_run = 0
        self.missing = 0  # frames handed out as lost

    def __len__(self) -> int:
        return len(self._frames)

    def push(
        self,
        audio: np.ndarray,
        vad: float | None = None,
        arrival: float | None = None,
        pos: int | None = None,
    ) -> None:
        """Append samples; ``pos`` is the stream position of ``audio[0]`` when known (RTP)."""
        if vad is not None:
            self._vad = vad
        if pos is not None and pos != self._write:
            # A gap (lost packets) or a restart: the unfinished frame cannot be completed.
            self._partial = np.zeros(0, dtype=np.float32)
            skip = (-pos) % FRAME_SAMPLES
            audio, pos = audio[skip:], pos + skip
            self._write = pos
        start = self._write - self._partial.size
        data = np.concatenate((self._partial, audio)) if self._partial.size else audio
        whole = data.size // FRAME_SAMPLES * FRAME_SAMPLES
        t = now() if arrival is None else arrival
        for offset in range(0, whole, FRAME_SAMPLES):
            index = (start + offset) // FRAME_SAMPLES
            if self._next is not None and index < self._next:
                self._late_run += 1
                if self._late_run < self.RESYNC:
                    self.late += 1
                    continue
                # Re-time: forget the old arrival offsets and hand-out position; this frame on.
                self._offsets.clear()
                self._next = None
                self.resyncs += 1
            self._late_run = 0
            self._frames[index] = (
                data[offset : offset + FRAME_SAMPLES].astype(np.float32, copy=False),
                self._vad,
            )
            self._offsets.append(t - (index + 1) * FRAME_MS / 1000)
        self._partial = data[whole:].copy()
        self._write += audio.size

    def _due_index(self, t: float) -> int | None:
        if not self._offsets:
            return None
        base = min(self._offsets)
        spread = sorted(self._offsets)[int(len(self._offsets) * 0.9)] - base
        self.delay = min(self.max_delay, max(self.min_delay, spread + 0.01))
        # The epsilon keeps float error from pushing an exact boundary into the previous frame.
        return math.floor((t - self.delay - base) / (FRAME_MS / 1000) + 1e-6)

    def pull(self, n: int, t: float | None = None) -> Pulled:
        """The ``n`` frames due at bot-clock time ``t`` (a tick's end)."""
        audio = np.zeros(n * FRAME_SAMPLES, dtype=np.float32)
        lost = np.ones(n, dtype=bool)
        vad = np.zeros(n, dtype=np.float32)
        due = self._due_index(now() if t is None else t)
        if due is None:
            return Pulled(audio, lost, vad)
        first = due - n
        # Stay contiguous from tick to tick (never hand a frame out twice); jump ahead only
        # when the estimate moved on by more than two frames.
        if self._next is not None and first - self._next <= 2:
            first = self._next
        for i in range(n):
            item = self._frames.pop(first + i, None)
            if item is not None:
                audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] = item[0]
                vad[i] = item[1]
                lost[i] = False
        self.missing += int(lost.sum())
        self._next = first + n
        for index in [k for k in self._frames if k < self._next]:
            del self._frames[index]
            self.late += 1
        return Pulled(audio, lost, vad)


class MicroTurnAssembler:
    """Builds one ``MicroTurn`` per tick from every participant's buffer, the bot's own
    output buffer and the video frames sampled in the window."""

    def __init__(self, call_id: str, micro_turn_ms: int, max_playout_ms: int, vad_threshold: float) -> None:
        self.call_id = call_id
        self.frames_per_turn = micro_turn_ms // 20
        self.duration = micro_turn_ms / 1000.0
        self.max_delay = max_playout_ms / 1000
        self.vad_threshold = vad_threshold
        self.participants: dict[str, FrameBuffer] = {}
        self.bot = FrameBuffer(self.max_delay)
        self._video: list[VideoFrame] = []
        self._events: list[str] = []
        self.index = 0

    def add_participant(self, name: str) -> FrameBuffer:
        buffer = self.participants.get(name)
        if buffer is None:
            buffer = self.participants[name] = FrameBuffer(self.max_delay)
        return buffer

    def remove_participant(self, name: str) -> None:
        self.participants.pop(name, None)

    def add_video(self, frame: VideoFrame) -> None:
        self._video.append(frame)
        del self._video[:-8]  # a slow tick must not let frames pile up

    def add_event(self, name: str) -> None:
        """Mark an event (a background result arrived, a reply is ready) for the next turn."""
        self._events.append(name)

    def assemble(self, start: float) -> MicroTurn:
        n = self.frames_per_turn
        mix = np.zeros(n * FRAME_SAMPLES, dtype=np.float32)
        vad = np.zeros(n, dtype=np.float32)
        lost = np.ones(n, dtype=bool) if self.participants else np.zeros(n, dtype=bool)
        speaking = []
        for name, buffer in self.participants.items():
            pulled = buffer.pull(n, start + self.duration)
            mix += pulled.audio
            vad = np.maximum(vad, pulled.vad)
            lost &= pulled.lost  # a frame is lost when nobody's audio made it
            if (pulled.vad >= self.vad_threshold).any():
                speaking.append(name)
        np.clip(mix, -1.0, 1.0, out=mix)
        bot = self.bot.pull(n, start + self.duration).audio
        video = tuple(f for f in self._video if f.t < start + self.duration)
        self._video = [f for f in self._video if f.t >= start + self.duration]
        events = tuple(self._events)
        self._events.clear()
        turn = MicroTurn(
            call_id=self.call_id,
            index=self.index,
            start=start,
            duration=self.duration,
            caller_audio=mix,
            bot_audio=bot,
            lost=lost,
            vad=vad,
            video=video,
            speaking=tuple(speaking),
            events=events,
        )
        self.index += 1
        return turn
