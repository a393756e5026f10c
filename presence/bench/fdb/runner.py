"""Plays one stimulus to a bot over real WebRTC and records what comes back.

Timeline: 0 is the moment the first sample of ``input.wav`` went into an outgoing frame. The
bot's audio is recorded where it arrived and cut to exactly the input's length into
``output.wav``; live injections (interruptions, backchannels, side talk) are mixed into the
outgoing audio when the bot's event arrives over the data channel (its ``t`` is on the
monotonic clock: one machine). ``events.json`` keeps the bot's events and ours, rebased to
the timeline.

Two transports make the call: ``aiortc`` (an in-process :class:`presence.caller.Caller`; the
recording is placed by arrival on the monotonic clock, ``TimedRecorder``) and ``chromium``
(headless Chromium's own WebRTC stack, :mod:`.chromium`). Both hand a :class:`Take` to
:func:`write_run`, which writes the same files.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presence.browser import Chromium, ChromiumUnavailable, chromium_problem
from presence.caller import Caller, PlayerTrack
from presence.clock import now, sleep_until
from presence.media.audio import make_frame, read_wav, resample, to_float32, write_wav
from presence.seams import OUT_SAMPLE_RATE

from .stimuli import RATE, Injection, SampleMeta, load_meta
from .timeline import TimedRecorder

log = logging.getLogger(__name__)

TRANSPORTS = ("aiortc", "chromium")


class ScriptPlayer(PlayerTrack):
    """A PlayerTrack that can also mix a clip over whatever is playing (a live injection)."""

    def __init__(self) -> None:
        super().__init__()
        self._mix: list[tuple[np.ndarray, int, asyncio.Future[float]]] = []

    def overlay(self, audio48: np.ndarray) -> asyncio.Future[float]:
        """Mix a clip in from the next frame on; resolves to when its first sample is sent."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._mix.append((audio48.astype(np.float32, copy=False), 0, future))
        return future

    async def recv(self):  # type: ignore[no-untyped-def]
        frame = await super().recv()
        if not self._mix:
            return frame
        t = now()
        samples = to_float32(frame.to_ndarray().reshape(-1))
        kept = []
        for clip, pos, future in self._mix:
            part = clip[pos : pos + samples.size]
            samples[: part.size] += part
            if pos == 0 and not future.done():
                future.set_result(t)
            if pos + samples.size < clip.size:
                kept.append((clip, pos + samples.size, future))
        self._mix = kept
        return make_frame(np.clip(samples, -1.0, 1.0), frame.pts)


@dataclass
class SampleRun:
    """What one run produced (also written to the sample directory)."""

    sample_dir: Path
    origin: float  # monotonic time of the first input sample sent
    duration_s: float
    output: np.ndarray  # 16 kHz, exactly as long as input.wav
    played: np.ndarray  # what the caller actually sent: input.wav plus the live injections
    events: list[dict[str, Any]] = field(default_factory=list)  # rebased to the timeline
    injections: list[dict[str, Any]] = field(default_factory=list)  # actual start/end
    error: str | None = None


def rebase(events: list[dict[str, Any]], origin: float) -> list[dict[str, Any]]:
    """Bot events with ``t`` (and ``received``) moved to the timeline, sorted by ``t``."""
    out = []
    for event in events:
        if event.get("type") not in (None, "event") or "t" not in event:
            continue
        e = dict(event)
        e["t"] = round(float(e["t"]) - origin, 4)
        if "received" in e:
            e["received"] = round(float(e["received"]) - origin, 4)
        e["source"] = e.get("source", "bot")
        out.append(e)
    return sorted(out, key=lambda e: float(e["t"]))


@dataclass
class Take:
    """What a transport brought back from one call, before it is written out."""

    origin: float  # monotonic time of timeline 0 (the first input sample sent)
    heard: np.ndarray  # 16 kHz, sample 0 at the origin (cut or padded to the input's length)
    events: list[dict[str, Any]]  # the bot's events as received, ``t`` on the monotonic clock
    injections: list[dict[str, Any]]  # performed or missed; start/end on the timeline
    error: str | None = None
    receiver: dict[str, Any] = field(default_factory=dict)  # transport details for events.json


