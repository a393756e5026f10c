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
    """Start positions (samples since ``t0``) for frames given their arrival times.

    ``offset`` is the frame's position in the sender's stream (from its RTP timestamp, so
    lost frames stay gaps); without it frames are taken as back to back. A run's anchor is
    where the stream's sample 0 would lie: the minimum over its frames of arrival - offset.
    """

    def __init__(self, rate: int, t0: float) -> None:
        self.rate = rate
        self.t0 = t0
        self.cursor: int | None = None  # end of what has been placed
        self._anchor = 0.0
        self._floor = -float("inf")  # a run never moves back over the previous one
        self._samples = 0

    @property
    def anchor(self) -> float:
        """Where the current run puts stream sample 0 (samples since ``t0``)."""
        return self._anchor

    def place(self, size: int, arrived: float, offset: int | None = None) -> tuple[int, bool]:
        """(start position, whether this frame began a new run)."""
        p = self._samples if offset is None else offset
        candidate = (arrived - self.t0) * self.rate - size - p
        new_run = self.cursor is None or candidate - self._anchor > GAP_S * self.rate
        if new_run:
            self._floor = -float("inf") if self.cursor is None else float(self.cursor - p)
            self._anchor = max(candidate, self._floor)
        else:
            self._anchor = max(min(self._anchor, candidate), self._floor)
        start = int(round(self._anchor + p))
        self._samples = p + size
        self.cursor = max(self.cursor or 0, start + size)
        return start, new_run


def stream_offset(frame: object, first_pts: int | None, rate: int) -> tuple[int | None, int | None]:
    """A decoded frame's position (samples at ``rate``) since the stream's first frame, from
    its pts; ``(None, first_pts)`` when the frame has no timing."""
    pts = getattr(frame, "pts", None)
    time_base = getattr(frame, "time_base", None)
    if pts is None or time_base is None:
        return None, first_pts
    if first_pts is None:
        first_pts = int(pts)
    delta = (int(pts) - first_pts) % 2**32  # RTP timestamps wrap at 32 bits
    return int(round(delta * float(time_base) * rate)), first_pts


class TimedRecorder(Recorder):
    """``presence.caller.Recorder`` with RTP-timed, min-filter placement (see above).

    Keeps every frame with its arrival time and stream offset; :meth:`audio` lays them out at
    the end, so a run's anchor found late in the call also corrects its first frames.
    """

    def __init__(self, rate: int = 16_000) -> None:
        super().__init__(rate)
        self._arrivals: list[tuple[float, int | None, np.ndarray]] = []
        self._first_pts: int | None = None

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                t = now()
                offset, self._first_pts = stream_offset(frame, self._first_pts, self.rate)
                audio = self._resample(frame)
                self.frames += 1
                self._arrivals.append((t, offset, audio))
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
            if pos < length:
                out[max(0, pos) : pos + chunk.size] = chunk[max(0, -pos) : length - pos]
        return out

    def _place(self) -> list[tuple[int, np.ndarray]]:
        # Two passes: the first finds each run's final anchor, the second lays frames by it.
        placer = ArrivalPlacer(self.rate, self.t0)
        runs: list[list[float]] = []  # per run: [first frame index, anchor]
        offsets: list[int] = []
        cumulative = 0
        for i, (t, offset, audio) in enumerate(self._arrivals):
            p = cumulative if offset is None else offset
            offsets.append(p)
            _start, new_run = placer.place(audio.size, t, p)
            if new_run:
                runs.append([i, 0.0])
            runs[-1][1] = placer.anchor
            cumulative = p + audio.size
        out: list[tuple[int, np.ndarray]] = []
        bounds = [int(r[0]) for r in runs] + [len(self._arrivals)]
        for k, (_first, anchor) in enumerate(runs):
            for i in range(bounds[k], bounds[k + 1]):
                out.append((int(round(anchor + offsets[i])), self._arrivals[i][2]))
        return out
