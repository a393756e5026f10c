"""``presence bench meeting``: Presence in a Janus meeting with four people, measured.

A real Janus VideoRoom (``presence.bench.janus_lab``: its own network namespace, needs root),
the bot in this process as ``presence serve`` builds it, and four aiortc humans (alice, bob,
carol, dan) speaking with piper's voice. They follow a script: statements, side talk between
them ("Bob, can you send me the slides after this?") and, about a third of the turns, questions
to the bot by name ("Presence, what did I miss?"). Like polite people, each waits for the bot's
answer, or for the bot to let the turn go, before the next one speaks. Measured:

- attribution: the share of utterances whose transcript line (a final caption or a
  ``not_addressed`` event before the next turn) carries the speaker's name;
- side talk the bot spoke after (target <= 0.10), questions to the bot answered (>= 0.95);
- voice-to-voice at the humans: the end of a question's speech (as sent) to the first bot audio
  the next human received of the bot's feed; the same questions on a direct call (aiortc over
  ``/api/offer``) to the same bot in the same run give the "vs direct" figure;
- CPU: this process (bot and humans) during the meeting, less the humans alone (measured after
  it: the same four talking, each receiving one other's feed), and Janus' own;
- ``--failover`` (presence.bench.meeting_failover): two ``presence serve`` nodes share the room
  queue; the room's holder is killed (SIGKILL); how long until the room shows the other node
  and until the bot's voice is back in the room.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presence.bench.janus_lab import (
    OPEN_ROOM,
    RATE,
    JanusHuman,
    JanusServer,
    check_host,
    remove_stale_namespaces,
)
from presence.bench.janus_media import Recording
from presence.bench.latency import cpu_seconds
from presence.bench.meeting_report import summarise, table, turn_table
from presence.bot.addressee import AddresseeOptions, AddresseeTracker
from presence.caller import Caller
from presence.clock import now
from presence.events import Ev
from presence.seams import CallEvent

NAMES = ("alice", "bob", "carol", "dan")
LINE_TIMEOUT_S = 15.0  # for the transcript line of an utterance
ANSWER_TIMEOUT_S = 25.0  # from an addressed line to the bot's first word
GAP_S = 0.7  # between the bot's last word (or its silence) and the next speaker
STAGES = (Ev.END_OF_TURN_DECIDED, Ev.RESPONDER_FIRST_TOKEN, Ev.TTS_FIRST_AUDIO)


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str
    kind: str  # side (between the humans), bot (a question to the bot), recap ("what did I miss?")


def _t(speaker: str, text: str) -> Turn:
    kind = "recap" if "what did i miss" in text.lower() else "bot" if text.startswith("Presence") else "side"
    return Turn(speaker, text, kind)


SCRIPT = [
    _t("alice", "Good morning everyone, let's start with the project status."),
    _t("bob", "The new design is finished, and the client liked the colours."),
    _t("carol", "Presence, what is the capital of France?"),
    _t("dan", "Carol, what did the client say yesterday?"),
    _t("carol", "They want the first release before the end of March."),
    _t("alice", "Presence, how many days are in a week?"),
    _t("bob", "Alice, can you send me the slides after this?"),
    _t("alice", "Sure, I will send them this afternoon."),
    _t("dan", "Presence, what did I miss?"),
    _t("carol", "The test servers were slow again last night."),
    _t("dan", "Bob, did you fix the login bug on Monday?"),
    _t("bob", "Presence, how many hours are in a day?"),
    _t("alice", "Should we move the demo to Thursday?"),  # a question to the room, no name
    _t("carol", "Dan, can you book the big meeting room for Thursday?"),
    _t("dan", "Presence, what is the largest planet in the solar system?"),
    _t("bob", "The budget for the second phase is still open."),
    _t("alice", "Presence, what did I miss?"),
    _t("dan", "Alice, the client also asked about the mobile app."),
    _t("carol", "Presence, how many minutes are in an hour?"),
    _t("bob", "Carol, please share the notes from the client call."),
    _t("alice", "We will talk about the budget again next week."),
    _t("dan", "Presence, what is two plus two?"),
    _t("carol", "Thanks, I think that covers everything for today."),
    _t("bob", "Presence, what did I miss?"),
]


@dataclass
class Clip:
    pcm: np.ndarray  # int16 at 48 kHz
    voiced_start: float  # seconds into the clip
    voiced_end: float

    @property
    def duration(self) -> float:
        return self.pcm.size / RATE


def make_clips(tts: Any, texts: list[str]) -> dict[str, Clip]:
    """Piper speech of each text, at 48 kHz, with where its voice begins and ends."""
    from presence.media.audio import resample

    clips = {}
    for text in dict.fromkeys(texts):
        audio = resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, RATE)
        frames = np.abs(audio[: audio.size // 960 * 960]).reshape(-1, 960).max(axis=1)
        voiced = np.flatnonzero(frames > 0.02)
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
        clips[text] = Clip(pcm, voiced[0] * 0.02, (voiced[-1] + 1) * 0.02)
    return clips


@dataclass
class TurnResult:
    index: int
    speaker: str
    kind: str
    text: str
    start: float = 0.0  # bot clock: the human began to send it
    speech_end: float = 0.0  # ... the end of its voice was sent
    heard: list[tuple[str, str, str]] = field(default_factory=list)  # (speaker, event, text)
    whisper: str = ""  # the final ASR pass's text of an addressed turn
    reason: str = ""  # per line: addressed, addressed* (no name in its words) or not_addressed's reason
    attributed: bool = False
    replied: bool = False  # bot speech began before the next turn
    backchannel: bool = False
    v2v_s: float | None = None  # speech end -> first bot audio at the next human
    bot_clock_s: float | None = None  # speech end -> the bot's first frame sent (its clock)
    stages_s: dict[str, float] = field(default_factory=dict)
    answer: str = ""


def _is_line(e: CallEvent) -> bool:
    d = e.data
    caption = (
        e.name == Ev.CAPTION and d.get("who") == "caller" and d.get("final") and d.get("pass_") != "final"
    )
    return bool(caption) or e.name == Ev.NOT_ADDRESSED


def _first(events: list[CallEvent], after: float, name: str = "") -> CallEvent | None:
    """The first event ``name`` (default: a transcript line) at or after ``after``."""
    return next((e for e in events if e.t >= after and (e.name == name if name else _is_line(e))), None)


async def until(check: Any, timeout: float, step: float = 0.05) -> Any:
    """``check()``'s first true value, polled; None after ``timeout`` seconds."""
    deadline = now() + timeout
    while not (value := check()) and now() < deadline:
        await asyncio.sleep(step)
    return value or None


