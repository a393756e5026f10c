"""``presence bench interpret``: the live interpreter measured over real calls.

A server in this process as ``presence serve`` builds it, one per policy (``interpret_policy``
simultaneous or consecutive; the backends are built once and shared, as the tests' servers
share them), and per direction a fresh room with two aiortc callers: a speaker of the source
language and a listener of the target language who hears only the interpretation
(``original=False``). The speaker says each corpus sentence (presence.bench.interpret_corpus:
piper for English, espeak-ng for Spanish); the bench waits until the listener has heard nothing
for ``--quiet-s`` after the source ended (at most ``--wait-s``), transcribes what the listener
received from the sentence's send time (whisper, word times, the target language) and scores it
(presence.bench.interpret_metrics): StartOffset, EndOffset, LAAL, ASR-BLEU, the share of source
words never interpreted (the ``interpretation_segment`` events' source side against whisper's
reading of the clip as sent) and the segments the interpreter dropped.

Settings come from the environment as ``presence serve`` reads them (PRESENCE_<NAME>, e.g.
PRESENCE_INTERPRET_MAX_LAG_S=6); port, greeting, jobs, notes and the policy are the bench's.
Each room first hears one unscored warm-up sentence (what the interpreter loads on first use).
A sentence takes its length, the interpretation's lag, ``--quiet-s`` and a whisper pass: about
10 s, so the whole corpus (33 a direction, both directions, both policies) takes ~25 minutes.
Output: a table per policy and direction, the targets met or missed, and warnings when the
listener heard sound before any segment (the original voice leaking) or an earlier sentence's
interpretation in a sentence's window; OUT/interpret.txt and OUT/interpret.json (every sentence,
its words, its segments with times relative to the sentence's send time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presence.bench.fdb.metrics import Word
from presence.bench.interpret_corpus import WARMUP, Pair, clips, pairs, transcriber
from presence.bench.interpret_metrics import (
    SEGMENT_EVENT,
    Row,
    bleu_differences,
    checks,
    count_covered,
    end_offset,
    segments,
    start_offset,
    summarise,
    table,
    voiced_words,
    word_laal,
    word_recall,
)
from presence.bench.janus_media import RATE
from presence.bench.meeting import Clip
from presence.caller import Caller
from presence.clock import now
from presence.media.audio import resample
from presence.seams import SAMPLE_RATE

POLICIES = ("simultaneous", "consecutive")
DIRECTIONS = ("es-en", "en-es")
JOIN_S = 1.5  # after both callers connected, before the first word
CUT_MARGIN_S = 0.5  # received audio kept around what sounded, for whisper


@dataclass
class SentenceResult(Row):
    index: int = 0
    source: str = ""
    t0: float = 0.0  # bot clock: the clip's first sample was sent
    source_start_s: float = 0.0  # its voice began, seconds after t0
    source_end_s: float = 0.0
    words: list[Word] = field(default_factory=list)  # what the listener heard, seconds after t0
    # the kept segments: times in seconds after t0 (reported, and its source span), texts
    interpreted: list[dict[str, object]] = field(default_factory=list)
    source_asr: str = ""  # whisper's reading of the clip as sent
    waited_s: float = 0.0  # from the source's end to the end of the listening window
    # the listener heard sound before any segment was reported: the original voice leaking
    # (original=False not honoured) or the bot speaking; what was heard then is not interpretation
    sound_before_segment: bool = False
    spilled: int = 0  # segments reported in this window for speech before it (an earlier sentence)


# ---------------------------------------------------------------------------------- audio
def as_16k(clip: Clip) -> np.ndarray:
    return resample(clip.pcm.astype(np.float32) / 32767, RATE, SAMPLE_RATE)


def heard_window(listener: Caller, start: float, end: float) -> tuple[np.ndarray, float]:
    """The listener's received audio between ``start`` and ``end`` (bot clock), cut down to
    what sounded (whisper invents words in long silences), and the bot-clock time of its first
    sample. Empty when nothing sounded."""
    rec = listener.recorder
    sounded = [t for t in rec.voiced if start <= t < end]
    if not sounded:
        return np.zeros(0, dtype=np.float32), start
    a, b = max(start, sounded[0] - CUT_MARGIN_S), min(end, sounded[-1] + CUT_MARGIN_S)
    audio = rec.audio(until=b)
    return audio[max(0, int((a - rec.t0) * rec.rate)) : int((b - rec.t0) * rec.rate)], a


async def read(language: str, audio: np.ndarray, offset: float = 0.0) -> tuple[list[Word], str]:
    """Whisper's words (times + ``offset``) and text of 16 kHz audio, in an executor thread."""
    if not audio.size:
        return [], ""
    reader = transcriber(language)
    result = await asyncio.get_running_loop().run_in_executor(None, reader.transcribe, audio)
    return [(w, offset + a, offset + b) for w, a, b in result.words], result.text


