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

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from presence.model import texts
from presence.model.configuration import EVENT_NAMES, FLOOR_ACTIONS
from presence.model.dialogue import MT_S, MT_SAMPLES, Dialogue
from presence.model.inputs import preprocess_frame
from presence.model.sources import (
    ACT,
    ESPEAK_NAMES,
    FRAME,
    KOKORO,
    KOKORO_SHARE,
    PIPER,
    SPEEDS,
    SR,
    ClipBank,
    Scene,
    Voice,
    activity,
    background_speech,
    cache_dir,
    caller_voices,
    loss_mask,
    noise,
    silero_frames,
)

log = logging.getLogger(__name__)

VAP_BINS = 10
IMAGE_SIZE = 64
GENERATOR_VERSION = "v7"  # bump when a change alters generated dialogues
YIELD_AFTER_S = 0.6  # an interruption is labelled "yield" from this much overlap on

ACTION = {name: i for i, name in enumerate(FLOOR_ACTIONS)}


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
            bg = background_speech(bank, samples, rng, espeak_only)
            if rng.random() < 0.3:  # babble
                bg += background_speech(bank, samples, rng, espeak_only)
        else:
            bg = noise(str(rng.choice(["white", "pink", "brown", "hum"])), samples, rng)
        mic = mic + bg * (b.level / 10 ** (snr / 20))
    frames = samples // FRAME
    lost = loss_mask(frames, rng) if rng.random() < 0.2 else np.zeros(frames, bool)
    mic = mic.reshape(frames, FRAME)
    mic[lost] = 0.0
    mic = np.clip(mic.reshape(-1), -1.0, 1.0).astype(np.float32)
    vad = silero_frames(mic)
    vad[lost] = 0.0  # the frame buffer hands a lost frame out with no probability
    bot = np.clip(bot, -1.0, 1.0).astype(np.float32)

    # Video at ~2 fps, half of the calls.
    video = np.zeros((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    video_mask = np.zeros(n, bool)
    alert = np.full(n, -1.0, np.float32)
    if rng.random() < 0.5:
        scene = Scene(rng, total)
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