def _bot_quiet(events: list[CallEvent], since: float, heard: Recording) -> bool:
    started = {e.data.get("utterance") for e in events if e.t >= since and e.name == Ev.BOT_SPEECH_START}
    ended = {e.data.get("utterance") for e in events if e.t >= since and e.name == Ev.BOT_SPEECH_END}
    return started <= ended and now() - (heard.voiced[-1] if heard.voiced else 0.0) > 0.8


async def settle(events: list[CallEvent], start: float, heard: Recording) -> None:
    """Wait as a polite person would: for the bot's whole answer when it took the turn, else a
    moment after it let it go (or after LINE_TIMEOUT_S of nothing)."""
    line = await until(lambda: _first(events, start), LINE_TIMEOUT_S)
    if line is not None and line.name == Ev.CAPTION:
        spoke = await until(lambda: _first(events, start, Ev.BOT_SPEECH_START), ANSWER_TIMEOUT_S)
        if spoke is not None:
            await until(lambda: _bot_quiet(events, start, heard), 60.0)
    else:
        await asyncio.sleep(1.0)
    await asyncio.sleep(GAP_S)


def analyse(turn: TurnResult, events: list[CallEvent], end: float, heard: Recording, names: Any) -> None:
    window = [e for e in events if turn.start <= e.t < end]
    lines = [e for e in window if _is_line(e)]
    turn.heard = [(str(e.data.get("speaker", "")), e.name, str(e.data.get("text", ""))) for e in lines]
    turn.attributed = bool(lines) and all(s == turn.speaker for s, _, _ in turn.heard)
    verdicts = [  # addressed without the name in its words: the partials' name, or the follow-up rule
        str(e.data.get("reason")) if e.name == Ev.NOT_ADDRESSED else "addressed" if names(t) else "addressed*"
        for e, (_, _, t) in zip(lines, turn.heard, strict=True)
    ]
    turn.reason = ", ".join(verdicts) or "nothing heard"
    turn.whisper = " / ".join(
        str(e.data.get("text")) for e in window if e.name == Ev.CAPTION and e.data.get("pass_") == "final"
    )
    spoke = next((e for e in window if e.name == Ev.BOT_SPEECH_START), None)
    turn.replied = spoke is not None
    turn.backchannel = any(e.name == Ev.BACKCHANNEL_EMITTED for e in window)
    turn.answer = " ".join(
        str(e.data.get("text")) for e in window if e.name == Ev.CAPTION and e.data.get("who") == "bot"
    )
    if spoke is None:
        return
    turn.bot_clock_s = spoke.t - turn.speech_end
    first = heard.first_voiced_after(max(turn.speech_end, spoke.t - 0.01))
    if first is not None and first < end + 5.0:
        turn.v2v_s = first - turn.speech_end
    for name in STAGES:
        mark = next((e for e in window if e.name == name and e.t <= spoke.t), None)
        if mark is not None:
            turn.stages_s[str(name)] = mark.t - turn.speech_end


