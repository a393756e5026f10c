"""Audio conversions between aiortc/PyAV frames and the bot's float32 arrays."""

from __future__ import annotations

import fractions
from collections import deque

import av
import numpy as np

from presence.seams import OUT_SAMPLE_RATE, SAMPLE_RATE


def to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


def to_float32(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0


class FrameResampler:
    """Turns decoded frames of any rate/layout into mono s16 at ``rate``.

    libswresample keeps filter state between frames, so one instance per stream.
    """

    def __init__(self, rate: int = SAMPLE_RATE) -> None:
        self.rate = rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)

    def __call__(self, frame: av.AudioFrame) -> np.ndarray:
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return to_float32(np.concatenate(chunks))


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a whole float32 mono clip (TTS output) with libswresample."""
    if rate_in == rate_out or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    frame = av.AudioFrame.from_ndarray(to_int16(audio).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate_in
    frame.time_base = fractions.Fraction(1, rate_in)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate_out)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # drain the filter
    return to_float32(np.concatenate(out)) if out else np.zeros(0, dtype=np.float32)


def make_frame(samples: np.ndarray, pts: int, rate: int = OUT_SAMPLE_RATE) -> av.AudioFrame:
    """A mono s16 frame for an outbound track."""
    frame = av.AudioFrame.from_ndarray(to_int16(samples).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, rate)
    return frame


def decimate_3(audio48: np.ndarray) -> np.ndarray:
    """48 kHz -> 16 kHz by averaging triples: cheap and good enough for the model's ear."""
    n = audio48.size // 3 * 3
    return audio48[:n].reshape(-1, 3).mean(axis=1).astype(np.float32)


def read_wav(path: str, rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read a WAV (any PCM format PyAV decodes) as float32 mono, optionally resampled."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        target = rate or stream.rate
        resampler = FrameResampler(target)
        parts = [resampler(frame) for frame in container.decode(stream)]
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return audio, target


def write_wav(path: str, audio: np.ndarray, rate: int) -> None:
    """Write float32 mono as 16-bit PCM WAV (stdlib, no extra dependency)."""
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(to_int16(audio).tobytes())


def speech_level_dbfs(audio: np.ndarray, frame: int = 320) -> float | None:
    """Speech level of a stretch of audio in dBFS: the RMS of its loudest 30 % of 20 ms frames
    (roughly its voiced part); None for silence or less than one frame."""
    if audio.size < frame:
        return None
    rms = np.sqrt(np.mean(np.square(audio[: audio.size // frame * frame].reshape(-1, frame)), axis=1))
    loud = rms[rms >= np.percentile(rms, 70)]
    level = float(np.sqrt(np.mean(np.square(loud)))) if loud.size else 0.0
    return 20 * float(np.log10(level)) if level > 1e-5 else None


class AudioTail:
    """The last ``seconds`` of a stream, kept as the chunks that came (whole chunks: it may
    hold up to one chunk more), for models that look back over recent audio."""

    def __init__(self, seconds: float, rate: int = SAMPLE_RATE) -> None:
        self.limit = int(seconds * rate)
        self._chunks: deque[np.ndarray] = deque()
        self._samples = 0

    def push(self, chunk: np.ndarray) -> None:
        self._chunks.append(chunk)
        self._samples += chunk.size
        while self._samples - self._chunks[0].size >= self.limit:
            self._samples -= self._chunks.popleft().size

    def chunks(self) -> list[np.ndarray]:
        return list(self._chunks)

    def clear(self) -> None:
        self._chunks.clear()
        self._samples = 0


def silent_runs(voiced: np.ndarray) -> list[tuple[int, int]]:
    """The runs of unvoiced frames in a voiced/unvoiced mask, as [start, end) frame indices."""
    edges = np.diff(np.concatenate([[1], voiced.astype(np.int8), [1]]))
    return list(zip(np.flatnonzero(edges == -1).tolist(), np.flatnonzero(edges == 1).tolist(), strict=True))
