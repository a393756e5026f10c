"""``presence bench soak``: many calls for a long time; does memory level off, does any call drop?

The bot runs as its own process (``presence serve``, rule-text replies by default so the LLM
does not saturate the machine). ``--calls`` aiortc callers in this process each ask a question
(piper voice), wait for the reply to end, pause 3-8 s and ask again; one headless Chromium page
joins with a fake camera and a looped microphone for the whole run. Every minute the server's
memory (PSS of its process tree: shared pages counted once), its CPU, the machine's CPU and the
calls it holds are read. The callers and the browser run at ``--nice`` 10: on a real deployment
they are other machines, here they share the server's two cores.

Reported: memory per call (PSS with every call joined against PSS before the first), growth
over the last ``--window`` minutes (target < 50 MB), calls dropped (target 0), replies per
minute and the caller-side voice-to-voice.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from presence import aio
from presence.aio import watch_loop_lag
from presence.bench.latency import QUESTIONS, Clip, ServerProcess, make_clips, pct, start_bot
from presence.bench.longcall import join_page, make_microphone
from presence.browser import launch_chromium, make_y4m
from presence.caller import Caller, Recorder
from presence.clock import now
from presence.config import Settings
from presence.events import Ev
from presence.seams import OUT_SAMPLE_RATE

REPLY_TIMEOUT_S = 30.0  # a question with no reply ending by then counts as unanswered
GROWTH_TARGET_MB = 50.0
MEMORY_EVERY_S = 10.0
# server lines about calls ending, and about its loop falling behind (which ends them)
ENDINGS = ("removing", ": failed", ": closed", "ERROR", "Traceback", "event loop lag")


@dataclass
class Talker:
    """One aiortc caller's record."""

    index: int
    replies: int = 0
    unanswered: int = 0
    v2v_s: list[tuple[float, float]] = field(default_factory=list)  # (run time, caller-side s)
    dropped: str | None = None  # why the call ended early
    stalls: int = 0  # questions this caller's own sender did not start within 10 s (call still up)


@dataclass
class Minute:
    minute: int
    memory_mb: float  # PSS of the server's process tree: the median of the minute's samples
    server_mb: float  # the same for the server process alone (the rest is its worker processes)
    memory_max_mb: float  # the minute's highest sample (video frames in flight come and go)
    server_cpu_percent: float  # of one core, the server's process tree
    machine_cpu_percent: float  # of all cores, everything on the machine
    calls_held: int  # what the server's /healthz says
    replies: int  # replies finished by the aiortc callers during the minute
    caller_lag_s: float = 0.0  # the callers' own event loop: its worst lag in the minute


@dataclass
class Soak:
    calls: int
    minutes: float
    idle_mb: float = float("nan")
    joined_mb: float = float("nan")
    talkers: list[Talker] = field(default_factory=list)
    samples: list[Minute] = field(default_factory=list)
    video_dropped: str | None = None
    server_said: list[str] = field(default_factory=list)  # its log lines about calls ending

    def per_call_mb(self) -> float:
        return (self.joined_mb - self.idle_mb) / (self.calls + 1)

    def growth(self, window: float, server_only: bool = False) -> tuple[int, float, float]:
        """(first minute of the window, growth over it in MB, fitted trend over it in MB).

        Growth is the last minute's median less the first's; the trend is the least-squares
        slope through every minute of the window times its length, less swayed by one minute.
        """
        first = max(1, int(self.minutes - window))
        inside = [s for s in self.samples if s.minute >= first]
        if len(inside) < 2:
            return first, float("nan"), float("nan")
        ys = [s.server_mb if server_only else s.memory_mb for s in inside]
        xs = [s.minute for s in inside]
        slope = statistics.linear_regression(xs, ys).slope
        return inside[0].minute, ys[-1] - ys[0], slope * (xs[-1] - xs[0])

    def dropped(self) -> list[str]:
        out = [f"caller {t.index}: {t.dropped}" for t in self.talkers if t.dropped]
        return out + ([f"video call: {self.video_dropped}"] if self.video_dropped else [])


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def _calls_held(session: aiohttp.ClientSession, url: str) -> int:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
        async with session.get(url + "/healthz") as resp:
            return int((await resp.json())["calls"])
    return -1


def _gone(caller: Caller, t0: float) -> str:
    return f"connection {caller.pc.connectionState if caller.pc else 'none'} at {now() - t0:.0f} s"