async def run_meeting(
    session: Any, humans: dict[str, JanusHuman], clips: dict[str, Clip], turns: list[Turn], bot: str
) -> list[TurnResult]:
    events: list[CallEvent] = []
    stop_listening = session.events.listen(events.append)  # its history keeps only the last 1000
    results: list[TurnResult] = []
    try:
        for i, turn in enumerate(turns):
            listener = humans[NAMES[(NAMES.index(turn.speaker) + 1) % len(NAMES)]]  # the next one
            heard = listener.subscriptions[bot].recording
            clip = clips[turn.text]
            r = TurnResult(i, turn.speaker, turn.kind, turn.text, start=now())
            done = await humans[turn.speaker].say(clip.pcm)
            r.speech_end = done - (clip.duration - clip.voiced_end)
            await settle(events, r.start, heard)
            analyse(r, events, now(), heard, AddresseeTracker(AddresseeOptions(bot_name=bot)).names_bot)
            results.append(r)
            _progress(r, i + 1, len(turns))
    finally:
        stop_listening()
    return results


def _progress(r: TurnResult, done: int, total: int) -> None:
    v2v = f", voice-to-voice {r.v2v_s * 1000:.0f} ms" if r.v2v_s is not None else ""
    heard = "; ".join(f"{s or '?'}: {t!r}" for s, _, t in r.heard) or "nothing"
    print(
        f"  {done}/{total} {r.speaker} ({r.kind}): {r.reason}; replied {r.replied}{v2v}; heard {heard}",
        file=sys.stderr,
        flush=True,
    )


