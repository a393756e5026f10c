"""A calibration bot: echoes each caller's audio back delayed by exactly ``delay_s``.

Implements ``presence.signaling.contract.CallHost``, so it is served by the real signaling app
(``presence.signaling.app.run_server``) and called with the real ``Caller``. Received audio is
laid on a sample timeline by arrival time (min-filter anchored, see timeline.py); its own paced track
reads that timeline ``delay_s`` behind the clock, so what goes out at time T is what arrived
at T - delay_s, to the sample. The harness must then measure ``delay_s`` plus the fixed cost
of the loopback transport; with a second run at delay 0 that cost cancels.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.bench.echo import EchoHost
from presence.clock import now
from presence.media.audio import FrameResampler
from presence.media.paced import FRAME_OUT, PacedAudioTrack
from presence.seams import OUT_SAMPLE_RATE
from presence.signaling.rtc import set_audio_prefetch

from .timeline import ArrivalPlacer, stream_offset


class DelayLine:
    """Audio placed by arrival time on the monotonic clock, read back ``delay_s`` later."""

    def __init__(self, delay_s: float, rate: int = OUT_SAMPLE_RATE, max_s: float = 120.0) -> None:
        self.delay_s = delay_s
        self.rate = rate
        self.t0 = now()
        self._buf = np.zeros(int(max_s * rate), dtype=np.float32)
        # Frames laid by arrival with a min-filter anchor (see timeline.py).
        self._placer = ArrivalPlacer(rate, self.t0)

    def write(self, audio: np.ndarray, arrived: float, offset: int | None = None) -> None:
        """Lay a frame by arrival; ``offset`` is its position in the sender's stream."""
        start, _new = self._placer.place(audio.size, arrived, offset)
        end = min(self._buf.size, start + audio.size)
        if end > start:
            self._buf[start:end] = audio[: end - start]

    def read(self, at: float, n: int) -> np.ndarray:
        """The ``n`` samples that arrived at ``at - delay_s`` onwards (silence if none)."""
        start = int(round((at - self.delay_s - self.t0) * self.rate))
        out = np.zeros(n, dtype=np.float32)
        lo, hi = max(0, start), min(self._buf.size, start + n)
        if hi > lo:
            out[lo - start : hi - start] = self._buf[lo:hi]
        return out


class DelayTrack(PacedAudioTrack):
    """Paced 20 ms frames read from a :class:`DelayLine` at their scheduled send time, so the
    delay stays exact even when the loop wakes a millisecond late."""

    def __init__(self, line: DelayLine) -> None:
        super().__init__()
        self.line = line

    def next_samples(self) -> np.ndarray:
        return self.line.read(self.frame_time, FRAME_OUT)


class DelayEchoHost(EchoHost):
    """A CallHost whose every call echoes the caller with a fixed delay."""

    def __init__(self, delay_s: float, host_addresses: tuple[str, ...] = ("127.0.0.1",)) -> None:
        super().__init__((), host_addresses)
        self.delay_s = delay_s
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def attach(self, pc: RTCPeerConnection, peer_id: str) -> None:
        line = DelayLine(self.delay_s)
        for transceiver in pc.getTransceivers():
            track = transceiver.receiver.track
            if transceiver.kind == "audio" and track is not None and peer_id not in self._tasks:
                set_audio_prefetch(transceiver.receiver, 1)
                self._tasks[peer_id] = asyncio.get_running_loop().create_task(self._pump(track, line))
        pc.addTrack(DelayTrack(line))

    async def _pump(self, track: MediaStreamTrack, line: DelayLine) -> None:
        resampler = FrameResampler(OUT_SAMPLE_RATE)
        first_pts: int | None = None
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                arrived = now()
                offset, first_pts = stream_offset(frame, first_pts, OUT_SAMPLE_RATE)
                line.write(resampler(frame), arrived, offset)

    async def hangup(self, peer_id: str) -> bool:
        task = self._tasks.pop(peer_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return await super().hangup(peer_id)
