"""Placing received audio frames on the monotonic clock, without the first frame's jitter.

A receiver knows only when each decoded frame came out of its jitter buffer. Placing every
frame at its own arrival tears the audio; placing frames back to back from the first one
(``presence.caller.Recorder``) keeps the first frame's extra wait (the jitter buffer's
prefetch, a late packet) as an offset for the whole stream, which is tens of milliseconds and
differs from call to call. Here a contiguous run is anchored at the *earliest* arrival it
has shown (a min filter over one-way delay, the standard clock-offset estimate), so the
timeline converges to the path's floor delay within a few frames.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.caller import Recorder
from presence.clock import now

GAP_S = 0.06  # arrivals later than the run predicts by more than this start a new run


class ArrivalPlacer:
    """Start positions (samples since ``t0``) for frames given their arrival times."""

    def __init__(self, rate: int, t0: float) -> None:
        self.rate = rate
        self.t0 = t0
        self.cursor: int | None = None  # end of what has been placed
        self._anchor = 0.0
        self._len = 0
        self._floor = 0

    @property
    def anchor(self) -> int:
        """Where the current run starts (samples since ``t0``), as estimated so far."""
        return int(round(self._anchor))

    @property
    def run_samples(self) -> int:
        """Samples placed in the current run (equal to the frame size on a run's first frame)."""
        return self._len

    def place(self, size: int, arrived: float) -> int:
        at = (arrived - self.t0) * self.rate - size  # where this frame would start by arrival
        if self.cursor is None or at - (self._anchor + self._len) > GAP_S * self.rate:
            # A new run (the first, or after a real gap in arrival): never back over the last.
            self._floor = self.cursor or 0
            self._anchor = max(at, float(self._floor))
            self._len = 0
        else:
            self._anchor = max(min(self._anchor, at - self._len), float(self._floor))
        start = int(round(self._anchor)) + self._len
        self._len += size
        self.cursor = max(self.cursor or 0, start + size)
        return start


class TimedRecorder(Recorder):
    """``presence.caller.Recorder`` with min-filter placement (see the module docstring).

    Keeps every frame with its arrival time; :meth:`audio` lays them out at the end, so a run's
    anchor found late in the call also corrects its first frames.
    """

    def __init__(self, rate: int = 16_000) -> None:
        super().__init__(rate)
        self._arrivals: list[tuple[float, np.ndarray]] = []

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                t = now()
                audio = self._resample(frame)
                self.frames += 1
                self._arrivals.append((t, audio))
                if np.abs(audio).max(initial=0.0) > 0.01:
                    self.last_voiced_at = t
                    if self.first_voiced_at is None:
                        self.first_voiced_at = t

    def audio(self, until: float | None = None) -> np.ndarray:
        placed = self._place()
        end = max((pos + chunk.size for pos, chunk in placed), default=0)
        length = end if until is None else max(end, int((until - self.t0) * self.rate))
        out = np.zeros(length, dtype=np.float32)
        for pos, chunk in placed:
            out[pos : pos + chunk.size] = chunk[: max(0, length - pos)]
        return out

    def _place(self) -> list[tuple[int, np.ndarray]]:
        # Two passes: the first finds each run's final anchor, the second lays frames by it.
        placer = ArrivalPlacer(self.rate, self.t0)
        runs: list[list[int]] = []  # per run: [first frame index, anchor]
        for i, (t, audio) in enumerate(self._arrivals):
            placer.place(audio.size, t)
            if placer.run_samples == audio.size:  # this frame began a run
                runs.append([i, 0])
            runs[-1][1] = placer.anchor
        out: list[tuple[int, np.ndarray]] = []
        bounds = [r[0] for r in runs] + [len(self._arrivals)]
        for k, (first, anchor) in enumerate(runs):
            pos = anchor
            for _t, audio in self._arrivals[first : bounds[k + 1]]:
                out.append((pos, audio))
                pos += audio.size
        return out