async def talk(url: str, clips: dict[str, Clip], talker: Talker, until: float, t0: float) -> None:
    """Ask, wait for the reply to end, pause, ask again, until ``until`` (monotonic)."""
    rng = random.Random(talker.index)
    caller = Caller(url=url, name=f"soak-{talker.index}", recorder=Recorder(keep_audio=False))
    try:
        await caller.connect()
    except Exception as exc:  # a refused or failed join is a dropped call
        talker.dropped = f"could not join: {exc}"
        return
    try:
        await asyncio.sleep(rng.uniform(0.5, 8.0))  # not all in step
        while now() < until:
            clip = clips[rng.choice(QUESTIONS)]
            try:  # a dead connection never pulls the clip: do not wait on it for ever
                sent = await asyncio.wait_for(caller.say(clip.audio48, OUT_SAMPLE_RATE), 10)
            except TimeoutError:
                if caller.pc is None or caller.pc.connectionState != "connected":
                    talker.dropped = _gone(caller, t0)
                    return
                # still connected: this process's own sender fell behind (its loop starved), not the call
                talker.stalls += 1
                caller.player.stop_playing()
                continue
            speech_end = sent + clip.voiced_end
            try:
                await caller.wait_event(Ev.BOT_SPEECH_END, after=speech_end, timeout=REPLY_TIMEOUT_S)
                talker.replies += 1
                first = caller.recorder.first_voiced_after(speech_end)
                if first is not None:
                    talker.v2v_s.append((first - t0, first - speech_end))
            except TimeoutError:
                talker.unanswered += 1
            caller.inbox.events.clear()  # a long call's events are not kept
            del caller.recorder.voiced[:]
            if caller.pc is None or caller.pc.connectionState != "connected":
                talker.dropped = _gone(caller, t0)
                return
            await asyncio.sleep(rng.uniform(3.0, 8.0))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(caller.hangup(), 10)


async def run_soak(settings: Settings, args: argparse.Namespace, work: Path) -> Soak:
    soak = Soak(args.calls, args.minutes)
    # info: the server says why a call ended ("peer ... silent", "failed"), kept for the report
    overrides = {
        "responder": args.responder,
        "greeting": "",
        "offer_burst": args.calls + 5,
        "log_level": "info",
    }
    overrides.update(dict(kv.split("=", 1) for kv in args.set))
    bot = await start_bot(settings, **overrides)
    if args.nice:
        # The callers and the browser stand in for machines of their own: from here on this
        # process (and Chromium, started below) yields the CPU to the server under test. Their
        # CPU still counts in the machine's figure.
        os.nice(args.nice)
    clips = make_clips(QUESTIONS)
    mic = work / "mic.wav"
    make_microphone(mic, 1.0, args.seed)  # a minute of questions, looped by Chromium
    camera = make_y4m(work / "camera.y4m", 4.0, w=640, h=480)
    chromium = await launch_chromium(work, wav=mic, y4m=camera)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.sleep(5.0)  # the bot's start-up settles
        soak.idle_mb = bot.memory_mb(pss=True)
        t0 = now()
        until = t0 + args.minutes * 60
        page = await join_page(chromium, bot.url, video=True, name="soak-video")
        for i in range(args.calls):
            soak.talkers.append(Talker(i))
            tasks.append(
                asyncio.create_task(talk(bot.url, clips, soak.talkers[-1], until, t0), name=f"caller {i}")
            )
            await asyncio.sleep(1.0)
        await asyncio.sleep(30.0)
        soak.joined_mb = bot.memory_mb(pss=True)
        print(
            f"joined: {args.calls} + 1 video, PSS {soak.idle_mb:.0f} -> {soak.joined_mb:.0f} MB "
            f"({soak.per_call_mb():.1f} MB per call)",
            file=sys.stderr,
        )
        await _sample_minutes(soak, bot, http, page, t0, until)
        # a question asked just before the end still gets its reply; nothing waits longer than that
        await asyncio.wait(tasks, timeout=REPLY_TIMEOUT_S + 30)
        soak.server_said = [x for x in bot.tail if any(k in x for k in ENDINGS)][-40:]
    finally:
        await _finish(tasks)
        await http.close()
        await chromium.close()
        await bot.stop()
    return soak


