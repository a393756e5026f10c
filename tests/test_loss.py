"""Audio under packet loss: libopus fills lost caller packets (FEC from the next packet, else
PLC) before VAD and ASR, on real opus packets and in a real call through a lossy link."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from aiortc.rtp import RtpPacket
from conftest import BotServer, need

from presence.bench.loss import LossyLink, Pattern, call_once, wer
from presence.media import opus_plc
from presence.media.audio import make_frame

SENTENCE = "I would like to change the delivery address for my order, please."


@pytest.fixture(scope="module")
def voice() -> np.ndarray:
    """Piper speech at 48 kHz (the piper voice alone: no other model loads)."""
    from presence.bot.backends.tts import PiperTTS
    from presence.media.audio import resample

    tts = PiperTTS()
    return resample(np.concatenate(list(tts.synthesize(SENTENCE))), tts.sample_rate, 48_000)


def _libopus() -> None:
    need(opus_plc.available(), f"libopus (Debian libopus0) and opuslib-next: {opus_plc.unavailable_reason()}")


def _packets(audio48: np.ndarray, fec_loss_pct: int) -> list[RtpPacket]:
    """Real opus packets from aiortc's encoder (with FEC when asked), as RTP packets."""
    encoder = opus_plc.fec_encoder(fec_loss_pct)
    payloads: list[bytes] = []
    for i in range(0, audio48.size // 960 * 960, 960):
        out, _ts = encoder.encode(make_frame(audio48[i : i + 960], i))
        payloads += out
    packets = []
    for seq, payload in enumerate(payloads):
        packet = RtpPacket(payload_type=111, sequence_number=(60000 + seq) & 0xFFFF, timestamp=seq * 960)
        packet.payload = payload
        packet._data = payload  # type: ignore[attr-defined]  # what aiortc's receiver sets
        packets.append(packet)
    return packets


def _receive(
    packets: list[RtpPacket], drop: set[int]
) -> tuple[np.ndarray, list[int], opus_plc.ConcealingOpusDecoder]:
    """Through the bot's jitter buffer and decoder: 48 kHz left channel and each frame's pts."""
    buffer = opus_plc.LossJitterBuffer(prefetch=1)
    decoder = opus_plc.ConcealingOpusDecoder()
    parts, pts = [], []
    for i, packet in enumerate(packets):
        if i in drop:
            continue
        _pli, frame = buffer.add(packet)
        if frame is not None:
            for out in decoder.decode(frame):
                pts.append(out.pts)
                parts.append(out.to_ndarray().reshape(-1)[::2].astype(np.float32) / 32768)
    return np.concatenate(parts), pts, decoder


def _loud_packet(audio48: np.ndarray) -> int:
    rms = np.sqrt(np.mean(np.square(audio48[: audio48.size // 960 * 960].reshape(-1, 960)), axis=1))
    middle = np.arange(rms.size)[rms.size // 4 : 3 * rms.size // 4]
    return int(middle[np.argmax(rms[middle])])


def _snr_db(got: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / max(1e-12, np.sum((got - ref) ** 2))))


def test_plc_fills_a_lost_packet_with_audio(voice: np.ndarray) -> None:
    _libopus()
    packets = _packets(voice, fec_loss_pct=0)  # no FEC: libopus' PLC alone
    k = _loud_packet(voice)
    ref, _pts, _ = _receive(packets, set())
    got, pts, decoder = _receive(packets, {k})
    assert got.size == ref.size, "the lost packet's 20 ms must be filled, not skipped"
    assert pts == sorted(pts) and pts[0] == 0  # placed by RTP time: no gap left for the lost one
    assert decoder.concealed == 1 and decoder.recovered == 0
    span = slice(k * 960, (k + 1) * 960)
    level = float(np.sqrt(np.mean(np.square(got[span]))))
    ref_level = float(np.sqrt(np.mean(np.square(ref[span]))))
    assert level > 0.2 * ref_level, f"PLC gave near silence: rms {level:.4f} vs {ref_level:.4f}"


def test_fec_recovers_a_lost_packet_from_the_next_one(voice: np.ndarray) -> None:
    _libopus()
    k = _loud_packet(voice)
    span = slice(k * 960, (k + 1) * 960)
    with_fec = _packets(voice, fec_loss_pct=10)
    ref, _pts, _ = _receive(with_fec, set())
    got, _pts, decoder = _receive(with_fec, {k})
    assert got.size == ref.size
    assert decoder.recovered == 1 and decoder.concealed == 0
    fec_snr = _snr_db(got[span], ref[span])
    # The same loss without FEC in the stream: PLC only guesses the waveform.
    plain = _packets(voice, fec_loss_pct=0)
    plain_ref, _pts, _ = _receive(plain, set())
    plc, _pts, _ = _receive(plain, {k})
    plc_snr = _snr_db(plc[span], plain_ref[span])
    assert fec_snr > 3.0 and fec_snr > plc_snr + 3.0, f"FEC {fec_snr:.1f} dB, PLC {plc_snr:.1f} dB"


def test_a_burst_is_filled_and_late_or_repeated_packets_are_dropped(voice: np.ndarray) -> None:
    _libopus()
    packets = _packets(voice, fec_loss_pct=10)
    k = _loud_packet(voice)
    ref, _pts, _ = _receive(packets, set())
    got, _pts, decoder = _receive(packets, set(range(k, k + 5)))  # 100 ms
    assert got.size == ref.size
    assert decoder.recovered == 1 and decoder.concealed == 4
    buffer = opus_plc.LossJitterBuffer(prefetch=1)
    out = [buffer.add(p)[1] for p in (packets[0], packets[2], packets[1], packets[1], packets[3])]
    # 2 came before 1 (reordered within the prefetch): both come out, in order; the repeat does not
    assert [f.timestamp if f else None for f in out] == [None, 0, 960, None, 1920]
    assert out[-1] is not None and out[-1].lost == 0 and buffer.late == 1


def test_the_bots_encoder_sends_fec() -> None:
    _libopus()
    decoder = opus_plc._opus.Decoder(48_000, 2)  # type: ignore[union-attr]
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(48_000) / 48_000)).astype(np.float32)
    packets = _packets(tone, fec_loss_pct=10)
    # libopus only carries FEC in its SILK and hybrid modes (TOC configurations 0-15)
    assert any(p.payload[0] >> 3 < 16 for p in packets[5:]), "no SILK/hybrid packets: no FEC"
    assert decoder.decode(packets[10].payload, 960, decode_fec=True)


async def test_fec_is_chosen_per_call_not_per_process() -> None:
    """Two real aiortc calls side by side, FEC asked for on one: each sender's encoder, once
    media flows, has what its own call asked for."""
    import asyncio

    from aiortc.mediastreams import AudioStreamTrack

    from presence.clock import now
    from presence.signaling.rtc import new_peer_connection

    async def call(loss_pct: int) -> tuple[dict[str, str], bool, list[object]]:
        a, b = (new_peer_connection([], ["127.0.0.1"]) for _ in range(2))
        sender = a.addTrack(AudioStreamTrack())
        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)
        (transceiver,) = a.getTransceivers()
        configured = opus_plc.configure_sender(transceiver, loss_pct)
        deadline = now() + 15
        while sender._RTCRtpSender__encoder is None and now() < deadline:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        encoder = sender._RTCRtpSender__encoder  # type: ignore[attr-defined]
        assert encoder is not None, "the sender never built its encoder"
        await asyncio.sleep(0.3)  # frames went through it: it was kept, not replaced
        assert sender._RTCRtpSender__encoder is encoder  # type: ignore[attr-defined]
        return getattr(encoder, "fec_loss_pct", 0), configured, [a, b]

    (with_fec, on, pcs1), (without, off, pcs2) = await asyncio.gather(call(10), call(0))
    for pc in pcs1 + pcs2:
        await pc.close()  # type: ignore[attr-defined]
    # the encoder that sent the frames is the FEC one (test_the_bots_encoder_sends_fec: its packets)
    assert on and with_fec == 10, with_fec
    assert not off and without == 0, without


def test_wer_scoring() -> None:
    assert wer("the cat sat", "the cat sat") == 0
    assert wer("the cat sat", "a cat sat down") == pytest.approx(2 / 3)


def test_lossy_link_drops_about_its_rate() -> None:
    link = LossyLink(0.05, seed=1, skip=0)
    assert 0.03 < sum(link.drop() for _ in range(4000)) / 4000 < 0.07
    bursty = LossyLink(0.05, burst=5, seed=1, skip=0)
    drops = [bursty.drop() for _ in range(4000)]
    assert 0.03 < sum(drops) / 4000 < 0.07
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, np.array(drops, int), 0])))[::2]
    assert set(runs.tolist()) <= {5, 10, 15}


