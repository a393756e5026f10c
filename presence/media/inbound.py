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
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.aio import log_this_drop, media_executor
from presence.clock import now
from presence.media.audio import FrameResampler
from presence.media.microturn import FrameBuffer
from presence.seams import FRAME_SAMPLES, SAMPLE_RATE, VAD, VideoFrame

if TYPE_CHECKING:
    from presence.media.echo import EchoStage
    from presence.media.mix import VoiceQueue

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


_END = (None, 0.0)  # queued by the reader after the track's last frame


NARROWBAND_HZ = 8_000  # G.711 phone audio: resampled once, to 16 kHz, then dithered
DITHER = 10 ** (-70 / 20)


class AudioReader(_Reader):
    """Reads one caller's audio track; scores it in batches off the loop.

    Reading and scoring are two tasks: the reader only takes frames off aiortc's queue (which
    grows without bound when nobody reads it) and stamps their arrival; the scorer hands
    whatever has piled up since its last round to one executor call (resampling, echo
    cancellation, VAD). One round trip per frame through a shared executor fell 14 s behind
    with ten calls on two cores, the caller heard late and stamped late; in batches the
    scorer catches up by itself. Frames older than ``MAX_BACKLOG_S`` give way (and are counted).
    """

    MAX_BACKLOG_S = 2.0

    def __init__(
        self,
        participant: str,
        track: MediaStreamTrack,
        buffer: FrameBuffer,
        vad: VAD,
        on_voice: VoiceCallback,
        executor: Executor | None = None,
        echo: EchoStage | None = None,
        mix: VoiceQueue | None = None,
    ) -> None:
        self.participant = participant
        self.mix = mix  # a room's mixes: the others hear this cleaned voice too
        self.track = track
        self.buffer = buffer
        self.vad = vad
        self.on_voice = on_voice
        self.executor = executor or media_executor()
        self.echo = echo  # the bot's own voice is taken out before the VAD and ASR hear it
        self.frames_in = 0
        self.dropped = 0  # frames that waited longer than MAX_BACKLOG_S and were let go
        self.last_frame_at = now()
        self._frames: deque[tuple[av.AudioFrame | None, float]] = deque()
        self._ready = asyncio.Event()
        # scorer state, touched only inside one executor call at a time
        self._resample = FrameResampler()
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_pos = 0  # stream position (16 kHz samples) of self._pending[0]
        self._first_pts: int | None = None
        self._dither = np.random.default_rng()

    async def _run(self) -> None:
        scorer = asyncio.create_task(self._score(), name=f"AudioScorer-{self.participant}")
        try:
            while True:
                frame = await self.track.recv()
                arrival = self.last_frame_at = now()
                self.frames_in += 1
                while self._frames and arrival - self._frames[0][1] > self.MAX_BACKLOG_S:
                    self._frames.popleft()
                    self.dropped += 1
                    if log_this_drop(self.dropped):
                        log.warning(
                            "audio of %s: scoring behind, %d frames dropped", self.participant, self.dropped
                        )
                self._frames.append((frame, arrival))
                self._ready.set()
        except MediaStreamError:
            log.debug("audio track of %s ended", self.participant)
            self._frames.append(_END)  # what arrived before the end is still scored
            self._ready.set()
            await scorer
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("audio reader of %s failed", self.participant)
        finally:
            scorer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scorer

    async def _score(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._frames:
                self._ready.clear()
                await self._ready.wait()
            batch = list(self._frames)
            self._frames.clear()
            ended = batch[-1] is _END
            if ended:
                batch.pop()
            try:
                scored = await loop.run_in_executor(self.executor, self._process, batch)
            except Exception:
                log.exception("audio scoring of %s failed", self.participant)
                scored = []
            for piece, prob, arrival, pos in scored:
                self.buffer.push(piece, prob, arrival, pos)
                if self.mix is not None:
                    self.mix.push(piece)
                self.on_voice(self.participant, prob, now(), piece)
            if ended:
                return

    def _process(
        self, batch: list[tuple[av.AudioFrame | None, float]]
    ) -> list[tuple[np.ndarray, float, float, int]]:
        """Blocking: resample, cancel echo and score whole VAD chunks, in arrival order."""
        out = []
        chunk = self.vad.chunk_samples
        for frame, arrival in batch:
            assert frame is not None
            audio = self._resample(frame)
            if frame.sample_rate <= NARROWBAND_HZ and audio.size:
                # Nothing above 4 kHz (a phone line): pocketsphinx's 16 kHz model reads the empty
                # band as words gone silent. A -70 dB floor there took its word error rate on G.711
                # from 0.44 to 0.21 (presence bench narrowband); the VAD and detectors do not hear it.
                audio = audio + self._dither.standard_normal(audio.size).astype(np.float32) * DITHER
            # RTP timestamps place the frame in the stream; a jump is packet loss.
            pos = self._pending_pos + self._pending.size
            if frame.pts is not None and frame.time_base is not None:
                if self._first_pts is None:
                    self._first_pts = frame.pts
                stamped = round((frame.pts - self._first_pts) * frame.time_base * SAMPLE_RATE)
                if abs(stamped - pos) > FRAME_SAMPLES // 2:
                    self._pending, self._pending_pos, pos = np.zeros(0, dtype=np.float32), stamped, stamped
            if self.echo is not None and audio.size:
                audio = self.echo.process(audio, pos, arrival)
            self._pending = np.concatenate((self._pending, audio))
            # Score whole VAD chunks before queueing, so each frame carries a fresh probability.
            while self._pending.size >= chunk:
                piece, self._pending = self._pending[:chunk], self._pending[chunk:]
                out.append((piece, self.vad.probability(piece), arrival, self._pending_pos))
                self._pending_pos += chunk
        return out


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
        self.executor = executor or media_executor()
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
