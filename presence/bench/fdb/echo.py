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
import secrets

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.clock import now
from presence.media.audio import FrameResampler, make_frame
from presence.seams import OUT_SAMPLE_RATE
from presence.signaling.contract import Answer, CallRejected
from presence.signaling.rtc import new_peer_connection, set_audio_prefetch

from .timeline import ArrivalPlacer, stream_offset

FRAME = OUT_SAMPLE_RATE // 50  # 20 ms at 48 kHz


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


class DelayTrack(MediaStreamTrack):
    """Paced 20 ms frames read from a :class:`DelayLine` at their own send time."""

    kind = "audio"

    def __init__(self, line: DelayLine) -> None:
        super().__init__()
        self.line = line
        self._start: float | None = None
        self._pts = 0

    async def recv(self):  # type: ignore[no-untyped-def]
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = now()
        else:
            self._pts += FRAME
            delay = self._start + self._pts / OUT_SAMPLE_RATE - now()
            if delay > 0:
                await asyncio.sleep(delay)
        # Read at the frame's scheduled time (not the wake-up time): the delay stays exact
        # even when the loop wakes a millisecond late.
        at = self._start + self._pts / OUT_SAMPLE_RATE
        return make_frame(self.line.read(at, FRAME), self._pts)


class DelayEchoHost:
    """A CallHost whose every call echoes the caller with a fixed delay."""

    def __init__(self, delay_s: float, host_addresses: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.delay_s = delay_s
        self.host_addresses = host_addresses
        self.peers: dict[str, RTCPeerConnection] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def active_calls(self) -> int:
        return len(self.peers)

    async def answer(self, sdp: str, *, participant: str, room: str | None) -> Answer:
        pc = new_peer_connection([], list(self.host_addresses))
        peer_id = secrets.token_hex(8)
        self.peers[peer_id] = pc
        line = DelayLine(self.delay_s)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and peer_id not in self._tasks:
                self._tasks[peer_id] = asyncio.get_running_loop().create_task(self._pump(track, line))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.hangup(peer_id)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "audio":
                    set_audio_prefetch(transceiver.receiver, 1)
            pc.addTrack(DelayTrack(line))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await self.hangup(peer_id)
            raise CallRejected(400, "bad_offer", f"cannot answer this offer: {exc}") from exc
        return Answer(call_id=peer_id, peer_id=peer_id, sdp=pc.localDescription.sdp)

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
        pc = self.peers.pop(peer_id, None)
        if pc is None:
            return False
        task = self._tasks.pop(peer_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await pc.close()
        return True

    async def close(self) -> None:
        for peer_id in list(self.peers):
            await self.hangup(peer_id)