async def direct_call(url: str, clips: dict[str, Clip], texts: list[str]) -> list[dict[str, float]]:
    """The same questions, one-to-one over /api/offer: the bot's voice-to-voice without the SFU."""
    out = []
    caller = Caller(url=url, name="direct")
    await caller.connect()
    try:
        await asyncio.sleep(1.0)
        for text in texts:
            clip = clips[text]
            sent = await caller.say(clip.pcm.astype(np.float32) / 32767, RATE)
            speech_end = sent + clip.voiced_end
            first = await until(
                lambda e=speech_end: caller.recorder.first_voiced_after(e), ANSWER_TIMEOUT_S, 0.02
            )
            await until(lambda: now() - (caller.recorder.last_voiced_at or 0.0) > 0.8, 30.0)
            marks: dict[str, float] = {}  # the first of each event of the bot's since the question
            for e in caller.events:
                t = float(e.get("t", 0.0))  # type: ignore[arg-type]
                if t >= sent:
                    marks.setdefault(str(e.get("name")), t)
            row = {"speech_end": speech_end}
            if first is not None:
                row["v2v_s"] = first - speech_end
            if Ev.BOT_SPEECH_START in marks:
                row["bot_clock_s"] = marks[Ev.BOT_SPEECH_START] - speech_end
            row |= {str(n): marks[n] - speech_end for n in STAGES if n in marks}
            out.append(row)
            print(f"  direct: {text!r}: {row.get('v2v_s', float('nan')) * 1000:.0f} ms", file=sys.stderr)
            await asyncio.sleep(GAP_S)
    finally:
        await caller.hangup()
    return out


# ---------------------------------------------------------------------------------- CPU
class CpuMeter:
    def __init__(self, janus: JanusServer) -> None:
        self.janus = janus
        self.t0 = self.us0 = self.j0 = 0.0

    def start(self) -> None:
        self.t0, self.us0 = now(), cpu_seconds(os.getpid(), (self.janus.pid,))
        self.j0 = cpu_seconds(self.janus.pid) if self.janus.pid else 0.0

    def stop(self) -> dict[str, float]:
        span = now() - self.t0
        us = cpu_seconds(os.getpid(), (self.janus.pid,)) - self.us0
        j = (cpu_seconds(self.janus.pid) if self.janus.pid else 0.0) - self.j0
        return {"seconds": span, "process_pct": 100 * us / span, "janus_pct": 100 * j / span}


async def humans_alone(
    humans: dict[str, JanusHuman], clips: dict[str, Clip], turns: list[Turn], seconds: float, meter: CpuMeter
) -> dict[str, float]:
    """The humans' own CPU: each receives one other's feed (as each received the bot's) while
    they say the script's lines one after another, with the meeting's pauses."""
    for i, name in enumerate(NAMES):
        await humans[name].subscribe(NAMES[(i + 1) % len(NAMES)])
    meter.start()
    k = 0
    while now() - meter.t0 < seconds:
        turn = turns[k % len(turns)]
        await humans[turn.speaker].say(clips[turn.text].pcm)
        await asyncio.sleep(1.5 + GAP_S)
        k += 1
    return meter.stop()


