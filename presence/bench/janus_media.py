"""Media of the Janus lab's humans (presence.bench.janus_lab): a voice that plays clips on the
wall clock, a small video, and a recording of what a subscription received, with the arrival
time of every frame that had sound in it."""

from __future__ import annotations

import asyncio
import bisect
import collections
import fractions
import time
import wave
from pathlib import Path

import av
import numpy as np
from aiortc import VideoStreamTrack
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.clock import now
from presence.media.audio import resample, to_float32, to_int16

RATE = 48000  # what the humans send and record: Opus' own rate
VOICED = 0.01 * 32768  # a received 20 ms frame this loud (peak, int16) has sound in it


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(mono int16 samples, rate) of a 16-bit WAV."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2, f"{path}: not 16-bit"
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        channels, rate = w.getnchannels(), w.getframerate()
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return pcm, rate


class VoiceTrack(MediaStreamTrack):
    """48 kHz mono audio on the wall clock: queued clips, silence between them. Silence keeps
    flowing so that the SFU's stream stays up (and the subscriber's track keeps time)."""

    kind = "audio"
    FRAME = RATE // 50  # 20 ms

    def __init__(self, max_queued_s: float = 120.0) -> None:
        super().__init__()
        self._clips: collections.deque[tuple[np.ndarray, asyncio.Future[float]]] = collections.deque()
        self._offset = 0  # into the first clip
        self._max_queued = int(max_queued_s * RATE)
        self._start: float | None = None
        self._pts = 0

    def queued(self) -> int:
        return sum(len(clip) for clip, _ in self._clips) - self._offset

    def play(self, pcm: np.ndarray) -> asyncio.Future[float]:
        """Queue int16 samples at 48 kHz; the future resolves once the last one was sent, to that
        time (``presence.clock.now``)."""
        if self.queued() + len(pcm) > self._max_queued:
            raise ValueError(f"more than {self._max_queued / RATE:g} s of audio queued")
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._clips.append((np.asarray(pcm, np.int16), done))
        return done

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        elif (wait := self._start + self._pts / RATE - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        out = np.zeros(self.FRAME, np.int16)
        filled = 0
        while filled < self.FRAME and self._clips:
            clip, done = self._clips[0]
            take = min(self.FRAME - filled, len(clip) - self._offset)
            out[filled : filled + take] = clip[self._offset : self._offset + take]
            filled, self._offset = filled + take, self._offset + take
            if self._offset >= len(clip):
                self._clips.popleft()
                self._offset = 0
                if not done.done():
                    done.set_result(now())
        frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self._pts, fractions.Fraction(1, RATE)
        self._pts += self.FRAME
        return frame

    def stop(self) -> None:
        super().stop()
        for _, done in self._clips:
            if not done.done():
                done.cancel()
        self._clips.clear()


class SmallVideoTrack(VideoStreamTrack):
    """160x120 frames at 30 fps: enough VP8 for the SFU, little CPU."""

    def __init__(self) -> None:
        super().__init__()
        self._image = np.full((120, 160, 3), 90, np.uint8)

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        self._image[:, :, 1] = (pts // 3000) % 256  # changes: a frozen picture would hide a stall
        frame = av.VideoFrame.from_ndarray(self._image, format="bgr24")
        frame.pts, frame.time_base = pts, time_base
        return frame


class Recording:
    """What a subscription received: mono int16 at 48 kHz, the last ``keep_s`` seconds."""

    def __init__(self, keep_s: float) -> None:
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._size = 0
        self._keep = int(keep_s * RATE)
        self.dropped = 0  # samples let go off the front
        self.audio_frames = 0
        self.video_frames = 0
        self.voiced: list[float] = []  # arrival (presence.clock.now) of every frame with sound

    def add(self, frame: av.AudioFrame, at: float | None = None) -> None:
        pcm = frame.to_ndarray()
        channels = len(frame.layout.channels)
        if frame.format.is_planar:
            mono = pcm.reshape(channels, -1).mean(axis=0)
        else:
            mono = pcm.reshape(-1, channels).mean(axis=1)
        if frame.format.name not in ("s16", "s16p"):
            mono = mono * 32767.0  # float formats
        mono = mono.astype(np.int16)
        if frame.sample_rate != RATE:
            mono = to_int16(resample(to_float32(mono), frame.sample_rate, RATE))
        self.audio_frames += 1
        if mono.size and int(np.abs(mono.astype(np.int32)).max()) > VOICED:
            self.voiced.append(now() if at is None else at)
        self._chunks.append(mono)
        self._size += len(mono)
        while self._size - len(self._chunks[0]) >= self._keep:
            self._size -= len(first := self._chunks.popleft())
            self.dropped += len(first)

    def audio(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def first_voiced_after(self, t: float) -> float | None:
        i = bisect.bisect_right(self.voiced, t)
        return self.voiced[i] if i < len(self.voiced) else None