# Waits for a bot event: (name, not before this monotonic time, timeout s) -> the event.
EventWaiter = Callable[[str, float, float], Awaitable[dict[str, object]]]
# Plays an injection's clip at (or as soon after as possible) a monotonic time; returns
# where its first sample landed on the timeline.
ClipPlayer = Callable[[Injection, float], Awaitable[float]]


async def inject(
    injection: Injection,
    clip_s: float,
    wait_event: EventWaiter,
    play: ClipPlayer,
    origin: float,
    deadline: float,
) -> dict[str, Any]:
    """Wait for the bot's event, then play the clip at event + offset (bot clock)."""
    record: dict[str, Any] = {
        "kind": injection.kind,
        "text": injection.text,
        "after_event": injection.after_event,
        "offset_s": injection.offset_s,
        "expects_stop": injection.expects_stop,
        "wav": injection.wav,
    }
    try:
        event = await wait_event(injection.after_event, origin, max(0.1, deadline - now()))
    except TimeoutError:
        record["missed"] = True
        return record
    at = float(event["t"]) + injection.offset_s
    if at > deadline:
        record["missed"] = True
        record["trigger_t"] = round(float(event["t"]) - origin, 4)
        return record
    start = await play(injection, at)
    record.update(
        missed=False,
        trigger_t=round(float(event["t"]) - origin, 4),
        start=round(start, 4),
        end=round(start + clip_s, 4),
    )
    return record


async def run_injections(
    injections: list[Injection],
    clips: dict[str, np.ndarray],
    wait_event: EventWaiter,
    play: ClipPlayer,
    origin: float,
    duration: float,
) -> list[dict[str, Any]]:
    """Perform every live injection while the input plays; returns when the input (and the
    frames still in flight) is over."""
    end = origin + duration
    # An injection must finish inside the recording, with a second to spare for a reply.
    tasks = [
        asyncio.create_task(
            inject(inj, clips[inj.wav].size / RATE, wait_event, play, origin, end - inj.duration_s - 1.0)
        )
        for inj in injections
    ]
    records: list[dict[str, Any]] = []
    try:
        await sleep_until(end + 0.25)  # the last frames still in flight
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            try:
                records.append(await task)
            except asyncio.CancelledError:
                pass
    return records


async def _run_aiortc(
    url: str,
    audio: np.ndarray,
    clips: dict[str, np.ndarray],
    injections: list[Injection],
    *,
    settle_s: float,
    connect_timeout: float,
) -> Take:
    """The call through an in-process aiortc caller (:class:`presence.caller.Caller`)."""
    duration = audio.size / RATE
    player = ScriptPlayer()
    caller = Caller(url=url, player=player, recorder=TimedRecorder(), name="fdb")
    error: str | None = None
    records: list[dict[str, Any]] = []
    origin = now()

    async def play(injection: Injection, at: float) -> float:
        await sleep_until(at)
        started = await player.overlay(resample(clips[injection.wav], RATE, OUT_SAMPLE_RATE))
        return started - origin

    try:
        await caller.connect(timeout=connect_timeout)
        # Let media flow both ways first, so the first input frame is not also the first
        # packet of the connection (DTLS/SRTP start-up would delay it).
        await asyncio.sleep(settle_s)
        origin = await caller.say(audio, RATE)
        records = await run_injections(injections, clips, caller.inbox.wait, play, origin, duration)
    except Exception as exc:  # a failed call is a result too: scored as silence
        log.exception("aiortc call to %s failed", url)
        error = f"{type(exc).__name__}: {exc}"
    finally:
        recorder = caller.recorder
        heard = recorder.audio(until=origin + duration + 0.5)
        await caller.hangup()
    first = int(round((origin - recorder.t0) * RATE))
    heard = heard[first:] if first >= 0 else np.zeros(0, dtype=np.float32)
    return Take(origin, heard, caller.events, records, error)


