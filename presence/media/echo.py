"""Server-side acoustic echo cancellation: the bot's own voice taken out of a caller's audio.

A caller on a speakerphone sends the bot's voice back to it, 100-300 ms late and quieter; left
in, the VAD hears it as the caller and the bot barges in on itself. Browsers cancel echo
themselves (``getUserMedia``'s echoCancellation, and our Python caller sends no echo), so this
runs only when ``echo_cancel`` asks for it (see :func:`echo_wanted`).

The far-end reference is what the bot actually sent: ``SpeechTrack`` writes each 20 ms frame,
decimated to 16 kHz, into a :class:`ReferenceBuffer` keyed by the bot clock at its send time.
Each caller's :class:`EchoStage` places its inbound audio on the same clock (RTP stream position
plus a min-filtered arrival anchor, as ``FrameBuffer`` does), reads the reference for the same
instants, and feeds both to an :class:`~presence.seams.EchoCanceller` in 10 ms frames before the
VAD and the ASR see the audio. The unknown echo path (network both ways plus the caller's
jitter buffer and room) is left to the canceller: WebRTC's AEC3 estimates the delay itself, and
the speex filter is long enough to cover it.
"""

from __future__ import annotations

import importlib
import itertools
import time
from collections import deque

import numpy as np

from presence.seams import SAMPLE_RATE, EchoCanceller

AEC_FRAME = SAMPLE_RATE // 100  # 10 ms: the frame both cancellers work in


def _binding(module: str, package: str) -> object:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"echo cancellation needs {package}: pip install {package} ({exc})") from exc


class WebRtcEchoCanceller:
    """WebRTC's AEC3 (``pywebrtc-audio``): adaptive delay estimation, a linear filter and a
    residual echo suppressor; the engine browsers run. Releases the GIL while it works."""

    name = "webrtc"

    def __init__(self, sample_rate: int = SAMPLE_RATE, delay_hint_ms: int = 0) -> None:
        mod = _binding("pywebrtc_audio", "pywebrtc-audio")
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate // 100
        self._aec = mod.EchoCanceller(sample_rate=sample_rate, num_channels=1, stream_delay_ms=delay_hint_ms)  # type: ignore[attr-defined]

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        return self._aec.process(
            np.ascontiguousarray(near, dtype=np.float32), np.ascontiguousarray(far, dtype=np.float32)
        )

    def reset(self) -> None:
        self._aec.reset()


class SpeexEchoCanceller:
    """Speex's MDF echo canceller (``speexdsp``, needs libspeexdsp): one linear adaptive filter
    of ``tail_ms``, which must cover the whole echo path delay; no residual suppression."""

    name = "speex"

    def __init__(self, sample_rate: int = SAMPLE_RATE, tail_ms: int = 512) -> None:
        self._mod = _binding("speexdsp", "speexdsp")
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate // 100
        self.tail = sample_rate * tail_ms // 1000
        self.reset()

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        n = self.frame_samples
        near16 = (np.clip(near, -1.0, 1.0) * 32767.0).astype(np.int16)
        far16 = (np.clip(far, -1.0, 1.0) * 32767.0).astype(np.int16)
        out = np.empty(near16.size, dtype=np.float32)
        for i in range(0, near16.size, n):
            got = self._ec.process(near16[i : i + n].tobytes(), far16[i : i + n].tobytes())
            out[i : i + n] = np.frombuffer(got, dtype=np.int16).astype(np.float32) / 32768.0
        return out

    def reset(self) -> None:
        self._ec = self._mod.EchoCanceller.create(self.frame_samples, self.tail, self.sample_rate)  # type: ignore[attr-defined]


CANCELLERS: dict[str, type] = {"webrtc": WebRtcEchoCanceller, "speex": SpeexEchoCanceller}


def make_canceller(name: str) -> EchoCanceller:
    try:
        cls = CANCELLERS[name]
    except KeyError:
        raise ValueError(f"unknown echo canceller {name!r}; one of {', '.join(CANCELLERS)}") from None
    return cls()


# Transports whose callers send the bot's voice back unless the server cancels it: none known.
# Browsers and WebRTC clients cancel their own echo, phones theirs and carriers the line's
# (G.168); and AEC3 on a SIP line with no echo at all swallowed a barge-in 3 s into the call,
# before it had converged (2 s of "Wait, stop." became 140 ms of voice; tests/test_sip.py).
ECHO_TRANSPORTS: frozenset[str] = frozenset()


def echo_wanted(setting: str, transport: str = "webrtc") -> bool:
    """Whether a peer's audio goes through the canceller: ``on`` always (a speakerphone line
    known to echo), ``off`` never, ``auto`` for the transports in ``ECHO_TRANSPORTS``."""
    if setting == "on":
        return True
    if setting == "auto":
        return transport in ECHO_TRANSPORTS
    return False


