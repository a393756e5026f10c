"""The raw sources a synthetic dialogue mixes: caller and bot voices (piper, Kokoro-82M,
espeak-ng) synthesised once and cached as clips, background noise and speech, bursty packet
loss, a synthetic camera, and Silero VAD over the mix as the inbound reader runs it."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from presence.media.audio import silent_runs
from presence.model import texts

SR = 16_000
FRAME = 320  # 20 ms
ACT = 160  # 10 ms activity resolution


def cache_dir() -> Path:
    return Path(os.environ.get("PRESENCE_TRAIN_CACHE", "~/.cache/presence/train")).expanduser()


@dataclass(frozen=True, slots=True)
class Voice:
    engine: str  # "piper" (bundled joe voice), "kokoro" (natural prosody) or "espeak"
    name: str = ""
    speed: int = 175

    def key(self) -> str:
        return f"{self.engine}:{self.name}:{self.speed}"


PIPER = Voice("piper")
ESPEAK_NAMES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-029",
    "en-us-nyc",
    "en-gb-x-rp",
    "en-us+f3",
    "en-gb+f4",
    "en-us+m3",
    "en-us+f2",
    "en-gb+m2",
)
SPEEDS = (150, 170, 190)
# Held-out callers speak in voices never trained on (and say sentences never trained on).
HELDOUT_ESPEAK = ("en-gb-scotland", "en-us+f2", "en-gb+m2")
# Kokoro-82M: natural prosody, the cue smart-turn reads (flite and espeak-ng fool it); slow to
# synthesise (0.7x real time on one core), so one voice per split; the packages hold Japanese
# voices only, which speak English lightly accented (jm_kumo and jf_tebukuro fool smart-turn: not used).
KOKORO = {"train": Voice("kokoro", "jf_alpha"), "heldout": Voice("kokoro", "jf_gongitsune")}
KOKORO_SHARE = 0.35


def caller_voices(split: str) -> list[str]:
    """The espeak-ng caller voice names of a split."""
    return [n for n in ESPEAK_NAMES if (n in HELDOUT_ESPEAK) == (split == "heldout")]


def activity(audio: np.ndarray, floor_db: float = -35.0) -> np.ndarray:
    """Voiced 10 ms frames of a clean clip: energy within ``floor_db`` of its loudest frame."""
    n = audio.size // ACT
    if n == 0:
        return np.zeros(0, dtype=bool)
    frames = audio[: n * ACT].reshape(n, ACT).astype(np.float64)
    energy = 10 * np.log10((frames**2).mean(axis=1) + 1e-12)
    return energy > energy.max() + floor_db


def _trim(audio: np.ndarray) -> np.ndarray:
    act = activity(audio, -40.0)
    if not act.any():
        return audio
    idx = np.flatnonzero(act)
    start = max(0, idx[0] * ACT - 480)
    end = min(audio.size, (idx[-1] + 1) * ACT + 480)
    return audio[start:end].astype(np.float32)


class ClipBank:
    """Synthesises lines with piper / espeak-ng at 16 kHz and caches them on disk."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_dir()) / "clips"
        self.root.mkdir(parents=True, exist_ok=True)
        self._engines: dict[str, Any] = {}
        self._memo: dict[str, np.ndarray] = {}
        self.synthesised = 0

    def _path(self, voice: Voice, text: str, suffix: str = "") -> Path:
        digest = hashlib.sha1(f"{voice.key()}|{text}".encode()).hexdigest()[:20]
        return self.root / f"{digest}{suffix}.npy"

    def _engine(self, voice: Voice) -> Any:
        from presence.bot.backends.tts import EspeakTTS, PiperTTS

        key = voice.key()
        if key not in self._engines:
            if voice.engine == "piper":
                self._engines[key] = PiperTTS()
            elif voice.engine == "kokoro":
                from presence.bot.backends.kokoro import KokoroTTS

                self._engines[key] = KokoroTTS(voice.name)
            else:
                self._engines[key] = EspeakTTS(voice.name, speed=voice.speed, max_chars=400)
        return self._engines[key]

    def _synth(self, voice: Voice, text: str) -> np.ndarray:
        from presence.media.audio import resample

        tts = self._engine(voice)
        chunks = list(tts.synthesize(text))
        if not chunks:
            raise RuntimeError(f"{voice.key()} produced no audio for {text!r}")
        audio = resample(np.concatenate(chunks), tts.sample_rate, SR)
        self.synthesised += 1
        return _trim(audio)

    def clip(self, voice: Voice, text: str) -> np.ndarray:
        path = self._path(voice, text)
        key = str(path)
        if key in self._memo:
            return self._memo[key]
        if path.exists():
            audio = np.load(path)
        else:
            audio = self._synth(voice, text)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # data is made by several processes
            np.save(tmp, audio.astype(np.float32))
            tmp.replace(path)
        self._memo[key] = audio
        return audio

    def split_at_comma(self, voice: Voice, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The sentence cut at its first comma, from one synthesis: the first part keeps the
        continuing intonation a speaker has before a mid-sentence pause."""
        comma = text.index(",")
        audio = self.clip(voice, text)
        act = activity(audio, -30.0)
        n = act.size
        expected = n * (comma + 1) / len(text)
        best: tuple[float, int] | None = None
        for i, j in silent_runs(act):  # silent runs of >= 40 ms inside the sentence: comma gaps
            if j - i >= 4 and 0.12 * n < i and j < 0.92 * n:
                score = abs((i + j) / 2 - expected) - 2.0 * (j - i)
                if best is None or score < best[0]:
                    best = (score, (i + j) // 2)
        if best is not None:
            cut = best[1] * ACT
            return audio[:cut].copy(), audio[cut:].copy()
        # No visible gap: synthesise the halves (the first one ends on the comma).
        return self.clip(voice, text[: comma + 1]), self.clip(voice, text[comma + 1 :].strip())


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white":
        out = white
    elif kind in ("pink", "brown"):
        spec = np.fft.rfft(white)
        f = np.maximum(np.fft.rfftfreq(n, 1 / SR), 20.0)
        spec /= np.sqrt(f) if kind == "pink" else f
        out = np.fft.irfft(spec, n)
    else:  # mains hum with harmonics and a little hiss
        t = np.arange(n) / SR
        base = 50.0 if rng.random() < 0.5 else 60.0
        out = sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.28)) / k for k in (1, 2, 3, 5))
        out = out + 0.05 * white
    out = out - out.mean()
    return (out / (np.sqrt(np.mean(out**2)) + 1e-12)).astype(np.float32)


def background_speech(bank: ClipBank, n: int, rng: np.random.Generator, espeak_only: bool) -> np.ndarray:
    track = np.zeros(n, np.float32)
    lines = texts.BOT_LINES + texts.CALLER_PLAIN + texts.INTERRUPTIONS
    t = int(rng.uniform(0, 1.0) * SR)
    while t < n:
        name = ESPEAK_NAMES[int(rng.integers(len(ESPEAK_NAMES)))]
        voice = (
            PIPER
            if not espeak_only and rng.random() < 0.2
            else Voice("espeak", name, int(rng.choice(SPEEDS)))
        )
        clip = bank.clip(voice, str(lines[int(rng.integers(len(lines)))]))
        end = min(n, t + clip.size)
        track[t:end] += clip[: end - t] / (np.sqrt(np.mean(clip**2)) + 1e-9)
        t = end + int(rng.uniform(0.2, 1.2) * SR)
    return track


def loss_mask(frames: int, rng: np.random.Generator) -> np.ndarray:
    """Gilbert-style bursty packet loss over 20 ms frames."""
    lost = np.zeros(frames, bool)
    p_start = rng.uniform(0.005, 0.03)
    mean_burst = rng.uniform(1.0, 4.0)
    i = 0
    while i < frames:
        if rng.random() < p_start:
            length = 1 + int(rng.exponential(mean_burst))
            lost[i : i + length] = True
            i += length
        i += 1
    return lost


class Scene:
    """A synthetic camera: a face on a gradient; an alert is a big flashing red-orange shape."""

    def __init__(self, rng: np.random.Generator, seconds: float) -> None:
        self.rng = rng
        sizes = ((160, 120), (120, 160), (176, 144), (96, 96), (320, 240))
        self.w, self.h = sizes[int(rng.integers(len(sizes)))]
        self.c0 = rng.uniform(30, 200, 3)
        self.c1 = rng.uniform(30, 200, 3)
        self.skin = np.array([rng.uniform(150, 240), rng.uniform(100, 180), rng.uniform(70, 150)])
        self.alerts: list[tuple[float, float]] = []
        for _ in range(int(rng.integers(0, 3))):
            s = rng.uniform(1.0, max(1.5, seconds - 3.0))
            self.alerts.append((s, s + rng.uniform(1.5, 3.0)))
        yy, xx = np.mgrid[0 : self.h, 0 : self.w]
        self.yy, self.xx = yy / self.h, xx / self.w

    def alert_at(self, t: float) -> bool:
        return any(s <= t < e for s, e in self.alerts)

    def frame(self, t: float) -> np.ndarray:
        rng = self.rng
        img = self.c0 + (self.c1 - self.c0) * self.yy[..., None]
        cx, cy = 0.5 + 0.08 * math.sin(0.7 * t), 0.45 + 0.03 * math.sin(1.3 * t)
        face = ((self.xx - cx) / 0.18) ** 2 + ((self.yy - cy) / 0.26) ** 2 < 1.0
        img[face] = self.skin
        if rng.random() < 0.3:  # a harmless small object (never red)
            ox, oy, s = rng.uniform(0, 0.85), rng.uniform(0, 0.85), 0.1
            box = (self.xx > ox) & (self.xx < ox + s) & (self.yy > oy) & (self.yy < oy + s)
            img[box] = [rng.uniform(0, 120), rng.uniform(80, 255), rng.uniform(80, 255)]
        if self.alert_at(t):
            s = rng.uniform(0.35, 0.55)
            ox, oy = rng.uniform(0, 1 - s), rng.uniform(0, 1 - s)
            tri = (
                (self.yy > oy)
                & (self.yy < oy + s)
                & (np.abs(self.xx - ox - s / 2) < (self.yy - oy) / 2 + 0.02)
            )
            flash = 255 if int(t * 4) % 2 == 0 else 200
            img[tri] = [flash, rng.uniform(40, 140), 0]
        img += rng.normal(0, 6, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)


def silero_frames(audio: np.ndarray) -> np.ndarray:
    """Silero probability per 20 ms frame, as the inbound reader assigns it: every frame
    carries the probability of the 512-sample chunk that completed it."""
    from presence.bot.backends.vad import SileroVAD

    vad = SileroVAD()
    chunk = vad.chunk_samples
    n_chunks = int(math.ceil(audio.size / chunk))
    padded = np.zeros(n_chunks * chunk, np.float32)
    padded[: audio.size] = audio
    probs = np.array(
        [vad.probability(padded[i * chunk : (i + 1) * chunk]) for i in range(n_chunks)], np.float32
    )
    frames = audio.size // FRAME
    ends = (np.arange(frames) + 1) * FRAME - 1
    return probs[np.minimum(ends // chunk, n_chunks - 1)]
