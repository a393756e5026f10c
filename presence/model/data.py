"""Synthetic two-party call dialogues with per-micro-turn floor labels, from offline voices.

A dialogue is scripted event by event on a 16 kHz timeline: caller turns (some with a pause
cut at a comma, so the audio before the pause keeps its non-final prosody), the bot's answers,
caller backchannels and interruptions over the bot, side talk with a second person, urgent
background results, background speech or noise at 0/10/20 dB SNR, packet loss and a synthetic
camera stream. The bot's output is rendered with the hold reflex the deployed policy keeps (the
bot pauses at a voice onset and resumes after 300 ms of quiet), so the model sees the same
"held" states it meets in a call. Silero VAD runs over the caller's microphone mix the way the
inbound reader does. Labels come from the script: per micro-turn the floor action a good
system takes, the voice activity of both parties over the next 2 s, and a visual alert flag.

Synthesised clips and finished dialogues are cached under ``~/.cache/presence/train`` (or
``$PRESENCE_TRAIN_CACHE``), so a rerun only reads files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presence.bot.caller_state import CallerState
from presence.model import texts
from presence.model.configuration import EVENT_NAMES, FLOOR_ACTIONS
from presence.model.inputs import preprocess_frame
from presence.seams import FloorState, MicroTurn, VideoFrame

log = logging.getLogger(__name__)

SR = 16_000
MT_S = 0.2  # micro-turn
MT_SAMPLES = 3200
FRAME = 320  # 20 ms
ACT = 160  # 10 ms activity resolution
VAP_BINS = 10
IMAGE_SIZE = 64
GENERATOR_VERSION = "v7"  # bump when a change alters generated dialogues
YIELD_AFTER_S = 0.6  # an interruption is labelled "yield" from this much overlap on

ACTION = {name: i for i, name in enumerate(FLOOR_ACTIONS)}


def cache_dir() -> Path:
    return Path(os.environ.get("PRESENCE_TRAIN_CACHE", "~/.cache/presence/train")).expanduser()


# ---------------------------------------------------------------------- voices and clips
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
        i = 0
        while i < n:  # silent runs of >= 40 ms inside the sentence: candidate comma gaps
            if act[i]:
                i += 1
                continue
            j = i
            while j < n and not act[j]:
                j += 1
            if j - i >= 4 and 0.12 * n < i and j < 0.92 * n:
                score = abs((i + j) / 2 - expected) - 2.0 * (j - i)
                if best is None or score < best[0]:
                    best = (score, (i + j) // 2)
            i = j
        if best is not None:
            cut = best[1] * ACT
            return audio[:cut].copy(), audio[cut:].copy()
        # No visible gap: synthesise the halves (the first one ends on the comma).
        return self.clip(voice, text[: comma + 1]), self.clip(voice, text[comma + 1 :].strip())


# ---------------------------------------------------------------------- dialogues
@dataclass
class Dialogue:
    """One generated call; per-micro-turn arrays have N = len(caller) // 3200 rows."""

    caller: np.ndarray  # (S,) float32 microphone mix
    bot: np.ndarray  # (S,) float32 the bot's output
    vad: np.ndarray  # (F,) float32 Silero probability per 20 ms frame
    lost: np.ndarray  # (F,) bool
    video: np.ndarray  # (N, 3, 64, 64) uint8 (zeros where no frame)
    video_mask: np.ndarray  # (N,) bool
    events: np.ndarray  # (N, E) float32
    actions: np.ndarray  # (N,) int64 index into FLOOR_ACTIONS
    vap: np.ndarray  # (N, bins, 2) float32, -1 = unknown
    alert: np.ndarray  # (N,) float32, -1 = no video
    meta: dict[str, Any] = field(default_factory=dict)
    # The end-of-turn teacher (model.teacher.eot_tracks): the answer as served, and as a target.
    eot: np.ndarray | None = None  # (N,) float32, -1 = none
    eot_target: np.ndarray | None = None  # (N,) float32, -1 = none

    @property
    def turns(self) -> int:
        return int(self.actions.shape[0])

    @property
    def bot_speaking(self) -> np.ndarray:
        return self.events[:, EVENT_NAMES.index("bot_speaking")] > 0

    @property
    def bot_held(self) -> np.ndarray:
        return self.events[:, EVENT_NAMES.index("bot_held")] > 0

    @property
    def reply_ready(self) -> np.ndarray:
        return self.events[:, EVENT_NAMES.index("reply_ready")] > 0

    def signals(self) -> dict[str, np.ndarray]:
        """The audio, VAD, loss and video arrays of ``inputs`` (no events)."""
        n = self.turns
        return {
            "caller_audio": self.caller[: n * MT_SAMPLES].reshape(n, MT_SAMPLES),
            "bot_audio": self.bot[: n * MT_SAMPLES].reshape(n, MT_SAMPLES),
            "caller_vad": self.vad[: n * 10].reshape(n, 10),
            "caller_lost": self.lost[: n * 10].reshape(n, 10).astype(np.float32),
            "video": self.video,
            "video_mask": self.video_mask,
        }

    def inputs(self) -> dict[str, np.ndarray]:
        """Arrays for ``PresenceInteractionModel.forward`` (no batch axis)."""
        return {**self.signals(), "events": self.all_events()}

    def all_events(self) -> np.ndarray:
        """(N, len(EVENT_NAMES)) event tokens as served: ``event_flags`` of the ``FloorState``
        that ``StateTracker`` steps (the engine's caller tracking, the teacher's answers, the
        words), so training reads exactly what a call gives the model."""
        from presence.model.inputs import event_flags

        tracker = StateTracker(self)
        return np.stack(
            [event_flags(turn.events, tracker.update(k, turn)) for k, turn in enumerate(microturns(self))]
        ).astype(np.float32)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp,
            caller=np.round(np.clip(self.caller, -1, 1) * 32767).astype(np.int16),
            bot=np.round(np.clip(self.bot, -1, 1) * 32767).astype(np.int16),
            vad=self.vad.astype(np.float16),
            lost=self.lost,
            video=self.video,
            video_mask=self.video_mask,
            events=self.events.astype(np.uint8),
            actions=self.actions.astype(np.int8),
            vap=self.vap.astype(np.float16),
            alert=self.alert.astype(np.int8),
            meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8),
            **({} if self.eot is None else {"eot": self.eot, "eot_target": self.eot_target}),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Dialogue:
        with np.load(path) as z:
            return cls(
                caller=z["caller"].astype(np.float32) / 32767.0,
                bot=z["bot"].astype(np.float32) / 32767.0,
                vad=z["vad"].astype(np.float32),
                lost=z["lost"].astype(bool),
                video=z["video"],
                video_mask=z["video_mask"].astype(bool),
                events=z["events"].astype(np.float32),
                actions=z["actions"].astype(np.int64),
                vap=z["vap"].astype(np.float32),
                alert=z["alert"].astype(np.float32),
                meta=json.loads(bytes(z["meta"]).decode()),
                eot=z["eot"].astype(np.float32) if "eot" in z else None,
                eot_target=z["eot_target"].astype(np.float32) if "eot_target" in z else None,
            )


