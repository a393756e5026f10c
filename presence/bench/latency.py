"""``presence bench latency``: voice-to-voice and barge-in stop latency, CPU per call vs echo.

The bot runs as its own process (``presence serve``), exactly as users run it; the callers are
in this process: aiortc peers, SIP phones (``sip_caller``) or a Twilio number's media stream
(``provider_caller``), as ``--transports`` says. Times are the caller's: the end of its speech (known from the
stimulus) to the first bot audio received, and the onset of an interruption to the last bot
audio received before the bot fell silent. CPU is read from /proc for the server process and
its children, against a bare aiortc echo server measured in the same run with the same callers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from presence.bench.pauses import PAUSED, PausedClip, make_paused_clips
from presence.caller import Caller
from presence.clock import now
from presence.config import Settings
from presence.media.audio import resample
from presence.provider_caller import TwilioCaller
from presence.seams import OUT_SAMPLE_RATE
from presence.sip_caller import SipCaller

QUESTIONS = [
    "What is your name?",
    "What time is it?",
    "What is two plus three?",
    "Can you hear me?",
    "How are you today?",
]
INTERRUPTION = "Wait, stop. I have a different question."
LONG_REPLY = (
    "Thanks for calling. I can help you with your account, your bills and your plans, "
    "and I can also look things up for you while we talk. Let me tell you about the options we have today."
)


@dataclass
class Clip:
    text: str
    audio48: np.ndarray
    voiced_start: float  # seconds into the clip
    voiced_end: float


def make_clips(texts: list[str]) -> dict[str, Clip]:
    from presence.bot.backends.tts import PiperTTS

    tts = PiperTTS()
    clips = {}
    for text in texts:
        audio = resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, OUT_SAMPLE_RATE)
        frames = np.abs(audio[: audio.size // 960 * 960]).reshape(-1, 960).max(axis=1)
        voiced = np.flatnonzero(frames > 0.02)
        clips[text] = Clip(text, audio, voiced[0] * 0.02, (voiced[-1] + 1) * 0.02)
    return clips


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class ServerProcess:
    """A server started as a child process; knows its URL and reads its CPU time."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.sip_port = int(env.get("PRESENCE_SIP_PORT", "-1"))
        self.tail: collections.deque[str] = collections.deque(maxlen=2000)  # its last output lines

    async def start(self, marker: str, timeout: float = 180.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert self.proc.stdout is not None
        deadline = now() + timeout
        while now() < deadline:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode().strip()
            if not line and self.proc.returncode is not None:
                break
            if marker in line:
                self.url = line.split(marker, 1)[1].strip().split("/?")[0].rstrip("/")
                asyncio.get_running_loop().create_task(self._drain())
                return
        raise RuntimeError(f"{' '.join(self.args)} did not start")

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.tail.append(line.decode(errors="replace").rstrip())

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def memory_mb(self, pss: bool = False, main_only: bool = False) -> float:
        """Memory of the process tree in MB (or of the server process alone): summed RSS, or
        with ``pss`` the proportional set size (shared pages counted once, not once per worker)."""
        assert self.proc is not None
        path, key = ("smaps_rollup", "Pss:") if pss else ("status", "VmRSS:")
        total = 0
        for pid in [self.proc.pid] if main_only else process_tree(self.proc.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
                    if line.startswith(key):
                        total += int(line.split()[1])
        return total / 1024

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
    return pids


def cpu_seconds(pid: int, skip: tuple[int | None, ...] = ()) -> float:
    """User + system CPU of ``pid`` and its live descendants, less the trees rooted at ``skip``."""
    tick = os.sysconf("SC_CLK_TCK")
    left = {p for s in skip if s for p in process_tree(s)}
    total = 0.0
    for p in process_tree(pid):
        if p in left:
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _env(**settings: object) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.items():
        env["PRESENCE_" + name.upper()] = str(value)
    return env


async def start_bot(settings: Settings, **overrides: object) -> ServerProcess:
    values = {
        "port": 0,
        "sip_port": _free_udp_port(),  # phones call it here (sip-* transports)
        "log_level": "warning",
        "responder": settings.responder,
        "eot_silence_ms": settings.eot_silence_ms,
    }
    values.update(overrides)
    server = ServerProcess([sys.executable, "-m", "presence.cli", "serve"], _env(**values))
    await server.start("Presence is listening on")
    return server


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_echo() -> ServerProcess:
    server = ServerProcess([sys.executable, "-m", "presence.bench.echo", "--port", "0"], dict(os.environ))
    await server.start("echo server listening on")
    return server


@dataclass
class Results:
    voice_to_voice: list[float] = field(default_factory=list)
    barge_in_stop: list[float] = field(default_factory=list)
    cpu: dict[str, dict[int, float]] = field(default_factory=dict)  # kind -> calls -> % of a core per call
    failures: list[str] = field(default_factory=list)
    pause_taken: list[float] = field(default_factory=list)  # 1: the bot spoke into a mid-sentence pause
    # per caller transport when several ran: "webrtc", "sip-pcmu", "sip-g722", "twilio"
    by_transport: dict[str, Results] = field(default_factory=dict)


# The callers a run can use: WebRTC (aiortc, Opus), phones over SIP with one codec each, and a
# phone through a Twilio number (its webhook, then its Media Streams websocket: 8 kHz mu-law).
TRANSPORTS = ("webrtc", "sip-pcmu", "sip-g722", "twilio")
MakeCaller = Callable[[], "Caller | SipCaller | TwilioCaller"]


def caller_factory(transport: str, server: ServerProcess) -> MakeCaller:
    if transport == "webrtc":
        return lambda: Caller(url=server.url)
    if transport == "twilio":
        return lambda: TwilioCaller(url=server.url)
    codec = {"sip-pcmu": "PCMU", "sip-g722": "G722"}[transport]
    return lambda: SipCaller(target=f"sip:presence@127.0.0.1:{server.sip_port}", codec=codec)


async def _until_quiet(caller: Caller | SipCaller | TwilioCaller, deadline: float) -> None:
    """Until the bot has been silent at the caller for 0.8 s (or ``deadline``)."""
    while now() < deadline:
        await asyncio.sleep(0.1)
        if now() - (caller.recorder.last_voiced_at or 0.0) > 0.8:
            return


async def voice_to_voice(make: MakeCaller, clips: dict[str, Clip], trials: int, results: Results) -> None:
    caller = make()
    await caller.connect()
    try:
        await asyncio.sleep(1.0)
        for i in range(trials):
            clip = clips[QUESTIONS[i % len(QUESTIONS)]]
            sent = await caller.say(clip.audio48, OUT_SAMPLE_RATE)
            speech_end = sent + clip.voiced_end
            first = None
            deadline = speech_end + 10.0
            while now() < deadline and first is None:
                await asyncio.sleep(0.02)
                first = caller.recorder.first_voiced_after(speech_end)
            if first is None:
                results.failures.append(f"v2v trial {i}: no answer within 10 s")
                continue
            results.voice_to_voice.append(first - speech_end)
            _progress("voice-to-voice", i + 1, trials, first - speech_end)
            # Let the reply finish before the next question (a new question would barge in).
            await _until_quiet(caller, first + 15.0)
    finally:
        await caller.hangup()


async def pause_trials(make: MakeCaller, clips: list[PausedClip], trials: int, results: Results) -> None:
    """Sentences with a 1.5 s pause to think: does the bot take the turn in the pause (FDB's
    pause TOR, lower is better)? Read at the caller: the bot's first audio after the pause began."""
    caller = make()
    await caller.connect()
    try:
        await asyncio.sleep(1.0)
        for i in range(trials):
            clip = clips[i % len(clips)]
            sent = await caller.say(clip.audio48, OUT_SAMPLE_RATE)
            await asyncio.sleep(clip.voiced_end + 4.0)
            first = caller.recorder.first_voiced_after(sent + clip.pause_start + 0.1)
            took = first is not None and first < sent + clip.pause_end
            results.pause_taken.append(float(took))
            _progress("pause", i + 1, trials, float(took))
            await _until_quiet(caller, now() + 15.0)  # the reply (to the whole sentence, or the cut one)
    finally:
        await caller.hangup()


async def barge_in(make: MakeCaller, clips: dict[str, Clip], trials: int, results: Results) -> None:
    rng = random.Random(7)
    clip = clips[INTERRUPTION]
    for i in range(trials):
        caller = make()
        await caller.connect()
        try:
            deadline = now() + 15.0
            while caller.recorder.first_voiced_at is None and now() < deadline:
                await asyncio.sleep(0.02)
            if caller.recorder.first_voiced_at is None:
                results.failures.append(f"barge-in trial {i}: the bot never spoke")
                continue
            await asyncio.sleep(rng.uniform(0.8, 1.6))
            sent = await caller.say(clip.audio48, OUT_SAMPLE_RATE)
            onset = sent + clip.voiced_start
            await asyncio.sleep(clip.voiced_end + 0.5)
            stop = caller.recorder.stopped_after(onset - 0.05)
            value = max(0.0, (stop if stop is not None else onset) - onset)
            results.barge_in_stop.append(value)
            _progress("barge-in stop", i + 1, trials, value)
        finally:
            await caller.hangup()


async def cpu_per_call(
    make: MakeCaller, clips: dict[str, Clip], calls: int, seconds: float, server: ServerProcess, *, talk: str
) -> float:
    """% of one core per call for ``calls`` concurrent callers.

    ``talk="listening"``: every caller talks without a break (questions back to back, no pause
    long enough to end a turn): media, VAD, micro-turns and streaming ASR, no replies.
    ``talk="conversation"``: a question every 6 s, each answered (ASR, LLM, TTS, whisper).
    """
    callers = [make() for _ in range(calls)]
    stop = asyncio.Event()
    # Voiced parts only, back to back: no pause long enough to end a turn.
    spans = [
        (int(clips[q].voiced_start * OUT_SAMPLE_RATE), int(clips[q].voiced_end * OUT_SAMPLE_RATE))
        for q in QUESTIONS
    ]
    monologue = np.concatenate([clips[q].audio48[a:b] for q, (a, b) in zip(QUESTIONS, spans, strict=True)])

    async def run(index: int, caller: Caller | SipCaller | TwilioCaller) -> None:
        await asyncio.sleep(index * 6.0 / max(1, calls))
        while not stop.is_set():
            if talk == "listening":
                done = await caller.say(monologue, OUT_SAMPLE_RATE)
                pause = max(0.0, done + monologue.size / OUT_SAMPLE_RATE - now() - 0.1)
            else:
                await caller.say(clips[QUESTIONS[index % len(QUESTIONS)]].audio48, OUT_SAMPLE_RATE)
                pause = 6.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)

    await asyncio.gather(*(c.connect() for c in callers))
    tasks = [asyncio.create_task(run(i, c)) for i, c in enumerate(callers)]
    await asyncio.sleep(2.0)  # settle: connections up, first frames through
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    stop.set()
    await asyncio.gather(*tasks)
    await asyncio.gather(*(c.hangup() for c in callers))
    return 100.0 * (cpu1 - cpu0) / (t1 - t0) / calls


async def measure_cpu(
    kind: str,
    server: ServerProcess,
    clips: dict[str, Clip],
    levels: list[int],
    seconds: float,
    results: Results,
    transport: str = "webrtc",
) -> None:
    make = caller_factory(transport, server)
    for talk, counts in (("listening", levels), ("conversation", levels[:1])):
        for n in counts:
            value = await cpu_per_call(make, clips, n, seconds, server, talk=talk)
            results.cpu.setdefault(f"{kind}:{talk}", {})[n] = value
            print(f"  {kind} CPU, {talk}, {n} calls: {value:.1f}% of a core per call", file=sys.stderr)


def _progress(name: str, done: int, total: int, value: float) -> None:
    print(f"\r  {name}: {done}/{total}  last {value * 1000:.0f} ms   ", end="", file=sys.stderr, flush=True)
    if done == total:
        print(file=sys.stderr)


def summary(results: Results) -> str:
    def row(name: str, values: list[float], target: str, base: list[float] | None = None) -> str:
        ms = [v * 1000 for v in values]
        versus = ""
        if base is not None:
            versus = f" | {pct(ms, 50) - pct([v * 1000 for v in base], 50):+.0f}"
        return (
            f"| {name} | {len(ms)} | {pct(ms, 50):.0f} | {pct(ms, 95):.0f} | {min(ms, default=float('nan')):.0f} "
            f"| {max(ms, default=float('nan')):.0f}{versus} | {target} |"
        )

    several = len(results.by_transport) > 1
    head = (
        "| metric (ms) | n | p50 | p95 | min | max |" + (" p50 vs webrtc |" if several else "") + " target |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    runs = results.by_transport or {"webrtc": results}
    base = runs.get("webrtc")
    for name, r in runs.items():
        label = f"{name} " if several else ""
        ref = base if several and base is not None else None
        lines.append(
            row(
                f"{label}voice-to-voice",
                r.voice_to_voice,
                "p50 <= 600 (aim 400); phone: within 100 of webrtc",
                ref.voice_to_voice if ref else None,
            )
        )
        lines.append(
            row(f"{label}barge-in stop", r.barge_in_stop, "p95 <= 250", ref.barge_in_stop if ref else None)
        )
    lines += [
        "",
        "| caller | turn-taking TOR (answered) | pause TOR (spoke into a 1.5 s pause) |",
        "|---|---|---|",
    ]
    for name, r in runs.items():
        asked = len(r.voice_to_voice) + sum(1 for f in r.failures if f.startswith("v2v"))
        turn = len(r.voice_to_voice) / asked if asked else float("nan")
        pause = statistics.fmean(r.pause_taken) if r.pause_taken else float("nan")
        lines.append(
            f"| {name} | {turn:.2f} ({len(r.voice_to_voice)}/{asked}) "
            f"| {pause:.2f} ({int(sum(r.pause_taken))}/{len(r.pause_taken)}) |"
        )
    if results.cpu:
        lines += [
            "",
            "| callers | concurrent calls | echo % core/call | bot % core/call | bot / echo |",
            "|---|---|---|---|---|",
        ]
        for talk in ("listening", "conversation"):
            for n in sorted(results.cpu.get(f"echo:{talk}", {})):
                echo = results.cpu[f"echo:{talk}"][n]
                bot = results.cpu.get(f"bot:{talk}", {}).get(n, float("nan"))
                lines.append(f"| {talk} | {n} | {echo:.1f} | {bot:.1f} | {bot / echo:.2f}x |")
        for talk in ("listening", "conversation"):
            for n, value in sorted(results.cpu.get(f"bot-sip:{talk}", {}).items()):
                lines.append(f"| {talk}, SIP PCMU phones | {n} | - | {value:.1f} | - |")
    return "\n".join(lines)


async def run(settings: Settings, args: argparse.Namespace) -> int:
    print(
        f"presence bench latency: {args.trials} trials each, machine: {os.cpu_count()} cores", file=sys.stderr
    )
    clips = make_clips([*QUESTIONS, INTERRUPTION])
    paused = make_paused_clips(PAUSED)
    results = Results()
    levels = [int(x) for x in args.calls.split(",")]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        print(f"unknown transports {sorted(unknown)}; take {', '.join(TRANSPORTS)}", file=sys.stderr)
        return 2
    for transport in transports:
        results.by_transport[transport] = Results()
    # One server of each kind for every transport: their figures differ by the transport alone.
    bot = await start_bot(settings, greeting="")
    try:
        for transport in transports:
            print(f"  {transport}:", file=sys.stderr)
            run_ = results.by_transport[transport]
            await voice_to_voice(caller_factory(transport, bot), clips, args.trials, run_)
            await pause_trials(caller_factory(transport, bot), paused, args.trials, run_)
        if not args.skip_cpu:
            await measure_cpu("bot", bot, clips, levels, args.cpu_seconds, results)
            if any(t.startswith("sip") for t in transports):
                await measure_cpu("bot-sip", bot, clips, levels, args.cpu_seconds, results, "sip-pcmu")
    finally:
        await bot.stop()
    talker = await start_bot(settings, greeting=LONG_REPLY)
    try:
        for transport in transports:
            await barge_in(
                caller_factory(transport, talker), clips, args.trials, results.by_transport[transport]
            )
    finally:
        await talker.stop()
    if not args.skip_cpu:
        echo = await start_echo()
        try:
            await measure_cpu("echo", echo, clips, levels, args.cpu_seconds, results)
        finally:
            await echo.stop()
    first = results.by_transport[transports[0]]
    results.voice_to_voice, results.barge_in_stop = first.voice_to_voice, first.barge_in_stop
    for name, r in results.by_transport.items():
        results.failures += [f"{name}: {f}" for f in r.failures]
    print(summary(results))
    for failure in results.failures:
        print(f"failure: {failure}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "voice_to_voice_s": results.voice_to_voice,
                    "barge_in_stop_s": results.barge_in_stop,
                    "by_transport": {
                        name: {
                            "voice_to_voice_s": r.voice_to_voice,
                            "barge_in_stop_s": r.barge_in_stop,
                            "pause_taken": r.pause_taken,
                        }
                        for name, r in results.by_transport.items()
                    },
                    "cpu_percent_per_call": results.cpu,
                    "failures": results.failures,
                    "machine": {"cores": os.cpu_count()},
                    "median_v2v_ms": statistics.median(results.voice_to_voice) * 1000
                    if results.voice_to_voice
                    else None,
                },
                indent=2,
            )
        )
    return 0 if not results.failures else 1
