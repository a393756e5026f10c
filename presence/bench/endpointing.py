"""Offline endpointing sweep: the smart-turn detector + words + silence, replayed over a grid.

``python -m presence.bench.endpointing --out DIR --limit N`` writes FDB-style ``pause`` and
``turn_taking`` stimuli twice (the piper voice alone, and the espeak-ng / flite voices), finds
speech and silence with Silero VAD (512-sample chunks, ``vad_threshold``), and at every silence
after speech inside the user's turn asks the detector at onset + 0, 100, 200, ... ms (its audio:
the last 8 s up to that moment). Each silence is one record in ``DIR/endpointing.json``: a real
turn end, the scripted mid-sentence pause, or a short gap inside the speech; with the words
said so far and the detector's answers over time, so a decision rule replays without the model.

The replayed rule is the fused policy's endpointing (presence/bot/policy.py):

    needed = min_delay  if p >= complete_threshold and the words look finished
             max_delay  if p < incomplete_threshold or the words end on a continuation word
             delay      otherwise
    fire when silence >= needed, p being the detector's latest answer at that silence

Detector latency is not modelled (an answer counts from the silence its audio ends at).
Beyond that rule the grid also tries ``hold_ms``: the answer at that silence is kept instead of
the latest (the detector's answer rises with the trailing silence it hears, pauses included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from presence.bench.fdb.stimuli import RATE, Synthesizer, available_voices, generate, load_meta
from presence.bot.policy import sounds_unfinished
from presence.media.audio import read_wav
from presence.seams import TurnDetector

CATEGORIES = ("pause", "turn_taking")
TAIL_S = 3.2  # dither appended to every input: the user stays silent after the turn
CHUNK = 512  # Silero's chunk (32 ms)
_WORDS = re.compile(r"[a-z0-9']+")


@dataclass
class Silence:
    sample: str
    category: str
    voice: str
    kind: str  # end (the turn is over) | pause (the scripted mid-sentence pause) | gap (inside speech)
    onset_s: float  # in the input
    silence_ms: float  # how long the silence lasts (VAD); ends are padded to TAIL_S
    words: str  # what the user has said so far (the script, as an ASR would give it)
    step_ms: int
    probs: list[float]  # the detector at onset + k * step_ms

    @property
    def family(self) -> str:
        return self.voice.split(":", 1)[0]


@dataclass(frozen=True)
class Rule:
    min_delay_ms: int
    delay_ms: int
    max_delay_ms: int
    complete_threshold: float
    incomplete_threshold: float
    hold_ms: int | None = None  # None: the latest answer; else the answer at this silence, kept

    def fire_ms(self, probs: Sequence[float], step_ms: int, finished_words: bool) -> float:
        """The silence at which the rule takes the turn (assuming the silence lasts)."""
        for k, p in enumerate(probs):
            if self.hold_ms is not None and k * step_ms > self.hold_ms:
                p = probs[self.hold_ms // step_ms]
            if p >= self.complete_threshold and finished_words:
                needed = self.min_delay_ms
            elif p < self.incomplete_threshold or not finished_words:
                needed = self.max_delay_ms
            else:
                needed = self.delay_ms
            needed = min(needed, self.max_delay_ms)
            if needed < (k + 1) * step_ms:
                return float(max(k * step_ms, needed))
        return float(self.max_delay_ms)

    def label(self) -> str:
        held = "latest p" if self.hold_ms is None else f"p held @{self.hold_ms}"
        return (
            f"{self.min_delay_ms}/{self.delay_ms}/{self.max_delay_ms} "
            f"c>={self.complete_threshold:.1f} i<{self.incomplete_threshold:.1f} {held}"
        )


# The rules policy (no detector: 300 ms, or 800 ms after a continuation word) and the fused
# policy's defaults in presence/config.py, for comparison.
WORDS_ONLY = Rule(300, 300, 800, 0.0, 0.0)
CURRENT = Rule(200, 600, 2500, 0.7, 0.3)
# The same thresholds, asking once at 200 ms of silence and keeping that answer, as pipecat does
# (it asks when its VAD declares the end of speech, 200 ms by default, then waits up to 3 s).
ASK_ONCE = Rule(200, 600, 2500, 0.7, 0.3, 200)
GRID = {
    "min_delay_ms": (100, 200, 300),
    "delay_ms": (400, 600, 800),
    "max_delay_ms": (1500, 2000, 2500, 3000),
    "complete_threshold": (0.5, 0.6, 0.7, 0.8),
    "incomplete_threshold": (0.2, 0.3, 0.4),
    "hold_ms": (None, 0, 100, 200),  # beyond the brief's rule (None): ask once, keep the answer
}


def grid() -> list[Rule]:
    return [Rule(*combo) for combo in itertools.product(*GRID.values())]


# ---------------------------------------------------------------------------- measuring


def _words(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def vad_probs(audio: np.ndarray) -> np.ndarray:
    from presence.bot.backends.vad import SileroVAD

    vad = SileroVAD()
    n = audio.size // CHUNK
    return np.array([vad.probability(audio[i * CHUNK : (i + 1) * CHUNK]) for i in range(n)])


def silences(voiced: np.ndarray) -> list[tuple[int, int]]:
    """(first silent chunk, first voiced chunk after it) of every silence after speech."""
    spans: list[tuple[int, int]] = []
    k = int(np.argmax(voiced)) if voiced.any() else voiced.size
    while k < voiced.size:
        while k < voiced.size and voiced[k]:
            k += 1
        start = k
        while k < voiced.size and not voiced[k]:
            k += 1
        if start < voiced.size:
            spans.append((start, k))
    return spans


def words_so_far(turns: Sequence[dict[str, Any]], t: float) -> str:
    """The scripted words said by ``t`` (a turn counts in proportion to its elapsed time)."""
    said: list[str] = []
    for turn in turns:
        words = _words(turn["text"]).split()
        if t >= turn["end"] - 0.05:
            said += words
        elif t > turn["start"]:
            said += words[: int(len(words) * (t - turn["start"]) / (turn["end"] - turn["start"]))]
    return " ".join(said)


def measure_sample(
    sample_dir: Path,
    family_set: str,
    detector: TurnDetector,
    vad_threshold: float,
    step_ms: int,
    horizon_ms: int,
) -> list[Silence]:
    meta = load_meta(sample_dir)
    audio, _ = read_wav(str(sample_dir / "input.wav"), RATE)
    tail = np.random.default_rng(meta.seed % 2**32).standard_normal(int(TAIL_S * RATE)) * 1e-4
    audio = np.concatenate([audio, tail.astype(np.float32)])
    voiced = vad_probs(audio) >= vad_threshold
    turn_end = float(meta.turn_end or meta.user_turns[-1]["end"])
    records: list[Silence] = []
    for start, stop in silences(voiced):
        onset = start * CHUNK / RATE
        if onset < meta.user_turns[0]["start"] or onset > turn_end + 0.5:
            continue  # not after the user's speech (a VAD blip in the tail)
        silence_ms = (stop - start) * CHUNK / RATE * 1000
        offset = stop * CHUNK / RATE
        # The scripted pause is the silence covering most of it; VAD dips next to it are gaps.
        pause = [p for p in meta.pauses if min(offset, p[1]) - max(onset, p[0]) >= 0.5 * (p[1] - p[0])]
        if stop == voiced.size:  # the silence that lasts: the turn is over
            kind, words = "end", words_so_far(meta.user_turns, turn_end)
        elif pause:
            kind, words = "pause", words_so_far(meta.user_turns, pause[0][0])
        else:
            kind, words = "gap", words_so_far(meta.user_turns, onset)
        probs = []
        k = 0
        while k * step_ms <= min(silence_ms, horizon_ms):
            end = start * CHUNK + k * step_ms * RATE // 1000
            probs.append(round(detector.probability(audio[max(0, end - 8 * RATE) : end]), 4))
            k += 1
        records.append(
            Silence(
                sample=f"{family_set}/{meta.id}",
                category=meta.category,
                voice=meta.voice,
                kind=kind,
                onset_s=round(onset, 3),
                silence_ms=round(silence_ms, 1),
                words=words,
                step_ms=step_ms,
                probs=probs,
            )
        )
    return records


def measure(
    out: Path, limit: int, seed: int, step_ms: int, horizon_ms: int, vad_threshold: float
) -> list[Silence]:
    from presence.bot.backends.turn import SmartTurnDetector

    detector = SmartTurnDetector()
    detector.load()
    synth = Synthesizer()
    voices = available_voices()
    sets = {
        "piper": [v for v in voices if v[0] == "piper"],
        "synthetic": [v for v in voices if v[0] != "piper"],
    }
    records: list[Silence] = []
    for name, chosen in sets.items():
        if not chosen:
            print(f"no {name} voices here (apt-get install espeak-ng flite?)", file=sys.stderr)
            continue
        dirs = generate(out / "stimuli" / name, CATEGORIES, limit, seed, synth=synth, voices=chosen)
        for k, sample_dir in enumerate(dirs, 1):
            started = time.perf_counter()
            got = measure_sample(sample_dir, name, detector, vad_threshold, step_ms, horizon_ms)
            records += got
            print(
                f"\r{name} {k}/{len(dirs)} {sample_dir.name}: {len(got)} silences, "
                f"{time.perf_counter() - started:.1f} s   ",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print(file=sys.stderr)
    return records


# ---------------------------------------------------------------------------- replaying


@dataclass
class Score:
    pauses: int
    pause_taken: float  # fraction of mid-sentence pauses where the rule fired before they ended
    gaps: int
    gap_taken: float
    ends: int
    end_p50: float
    end_p95: float
    missed: int


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def score(rule: Rule, records: Iterable[Silence]) -> Score:
    taken = {"pause": [0, 0], "gap": [0, 0]}
    latencies: list[float] = []
    missed = 0
    for r in records:
        fire = rule.fire_ms(r.probs, r.step_ms, not sounds_unfinished(r.words))
        if r.kind == "end":
            if fire < r.silence_ms:
                latencies.append(fire)
            else:
                missed += 1
        else:
            taken[r.kind][0] += fire < r.silence_ms
            taken[r.kind][1] += 1
    return Score(
        pauses=taken["pause"][1],
        pause_taken=taken["pause"][0] / max(1, taken["pause"][1]),
        gaps=taken["gap"][1],
        gap_taken=taken["gap"][0] / max(1, taken["gap"][1]),
        ends=len(latencies) + missed,
        end_p50=_pct(latencies, 0.5),
        end_p95=_pct(latencies, 0.95),
        missed=missed,
    )


def _row(name: str, s: Score) -> str:
    return (
        f"| {name} | {s.pause_taken:5.0%} ({s.pauses}) | {s.gap_taken:4.0%} ({s.gaps}) | "
        f"{s.end_p50:5.0f} | {s.end_p95:5.0f} | {s.missed}/{s.ends} |"
    )


HEADER = "| rule min/delay/max complete incomplete | pauses taken (n) | gaps taken (n) | end p50 ms | end p95 ms | ends missed |\n|---|---|---|---|---|---|"


def detector_summary(records: Sequence[Silence], families: dict[str, list[str]]) -> list[str]:
    lines = [
        "| voices | kind | n | median p @0 ms | @200 ms | @500 ms | share p>=0.5 @200 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for fam, members in families.items():
        for kind in ("end", "pause"):
            chosen = [r for r in records if r.family in members and r.kind == kind]
            if not chosen:
                continue
            at = [[r.probs[min(k, len(r.probs) - 1)] for r in chosen] for k in (0, 2, 5)]
            share = sum(p >= 0.5 for p in at[1]) / len(chosen)
            lines.append(
                f"| {fam} | {kind} | {len(chosen)} | {statistics.median(at[0]):.2f} | "
                f"{statistics.median(at[1]):.2f} | {statistics.median(at[2]):.2f} | {share:.0%} |"
            )
    return lines


def report(records: Sequence[Silence], top: int = 6) -> str:
    families = {
        "piper": ["piper"],
        "espeak-ng": ["espeak"],
        "flite": ["flite"],
        "espeak-ng+flite": ["espeak", "flite"],
        "all": ["piper", "espeak", "flite"],
    }
    lines = ["## smart-turn v3.2 answers by voice", "", *detector_summary(records, families)]
    rules = grid()
    by_family: dict[str, dict[Rule, Score]] = {}
    for fam, members in families.items():
        chosen = [r for r in records if r.family in members]
        if chosen:
            by_family[fam] = {rule: score(rule, chosen) for rule in [*rules, WORDS_ONLY, CURRENT, ASK_ONCE]}
    best_piper: list[Rule] = []
    for fam, scores in by_family.items():

        def key(rule: Rule, scores: dict[Rule, Score] = scores) -> tuple[float, float, float]:
            return (round(scores[rule].pause_taken, 3), scores[rule].end_p50, scores[rule].end_p95)

        latest = sorted((r for r in rules if r.hold_ms is None), key=key)[:top]
        held = sorted((r for r in rules if r.hold_ms is not None), key=key)[:top]
        if fam == "piper":
            best_piper = [*latest[:2], *held[:2]]
        lines += ["", f"## {fam}: best {top} by (pauses taken, end p50), latest p / p held", "", HEADER]
        lines += [_row(r.label(), scores[r]) for r in [*latest, *held]]
        lines.append(_row("baseline words only (rules 300/800)", scores[WORDS_ONLY]))
        lines.append(_row("current fused defaults " + CURRENT.label(), scores[CURRENT]))
        lines.append(_row("current thresholds, asked once " + ASK_ONCE.label(), scores[ASK_ONCE]))
        if fam != "piper":
            lines += [_row("piper's best: " + r.label(), scores[r]) for r in best_piper]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="offline endpointing sweep with the smart-turn detector")
    parser.add_argument("--out", type=Path, default=Path("/tmp/endpointing"))
    parser.add_argument("--limit", type=int, default=20, help="samples per category and voice set")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--step-ms", type=int, default=100)
    parser.add_argument("--horizon-ms", type=int, default=3000, help="last silence the detector is asked at")
    parser.add_argument("--vad-threshold", type=float, default=0.5)
    parser.add_argument("--replay", action="store_true", help="only replay DIR/endpointing.json")
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args(argv)
    path = args.out / "endpointing.json"
    if args.replay:
        saved = json.loads(path.read_text())
        config, records = saved["config"], [Silence(**r) for r in saved["silences"]]
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        records = measure(args.out, args.limit, args.seed, args.step_ms, args.horizon_ms, args.vad_threshold)
        config = {k: v for k, v in vars(args).items() if k not in ("out", "replay", "top")}
        path.write_text(json.dumps({"config": config, "silences": [asdict(r) for r in records]}, indent=1))
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items() if k != "top")
    head = f"# python -m presence.bench.endpointing {options}: {len(records)} silences\n\n"
    table = head + report(records, args.top)
    (args.out / "endpointing.txt").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
