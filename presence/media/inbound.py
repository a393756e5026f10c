"""Per-participant readers: pull decoded RTP frames off aiortc tracks, without blocking the loop.

Audio is resampled to 16 kHz mono, scored by the VAD in an executor as 512-sample chunks fill,
and pushed into the participant's ``FrameBuffer``. Every VAD result also goes to ``on_voice`` at
once: the barge-in reflex must not wait for the next micro-turn. Video is drained continuously
(aiortc queues every decoded frame) and sampled at a fixed rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.clock import now
from presence.media.audio import FrameResampler
from presence.media.microturn import FrameBuffer
from presence.seams import FRAME_SAMPLES, SAMPLE_RATE, VAD, VideoFrame

if TYPE_CHECKING:
    from presence.media.echo import EchoStage

log = logging.getLogger(__name__)

# participant, probability, bot-clock time, the chunk's 16 kHz audio
VoiceCallback = Callable[[str, float, float, np.ndarray], None]


class _Reader:
    """A task that reads one track until it ends or the reader is stopped."""

    participant: str
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{type(self).__name__}-{self.participant}")

    async def _run(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class AudioReader(_Reader):
    def __init__(
        self,
        participant: str,
        track: MediaStreamTrack,
        buffer: FrameBuffer,
        vad: VAD,
        on_voice: VoiceCallback,
        executor: Executor | None = None,
        echo: EchoStage | None = None,
    ) -> None:
        self.participant = participant
        self.track = track
        self.buffer = buffer
        self.vad = vad
        self.on_voice = on_voice
        self.executor = executor
        self.echo = echo  # the bot's own voice is taken out before the VAD and ASR hear it
        self.frames_in = 0
        self.last_frame_at = now()
        self._resample = FrameResampler()
        self._pending = np.zeros(0, dtype=np.float32)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        chunk = self.vad.chunk_samples
        first_pts: int | None = None
        pending_pos = 0  # stream position (16 kHz samples) of self._pending[0]
        try:
            while True:
                frame = await self.track.recv()
                arrival = self.last_frame_at = now()
                self.frames_in += 1
                audio = self._resample(frame)
                # RTP timestamps place the frame in the stream; a jump is packet loss.
                pos = pending_pos + self._pending.size
                if frame.pts is not None and frame.time_base is not None:
                    if first_pts is None:
                        first_pts = frame.pts
                    stamped = round((frame.pts - first_pts) * frame.time_base * SAMPLE_RATE)
                    if abs(stamped - pos) > FRAME_SAMPLES // 2:
                        self._pending, pending_pos, pos = np.zeros(0, dtype=np.float32), stamped, stamped
                if self.echo is not None and audio.size:
                    audio = await loop.run_in_executor(self.executor, self.echo.process, audio, pos, arrival)
                self._pending = np.concatenate((self._pending, audio))
                # Score whole VAD chunks before queueing, so each frame carries a fresh probability.
                while self._pending.size >= chunk:
                    piece, self._pending = self._pending[:chunk], self._pending[chunk:]
                    prob = await loop.run_in_executor(self.executor, self.vad.probability, piece)
                    self.buffer.push(piece, prob, arrival, pending_pos)
                    pending_pos += chunk
                    self.on_voice(self.participant, prob, now(), piece)
        except MediaStreamError:
            log.debug("audio track of %s ended", self.participant)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("audio reader of %s failed", self.participant)


class VideoReader(_Reader):
    """Drains a video track and hands a downscaled RGB frame to ``on_frame`` at ``fps``."""

    def __init__(
        self,
        participant: str,
        track: MediaStreamTrack,
        fps: float,
        max_width: int,
        on_frame: Callable[[VideoFrame], None],
        executor: Executor | None = None,
    ) -> None:
        self.participant = participant
        self.track = track
        self.interval = 1.0 / fps if fps > 0 else float("inf")
        self.max_width = max_width
        self.on_frame = on_frame
        self.executor = executor
        self.frames_in = 0
        self.frames_sampled = 0

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = frame.width, frame.height
        if width > self.max_width:
            # Keep the aspect ratio and even sizes (most codecs and patchers want them).
            height = max(2, round(height * self.max_width / width) // 2 * 2)
            width = self.max_width
        return frame.to_ndarray(format="rgb24", width=width, height=height)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sample = now()
        try:
            while True:
                frame = await self.track.recv()
                self.frames_in += 1
                t = now()
                if t < next_sample:
                    continue
                next_sample = max(next_sample + self.interval, t)
                rgb = await loop.run_in_executor(self.executor, self._convert, frame)
                self.frames_sampled += 1
                self.on_frame(VideoFrame(t=t, participant=self.participant, rgb=rgb))
        except MediaStreamError:
            log.debug("video track of %s ended", self.participant)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("video reader of %s failed", self.participant)