@pytest.mark.slow
async def test_a_call_under_5_percent_loss_reaches_the_bot(
    bot: BotServer, speech: Callable[[str], np.ndarray]
) -> None:
    """A real caller, the real bot, 5 % of the caller's packets dropped on the way in: almost all
    of the audio still reaches the micro-turns (a generous bound; not a timing assertion)."""
    _libopus()
    clip = speech(SENTENCE)
    result = await call_once(bot, [(SENTENCE, clip)], Pattern("5 %", 0.05), seed=3)
    assert result.dropped > 0.02 and result.filled > 0, (
        f"dropped {result.dropped:.1%}, filled {result.filled}"
    )
    # Counted where the decoded audio enters the bot's frame buffer: how late it got there is
    # the micro-turn clock's business (and this machine's load), not the concealment's.
    arrived = result.arrived[0]
    assert arrived >= 0.9, f"only {arrived:.0%} of the caller's audio frames reached the bot"


def test_frame_buffer_follows_a_stream_that_got_slower_for_good() -> None:
    """A stall upstream (a CPU hiccup, a backlog in a jitter buffer) delays every later frame:
    after a run of late frames the buffer re-times the stream instead of losing it for good."""
    from presence.media.microturn import FrameBuffer
    from presence.seams import FRAME_SAMPLES

    buf = FrameBuffer(max_delay=0.2)
    f = 0.02

    def push(index: int, arrival: float) -> None:
        buf.push(np.full(FRAME_SAMPLES, 0.5, np.float32), 0.5, arrival, index * FRAME_SAMPLES)

    # Frames 0-49 on time; from frame 50 on, each arrives 400 ms later than it would have.
    events = [(100.0 + (i + 1) * f + (0.4 if i >= 50 else 0.0), 0, i) for i in range(200)]
    events += [(100.0 + (tick + 1) * 0.2 + 0.02, 1, tick) for tick in range(20)]
    got: dict[int, bool] = {}
    for t, kind, i in sorted(events):
        if kind == 0:
            push(i, t)
        else:
            got[i] = not buf.pull(10, t).lost.any()
    assert all(got[tick] for tick in range(5)) and buf.resyncs == 1
    assert all(got[tick] for tick in range(12, 20)), f"still losing the stream after re-timing: {got}"
