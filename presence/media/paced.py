"""A paced outbound audio track: one 20 ms, 48 kHz mono frame per 20 ms of the bot clock."""

from __future__ import annotations

import asyncio

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.clock import now
from presence.media.audio import make_frame
from presence.seams import OUT_SAMPLE_RATE

FRAME_OUT = OUT_SAMPLE_RATE // 50  # 960 samples = 20 ms
MAX_BEHIND_S = 0.2  # a stall longer than this delays the audio; up to it, frames catch up


class PacedAudioTrack(MediaStreamTrack):
    """aiortc pulls frames as fast as it can; this paces them on the bot clock.

    Subclasses fill each frame in ``next_samples``; ``frame_time`` is the scheduled send time of
    the frame being filled (not the wake-up time, which can be a millisecond late).
    """

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None
        self._pts = 0

    @property
    def frame_time(self) -> float:
        return (self._start or now()) + self._pts / OUT_SAMPLE_RATE

    def next_samples(self) -> np.ndarray:
        raise NotImplementedError

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = now()
        else:
            self._pts += FRAME_OUT
            delay = self._start + self._pts / OUT_SAMPLE_RATE - now()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -MAX_BEHIND_S:
                # The loop stalled: let the backlog beyond MAX_BEHIND_S go (the audio itself is
                # delayed, not lost) and send the rest back to back. Re-anchoring on "now" made
                # the next frame wait 20 ms again: a loop late by L on every wake-up then sent
                # one frame per 20 ms + L (2.5 a second at L = 0.4 s), and replies took minutes.
                self._start -= delay + MAX_BEHIND_S
        return make_frame(self.next_samples(), self._pts)
