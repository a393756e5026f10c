"""Calibration: run the harness against an echo bot with a known delay and measure it.

The delay is measured two ways on the recorded timeline: the lag of the cross-correlation peak
between what was sent and what came back, and the difference of their first onsets. The
loopback transport adds a fixed cost (encode, jitter buffers, decode); a base run with a
small known delay measures it, and the harness is calibrated when every other run measures D + that cost within
10 ms. Each transport (aiortc, chromium) has a cost of its own and is calibrated with its own calls.
A call whose two measures disagree was disturbed (a jitter buffer stretched the audio under CPU
pressure) and is made again, up to twice; the report counts these retries. Throw-away calls
come first, until one is undisturbed (at most three); the report counts them too.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from presence.browser import Chromium, launch_chromium
from presence.config import Settings
from presence.signaling.app import run_server

from .echo import DelayEchoHost
from .runner import run_sample
from .stimuli import RATE, SampleMeta, Synthesizer, Voice, write_sample

TOLERANCE_S = 0.010
RETRIES = 2  # a disturbed calibration call is made again this many times at most
WARMUPS = 3  # throw-away calls at most, until one is undisturbed

log = logging.getLogger(__name__)


def xcorr_delay(sent: np.ndarray, received: np.ndarray, rate: int = RATE, max_lag_s: float = 2.0) -> float:
    """Lag (seconds, >= 0) at which ``received`` best matches ``sent`` (FFT cross-correlation)."""
    n = sent.size + received.size
    size = 1 << (n - 1).bit_length()
    spec = np.fft.rfft(received, size) * np.conj(np.fft.rfft(sent, size))
    corr = np.fft.irfft(spec, size)
    max_lag = min(int(max_lag_s * rate), received.size - 1)
    lag = int(np.argmax(corr[: max_lag + 1]))
    return lag / rate


def onset(audio: np.ndarray, rate: int = RATE, relative: float = 0.1) -> float | None:
    """First sample above ``relative`` of the clip's peak, in seconds."""
    peak = float(np.abs(audio).max(initial=0.0))
    if peak <= 1e-3:
        return None
    idx = np.flatnonzero(np.abs(audio) > relative * peak)
    return float(idx[0]) / rate if idx.size else None


@dataclass
class Calibration:
    delay_s: float
    xcorr_s: float
    onset_s: float | None

    @property
    def disturbed(self) -> bool:
        """Onset and correlation peak disagree: a jitter buffer stretched the audio mid-call."""
        return self.onset_s is None or abs(self.onset_s - self.xcorr_s) > TOLERANCE_S


@dataclass
class CalibrationReport:
    transport_s: float  # the loopback path's own delay: base run's measurement minus its D
    runs: list[Calibration]
    transport: str = "aiortc"  # which caller made the calls (runner.TRANSPORTS)
    retries: int = 0  # calls made again because their two measures disagreed
    warmups: int = 1  # throw-away calls before the base run

    def errors(self) -> list[float]:
        """Measured D minus true D for each run, the transport cost taken off."""
        return [r.xcorr_s - self.transport_s - r.delay_s for r in self.runs[1:]]

    @property
    def max_error_s(self) -> float:
        return max((abs(e) for e in self.errors()), default=0.0)

    def to_json(self) -> dict[str, object]:
        return {
            "transport": self.transport,
            "transport_s": self.transport_s,
            "runs": [asdict(r) for r in self.runs],
            "errors_s": self.errors(),
            "max_error_s": self.max_error_s,
            "tolerance_s": TOLERANCE_S,
            "retries": self.retries,
            "warmups": self.warmups,
        }


def _calibration_sample(directory: Path, synth: Synthesizer | None = None) -> Path:
    """Speech with gaps, so the correlation has one clear peak: espeak is instant."""
    synth = synth or Synthesizer()
    speech = synth(Voice("espeak", "en-us"), "Calibration. One, two, three. The quick brown fox.")
    audio = np.zeros(int((0.5 + speech.size / RATE + 1.5) * RATE), dtype=np.float32)
    audio[int(0.5 * RATE) : int(0.5 * RATE) + speech.size] = speech
    meta = SampleMeta(
        id="calibration",
        category="calibration",
        seed=0,
        version=1,
        voice="espeak:en-us",
        text="calibration",
        duration_s=audio.size / RATE,
    )
    write_sample(directory, audio, meta, {})
    return directory


async def measure_echo(
    delay_s: float, sample_dir: Path, transport: str = "aiortc", browser: Chromium | None = None
) -> Calibration:
    """Serve a DelayEchoHost, play the sample through the harness, measure the delay."""
    settings = Settings.from_env({}, port=0, greeting="")
    runner = await run_server(settings, DelayEchoHost(delay_s))
    try:
        run = await run_sample(settings.base_url, sample_dir, transport=transport, browser=browser)
    finally:
        await runner.cleanup()
    if run.error:
        raise RuntimeError(f"calibration call failed: {run.error}")
    sent_onset, got_onset = onset(run.played), onset(run.output)
    return Calibration(
        delay_s=delay_s,
        xcorr_s=xcorr_delay(run.played, run.output),
        onset_s=None if sent_onset is None or got_onset is None else got_onset - sent_onset,
    )


async def calibrate(
    delays: tuple[float, ...] = (0.3, 0.6),
    base_delay_s: float = 0.1,
    out: Path | None = None,
    transport: str = "aiortc",
) -> CalibrationReport:
    """Measure the transport with a run at ``base_delay_s``, then each D.

    The base run is not at D = 0: an echo cannot send a frame before it has arrived, so a
    zero-delay echo would race its own input. A warm-up call comes first and is discarded.
    With ``transport="chromium"`` one browser makes every call (a page each).
    """
    browser = await launch_chromium() if transport == "chromium" else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sample_dir = _calibration_sample(Path(out or tmp) / "calibration")

            async def undisturbed(delay: float, calls: int) -> tuple[Calibration, int]:
                """Call until one is undisturbed, ``calls`` at most: the last call, and how many
                were made. Onset and correlation peak agree on an undisturbed call; when they
                don't, a jitter buffer stretched the audio mid-call (CPU pressure)."""
                for made in range(1, calls + 1):
                    run = await measure_echo(delay, sample_dir, transport, browser)
                    if not run.disturbed:
                        break
                    if made < calls:
                        log.warning("calibration call at D=%.2f s was disturbed (%s): again", delay, run)
                return run, made

            # The first call of a process pays one-time costs (codec and thread start-up) that
            # shift its timing by ~10 ms, and a new browser keeps busy for a while after its
            # start on a loaded machine: throw calls away until one is undisturbed.
            _, warmups = await undisturbed(base_delay_s, WARMUPS)
            runs: list[Calibration] = []
            retries = 0
            for delay in (base_delay_s, *delays):
                run, made = await undisturbed(delay, RETRIES + 1)
                runs.append(run)
                retries += made - 1
            base = runs[0]
    finally:
        if browser is not None:
            await browser.close()
    report = CalibrationReport(base.xcorr_s - base_delay_s, runs, transport, retries, warmups)
    if out is not None:
        (Path(out) / "calibration.json").write_text(json.dumps(report.to_json(), indent=2))
    return report