class ReferenceBuffer:
    """The bot's outgoing audio at 16 kHz on the bot clock: a ring of ``seconds``.

    ``write`` lays a frame at the bot-clock time its first sample was sent; ``read`` returns the
    samples sent from time ``t`` on (silence where nothing was sent or it is too old). One per
    call (every participant hears the same track). The speech track writes on the event loop
    while readers read in executors: a read that races a write gets part of a frame early or
    late, which the canceller's filter absorbs like any other small misalignment.
    """

    def __init__(self, seconds: float = 8.0, rate: int = SAMPLE_RATE) -> None:
        self.rate = rate
        self.size = int(seconds * rate)
        self._ring = np.zeros(self.size, dtype=np.float32)
        self._t0: float | None = None
        self._end = 0  # absolute sample index just past the newest written sample
        self.frames = 0

    def _index(self, t: float) -> int:
        assert self._t0 is not None
        return round((t - self._t0) * self.rate)

    def write(self, audio: np.ndarray, t: float) -> None:
        if self._t0 is None:
            self._t0 = t
        start = self._index(t)
        if start > self._end:  # a pause in sending (a stalled loop): silence in between
            self._clear(self._end, start)
        self._put(start, audio)
        self._end = max(self._end, start + audio.size)
        self.frames += 1

    def _clear(self, lo: int, hi: int) -> None:
        hi = min(hi, lo + self.size)
        for a in range(lo, hi, self.size):
            b = min(hi, a + self.size)
            i, j = a % self.size, b % self.size or self.size
            if j > i:
                self._ring[i:j] = 0.0
            else:
                self._ring[i:] = 0.0
                self._ring[:j] = 0.0

    def _put(self, start: int, audio: np.ndarray) -> None:
        idx = (start + np.arange(audio.size)) % self.size
        self._ring[idx] = audio

    def read(self, t: float, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.float32)
        if self._t0 is None:
            return out
        start = self._index(t)
        lo, hi = max(start, self._end - self.size, 0), min(start + n, self._end)
        if hi > lo:
            out[lo - start : hi - start] = self._ring[np.arange(lo, hi) % self.size]
        return out


class EchoStage:
    """One caller's echo canceller with the reference aligned to their inbound audio.

    ``process`` takes the caller's 16 kHz audio in any chunk sizes, with its RTP stream
    position and arrival time, and returns the same number of samples, cleaned. The canceller
    works in whole 10 ms frames, so the output runs a constant part of a frame (less than
    10 ms) behind the input. Blocking: the reader runs it in an executor.
    """

    # Chunks of arrival history (about 1 s): long enough to find the fastest path through the
    # jitter, short enough to follow a sender that skipped ahead after a stall (its stream then
    # carries echo of later bot audio; a canceller cannot cancel echo older than its reference).
    ANCHOR_WINDOW = 50
    ANCHOR_STEP_S = 0.02  # move the reference alignment only for a change bigger than this
    SHIFT_CHUNKS = 10  # every one of the last 10 chunks (about 200 ms) arrived ...
    SHIFT_S = 0.08  # ... this much later than the alignment expects: the sender skipped ahead

    def __init__(self, canceller: EchoCanceller, reference: ReferenceBuffer) -> None:
        self.canceller = canceller
        self.reference = reference
        self._offsets: deque[float] = deque(maxlen=self.ANCHOR_WINDOW)
        self._anchor: float | None = None  # bot-clock time of stream position 0
        self._near = np.zeros(0, dtype=np.float32)
        self._far = np.zeros(0, dtype=np.float32)
        self._out = np.zeros(0, dtype=np.float32)
        self.samples = 0
        self.realigned = 0  # times the reference alignment moved
        self.busy_s = 0.0  # thread CPU time spent in the canceller

    def _place(self, pos: int, n: int, arrival: float) -> float:
        """Bot-clock time of stream position ``pos``: the earliest arrival seen recently is the
        fastest path through network and decoder (later ones waited in a queue).

        A sender that stalled and went on from where it was (its stream positions now behind
        the clock for good) shows as every recent chunk arriving late: then the alignment moves
        at once rather than after the window, since until it does the echo sits further from
        its reference than a canceller searches. A jitter burst is not that: its chunks arrive
        together, the last ones on time."""
        offset = arrival - (pos + n) / SAMPLE_RATE
        self._offsets.append(offset)
        base = min(self._offsets)
        if self._anchor is not None and len(self._offsets) >= self.SHIFT_CHUNKS:
            recent = min(itertools.islice(reversed(self._offsets), self.SHIFT_CHUNKS))
            if recent - self._anchor > self.SHIFT_S:
                self._offsets.clear()
                self._offsets.append(recent)
                base = recent
        if self._anchor is None or abs(base - self._anchor) > self.ANCHOR_STEP_S:
            self._anchor = base
            self.realigned += 1
        return self._anchor + pos / SAMPLE_RATE

    def process(self, near: np.ndarray, pos: int, arrival: float) -> np.ndarray:
        if near.size == 0:
            return near
        t0 = time.thread_time()
        t = self._place(pos, near.size, arrival)
        self._near = np.concatenate((self._near, near))
        self._far = np.concatenate((self._far, self.reference.read(t, near.size)))
        whole = self._near.size // AEC_FRAME * AEC_FRAME
        if whole:
            done = self.canceller.process(self._near[:whole], self._far[:whole])
            self._out = np.concatenate((self._out, np.asarray(done, dtype=np.float32)))
            self._near, self._far = self._near[whole:], self._far[whole:]
        # Same length out as in: prime with silence the first time a remainder stays behind.
        if self._out.size < near.size:
            self._out = np.concatenate((np.zeros(near.size - self._out.size, dtype=np.float32), self._out))
        result, self._out = self._out[: near.size], self._out[near.size :]
        self.samples += near.size
        self.busy_s += time.thread_time() - t0
        return result

    def reset(self) -> None:
        self.canceller.reset()
        self._offsets.clear()
        self._anchor = None