# ---------------------------------------------------------------------------------- run
async def run(args: argparse.Namespace) -> int:
    from presence.bot.backends.factory import build_backends, warm_up
    from presence.bot.calls import CallManager
    from presence.config import Settings
    from presence.signaling.app import run_server
    from presence.signaling.janus.room import JanusMeeting, MeetingOptions
    from presence.signaling.rooms import RoomRequest

    try:
        check_host()
    except RuntimeError as exc:
        print(f"presence bench meeting: {exc}", file=sys.stderr)
        return 2
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    turns = [SCRIPT[i % len(SCRIPT)] for i in range(args.turns)]
    started, began_wall = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(
        f"presence bench meeting: {len(turns)} turns, 4 humans, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.2f} at {began_wall}",
        file=sys.stderr,
    )
    remove_stale_namespaces()
    work = Path(tempfile.mkdtemp(prefix="presence-meeting-"))
    janus = JanusServer(work)
    humans: dict[str, JanusHuman] = {}
    runner, meeting = None, None
    failover: dict[str, Any] | None = None
    try:
        janus.start()
        settings = Settings.from_env(
            None,
            port=0,
            sip_port=-1,
            greeting="",
            jobs="off",
            notes_dir="",
            ice_host_addresses=[janus.host_address],
        )
        backends = build_backends(settings)
        await warm_up(backends)
        clips = make_clips(backends.tts, [t.text for t in SCRIPT])
        manager = CallManager(settings, backends)
        runner = await run_server(settings, manager)
        for name in NAMES:
            humans[name] = await JanusHuman.join(janus, name, keep_s=20.0, rx_prefetch_packets=2)
        bot = settings.bot_name
        meeting = await JanusMeeting.join(
            manager,
            RoomRequest(id="bench", url=janus.url(OPEN_ROOM)),
            settings,
            MeetingOptions(notes_timeout_s=0.0),
        )
        session = manager.get(meeting.call_id)
        assert session is not None
        if not await until(lambda: len(session.peers) == len(NAMES), 20.0):
            raise RuntimeError(f"the bot listens to {[p.participant for p in session.peers.values()]} only")
        for human in humans.values():
            await human.subscribe(bot, timeout=15.0)
        await asyncio.sleep(1.0)
        meter = CpuMeter(janus)
        meter.start()
        results = await run_meeting(session, humans, clips, turns, bot)
        cpu = {"meeting": meter.stop()}
        await meeting.leave()
        notes, meeting = meeting.notes, None
        cpu["humans_alone"] = await humans_alone(humans, clips, turns, args.humans_s, meter)
        asked = [t.text for t in SCRIPT if t.kind == "bot"]
        direct = await direct_call(
            settings.base_url, clips, [asked[i % len(asked)] for i in range(args.direct)]
        )
        for human in humans.values():
            await human.leave()
        humans.clear()
        if args.failover:
            from presence.bench.meeting_failover import run_failover

            try:
                failover = await run_failover(janus, clips, asked, args.lease_s, bot)
            except Exception as exc:  # the meeting's figures stand without it
                failover = {"failed": f"{type(exc).__name__}: {exc}".replace("\n", " / ")[:600]}
        summary = summarise(results, direct, cpu)
        head = (
            f"presence bench meeting --turns {args.turns}: {began_wall}, {os.cpu_count()} cores, "
            f"{time.monotonic() - started:.0f} s, responder {settings.responder}, load at the end "
            f"{os.getloadavg()[0]:.2f}"
        )
        text = "\n\n".join([head, table(summary, failover), turn_table(results)])
        print(text)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".txt").write_text(text + "\n")
        data = {
            "run": head,
            **summary,
            "failover": failover,
            "turns_detail": [asdict(t) for t in results],
            "notes": notes,
        }
        out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str))
        print(f"written: {out.with_suffix('.txt')}, {out.with_suffix('.json')}", file=sys.stderr)
        return 0
    except Exception as exc:
        print(f"presence bench meeting failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if janus.log_path.exists():
            print(f"Janus' log ends:\n{janus.log_tail(15)}", file=sys.stderr)
        raise
    finally:
        with contextlib.suppress(Exception):
            if meeting is not None:
                await meeting.leave()
        for human in humans.values():
            with contextlib.suppress(Exception):
                await human.leave()
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        janus.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="presence bench meeting",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Needs root (network namespaces) and the Debian package janus.",
    )
    parser.add_argument(
        "--turns", type=int, default=len(SCRIPT), help=f"scripted turns (default {len(SCRIPT)})"
    )
    parser.add_argument("--direct", type=int, default=6, help="questions on the direct call (default 6)")
    parser.add_argument("--humans-s", type=float, default=20.0, help="seconds of the humans-alone CPU run")
    parser.add_argument(
        "--failover", action="store_true", help="also: two serve nodes, kill the room's holder"
    )
    parser.add_argument("--lease-s", type=float, default=6.0, help="rooms_lease_s of the failover nodes")
    parser.add_argument("--out", default="bench/results/meeting", help="writes OUT.txt and OUT.json")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted: Janus, its namespace and the humans are gone", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