# ---------------------------------------------------------------------------------- one sentence
async def settle(
    listener: Caller, speaker: Caller, source: str, t0: float, source_end: float, args: argparse.Namespace
) -> float:
    """Wait until the listener has heard nothing for ``quiet_s`` after the source ended and the
    last segment was reported; while nothing at all came, until ``wait_s`` after the source."""
    deadline = source_end + args.wait_s
    while now() < deadline:
        voice = listener.recorder.last_voiced_at
        voice = voice if voice is not None and voice > t0 else None
        reported = [
            float(e.get("t", 0.0))  # type: ignore[arg-type]
            for e in (*listener.events, *speaker.events)
            if e.get("name") == SEGMENT_EVENT and e.get("source_language") == source
        ]
        reported = [t for t in reported if t >= t0]
        last = max([source_end, voice or 0.0, *reported])
        if (voice is not None or reported) and now() - last >= args.quiet_s:
            break
        await asyncio.sleep(0.1)
    return now()


async def measure(
    speaker: Caller,
    listener: Caller,
    pair: Pair,
    clip: Clip,
    source_words: list[Word],
    policy: str,
    index: int,
    args: argparse.Namespace,
) -> SentenceResult:
    source, target = pair.source_language, pair.target_language
    t0 = await speaker.say(clip.pcm.astype(np.float32) / 32767, RATE)
    start, end = t0 + clip.voiced_start, t0 + clip.voiced_end
    await asyncio.sleep(max(0.0, t0 + clip.duration - now()))
    until = await settle(listener, speaker, source, t0, end, args)
    reported, dropped = segments([*listener.events, *speaker.events], source, target, t0, until)
    kept = [e for e in reported if not isinstance(e.get("source_end"), int | float) or e["source_end"] >= t0]
    audio, offset = heard_window(listener, t0, until)
    words, _ = await read(target, audio, offset)
    words = voiced_words(words, listener.recorder.voiced)
    spoken = [(w, t0 + a, t0 + b) for w, a, b in source_words]
    sounds = [t for t in listener.recorder.voiced if t0 <= t < until]
    first_report = min((float(e.get("t", 0.0)) for e in kept), default=float("inf"))
    done, total = count_covered(spoken, kept)
    return SentenceResult(
        policy=policy,
        direction=pair.direction,
        reference=pair.reference,
        heard=" ".join(w for w, _, _ in words),
        start_offset_s=start_offset(words, start),
        end_offset_s=end_offset(words, end),
        laal_s=word_laal(words, start, end, pair.reference),
        source_words=total,
        covered_words=done,
        dropped=dropped,
        source_recall=word_recall(pair.source, " ".join(w for w, _, _ in source_words)),
        index=index,
        source=pair.source,
        t0=t0,
        source_start_s=clip.voiced_start,
        source_end_s=clip.voiced_end,
        words=[(w, round(a - t0, 3), round(b - t0, 3)) for w, a, b in words],
        interpreted=[_segment_row(e, t0) for e in kept],
        source_asr=" ".join(w for w, _, _ in source_words),
        waited_s=until - end,
        sound_before_segment=bool(sounds) and sounds[0] < first_report - 0.1,
        spilled=len(reported) - len(kept),
    )


def _segment_row(event: Mapping[str, Any], t0: float) -> dict[str, object]:
    row: dict[str, object] = {"source_text": event.get("source_text"), "text": event.get("text")}
    for name in ("t", "source_start", "source_end", "committed_at"):
        value = event.get(name)
        row[name] = round(float(value) - t0, 3) if isinstance(value, int | float) else value
    return row


def _progress(r: SentenceResult, total: int) -> None:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    share = 1 - r.covered_words / r.source_words if r.source_words else None
    print(
        f"  {r.policy} {r.direction} {r.index + 1}/{total}: start {s(r.start_offset_s)}, end "
        f"{s(r.end_offset_s)}, LAAL {s(r.laal_s)}, untranslated "
        f"{'-' if share is None else f'{100 * share:.0f} %'}, dropped {r.dropped}"
        f"{f', {r.spilled} segments of earlier speech' if r.spilled else ''}; heard {r.heard!r}",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------------------------- one room
async def run_direction(
    url: str,
    policy: str,
    direction: str,
    chosen: list[Pair],
    voices: dict[str, Clip],
    source_words: dict[str, list[Word]],
    args: argparse.Namespace,
) -> list[SentenceResult]:
    source, target = direction.split("-")
    room = f"interpret-{policy}-{direction}-{uuid.uuid4().hex[:6]}"
    listener = Caller(url=url, room=room, name=f"listener-{target}", language=target, original=False)
    speaker = Caller(url=url, room=room, name=f"speaker-{source}", language=source)
    results: list[SentenceResult] = []
    try:
        await listener.connect()
        await speaker.connect()
        await asyncio.sleep(JOIN_S)
        warm = voices[WARMUP[source]]
        t0 = await speaker.say(warm.pcm.astype(np.float32) / 32767, RATE)
        await asyncio.sleep(warm.duration)
        await settle(listener, speaker, source, t0, t0 + warm.voiced_end, args)
        for i, pair in enumerate(chosen):
            r = await measure(
                speaker, listener, pair, voices[pair.source], source_words[pair.source], policy, i, args
            )
            results.append(r)
            _progress(r, len(chosen))
    finally:
        for caller in (speaker, listener):
            with contextlib.suppress(Exception):
                await caller.hangup()
    return results


# ---------------------------------------------------------------------------------- run
def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores{f' ({model})' if model else ''}, no GPU used, load {os.getloadavg()[0]:.2f}"
    )


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"presence bench interpret: {what} must be among {', '.join(allowed)}, not {text!r}")
    return chosen


