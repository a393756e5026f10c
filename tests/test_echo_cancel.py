"""Server-side echo cancellation: real cancellers on piper speech, the reference alignment, and
the wiring from the setting through the factory to the call's tracks."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from collections.abc import Callable

import av
import numpy as np
import pytest
from conftest import need
from conftest import test_settings as make_settings

from presence.bot.backends.factory import BackendConfigError, Backends, _build_echo
from presence.clock import now
from presence.config import Settings
from presence.media.audio import resample
from presence.media.echo import (
    EchoStage,
    ReferenceBuffer,
    SpeexEchoCanceller,
    WebRtcEchoCanceller,
    echo_wanted,
    make_canceller,
)
from presence.media.inbound import AudioReader
from presence.media.microturn import FrameBuffer
from presence.seams import OUT_SAMPLE_RATE, SAMPLE_RATE, EchoCanceller

SR = SAMPLE_RATE
FAR_TEXT = (
    "Thanks for calling. I can help you with your account, your bills and your plans, and I can "
    "also look things up for you while we talk."
)
NEAR_TEXT = "Could you tell me how much the basic plan costs every month?"


def _webrtc_available() -> bool:
    return importlib.util.find_spec("pywebrtc_audio") is not None


@pytest.fixture
def webrtc() -> None:
    # The default canceller is a dependency: under CI=true its absence fails the run.
    need(_webrtc_available(), "pywebrtc-audio is not installed (pip install pywebrtc-audio)")


@pytest.fixture(scope="module")
def voices(speech: Callable[[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The bot's voice (far end) and the caller's (near end), piper at 16 kHz."""
    far = resample(speech(FAR_TEXT), OUT_SAMPLE_RATE, SR)
    near = resample(speech(NEAR_TEXT), OUT_SAMPLE_RATE, SR)
    return far, near


def _delayed(audio: np.ndarray, delay_s: float, gain_db: float, length: int) -> np.ndarray:
    d = int(delay_s * SR)
    out = np.zeros(length, dtype=np.float32)
    out[d : d + audio.size] = audio[: max(0, length - d)]
    return out * np.float32(10 ** (gain_db / 20))


