"""Plays one stimulus to a bot over real WebRTC and records what comes back.

Timeline: 0 is the moment the first sample of ``input.wav`` went into an outgoing frame. The
bot's audio is recorded where it arrived on the monotonic clock (``Caller.recorder``) and cut
to exactly the input's length into ``output.wav``; live injections (interruptions,
backchannels, side talk) are mixed into the outgoing audio when the bot's event arrives over
the data channel (its ``t`` is on the same clock: one machine). ``events.json`` keeps the
bot's events and ours, rebased to the timeline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presence.caller import Caller, PlayerTrack
from presence.clock import now, sleep_until
from presence.media.audio import make_frame, read_wav, resample, to_float32, write_wav
from presence.seams import OUT_SAMPLE_RATE

from .stimuli import RATE, Injection, load_meta
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


async def _inject(
    caller: Caller,
    player: ScriptPlayer,
    injection: Injection,
    clip16: np.ndarray,
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
        event = await caller.wait_event(
            injection.after_event, after=origin, timeout=max(0.1, deadline - now())
        )
    except TimeoutError:
        record["missed"] = True
        return record
    at = float(event["t"]) + injection.offset_s
    if at > deadline:
        record["missed"] = True
        record["trigger_t"] = round(float(event["t"]) - origin, 4)
        return record
    await sleep_until(at)
    started = await player.overlay(resample(clip16, RATE, OUT_SAMPLE_RATE))
    record.update(
        missed=False,
        trigger_t=round(float(event["t"]) - origin, 4),
        start=round(started - origin, 4),
        end=round(started - origin + clip16.size / RATE, 4),
    )
    return record


async def run_sample(
    url: str,
    sample_dir: str | Path,
    *,
    transport: str = "aiortc",
    settle_s: float = 0.5,
    connect_timeout: float = 20.0,
) -> SampleRun:
    """Stream ``sample_dir/input.wav`` to the bot at ``url`` in real time and record the answer.

    Writes ``output.wav`` (same length as the input), ``played.wav`` (the input with the live
    injections mixed in), ``events.json`` and, for interruptions, FDB's ``interrupt.json``.
    """
    if transport == "chromium":
        raise NotImplementedError(
            "the chromium transport is not implemented yet: Chromium's fake microphone plays a "
            "file from its own start and cannot inject clips on the bot's events; use "
            "transport='aiortc'"
        )
    if transport != "aiortc":
        raise ValueError(f"unknown transport {transport!r}; use one of {TRANSPORTS}")
    sample_dir = Path(sample_dir)
    meta = load_meta(sample_dir)
    audio, _ = read_wav(str(sample_dir / "input.wav"), RATE)
    n = audio.size
    duration = n / RATE
    clips = {inj.wav: read_wav(str(sample_dir / inj.wav), RATE)[0] for inj in meta.injections}

    player = ScriptPlayer()
    caller = Caller(url=url, player=player, recorder=TimedRecorder(), name="fdb")
    error: str | None = None
    injections: list[dict[str, Any]] = []
    origin = now()
    try:
        await caller.connect(timeout=connect_timeout)
        # Let media flow both ways first, so the first input frame is not also the first
        # packet of the connection (DTLS/SRTP start-up would delay it).
        await asyncio.sleep(settle_s)
        origin = await caller.say(audio, RATE)
        end = origin + duration
        # An injection must finish inside the recording, with a second to spare for a reply.
        tasks = [
            asyncio.create_task(
                _inject(caller, player, inj, clips[inj.wav], origin, end - inj.duration_s - 1.0)
            )
            for inj in meta.injections
        ]
        await sleep_until(end + 0.25)  # the last frames still in flight
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            try:
                injections.append(await task)
            except asyncio.CancelledError:
                pass
    except Exception as exc:  # a failed call is a result too: scored as silence
        log.exception("sample %s failed", sample_dir.name)
        error = f"{type(exc).__name__}: {exc}"
    finally:
        recorder = caller.recorder
        heard = recorder.audio(until=origin + duration + 0.5)
        await caller.hangup()
    first = int(round((origin - recorder.t0) * RATE))
    output = np.zeros(n, dtype=np.float32)
    if first >= 0:
        part = heard[first : first + n]
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

    events = rebase(caller.events, origin)
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
                "error": error,
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
    return SampleRun(sample_dir, origin, duration, output, played, events, injections, error)