async def run(args: argparse.Namespace) -> int:
    from presence.bot.backends.factory import build_backends, warm_up
    from presence.bot.calls import CallManager
    from presence.config import Settings
    from presence.signaling.app import run_server

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    policies = _choices(args.policies, POLICIES, "--policies")
    directions = _choices(args.directions, DIRECTIONS, "--directions")
    chosen = {d: pairs(d, args.limit) for d in directions}
    started, began_wall = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(
        f"presence bench interpret: {', '.join(policies)} x {', '.join(directions)}, "
        f"{sum(map(len, chosen.values()))} sentences each policy, {machine()}, at {began_wall}",
        file=sys.stderr,
    )

    def settings_for(policy: str) -> Settings:
        return Settings.from_env(
            None, port=0, sip_port=-1, greeting="", jobs="off", notes_dir="", interpret_policy=policy
        )

    backends = build_backends(settings_for(policies[0]))
    await warm_up(backends)
    voices: dict[str, Clip] = {}
    source_words: dict[str, list[Word]] = {}
    for direction, chosen_pairs in chosen.items():
        language = direction.split("-")[0]
        texts = [p.source for p in chosen_pairs]
        voices |= clips(language, [*texts, WARMUP[language]])
        for text in texts:  # whisper's reading of each clip as sent: the source words and their times
            source_words[text] = (await read(language, as_16k(voices[text])))[0]
    print(f"  voices and source transcripts ready after {time.monotonic() - started:.0f} s", file=sys.stderr)
    rows: list[SentenceResult] = []
    try:
        for policy in policies:
            settings = settings_for(policy)
            runner = await run_server(settings, CallManager(settings, backends))
            try:
                for direction in directions:
                    rows += await run_direction(
                        settings.base_url, policy, direction, chosen[direction], voices, source_words, args
                    )
            finally:
                await runner.cleanup()
    finally:
        kit = getattr(backends, "languages", None)
        if kit is not None:
            with contextlib.suppress(Exception):
                kit.close()
    summary = summarise(rows)
    head = (
        f"presence bench interpret --limit {args.limit or 'all'} --policies {','.join(policies)} "
        f"--directions {','.join(directions)}: {began_wall}, {machine()}, "
        f"{time.monotonic() - started:.0f} s"
    )
    verdicts = checks(summary)
    differences = bleu_differences(summary)
    lines = [head, "", table(summary), ""]
    lines += [f"ASR-BLEU simultaneous - consecutive, {d}: {v:+.1f}" for d, v in differences.items()]
    leaks = [r for r in rows if r.sound_before_segment]
    if leaks:
        lines.append(
            f"warning: in {len(leaks)} of {len(rows)} sentences the listener heard sound before any "
            "segment was reported (the original voice with original=False, or the bot speaking)"
        )
    spills = [r for r in rows if r.spilled]
    if spills:
        lines.append(
            f"warning: in {len(spills)} of {len(rows)} sentences the interpretation of earlier speech "
            f"was still playing (raise --wait-s or --quiet-s): their figures include it"
        )
    lines += ["", "targets:"]
    lines += [f"  {'ok  ' if met else '-   ' if met is None else 'MISS'} {what}" for what, met in verdicts]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "interpret.txt").write_text(text + "\n")
    data = {
        "run": head,
        "summary": summary,
        "bleu_simultaneous_minus_consecutive": differences,
        "targets": [{"what": w, "met": m} for w, m in verdicts],
        "sentences": [asdict(r) for r in rows],
    }
    (out / "interpret.json").write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    print(f"written: {out / 'interpret.txt'}, {out / 'interpret.json'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="presence bench interpret",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Needs espeak-ng and apertium-eng-spa (Debian), piper and the multilingual whisper.",
    )
    parser.add_argument("--limit", type=int, default=None, help="sentences per direction (default all)")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help=f"comma separated (default {','.join(POLICIES)})"
    )
    parser.add_argument(
        "--directions", default=",".join(DIRECTIONS), help=f"comma separated (default {','.join(DIRECTIONS)})"
    )
    parser.add_argument(
        "--quiet-s", type=float, default=3.0, help="the listener's silence that ends a sentence (default 3)"
    )
    parser.add_argument(
        "--wait-s", type=float, default=20.0, help="longest wait after a sentence's end (default 20)"
    )
    parser.add_argument("--out", default="bench/results", help="writes OUT/interpret.txt and .json")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("sacrebleu") is None:
        # scored only at the end: say so before a half-hour run, not after it
        parser.error(
            "ASR-BLEU needs sacrebleu: pip install sacrebleu (or the dev extra: pip install -e '.[dev]')"
        )
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
