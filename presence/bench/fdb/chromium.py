"""The ``chromium`` transport: the call is made by headless Chromium's own WebRTC stack.

The page is loaded from the bot's origin (``/healthz``) and runs ``chromium.js``: Chromium
does ICE, DTLS, SRTP, Opus encoding, pacing and the ``events`` data channel.

Sending is on the page's AudioContext clock (48 kHz): ``input.wav`` starts at a scheduled
context time T0 (timeline 0) and every injection at a scheduled context time, so
``played.wav`` and the injection times are exact on that clock.

Receiving: the page keeps every RTP packet of the bot's audio with its arrival time
(encoded insertable streams, before the jitter buffer); Python decodes them and places them
by arrival and RTP timestamp with the same min-filter as the aiortc transport
(``timeline.TimedRecorder``). That is ``output.wav``: the bot's audio as the page received
it. What the page then *plays* comes out of Chrome's adaptive jitter buffer and its audio
renderer, which add 40-60 ms that change by 10-25 ms from call to call (measured here: the
jitter buffer settles at 30 or 40 ms per call, and the renderer-to-WebAudio hand-over has a
random phase); that would swamp a 10 ms calibration. Placed by arrival, the calibration's
echo delays are measured within 2 ms (transport ~15 ms; aiortc's ~36 ms includes its own
2-packet receive prefetch). The page still records what it plays (an AudioWorklet on the
remote track) and ``events.json`` reports the difference per call as
``receiver.playout_delay_s`` (50-70 ms against the echo bot, 90-250 ms against the real bot,
whose packets come less evenly while its models run).

Clocks: the bot's events, the packet arrivals and T0 are put on this process's monotonic
clock. The recorder worklet reads the wall clock (``Date.now()``) at each 128-frame render
quantum; the minimum of wall - context time over a few seconds is when the context renders
a given time. ``Date.now() - performance.now()`` (maximum over a 2 ms busy loop) maps packet
arrival times to the wall clock, and Python's ``time.time() - time.monotonic()`` (the same
CLOCK_REALTIME) maps the wall clock to monotonic. Error: about 1 ms (``Date.now()`` steps);
a sample rendered at T0 leaves the page after Chromium's send path (~27 ms here, ~8 ms for
aiortc), which is part of the transport cost the calibration measures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame

from presence.browser import Chromium, launch_chromium
from presence.caller import EventInbox
from presence.clock import now, sleep_until
from presence.media.audio import FrameResampler, resample, to_float32, to_int16

from .runner import Take, run_injections
from .stimuli import RATE, Injection
from .timeline import TimedRecorder, stream_offset

log = logging.getLogger(__name__)

HARNESS_JS = Path(__file__).with_name("chromium.js")
CTX_RATE = 48_000
INJECT_LEAD_S = 0.1  # Python asks the page this early, so the clip starts on time
CLOCK_SPAN_S = 3.0  # the context clock mapping uses the render timings of this many seconds
MAX_PLAYOUT_S = 0.5  # the longest playout delay looked for


def _b64(audio: np.ndarray) -> str:
    return base64.b64encode(to_int16(audio).tobytes()).decode("ascii")


def _sources(audio: np.ndarray, clips: dict[str, np.ndarray]) -> dict[str, str]:
    """The input and the injection clips for the page: 48 kHz int16, base64."""
    sources = {"input": _b64(resample(audio, RATE, CTX_RATE))}
    sources.update({wav: _b64(resample(clip, RATE, CTX_RATE)) for wav, clip in clips.items()})
    return sources


def _pcm16(b64: str) -> np.ndarray:
    """The page's 48 kHz int16 base64 as 16 kHz float32."""
    return resample(to_float32(np.frombuffer(base64.b64decode(b64), dtype=np.int16)), CTX_RATE, RATE)


def _wall_minus_mono() -> float:
    """``time.time() - time.monotonic()``, from the tightest of a few paired reads."""
    best = (float("inf"), 0.0)
    for _ in range(5):
        a = time.monotonic()
        wall = time.time()
        b = time.monotonic()
        best = min(best, (b - a, wall - (a + b) / 2))
    return best[1]