async def _finish(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the callers still running; name any that ignores it (the run ends regardless)."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=15)
    for task in stuck:
        print(f"a caller did not stop when cancelled: {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


async def _sample_minutes(
    soak: Soak, bot: ServerProcess, http: aiohttp.ClientSession, page: Any, t0: float, until: float
) -> None:
    cpu_mark, busy_mark, t_mark, replies_mark = bot.cpu_seconds(), _machine_busy(), now(), 0
    minute = 0
    # The aiortc callers share this process: a starved loop here fails calls as surely as the server's.
    lags: list[float] = []
    watcher = asyncio.create_task(watch_loop_lag(lags.append, warn_s=float("inf")))  # in the minute lines
    try:
        while now() < until - 1.0:
            # memory every 10 s; a minute's figure is their median, so a burst of video frames
            # in flight at the sampling instant is not read as growth
            end = min(t0 + 60 * (minute + 1), until)
            tree: list[float] = []
            main: list[float] = []
            while True:
                tree.append(bot.memory_mb(pss=True))
                main.append(bot.memory_mb(pss=True, main_only=True))
                if now() + MEMORY_EVERY_S > end:
                    break
                await asyncio.sleep(MEMORY_EVERY_S)
            await asyncio.sleep(max(0.0, end - now()))
            minute += 1
            cpu, busy, t = bot.cpu_seconds(), _machine_busy(), now()
            replies = sum(x.replies for x in soak.talkers)
            state = "page gone"
            with contextlib.suppress(Exception):
                state = str(
                    await page.evaluate(
                        "window.presence.pc ? window.presence.pc.connectionState"
                        " : `hung up (${window.presence.state}, ${window.presence.connection})`"
                    )
                )
            if state != "connected" and soak.video_dropped is None:
                soak.video_dropped = f"{state} at {t - t0:.0f} s"
                print(f"the video call dropped: {soak.video_dropped}", file=sys.stderr)
            sample = Minute(
                minute,
                statistics.median(tree),
                statistics.median(main),
                max(tree),
                100 * (cpu - cpu_mark) / (t - t_mark),
                100 * (busy[0] - busy_mark[0]) / max(1, busy[1] - busy_mark[1]),
                await _calls_held(http, bot.url),
                replies - replies_mark,
                max(lags, default=0.0),
            )
            lags.clear()
            soak.samples.append(sample)
            cpu_mark, busy_mark, t_mark, replies_mark = cpu, busy, t, replies
            print(
                f"minute {minute}: PSS {sample.memory_mb:.0f} MB (server {sample.server_mb:.0f}), server CPU {sample.server_cpu_percent:.0f} % "
                f"of a core, machine {sample.machine_cpu_percent:.0f} %, calls held {sample.calls_held}, "
                f"replies {sample.replies}, callers' loop lag max {sample.caller_lag_s:.2f} s",
                file=sys.stderr,
            )
    finally:
        watcher.cancel()


def report(soak: Soak, window: float) -> str:
    first, growth, trend = soak.growth(window)
    _, server_growth, server_trend = soak.growth(window, server_only=True)
    v2v = [s for t in soak.talkers for _, s in t.v2v_s]
    cpu = [s.server_cpu_percent for s in soak.samples]
    lines = [
        f"soak: {soak.calls} aiortc calls + 1 Chromium video call for {soak.minutes:g} min, "
        f"machine: {os.cpu_count()} cores",
        "",
        "PSS: the median of the minute's samples (every 10 s); all = the server and its ASR workers",
        "",
        "| minute | PSS all MB | PSS server MB | PSS all max MB | server CPU % of a core | machine CPU % "
        "| calls held | replies | callers' loop lag max s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.minute} | {s.memory_mb:.0f} | {s.server_mb:.0f} | {s.memory_max_mb:.0f} "
        f"| {s.server_cpu_percent:.0f} | {s.machine_cpu_percent:.0f} "
        f"| {s.calls_held} | {s.replies} | {s.caller_lag_s:.2f} |"
        for s in soak.samples
    ]
    lines += [
        "",
        f"memory: {soak.idle_mb:.0f} MB before the calls, {soak.joined_mb:.0f} MB with all "
        f"{soak.calls + 1} joined: {soak.per_call_mb():.1f} MB per call",
        f"growth from minute {first} to minute {soak.samples[-1].minute if soak.samples else 0}: "
        f"{growth:+.0f} MB, fitted trend {trend:+.0f} MB (target < {GROWTH_TARGET_MB:.0f} MB); "
        f"the server process alone {server_growth:+.0f} MB, trend {server_trend:+.0f} MB",
        f"server CPU: p50 {pct(cpu, 50):.0f} % of a core ({pct(cpu, 50) / (soak.calls + 1):.1f} % per call)",
        f"replies: {sum(t.replies for t in soak.talkers)}, unanswered questions: "
        f"{sum(t.unanswered for t in soak.talkers)}, questions the callers' own sender stalled on: "
        f"{sum(t.stalls for t in soak.talkers)}",
        f"voice-to-voice at the callers: p50 {pct(v2v, 50) * 1000:.0f} ms, p95 {pct(v2v, 95) * 1000:.0f} ms "
        f"(n={len(v2v)})",
        f"calls dropped: {len(soak.dropped())} (target 0)",
    ]
    lines += [f"  - {d}" for d in soak.dropped()]
    if soak.server_said:
        lines += ["", "the server on calls ending:", *(f"    {x}" for x in soak.server_said)]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    print(
        f"presence bench soak: {args.calls} calls + 1 video call, {args.minutes:g} min, "
        f"{os.cpu_count()} cores, replies: {args.responder}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="presence-soak-") as tmp:
        soak = await run_soak(Settings(), args, Path(tmp))
    text = report(soak, args.window)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text + "\n")
        (out / "soak.json").write_text(json.dumps(asdict(soak), indent=2))
    return 1 if soak.dropped() or not soak.samples else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="presence bench soak", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10, help="aiortc callers besides the video call [10]")
    parser.add_argument("--minutes", type=float, default=30.0, help="how long [30]")
    parser.add_argument(
        "--window", type=float, default=25.0, help="growth is measured over the last N min [25]"
    )
    parser.add_argument(
        "--responder", default="rules", help="reply text: rules (default), auto, llama, openai"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--nice", type=int, default=10, help="niceness of the callers and the browser, not the server [10]"
    )
    parser.add_argument("--out", default="", help="write report.md and soak.json here")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a bot setting")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.minutes <= 0:
        parser.error("--calls must be at least 1 and --minutes positive")
    return aio.run(run(args))  # ten aiortc callers in one process: the same datagram reads as the server