def _run(ec: EchoCanceller, mic: np.ndarray, far: np.ndarray, chunk: int = 320) -> np.ndarray:
    out = np.zeros_like(mic)
    for i in range(0, mic.size // chunk * chunk, chunk):
        out[i : i + chunk] = ec.process(mic[i : i + chunk], far[i : i + chunk])
    return out


def _erle_db(echo: np.ndarray, residual: np.ndarray) -> float:
    return 10 * float(np.log10(np.sum(echo**2) / max(float(np.sum(residual**2)), 1e-12)))


def _near_corr(out: np.ndarray, near: np.ndarray, max_lag: int = 320) -> float:
    """Correlation with the clean near end, allowing for the canceller's own latency."""
    n = near.size - max_lag
    best = -1.0
    for lag in range(0, max_lag + 1, 4):
        a, b = out[lag : lag + n], near[:n]
        a, b = a - a.mean(), b - b.mean()
        best = max(best, float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
    return best


def _scene(
    far: np.ndarray, near: np.ndarray, delay_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The far end plays, its echo comes back at -10 dB; then the caller talks alone."""
    ref = np.concatenate([far, np.zeros(near.size + SR, np.float32)])
    echo = _delayed(ref, delay_s, -10.0, ref.size)
    at = far.size + int(delay_s * SR) + SR // 2
    mic = echo.copy()
    mic[at : at + near.size] += near
    return ref, echo, mic, at


@pytest.mark.parametrize("delay_s", [0.1, 0.25])
def test_webrtc_removes_a_delayed_attenuated_echo_and_keeps_the_caller(
    webrtc: None, voices: tuple[np.ndarray, np.ndarray], delay_s: float
) -> None:
    far, near = voices
    ref, echo, mic, at = _scene(far, near, delay_s)
    out = _run(WebRtcEchoCanceller(), mic, ref)
    converged = slice(2 * SR, far.size)  # far end alone, after 2 s
    erle = _erle_db(echo[converged], out[converged])
    assert erle >= 20.0, f"ERLE {erle:.1f} dB"
    kept = _near_corr(out[at:], near)
    assert kept >= 0.85, f"near end correlation {kept:.2f}"


def test_speex_reduces_the_echo_and_keeps_the_caller(voices: tuple[np.ndarray, np.ndarray]) -> None:
    # speexdsp is the measured alternative (the test install builds it: swig, libspeexdsp-dev).
    need(importlib.util.find_spec("speexdsp") is not None, "speexdsp is not installed (pip install speexdsp)")
    far, near = voices
    ref, echo, mic, at = _scene(far, near, 0.1)
    out = _run(SpeexEchoCanceller(), mic, ref)
    converged = slice(3 * SR, far.size)
    erle = _erle_db(echo[converged], out[converged])
    assert erle >= 10.0, f"ERLE {erle:.1f} dB"
    assert _near_corr(out[at:], near) >= 0.9


def test_reference_buffer_keys_audio_by_send_time() -> None:
    ref = ReferenceBuffer(seconds=1.0)
    assert not ref.read(5.0, 10).any()  # nothing sent yet
    t0 = 100.0
    frames = [np.full(320, k + 1, dtype=np.float32) for k in range(3)]
    for k, frame in enumerate(frames):
        ref.write(frame, t0 + k * 0.02)
    assert np.array_equal(ref.read(t0, 960), np.concatenate(frames))
    # 10 ms into frame 1, reaching 20 ms past the end: silence after what was sent
    got = ref.read(t0 + 0.03, 640)
    assert np.all(got[:160] == 2) and np.all(got[160:480] == 3) and not got[480:].any()
    assert not ref.read(t0 - 1.0, 320).any()
    # a pause in sending leaves silence, and the ring forgets what is older than its length
    ref.write(np.full(320, 9, dtype=np.float32), t0 + 0.5)
    assert not ref.read(t0 + 0.06, 320).any() and np.all(ref.read(t0 + 0.5, 320) == 9)
    for k in range(60):
        ref.write(np.full(320, 7, dtype=np.float32), t0 + 0.52 + k * 0.02)
    assert not ref.read(t0, 320).any()


def test_stage_aligns_the_reference_by_bot_clock_through_jitter(
    webrtc: None, voices: tuple[np.ndarray, np.ndarray]
) -> None:
    """The wiring's arithmetic: the bot's frames stamped with their send time, the caller's
    audio with RTP positions and jittered arrivals that carry the echo 180 ms later."""
    far, near = voices
    ref_audio, echo, mic, at = _scene(far, near, 0.18)
    reference = ReferenceBuffer(seconds=30.0)
    stage = EchoStage(make_canceller("webrtc"), reference)
    t_send0 = 1000.0
    rng = np.random.default_rng(1)
    out = []
    frame = 320
    # The speech track writes a frame at its send time, before anything can echo it.
    for k in range(ref_audio.size // frame):
        reference.write(ref_audio[k * frame : (k + 1) * frame], t_send0 + k * 0.02)
    for k in range(mic.size // frame):
        # caller frame k (the mic during [k*20 ms, (k+1)*20 ms)) arrives after its end + jitter
        arrival = t_send0 + (k + 1) * 0.02 + 0.01 + float(rng.exponential(0.01))
        chunk = mic[k * frame : (k + 1) * frame]
        # the decoder's resampler hands over uneven pieces now and then
        cut = 296 if k == 0 else frame
        got = stage.process(chunk[:cut], k * frame, arrival)
        assert got.size == cut
        out.append(got)
        if cut < frame:
            out.append(stage.process(chunk[cut:], k * frame + cut, arrival))
    cleaned = np.concatenate(out)
    converged = slice(2 * SR, far.size)
    erle = _erle_db(echo[converged], cleaned[converged])
    assert erle >= 15.0, f"ERLE through the stage {erle:.1f} dB"
    assert _near_corr(cleaned[at:], near, max_lag=640) >= 0.8
    assert stage.samples == mic.size // frame * frame and stage.busy_s > 0


def test_echo_wanted_by_setting_and_transport() -> None:
    assert echo_wanted("on") and echo_wanted("on", "sip")
    assert not echo_wanted("off") and not echo_wanted("off", "sip")
    # auto: browsers, phones and carriers cancel their own echo (see ECHO_TRANSPORTS)
    assert not echo_wanted("auto", "webrtc") and not echo_wanted("auto", "sip")


def test_factory_wires_the_setting(webrtc: None) -> None:
    assert _build_echo(make_settings(echo_cancel="off")) is None
    factory = _build_echo(make_settings(echo_cancel="on"))
    assert factory is not None
    ec = factory()
    assert isinstance(ec, WebRtcEchoCanceller) and isinstance(ec, EchoCanceller)
    assert factory() is not ec  # one per stream: it is stateful
    assert _build_echo(make_settings(echo_cancel="auto")) is not None  # per peer: see echo_wanted
    if importlib.util.find_spec("speexdsp") is not None:
        speex = _build_echo(make_settings(echo_cancel="on", echo_canceller="speex"))
        assert speex is not None and isinstance(speex(), SpeexEchoCanceller)
    with pytest.raises(ValueError):
        Settings.from_env({"PRESENCE_ECHO_CANCEL": "maybe"})
    with pytest.raises((BackendConfigError, ValueError)):
        _build_echo(dataclasses.replace(make_settings(echo_cancel="on"), echo_canceller="nope"))


async def test_session_gives_the_track_a_reference_only_when_wanted(webrtc: None, backends: Backends) -> None:
    from presence.bot.session import CallSession

    async def on_empty(_session: CallSession) -> None:
        return None

    with_echo = dataclasses.replace(backends, echo_factory=WebRtcEchoCanceller)
    on = CallSession("c1", None, make_settings(echo_cancel="on"), with_echo, None, on_empty)
    assert on.echo_reference is not None and on.track.reference is on.echo_reference
    auto = CallSession("c2", None, make_settings(echo_cancel="auto"), with_echo, None, on_empty)
    assert auto.echo_reference is None and auto.track.reference is None
    off = CallSession("c3", None, make_settings(echo_cancel="off"), backends, None, on_empty)
    assert off.echo_reference is None
    for session in (on, auto, off):
        await session.close()


class _FrameTrack:
    """A received caller track: 20 ms, 48 kHz frames with RTP-style pts, in real time."""

    kind = "audio"

    def __init__(self, audio48: np.ndarray, on_frame: Callable[[int, float], None]) -> None:
        self.audio48, self.on_frame, self.k = audio48, on_frame, 0
        self.t0: float | None = None

    async def recv(self) -> av.AudioFrame:
        from aiortc.mediastreams import MediaStreamError

        from presence.media.audio import make_frame

        n = OUT_SAMPLE_RATE // 50
        if (self.k + 1) * n > self.audio48.size:
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = now()
        await asyncio.sleep(max(0.0, self.t0 + (self.k + 1) * 0.02 - now()))
        self.on_frame(self.k, self.t0)
        frame = make_frame(self.audio48[self.k * n : (self.k + 1) * n], self.k * n)
        self.k += 1
        return frame


async def test_reader_cancels_before_the_vad(
    webrtc: None, backends: Backends, voices: tuple[np.ndarray, np.ndarray]
) -> None:
    """The real reader with a real VAD: with the stage the bot's echo reaches neither the VAD
    nor the buffer; the reference is written on the bot clock as the speech track would."""
    far, _near = voices
    far = far[: 5 * SR]
    delay = 0.12
    reference = ReferenceBuffer()
    mic48 = resample(_delayed(far, delay, -10.0, far.size), SR, OUT_SAMPLE_RATE)

    def send_reference(k: int, t0: float) -> None:
        # The bot's frame j went out at t0 + (j - 1) * 20 ms, on its schedule and before the
        # caller's frame j: written a little ahead, as the paced speech track does.
        for j in range(k, k + 3):
            reference.write(far[j * 320 : (j + 1) * 320], t0 + (j - 1) * 0.02)

    async def voiced_frames(echo: EchoStage | None) -> tuple[int, float]:
        probs: list[float] = []
        reader = AudioReader(
            "caller",
            _FrameTrack(mic48, send_reference),  # type: ignore[arg-type]
            FrameBuffer(0.2),
            backends.vad_factory(),
            lambda _p, prob, _t, _a: probs.append(prob),
            echo=echo,
        )
        reader.start()
        while reader._task is not None and not reader._task.done():
            await asyncio.sleep(0.1)
        late = probs[len(probs) // 2 :]  # after convergence
        return sum(p >= 0.5 for p in late), max(late)

    raw, _ = await voiced_frames(None)
    cleaned, top = await voiced_frames(EchoStage(WebRtcEchoCanceller(), reference))
    assert raw >= 10, "the echo alone should sound like speech to the VAD"
    assert cleaned == 0, f"{cleaned} VAD chunks still voiced (max p {top:.2f})"