class PageClock:
    """Maps the page's AudioContext time and ``performance.now()`` to the monotonic clock."""

    def __init__(self, wall_minus_mono: float, rate: int = CTX_RATE) -> None:
        self.wall_minus_mono = wall_minus_mono
        self.rate = rate
        self.lags: list[tuple[int, float]] = []  # (context frame, wall ms - context ms)
        self.perf_ms: float | None = None  # wall ms - performance.now()

    def add(self, report: dict[str, Any]) -> None:
        self.lags += [(int(frame), float(lag)) for frame, lag in report["lags"] if lag is not None]
        perf = report.get("perf")
        if isinstance(perf, int | float) and np.isfinite(perf):
            self.perf_ms = perf if self.perf_ms is None else max(self.perf_ms, perf)

    def offset(self, frame: int | None = None) -> float:
        """Monotonic minus context seconds, from the render timings near ``frame`` (the
        latest ones when None)."""
        if not self.lags:
            raise RuntimeError("the page has reported no render timings yet")
        span = int(CLOCK_SPAN_S * self.rate)
        center = self.lags[-1][0] if frame is None else frame
        near = [lag for f, lag in self.lags if abs(f - center) <= span] or [lag for _, lag in self.lags]
        return min(near) / 1000.0 - self.wall_minus_mono

    def ctx_to_mono(self, ctx_s: float) -> float:
        return ctx_s + self.offset(int(ctx_s * self.rate))

    def mono_to_ctx(self, mono: float) -> float:
        return mono - self.offset()

    def perf_to_mono(self, perf_ms: float) -> float:
        if self.perf_ms is None:
            raise RuntimeError("the page has not reported its performance clock")
        return (perf_ms + self.perf_ms) / 1000.0 - self.wall_minus_mono