def write_run(
    sample_dir: Path,
    meta: SampleMeta,
    audio: np.ndarray,
    clips: dict[str, np.ndarray],
    take: Take,
    transport: str,
) -> SampleRun:
    """Lay a take on the timeline and write ``output.wav``, ``played.wav``, ``events.json``
    and (for interruptions) ``interrupt.json``; the same for every transport."""
    n = audio.size
    duration = n / RATE
    origin, injections = take.origin, take.injections
    output = np.zeros(n, dtype=np.float32)
    part = take.heard[:n]
    output[: part.size] = part
    played = audio.copy()
    for record in injections:
        if record.get("missed") or "start" not in record:
            continue
        clip = clips[record["wav"]]
        start = int(round(record["start"] * RATE))
        stop = min(n, start + clip.size)
        if stop > start:
            played[start:stop] += clip[: stop - start]

    events = rebase(take.events, origin)
    ours: list[dict[str, Any]] = [{"name": "input_start", "t": 0.0, "source": "caller"}]
    for record in injections:
        if record.get("missed"):
            ours.append({"name": "injection_missed", "t": duration, "source": "caller", **record})
        else:
            ours.append({"name": "injection_start", "t": record["start"], "source": "caller", **record})
            ours.append(
                {"name": "injection_end", "t": record["end"], "source": "caller", "kind": record["kind"]}
            )
    ours.append({"name": "input_end", "t": duration, "source": "caller"})
    events = sorted(events + ours, key=lambda e: float(e["t"]))

    write_wav(str(sample_dir / "output.wav"), output, RATE)
    write_wav(str(sample_dir / "played.wav"), np.clip(played, -1, 1), RATE)
    (sample_dir / "events.json").write_text(
        json.dumps(
            {
                "origin_monotonic": origin,
                "duration_s": duration,
                "transport": transport,
                "error": take.error,
                **({"receiver": take.receiver} if take.receiver else {}),
                "injections": injections,
                "events": events,
            },
            indent=1,
            default=str,
        )
    )
    interrupts = [r for r in injections if r.get("kind") == "interruption" and not r.get("missed")]
    if interrupts:
        (sample_dir / "interrupt.json").write_text(
            json.dumps(
                [
                    {
                        "context": meta.text,
                        "interrupt": r["text"],
                        "timestamp": [r["start"], r["end"]],
                    }
                    for r in interrupts
                ],
                indent=2,
            )
        )
    return SampleRun(sample_dir, origin, duration, output, played, events, injections, take.error)


async def run_sample(
    url: str,
    sample_dir: str | Path,
    *,
    transport: str = "aiortc",
    settle_s: float = 0.5,
    connect_timeout: float = 20.0,
    browser: Chromium | None = None,
) -> SampleRun:
    """Stream ``sample_dir/input.wav`` to the bot at ``url`` in real time and record the answer.

    ``transport`` is ``aiortc`` (an in-process aiortc caller) or ``chromium`` (headless
    Chromium's WebRTC stack, see :mod:`.chromium`; ``browser`` reuses a running one, else
    each call launches its own). Writes ``output.wav`` (same length as the input),
    ``played.wav`` (the input with the live injections mixed in), ``events.json`` and, for
    interruptions, FDB's ``interrupt.json``.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; use one of {TRANSPORTS}")
    if transport == "chromium" and browser is None:
        problem = chromium_problem()
        if problem is not None:
            raise ChromiumUnavailable(f"the chromium transport needs Chromium and playwright: {problem}")
    sample_dir = Path(sample_dir)
    meta = load_meta(sample_dir)
    audio, _ = read_wav(str(sample_dir / "input.wav"), RATE)
    clips = {inj.wav: read_wav(str(sample_dir / inj.wav), RATE)[0] for inj in meta.injections}
    if transport == "chromium":
        from .chromium import run_chromium

        take = await run_chromium(
            url,
            audio,
            clips,
            meta.injections,
            settle_s=settle_s,
            connect_timeout=connect_timeout,
            browser=browser,
        )
    else:
        take = await _run_aiortc(
            url, audio, clips, meta.injections, settle_s=settle_s, connect_timeout=connect_timeout
        )
    # Writing the WAVs and JSON of a long sample takes a while: off the event loop.
    return await asyncio.to_thread(write_run, sample_dir, meta, audio, clips, take, transport)
