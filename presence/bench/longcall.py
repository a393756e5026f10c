"""``presence bench longcall``: does a long video call stay as fast as its first minute?

The bot runs as its own process (``presence serve`` on the given settings). Headless Chromium
joins through the call page with a fake camera and a fake microphone that asks a question every
10-15 s (piper voice). Per reply the bot's own ``latency`` events give the breakdown (decision,
first token, first audio, voice-to-voice from the caller's last voiced frame to the first packet
sent); every minute the server's memory (RSS of its process tree) and CPU are read from /proc.
A caller turn whose caption falls outside every question is a false turn (speech nobody said).

Figures are the bot's (transport is not included): the long-call target is a ratio, minutes 9-10
against minute 1, so the constant transport cost cancels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presence.bench.latency import make_clips, pct, start_bot
from presence.browser import launch_chromium, make_y4m
from presence.clock import now
from presence.config import Settings
from presence.media.audio import write_wav
from presence.seams import OUT_SAMPLE_RATE

QUESTIONS = [
    "What is your name?",
    "What is the capital of France?",
    "How many days are in a week?",
    "Can you help me plan my day?",
    "What is three plus four?",
    "What should I cook for dinner tonight?",
    "What is the weather usually like in spring?",
    "How do I make a cup of tea?",
    "What time is it?",
    "Can you tell me a short joke?",
    "What is a good name for a dog?",
    "How far is the moon?",
    "What is ten minus two?",
    "Why is the sky blue?",
    "What do bees make?",
]
CONNECTED = "window.presence.pc && window.presence.pc.connectionState === 'connected'"
# A caller caption this long after a question's last word still belongs to it (ASR final,
# whisper's final pass); anything outside every question's window is a false turn.
TURN_SLACK_S = 3.0
METRICS = ("end_of_turn_decided", "responder_first_token", "tts_first_audio", "voice_to_voice")


@dataclass
class Question:
    text: str
    start_s: float  # voiced start in the microphone file
    end_s: float  # voiced end in the microphone file


@dataclass
class Reply:
    t_s: float  # call time of the voice_to_voice mark
    minute: int
    ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Sample:
    minute: int
    rss_mb: float
    cpu_percent: float  # of one core, over the last minute, server process tree


def make_microphone(path: Path, minutes: float, seed: int) -> list[Question]:
    """A 48 kHz WAV with a question every 10-15 s; returns where each one is voiced."""
    rng = random.Random(seed)
    clips = make_clips(QUESTIONS)
    total = round((minutes * 60 + 20) * OUT_SAMPLE_RATE)
    mic = np.zeros(total, np.float32)
    questions: list[Question] = []
    at, i = 5.0, 0  # the page connects after the fake microphone has started
    while True:
        clip = clips[QUESTIONS[i % len(QUESTIONS)]]
        begin = round(at * OUT_SAMPLE_RATE)
        if begin + clip.audio48.size > total:
            break
        mic[begin : begin + clip.audio48.size] = clip.audio48
        questions.append(Question(clip.text, at + clip.voiced_start, at + clip.voiced_end))
        at += rng.uniform(10.0, 15.0)
        i += 1
    write_wav(str(path), mic, OUT_SAMPLE_RATE)
    return questions


async def join_page(
    chromium: Any, url: str, *, video: bool, name: str = "longcall", listener: Any = None
) -> Any:
    """Open the call page in ``chromium``, join (audio or video) and wait until connected;
    ``listener`` gets every bot event the page receives."""
    page = await chromium.new_page()
    if listener is not None:
        await page.expose_function("presenceBench", listener)
    await page.goto(url + "/")
    await page.wait_for_function("window.presence && window.presence.config !== null")
    if listener is not None:
        await page.evaluate("window.presence.listeners.push((m) => window.presenceBench(m))")
    await page.select_option("#mode", "video" if video else "audio")
    await page.fill("#name", name)
    await page.click("#join")
    await page.wait_for_function(CONNECTED, timeout=30_000)
    return page


def _flat(msg: dict[str, Any]) -> dict[str, Any]:
    nested = msg.get("data")
    return {**msg, **nested, "name": msg.get("name")} if isinstance(nested, dict) else msg


@dataclass
class LongCall:
    questions: list[Question]
    replies: list[Reply] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    caller_turns: list[tuple[float, str]] = field(default_factory=list)  # (call time, text)
    origin: float | None = None  # bot clock of the microphone file's time 0

    def false_turns(self) -> list[tuple[float, str]]:
        if self.origin is None:
            return []
        windows = [(q.start_s - 0.5, q.end_s + TURN_SLACK_S) for q in self.questions]
        return [(t, text) for t, text in self.caller_turns if not any(a <= t <= b for a, b in windows)]

    def minute_rows(self) -> list[dict[str, Any]]:
        rows = []
        for minute in sorted({r.minute for r in self.replies} | {s.minute for s in self.samples}):
            mine = [r for r in self.replies if r.minute == minute]
            row: dict[str, Any] = {"minute": minute + 1, "replies": len(mine)}
            for metric in METRICS:
                row[metric] = pct([r.ms[metric] for r in mine if metric in r.ms], 50)
            sample = next((s for s in self.samples if s.minute == minute), None)
            row["rss_mb"] = sample.rss_mb if sample else float("nan")
            row["cpu_percent"] = sample.cpu_percent if sample else float("nan")
            rows.append(row)
        return rows

    def ratio(self, metric: str = "voice_to_voice") -> tuple[float, float, float]:
        """p50 over minutes 9-10 (call time 480-600 s), p50 over minute 1, and their ratio."""
        first = [r.ms[metric] for r in self.replies if r.minute == 0 and metric in r.ms]
        last = [r.ms[metric] for r in self.replies if r.minute in (8, 9) and metric in r.ms]
        a, b = pct(last, 50), pct(first, 50)
        return a, b, a / b if first and last else float("nan")


def report(call: LongCall, minutes: float) -> str:
    lines = [
        f"long call: {len(call.questions)} questions over {minutes:g} min, {len(call.replies)} replies, "
        f"machine: {os.cpu_count()} cores",
        "",
        "| minute | replies | decision p50 ms | first token p50 ms | first audio p50 ms "
        "| voice-to-voice p50 ms | server RSS MB | server CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in call.minute_rows():
        values = " | ".join(f"{row[m]:.0f}" for m in METRICS)
        lines.append(
            f"| {row['minute']} | {row['replies']} | {values} | {row['rss_mb']:.0f} | {row['cpu_percent']:.0f} |"
        )
    last, first, ratio = call.ratio()
    ft_last, ft_first, ft_ratio = call.ratio("responder_first_token")
    lines += [
        "",
        f"voice-to-voice p50: minute 1 {first:.0f} ms, minutes 9-10 {last:.0f} ms, ratio {ratio:.2f}x "
        "(target <= 1.2x)",
        f"first token p50: minute 1 {ft_first:.0f} ms, minutes 9-10 {ft_last:.0f} ms, ratio {ft_ratio:.2f}x",
    ]
    false = call.false_turns()
    lines.append(f"false caller turns in silence: {len(false)} (target 0)")
    lines += [f"  - at {t:.1f} s: {text!r}" for t, text in false]
    answered = sum(
        any(q.end_s <= r.t_s <= q.end_s + TURN_SLACK_S + 5 for r in call.replies) for q in call.questions
    )
    lines.append(f"questions answered: {answered} of {len(call.questions)}")
    return "\n".join(lines)


async def run_call(settings: Settings, args: argparse.Namespace, work: Path) -> LongCall:
    mic = work / "mic.wav"
    questions = make_microphone(mic, args.minutes, args.seed)
    camera = make_y4m(work / "camera.y4m", 4.0, w=640, h=480) if not args.no_video else None
    call = LongCall(questions)
    bot = await start_bot(settings, greeting="", **dict(kv.split("=", 1) for kv in args.set))
    chromium = await launch_chromium(work, wav=mic, y4m=camera)
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    try:
        page = await join_page(chromium, bot.url, video=not args.no_video, listener=received.put_nowait)
        joined = now()
        cpu_mark, t_mark = bot.cpu_seconds(), now()
        pending: dict[str, float] = {}
        duration = args.minutes * 60
        while now() - joined < duration:
            with contextlib.suppress(TimeoutError):
                msg = await asyncio.wait_for(received.get(), 1.0)
                _take(call, msg, pending, questions)
            if now() - t_mark >= 60:
                cpu, t = bot.cpu_seconds(), now()
                sample = Sample(len(call.samples), bot.memory_mb(), 100 * (cpu - cpu_mark) / (t - t_mark))
                call.samples.append(sample)
                cpu_mark, t_mark = cpu, t
                print(
                    f"minute {sample.minute + 1}: {len(call.replies)} replies, RSS {sample.rss_mb:.0f} MB, "
                    f"CPU {sample.cpu_percent:.0f} %, last v2v "
                    f"{call.replies[-1].ms.get('voice_to_voice', float('nan')) if call.replies else float('nan'):.0f} ms",
                    file=sys.stderr,
                )
        with contextlib.suppress(Exception):
            await page.click("#hangup")
    finally:
        await chromium.close()
        await bot.stop()
    return call


def _take(call: LongCall, msg: dict[str, Any], pending: dict[str, float], questions: list[Question]) -> None:
    """Book one bot event (as the page got it) into ``call``."""
    msg = _flat(msg)
    name, t = msg.get("name"), msg.get("t")
    if not isinstance(t, (int, float)):
        return
    if name == "caller_speech_start" and call.origin is None:
        call.origin = t - questions[0].start_s  # the first thing the microphone says
    if call.origin is None:
        return
    at = t - call.origin
    if name == "caption" and msg.get("who") == "caller" and msg.get("final") and not msg.get("pass_"):
        call.caller_turns.append((at, str(msg.get("text", ""))))
    elif name == "latency" and isinstance(msg.get("ms"), (int, float)):
        metric = str(msg.get("metric") or msg.get("measure") or "")
        if metric in METRICS:
            pending[metric] = float(msg["ms"])
        if metric == "voice_to_voice":
            call.replies.append(Reply(at, int(at // 60), dict(pending)))
            pending.clear()


async def run(settings: Settings, args: argparse.Namespace) -> int:
    print(
        f"presence bench longcall: {args.minutes:g} min, {'audio only' if args.no_video else 'video'}, "
        f"{os.cpu_count()} cores",
        file=sys.stderr,
    )
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory(prefix="presence-longcall-") as tmp:
        call = await run_call(settings, args, Path(tmp))
    text = report(call, args.minutes)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text + "\n")
        (out / "longcall.json").write_text(
            json.dumps(
                {
                    "questions": [asdict(q) for q in call.questions],
                    "replies": [asdict(r) for r in call.replies],
                    "samples": [asdict(s) for s in call.samples],
                    "caller_turns": call.caller_turns,
                    "false_turns": call.false_turns(),
                    "minutes": call.minute_rows(),
                    "machine": {"cores": os.cpu_count()},
                    "v2v_ratio": call.ratio()[2],
                    "v2v_p50_ms": statistics.median([r.ms["voice_to_voice"] for r in call.replies])
                    if call.replies
                    else None,
                },
                indent=2,
            )
        )
    return 0 if call.replies else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="call length (default 10)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the question spacing")
    parser.add_argument("--no-video", action="store_true", help="join audio only (a baseline)")
    parser.add_argument("--out", default="", help="write report.md and longcall.json here")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a bot setting (repeatable)"
    )