def _split_lines(lines: tuple[str, ...], split: str) -> list[str]:
    # Every fifth line is held out, so held-out dialogues say sentences never trained on.
    return [line for i, line in enumerate(lines) if (i % 5 == 4) == (split == "heldout")]


class _Builder:
    """Scripts one dialogue (see the module docstring). Times in seconds."""

    def __init__(
        self, bank: ClipBank, rng: np.random.Generator, seconds: float, split: str, espeak_only: bool
    ) -> None:
        self.bank = bank
        self.rng = rng
        self.split = split
        self.espeak_only = espeak_only
        self.limit = seconds
        self.length = int((seconds + 25.0) * SR)
        n_act = self.length // ACT
        self.fg = np.zeros(self.length, np.float32)  # the caller (and the caller's asides)
        self.other = np.zeros(self.length, np.float32)  # a second person in the caller's room
        self.bot = np.zeros(self.length, np.float32)
        self.fg_act = np.zeros(n_act, bool)
        self.other_act = np.zeros(n_act, bool)
        r = rng.random
        pool = [Voice("espeak", n, int(rng.choice(SPEEDS))) for n in ESPEAK_NAMES]
        callers = [Voice("espeak", n, int(rng.choice(SPEEDS))) for n in caller_voices(split)]
        self.caller_voice = callers[int(rng.integers(len(callers)))]
        roll = r()
        if not espeak_only and roll < 0.3:
            self.caller_voice = PIPER
        elif not espeak_only and roll < 0.3 + KOKORO_SHARE:
            self.caller_voice = KOKORO[split]
        self.bot_voice = Voice("espeak", "en-us", 175) if espeak_only or r() < 0.3 else PIPER
        others = [v for v in pool if v.name != self.caller_voice.name]
        self.other_voice = others[int(rng.integers(len(others)))]
        self.level = 10 ** (rng.uniform(-26, -14) / 20)  # caller speech RMS
        self.comma_lines = _split_lines(texts.CALLER_COMMA, split)
        self.plain_lines = _split_lines(texts.CALLER_PLAIN, split)
        # Annotations (seconds).
        self.bot_turns: list[tuple[float, float]] = []
        self.held: list[tuple[float, float]] = []
        self.turn_ends: list[tuple[float, float]] = []
        self.urgent: list[tuple[float, float]] = []
        self.interruptions: list[tuple[float, float]] = []
        self.bc_labels: list[float] = []
        self.pauses: list[tuple[float, float]] = []
        self.ready: list[tuple[float, float]] = []
        self.caller_bcs: list[tuple[float, float]] = []
        self.side_spans: list[tuple[float, float, bool]] = []
        self.utterances: list[tuple[float, float, str]] = []
        self._last_bc_label = -1e9

    # -------------------------------------------------------------- placing audio
    def _gain(self, clip: np.ndarray, level: float) -> float:
        act = activity(clip)
        voiced = clip[: act.size * ACT].reshape(-1, ACT)[act] if act.any() else clip
        rms = float(np.sqrt(np.mean(np.square(voiced, dtype=np.float64)))) or 1e-4
        return level / rms

    def _place(self, track: str, clip: np.ndarray, t: float, level: float) -> float:
        """Add a clip at time t with a speech level; returns its end time."""
        start = int(round(t * SR / ACT)) * ACT
        end = min(self.length, start + clip.size)
        if end <= start:
            return t
        audio = clip[: end - start] * self._gain(clip, level)
        getattr(self, track)[start:end] += audio
        act = activity(clip)[: (end - start) // ACT]
        getattr(self, f"{track}_act")[start // ACT : start // ACT + act.size] |= act
        return end / SR

    def _line(self, lines: list[str] | tuple[str, ...]) -> str:
        return str(lines[int(self.rng.integers(len(lines)))])

    def _ready_after(self, t: float, until: float) -> None:
        # The engine prepares a reply speculatively once the caller falls silent.
        start = t + self.rng.uniform(0.3, 0.9)
        if start < until:
            self.ready.append((start, until))

    # -------------------------------------------------------------- script pieces
    def caller_turn(self, t: float) -> tuple[float, bool]:
        """A caller turn from t; returns (end, urgent): urgent when the bot cut in."""
        rng = self.rng
        n_sent = 1 if rng.random() < 0.6 else 2
        pause_at = int(rng.integers(n_sent)) if rng.random() < 0.45 else -1
        voiced = 0.0
        for i in range(n_sent):
            if i == pause_at or rng.random() < 0.5:
                line = self._line(self.comma_lines)
            else:
                line = self._line(self.plain_lines)
            if i == pause_at and "," in line:
                first, second = self.bank.split_at_comma(self.caller_voice, line)
                start = t
                t = self._place("fg", first, t, self.level)
                voiced += first.size / SR
                pause = rng.uniform(0.7, 2.5)
                self.pauses.append((t, t + pause))
                self._ready_after(t, t + pause)
                if voiced >= 3.0 and t - self._last_bc_label >= 4.0:
                    self.bc_labels.append(t)
                    self._last_bc_label = t
                t += pause
                t = self._place("fg", second, t, self.level)
                voiced += second.size / SR
                self.utterances.append((start, t, line))
            else:
                clip = self.bank.clip(self.caller_voice, line)
                dur = clip.size / SR
                if not self.urgent and dur > 2.0 and rng.random() < 0.12:
                    return self._urgent(t, clip, line), True
                start = t
                t = self._place("fg", clip, t, self.level)
                voiced += dur
                self.utterances.append((start, t, line))
            if i < n_sent - 1:
                t += rng.uniform(0.1, 0.3)  # a short breath between sentences
        return t, False

    def _urgent(self, t: float, clip: np.ndarray, line: str) -> float:
        """A background result arrives while the caller talks: the bot cuts in, the caller
        stops shortly after; returns the end of the bot's turn."""
        rng = self.rng
        dur = clip.size / SR
        arrival = t + rng.uniform(0.6, dur - 0.8)
        bot_start = arrival + 0.6
        stop = bot_start + rng.uniform(0.3, 0.6)
        cut = clip[: int((stop - t) * SR)].copy()
        fade = min(cut.size, 320)
        cut[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        self._place("fg", cut, t, self.level)
        self.utterances.append(
            (t, stop, " ".join(line.split()[: max(1, int(len(line.split()) * (stop - t) / dur))]))
        )
        self.urgent.append((arrival, bot_start))
        end, _ = self.bot_turn(bot_start, self._line(texts.BOT_URGENT), overlaps=False, holds_from=stop + 0.1)
        return end

    def side_talk(self, t: float) -> float:
        """The caller turns to someone in the room; that person answers (lower level)."""
        rng = self.rng
        start = t
        line = self._line(texts.SIDE_SELF)
        t = self._place(
            "fg", self.bank.clip(self.caller_voice, line), t, self.level * 10 ** (-rng.uniform(6, 10) / 20)
        )
        self.utterances.append((start, t, line))
        t += rng.uniform(0.2, 0.6)
        t = self._place(
            "other",
            self.bank.clip(self.other_voice, self._line(texts.SIDE_OTHER)),
            t,
            self.level * 10 ** (-rng.uniform(8, 14) / 20),
        )
        self.side_spans.append((start, t, False))
        return t

    def bot_turn(
        self, start: float, line: str | None = None, overlaps: bool = True, holds_from: float | None = None
    ) -> tuple[float, float | None]:
        """The bot speaks from ``start``; callers may backchannel, talk aside or interrupt.
        Returns (end of the bot's turn, end of an interrupting caller turn or None)."""
        rng = self.rng
        clip = self.bank.clip(self.bot_voice, line or self._line(texts.BOT_LINES))
        nominal = clip.size / SR
        level = 10 ** (rng.uniform(-22, -18) / 20)
        clip = clip * self._gain(clip, level)
        yield_at: float | None = None
        interrupt_end: float | None = None
        onset = 0.0
        roll = rng.random()
        if overlaps and roll < 0.25 and nominal > 2.0:
            onset = start + rng.uniform(0.8, nominal - 0.5)
            text = self._line(texts.INTERRUPTIONS)
            interrupt_end = self._place("fg", self.bank.clip(self.caller_voice, text), onset, self.level)
            self.utterances.append((onset, interrupt_end, text))
            # The hold reflex silences the bot at once; the turn is given up once the overlap
            # is clearly more than a backchannel.
            yield_at = onset + rng.uniform(0.9, 1.5)
        elif overlaps and roll < 0.55 and nominal > 1.5:
            at = start + rng.uniform(0.5, max(0.6, nominal - 0.5))
            for _ in range(1 if rng.random() < 0.7 else 2):
                word = self._line(texts.CALLER_BACKCHANNELS)
                end = self._place(
                    "fg",
                    self.bank.clip(self.caller_voice, word),
                    at,
                    self.level * 10 ** (-rng.uniform(0, 4) / 20),
                )
                self.caller_bcs.append((at, end))
                self.utterances.append((at, end, word))
                at = end + rng.uniform(1.5, 3.0)
                if at > start + nominal:
                    break
        elif overlaps and roll < 0.7:
            at = start + rng.uniform(0.3, max(0.4, nominal - 0.3))
            end = self._place(
                "other",
                self.bank.clip(self.other_voice, self._line(texts.SIDE_OTHER)),
                at,
                self.level * 10 ** (-rng.uniform(8, 14) / 20),
            )
            self.side_spans.append((at, end, True))

        # Render with the hold reflex: pause at a voice onset in the caller's room, resume
        # after 300 ms of quiet; the turn ends when the audio is out or the bot yields.
        mic = self.fg_act | self.other_act
        step = int(round(start * SR / ACT))
        pos, run, quiet, held_since = 0, 0, 10**6, None
        enable = int(round((holds_from or 0.0) * SR / ACT))
        while pos < clip.size and step < mic.size - 1:
            t = step * ACT / SR
            if yield_at is not None and t >= yield_at:
                break
            if mic[step]:
                run, quiet = run + 1, 0
            else:
                quiet += 1
                if quiet >= 6:
                    run = 0
            if held_since is None and run >= 8 and step >= enable:
                held_since = t
            elif held_since is not None and quiet >= 30:
                self.held.append((held_since, t))
                held_since = None
            if held_since is None:
                chunk = clip[pos : pos + ACT]
                self.bot[step * ACT : step * ACT + chunk.size] += chunk
                pos += ACT
            step += 1
        end = step * ACT / SR
        if held_since is not None:
            self.held.append((held_since, end))
        self.bot_turns.append((start, end))
        if yield_at is not None:
            self.interruptions.append((onset, end))
        return end, interrupt_end

    # -------------------------------------------------------------- the whole call
    def script(self) -> float:
        rng = self.rng
        t = rng.uniform(0.3, 1.5)
        while t < self.limit - 3.0:
            if rng.random() < 0.15:
                side_end = self.side_talk(t)
                nxt = side_end + rng.uniform(0.6, 1.4)
                self._ready_after(side_end, nxt)
                t = nxt
            end, urgent = self.caller_turn(t)
            if urgent:
                t = end
            else:
                bot_start = end + rng.uniform(0.7, 1.4)
                self.turn_ends.append((end, bot_start))
                self._ready_after(end, bot_start)
                t, caller_end = self.bot_turn(bot_start)
                while caller_end is not None:  # the caller took the floor: answer them
                    resume = max(caller_end, t) + rng.uniform(0.7, 1.4)
                    self.turn_ends.append((max(caller_end, t), resume))
                    self._ready_after(max(caller_end, t), resume)
                    t, caller_end = self.bot_turn(resume, overlaps=rng.random() < 0.5)
                    if caller_end is not None and rng.random() < 0.5:
                        caller_end = None  # do not chain forever
            t += rng.uniform(0.3, 1.2)
        return t + 0.4


# ---------------------------------------------------------------------- background, loss, video
def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
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


def _background_speech(bank: ClipBank, n: int, rng: np.random.Generator, espeak_only: bool) -> np.ndarray:
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


def _loss_mask(frames: int, rng: np.random.Generator) -> np.ndarray:
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


class _Scene:
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


def _silero_frames(audio: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------------- assembling a dialogue
def generate_dialogue(
    bank: ClipBank, seed: int, seconds: float = 40.0, split: str = "train", espeak_only: bool = False
) -> Dialogue:
    rng = np.random.default_rng(seed)
    b = _Builder(bank, rng, seconds, split, espeak_only)
    total = b.script()
    n = int(total / MT_S)
    samples = n * MT_SAMPLES
    fg, other, bot = b.fg[:samples], b.other[:samples], b.bot[:samples]

    background = rng.choice(["none", "noise", "speech"], p=[0.4, 0.3, 0.3])
    snr = float(rng.choice([0.0, 10.0, 20.0]))
    mic = fg + other
    if background != "none":
        if background == "speech":
            bg = _background_speech(bank, samples, rng, espeak_only)
            if rng.random() < 0.3:  # babble
                bg += _background_speech(bank, samples, rng, espeak_only)
        else:
            bg = _noise(str(rng.choice(["white", "pink", "brown", "hum"])), samples, rng)
        mic = mic + bg * (b.level / 10 ** (snr / 20))
    frames = samples // FRAME
    lost = _loss_mask(frames, rng) if rng.random() < 0.2 else np.zeros(frames, bool)
    mic = mic.reshape(frames, FRAME)
    mic[lost] = 0.0
    mic = np.clip(mic.reshape(-1), -1.0, 1.0).astype(np.float32)
    vad = _silero_frames(mic)
    vad[lost] = 0.0  # the frame buffer hands a lost frame out with no probability
    bot = np.clip(bot, -1.0, 1.0).astype(np.float32)

    # Video at ~2 fps, half of the calls.
    video = np.zeros((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    video_mask = np.zeros(n, bool)
    alert = np.full(n, -1.0, np.float32)
    if rng.random() < 0.5:
        scene = _Scene(rng, total)
        times = np.arange(rng.uniform(0, 0.5), n * MT_S, 0.5)
        last_alert = 0.0
        ti = 0
        for k in range(n):
            t_s, t_e = k * MT_S, (k + 1) * MT_S
            while ti < times.size and times[ti] < t_e:
                if times[ti] >= t_s:
                    video[k] = preprocess_frame(scene.frame(float(times[ti])), IMAGE_SIZE)
                    video_mask[k] = True
                    last_alert = float(scene.alert_at(float(times[ti])))
                ti += 1
            alert[k] = last_alert

    labels, events = _labels(b, n)
    vap = _vap(b.fg_act, activity_track(bot), n)
    meta = {
        "seed": seed,
        "split": split,
        "caller_voice": b.caller_voice.key(),
        "bot_voice": b.bot_voice.key(),
        "background": str(background),
        "snr_db": snr if background != "none" else None,
        "loss": bool(lost.any()),
        "video": bool(video_mask.any()),
        "turn_ends": b.turn_ends,
        "pauses": b.pauses,
        "interruptions": b.interruptions,
        "caller_backchannels": b.caller_bcs,
        "side_talk": b.side_spans,
        "urgent": b.urgent,
        "bot_turns": b.bot_turns,
        "held": b.held,
        "utterances": b.utterances,
    }
    return Dialogue(mic, bot, vad, lost, video, video_mask, events, labels, vap, alert, meta)


def activity_track(audio: np.ndarray, floor_db: float = -50.0) -> np.ndarray:
    """10 ms activity of a rendered track (absolute floor: the track is mostly silence)."""
    n = audio.size // ACT
    frames = audio[: n * ACT].reshape(n, ACT).astype(np.float64)
    return 10 * np.log10((frames**2).mean(axis=1) + 1e-12) > floor_db


def _vap(caller_act: np.ndarray, bot_act: np.ndarray, n: int) -> np.ndarray:
    """Share of each 200 ms bin of the next 2 s in which each party is voiced (-1 past the end)."""
    per_bin = int(MT_S * SR / ACT)  # 20 activity frames per bin
    total = n * per_bin
    out = np.full((n, VAP_BINS, 2), -1.0, np.float32)
    for p, act in enumerate((caller_act[:total], bot_act[:total])):
        act = np.concatenate([act, np.zeros(max(0, total - act.size), bool)])
        bins = act.reshape(n, per_bin).mean(axis=1)  # bin k covers micro-turn k
        for j in range(VAP_BINS):
            src = np.arange(n) + 1 + j  # bin j after micro-turn k is micro-turn k+1+j
            ok = src < n
            out[ok, j, p] = bins[src[ok]]
    return out


def _labels(b: _Builder, n: int) -> tuple[np.ndarray, np.ndarray]:
    actions = np.zeros(n, np.int64)
    events = np.zeros((n, len(EVENT_NAMES)), np.float32)
    eps = 1e-6

    def inside(spans: list[tuple[float, float]], t: float) -> bool:
        return any(s <= t < e for s, e in spans)

    for k in range(n):
        t_e = (k + 1) * MT_S
        probe = t_e - eps
        speaking = inside(b.bot_turns, probe)
        events[k, EVENT_NAMES.index("bot_speaking")] = speaking
        events[k, EVENT_NAMES.index("bot_held")] = speaking and inside(b.held, probe)
        events[k, EVENT_NAMES.index("reply_ready")] = (not speaking) and inside(b.ready, probe)
        # An urgent result waits from its arrival until the bot starts saying it.
        waiting = any(r <= probe < s for r, s in b.urgent)
        events[k, EVENT_NAMES.index("result")] = waiting
        events[k, EVENT_NAMES.index("result_urgent")] = waiting
        if speaking:
            # 0.6 s of overlap: longer than a "yeah" / "uh-huh", so the two can be told apart.
            barge = any(o + YIELD_AFTER_S <= t_e + eps and probe < e for o, e in b.interruptions)
            actions[k] = ACTION["yield" if barge else "continue"]
        elif waiting:  # an urgent result while the caller talks: cut in now
            actions[k] = ACTION["interrupt"]
        elif any(e + 0.2 <= t_e + eps and probe < s for e, s in b.turn_ends):
            actions[k] = ACTION["speak"]
        elif any(p + 0.2 <= t_e + eps < p + 0.4 for p in b.bc_labels):
            actions[k] = ACTION["backchannel"]
        else:
            actions[k] = ACTION["listen"]
    return actions, events


# ---------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DataSpec:
    split: str = "train"  # "train" | "heldout"
    dialogues: int = 160
    seconds: float = 40.0
    seed: int = 0
    espeak_only: bool = False

    def path(self, i: int, root: Path) -> Path:
        tag = f"{GENERATOR_VERSION}-{self.split}-s{self.seed}-{int(self.seconds)}s-{'e' if self.espeak_only else 'm'}"
        return root / "dialogues" / f"{tag}-{i:04d}.npz"

    def dialogue_seed(self, i: int) -> int:
        base = 1_000_003 if self.split == "heldout" else 0
        return base + self.seed * 100_000 + i


def iter_dialogues(
    spec: DataSpec, bank: ClipBank | None = None, progress: Callable[[int, int], None] | None = None
) -> Iterator[Dialogue]:
    """Generate (or read from the cache) the dialogues of a spec."""
    from presence.model.teacher import with_teacher

    root = cache_dir()
    bank = bank or ClipBank(root)
    for i in range(spec.dialogues):
        path = spec.path(i, root)
        if path.exists():
            try:
                d = Dialogue.load(path)
                if d.eot is None:  # cached before the teacher track existed
                    with_teacher(d).save(path)
                yield d
                continue
            except (OSError, ValueError, KeyError):
                log.warning("cached dialogue %s unreadable: regenerating", path)
        d = with_teacher(
            generate_dialogue(bank, spec.dialogue_seed(i), spec.seconds, spec.split, spec.espeak_only)
        )
        d.save(path)
        if progress is not None:
            progress(i + 1, spec.dialogues)
        yield d


def load_dialogues(spec: DataSpec, progress: Callable[[int, int], None] | None = None) -> list[Dialogue]:
    return list(iter_dialogues(spec, progress=progress))


# ---------------------------------------------------------------------- micro-turns for policies
def microturns(d: Dialogue, call_id: str = "synthetic") -> list[MicroTurn]:
    """The dialogue as the engine's micro-turns (what a FloorPolicy receives)."""
    arrays = d.signals()
    out = []
    for k in range(d.turns):
        video: tuple[VideoFrame, ...] = ()
        if d.video_mask[k]:
            video = (VideoFrame(k * MT_S, "caller", np.ascontiguousarray(d.video[k].transpose(1, 2, 0))),)
        arrived = any(k * MT_S <= r < (k + 1) * MT_S for r, _ in d.meta["urgent"])
        events = ("job_result_injected",) if arrived else ()
        out.append(
            MicroTurn(
                call_id=call_id,
                index=k,
                start=k * MT_S,
                duration=MT_S,
                caller_audio=arrays["caller_audio"][k],
                bot_audio=arrays["bot_audio"][k],
                lost=d.lost[k * 10 : (k + 1) * 10],
                vad=arrays["caller_vad"][k],
                video=video,
                speaking=("caller",) if (arrays["caller_vad"][k] >= 0.5).any() else (),
                events=events,
            )
        )
    return out


class StateTracker:
    """The engine's ``FloorState`` over a scripted dialogue: the caller fields come from the
    very ``CallerState`` the engine steps (``presence.bot.caller_state``), bot speaking/held/
    reply-ready from the script. The utterance ends when the bot takes the turn, or when a
    held bot resumes (the backchannel path), as in the engine. ``partial_text`` gets the
    script's words 0.6 s late, like a streaming ASR's partials."""

    def __init__(self, d: Dialogue, threshold: float = 0.5, asr_delay_s: float = 0.6) -> None:
        self.d = d
        self.asr_delay = asr_delay_s
        self.state = FloorState()
        self.caller = CallerState(threshold)
        self._prev_bot = False
        self._prev_held = False
        self._words: list[tuple[float, str]] = []
        for s, e, text in d.meta["utterances"]:
            words = text.split()
            for i, w in enumerate(words):
                self._words.append((s + (e - s) * (i + 1) / len(words), w))
        self._words.sort()

    def update(self, k: int, turn: MicroTurn) -> FloorState:
        s, d = self.state, self.d
        bot, held = bool(d.bot_speaking[k]), bool(d.bot_held[k])
        if (bot and not self._prev_bot) or (self._prev_held and not held and bot):
            self.caller.end_utterance()
        s.bot_speaking, s.bot_held = bot, held
        self.caller.step(turn, s)
        utt_start = self.caller.utt_start
        if utt_start is not None:
            heard = turn.end - self.asr_delay
            s.partial_text = " ".join(w for t, w in self._words if utt_start - 0.1 <= t <= heard)
        else:
            s.partial_text = ""
        s.eot_probability = None if d.eot is None or d.eot[k] < 0 else float(d.eot[k])
        s.reply_ready = bool(d.reply_ready[k])
        s.result_waiting = bool(d.events[k, EVENT_NAMES.index("result")])
        s.result_urgent = bool(d.events[k, EVENT_NAMES.index("result_urgent")])
        self._prev_bot, self._prev_held = bot, held
        return s