class PageCall:
    """Python's side of the page: the bot's events (stamped on arrival) and the clock."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.inbox = EventInbox()
        self.clock = PageClock(_wall_minus_mono())

    async def sync_clock(self, perf: bool = False) -> None:
        """Fetch the render timings (and, with ``perf``, the performance clock's offset)."""
        report = await self.page.evaluate("([i, p]) => fdb.clock(i, p)", [len(self.clock.lags), perf])
        self.clock.add(report)

    async def play(self, name: str, when: float) -> int:
        """Schedule a clip at context time ``when`` (or as soon as safely possible); returns
        the context frame it starts at."""
        return int(await self.page.evaluate("([n, w]) => fdb.play(n, w)", [name, when]))


class _PacketRecorder(TimedRecorder):
    """A TimedRecorder fed with decoded packets instead of a track."""

    def add(self, arrived: float, offset: int | None, audio: np.ndarray) -> None:
        self._arrivals.append((arrived, offset, audio))


def place_packets(
    packets: list[list[Any]], clock: PageClock, origin: float, until: float, rate: int = RATE
) -> np.ndarray:
    """Decode the page's received Opus packets and lay them on the timeline (sample 0 at
    ``origin``) by arrival and RTP timestamp, as the aiortc transport's recorder does."""
    seen: set[int] = set()
    ordered: list[tuple[int, float, int, bytes]] = []
    wrap, last = 0, None
    for i, (arrived, rtp, seq, payload) in enumerate(packets):
        if seq is None:
            key = i
        else:  # unwrap 16-bit sequence numbers; drop duplicates
            if last is not None and seq - last < -32768:
                wrap += 65536
            elif last is not None and seq - last > 32768:
                wrap -= 65536
            last = seq
            key = seq + wrap
            if key in seen:
                continue
            seen.add(key)
        ordered.append((key, float(arrived), int(rtp), base64.b64decode(payload)))
    ordered.sort(key=lambda p: p[0])
    decoder = OpusDecoder()
    resampler = FrameResampler(rate)
    recorder = _PacketRecorder(rate)
    first_pts: int | None = None
    for _key, arrived, rtp, payload in ordered:
        for frame in decoder.decode(JitterFrame(payload, rtp)):
            offset, first_pts = stream_offset(frame, first_pts, rate)
            recorder.add(clock.perf_to_mono(arrived), offset, resampler(frame))
    # Laid out from before the first packet, then cut at the origin (as the aiortc path does).
    recorder.t0 = min([origin] + [clock.perf_to_mono(p[1]) for p in ordered]) - 1.0
    first = int(round((origin - recorder.t0) * rate))
    return recorder.audio(until=until)[first:]


def playout_delay(heard: np.ndarray, played: np.ndarray, rate: int = RATE) -> float | None:
    """How much later the page played what it received (cross-correlation), or None in
    silence. Runs in a thread: an FFT over the whole call."""
    if min(np.abs(heard).max(initial=0.0), np.abs(played).max(initial=0.0)) < 1e-3:
        return None
    from .calibrate import xcorr_delay

    n = min(heard.size, played.size)
    return round(xcorr_delay(heard[:n], played[:n], rate, MAX_PLAYOUT_S), 4)


async def run_chromium(
    url: str,
    audio: np.ndarray,
    clips: dict[str, np.ndarray],
    injections: list[Injection],
    *,
    settle_s: float = 0.5,
    connect_timeout: float = 20.0,
    browser: Chromium | None = None,
    name: str = "fdb",
) -> Take:
    """One call from a Chromium page to the bot at ``url`` (16 kHz ``audio`` in, the take out).

    ``browser`` is a running Chromium to open the page in; without one, one is launched for
    this call and closed after it.
    """
    duration = audio.size / RATE
    owned = browser is None
    if browser is None:
        browser = await launch_chromium()
    page = None
    call: PageCall | None = None
    error: str | None = None
    records: list[dict[str, Any]] = []
    origin = now()
    heard = np.zeros(0, dtype=np.float32)
    receiver: dict[str, Any] = {}
    try:
        page = await browser.new_page()
        page.on("pageerror", lambda exc: log.warning("chromium page error: %s", exc))
        call = PageCall(page)
        await page.expose_function("fdbEvent", call.inbox.receive)
        await page.goto(url.rstrip("/") + "/healthz", timeout=connect_timeout * 1000)
        await page.add_script_tag(path=str(HARNESS_JS))
        sources = await asyncio.to_thread(_sources, audio, clips)
        await page.evaluate("(clips) => fdb.setup(clips)", sources)
        await asyncio.wait_for(page.evaluate("(o) => fdb.connect(o)", {"name": name}), connect_timeout)
        await page.wait_for_function(
            "['connected', 'failed', 'closed'].includes(fdb.state)",
            polling=20,
            timeout=connect_timeout * 1000,
        )
        state = await page.evaluate("fdb.state")
        if state != "connected":
            raise ConnectionError(f"could not connect (state {state})")
        # Let media flow both ways first, as the aiortc caller does (DTLS/SRTP start-up).
        await asyncio.sleep(settle_s)
        await call.sync_clock(perf=True)
        start = await call.play("input", 0.0)  # as soon as safely possible
        t0 = start / CTX_RATE
        await call.sync_clock()
        origin = call.clock.ctx_to_mono(t0)

        async def play(injection: Injection, at: float) -> float:
            await sleep_until(at - INJECT_LEAD_S)
            await call.sync_clock()
            frame = await call.play(injection.wav, call.clock.mono_to_ctx(at))
            return (frame - start) / CTX_RATE

        records = await run_injections(injections, clips, call.inbox.wait, play, origin, duration)
        await call.sync_clock(perf=True)
        until = origin + duration + 0.5
        packets = await page.evaluate("fdb.received(0)")
        heard = await asyncio.to_thread(place_packets, packets, call.clock, origin, until)
        frames = int(np.ceil(duration * CTX_RATE))
        pcm = await page.evaluate("([s, n]) => fdb.played(s, n)", [start, frames])
        receiver = {
            "packets": len(packets),
            "playout_delay_s": await asyncio.to_thread(playout_delay, heard, _pcm16(pcm)),
        }
    except Exception as exc:  # a failed call is a result too: scored as silence
        log.exception("chromium call to %s failed", url)
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if page is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(page.evaluate("fdb.hangup()"), 5.0)
            with contextlib.suppress(Exception):
                await page.close()
        if owned:
            await browser.close()
    return Take(origin, heard, call.inbox.events if call is not None else [], records, error, receiver)
