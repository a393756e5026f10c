"""SIP media without a SIP library: SDP offers/answers and the RTP endpoint, on real loopback
sockets (no mocks). The SDPs are what baresip 1.0.0 and sipp 3.6.1 send."""

from __future__ import annotations

import asyncio
import fractions
import itertools
import shutil
import socket
import struct
import subprocess
import tempfile

import av
import numpy as np
import pytest
from aiortc.codecs.g711 import PcmuEncoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket
from conftest import need

from presence.media.audio import FrameResampler, make_frame, read_wav, resample
from presence.media.inbound import AudioReader
from presence.media.microturn import FrameBuffer
from presence.media.paced import FRAME_OUT, PacedAudioTrack
from presence.media.rtp import RtpAudioTrack, RtpEndpoint, parse_telephone_event
from presence.signaling.sip.sdp import (
    G722,
    OPUS,
    PCMA,
    PCMU,
    RtpCodec,
    SdpError,
    build_sdp,
    choose,
    parse_sdp,
)

HOST = "127.0.0.1"
PORTS = (20000, 40000)
DTMF_PT = 101

# ---------------------------------------------------------------- SDP


# The body of baresip 1.0.0's INVITE (account audio_codecs=opus/48000/2,G722/16000/1,PCMU,PCMA).
BARESIP_INVITE = (
    "v=0\r\n"
    "o=- 598709357 1869373108 IN IP4 127.0.0.1\r\n"
    "s=-\r\n"
    "c=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\n"
    "a=tool:baresip 1.0.0\r\n"
    "m=audio 10412 RTP/AVP 96 9 0 8 101\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "a=fmtp:96 stereo=1;sprop-stereo=1\r\n"
    "a=rtpmap:9 G722/8000\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=sendrecv\r\n"
    "a=label:1\r\n"
    "a=rtcp-rsize\r\n"
    "a=ssrc:3868469731 cname:sip:alice@127.0.0.1\r\n"
    "a=minptime:20\r\n"
    "a=ptime:20\r\n"
)

# sipp's built-in uac scenario (`sipp -sd uac`), keywords filled in as sipp does.
SIPP_UAC = (
    "v=0\r\n"
    "o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n"
    "s=-\r\n"
    "c=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\n"
    "m=audio 6000 RTP/AVP 0\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
)


def _sipp_sdp(scenario: str) -> str:
    """The SDP of one of sipp's built-in scenarios, its [keywords] filled in."""
    xml = subprocess.run(["sipp", "-sd", scenario], capture_output=True, text=True).stdout  # exits 99
    body = xml[xml.index("v=0") :]
    body = body[: body.index("]]>")]
    for key, value in {
        "[media_ip_type]": "4",
        "[local_ip_type]": "4",
        "[media_ip]": "127.0.0.1",
        "[local_ip]": "127.0.0.1",
        "[media_port]": "6000",
        "[auto_media_port]": "6000",
    }.items():
        body = body.replace(key, value)
    return "".join(line.strip() + "\r\n" for line in body.strip().splitlines())


def test_parse_baresip_offer_and_choose() -> None:
    offer = parse_sdp(BARESIP_INVITE)
    assert (offer.address, offer.port, offer.direction, offer.ptime_ms) == (
        "127.0.0.1",
        10412,
        "sendrecv",
        20,
    )
    assert offer.codecs == (RtpCodec("opus", 96, 48000, 2), G722, PCMU, PCMA)
    assert offer.dtmf_payload_type == DTMF_PT and not offer.held
    assert choose(offer) == G722
    assert choose(offer, ("opus", "PCMU")) == RtpCodec("opus", 96, 48000, 2)
    assert choose(offer, ["pcma"]) == PCMA
    with pytest.raises(SdpError, match="none of"):
        choose(parse_sdp(SIPP_UAC), ("G722", "opus"))


@pytest.mark.parametrize("live", [False, True], ids=["copy", "sipp"])
def test_parse_sipp_uac_offer(live: bool) -> None:
    if live:
        need(shutil.which("sipp") is not None, "sipp (Debian sip-tester)")
    offer = parse_sdp(_sipp_sdp("uac") if live else SIPP_UAC)
    assert (offer.address, offer.port, offer.codecs, offer.dtmf_payload_type) == (
        "127.0.0.1",
        6000,
        (PCMU,),
        None,
    )
    assert offer.direction == "sendrecv" and choose(offer) == PCMU


def test_parse_sipp_uac_pcap_offer_with_telephone_event() -> None:
    need(shutil.which("sipp") is not None, "sipp (Debian sip-tester)")
    offer = parse_sdp(_sipp_sdp("uac_pcap"))
    assert offer.codecs == (PCMA,) and offer.dtmf_payload_type == DTMF_PT


def test_static_payload_types_need_no_rtpmap_and_extras_do_not_trip_the_parser() -> None:
    sdp = (
        "v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nt=0 0\r\n"
        "m=image 0 udptl t38\r\n"  # a T.38 section aiortc's parser cannot read
        "m=audio 4000 RTP/AVP 9 18 0 101\r\n"
        "c=IN IP4 10.0.0.7\r\n"
        "a=rtpmap:18 G729/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-16\r\n"
        "a=ssrc:1234\r\n"  # no value: aiortc would raise
        "a=ptime:30\r\n"
    )
    offer = parse_sdp(sdp)
    assert offer.address == "10.0.0.7"  # the media-level c= wins
    assert offer.codecs == (G722, PCMU) and offer.dtmf_payload_type == DTMF_PT and offer.ptime_ms == 30


@pytest.mark.parametrize(
    ("lines", "direction", "held"),
    [
        ("c=IN IP4 10.0.0.5\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=sendonly\r\n", "sendonly", True),
        ("c=IN IP4 10.0.0.5\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=inactive\r\n", "inactive", True),
        ("c=IN IP4 10.0.0.5\r\nt=0 0\r\na=sendonly\r\nm=audio 4000 RTP/AVP 0\r\n", "sendonly", True),
        ("c=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n", "sendrecv", True),
        (
            "c=IN IP4 10.0.0.5\r\nt=0 0\r\na=sendonly\r\nm=audio 4000 RTP/AVP 0\r\na=sendrecv\r\n",
            "sendrecv",
            False,
        ),
    ],
    ids=["sendonly", "inactive", "session-level", "c=0.0.0.0", "media-level-wins"],
)
def test_hold(lines: str, direction: str, held: bool) -> None:
    offer = parse_sdp("v=0\r\no=- 1 2 IN IP4 10.0.0.5\r\ns=-\r\n" + lines)
    assert (offer.direction, offer.held) == (direction, held)


@pytest.mark.parametrize(
    ("sdp", "message"),
    [
        (
            "v=0\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\nm=video 5000 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n",
            "no audio",
        ),
        ("v=0\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n", "no connection address"),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 0 RTP/AVP 0\r\n", "out of range"),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 70000 RTP/AVP 0\r\n", "out of range"),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 18 3\r\na=rtpmap:18 G729/8000\r\n", "no supported"),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 96\r\na=rtpmap:96 opus/8000\r\n", "no supported"),
        (
            "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 101\r\na=rtpmap:101 telephone-event/8000\r\n",
            "no supported",
        ),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/SAVP 0\r\n", "RTP/AVP only"),
        ("v=0\r\nc=IN IP4 pbx.example.com\r\nm=audio 5000 RTP/AVP 0\r\n", "not an IP address"),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP\r\n", "no supported"),
        ("v=0\r\nc=IN IP4\r\nm=audio 5000 RTP/AVP 0\r\n", "malformed"),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 0\r\na=rtpmap:0 PCMU\r\n", "malformed"),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio five RTP/AVP 0\r\n", "malformed"),
        ("", "no audio"),
        ("\x00\xff garbage", "no audio"),
    ],
)
def test_bad_sdp_raises_sdp_error(sdp: str, message: str) -> None:
    with pytest.raises(SdpError, match=message):
        parse_sdp(sdp)


def test_build_answer_and_offer_round_trip() -> None:
    answer = build_sdp("192.0.2.10", 30000, [G722], DTMF_PT, "recvonly", session_id=42, version=3)
    assert answer.endswith("\r\n") and "\n" not in answer.replace("\r\n", "")
    assert answer.startswith("v=0\r\no=presence 42 3 IN IP4 192.0.2.10\r\n")
    assert "a=ptime:20\r\n" in answer and "a=rtpmap:9 G722/8000\r\n" in answer
    back = parse_sdp(answer)
    assert (back.address, back.port, back.codecs, back.dtmf_payload_type, back.direction) == (
        "192.0.2.10",
        30000,
        (G722,),
        DTMF_PT,
        "recvonly",
    )
    offer = build_sdp("::1", 30002, [OPUS, G722, PCMU, PCMA], 101)
    assert "c=IN IP6 ::1\r\n" in offer and "a=rtpmap:111 opus/48000/2\r\n" in offer
    assert "m=audio 30002 RTP/AVP 111 9 0 8 101\r\n" in offer
    assert parse_sdp(offer).codecs == (OPUS, G722, PCMU, PCMA)
    assert "telephone-event" not in build_sdp("10.0.0.1", 4000, [PCMU], None)
    with pytest.raises(ValueError):
        build_sdp("10.0.0.1", 4000, [PCMU], None, direction="both")


# ---------------------------------------------------------------- RTP helpers


class ClipTrack(PacedAudioTrack):
    """Plays a 48 kHz clip in paced 20 ms frames, then ends (as a SpeechTrack's frames)."""

    def __init__(self, audio: np.ndarray) -> None:
        super().__init__()
        self.audio = audio
        self.pos = 0

    def next_samples(self) -> np.ndarray:
        if self.pos >= self.audio.size:
            raise MediaStreamError
        chunk = self.audio[self.pos : self.pos + FRAME_OUT]
        self.pos += FRAME_OUT
        return np.pad(chunk, (0, FRAME_OUT - chunk.size))


class Peer(asyncio.DatagramProtocol):
    """A raw UDP socket on loopback that records what reaches it."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls) -> Peer:
        peer = cls()
        loop = asyncio.get_running_loop()
        peer.transport, _ = await loop.create_datagram_endpoint(lambda: peer, local_addr=(HOST, 0))
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (HOST, port))

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


def _pcmu_payloads(n: int) -> list[bytes]:
    """``n`` 20 ms mu-law payloads of a 1 kHz tone."""
    encoder = PcmuEncoder()
    tone = 0.4 * np.sin(2 * np.pi * 1000 * np.arange((n + 2) * FRAME_OUT) / 48_000)
    out: list[bytes] = []
    for i in range(n + 2):
        out += encoder.encode(make_frame(tone[i * FRAME_OUT : (i + 1) * FRAME_OUT], i * FRAME_OUT))[0]
    return out[:n]


def _rtp(seq: int, ts: int, payload: bytes, pt: int = 0, ssrc: int = 0x1234, marker: int = 0) -> bytes:
    return RtpPacket(pt, marker, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc, payload).serialize()


async def _drain(track: RtpAudioTrack, idle: float = 0.15) -> list[av.AudioFrame]:
    """Every frame the track yields until it has been quiet for ``idle`` seconds."""
    frames = []
    while True:
        try:
            frames.append(await asyncio.wait_for(track.recv(), idle))
        except TimeoutError:
            return frames


async def _until(condition, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


def _speech_clip() -> np.ndarray:
    """About 0.6 s of speech at 48 kHz (espeak-ng), or a chirp where it is missing."""
    if shutil.which("espeak-ng"):
        with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
            subprocess.run(["espeak-ng", "-w", wav.name, "one two three"], check=True)
            audio, _ = read_wav(wav.name, 48_000)
        voiced = np.flatnonzero(np.abs(audio) > 0.02)
        return 0.8 * audio[voiced[0] : voiced[0] + 28_800] / max(1e-3, float(np.abs(audio).max()))
    t = np.arange(28_800) / 48_000
    return (0.4 * np.sin(2 * np.pi * (200 + 1500 * t) * t)).astype(np.float32)


_CLIP: np.ndarray | None = None


def _aligned_correlation(ref: np.ndarray, out: np.ndarray, rate: int) -> float:
    """Normalized correlation of ``out`` with ``ref`` at the best lag within 100 ms."""
    size = 1 << int(np.ceil(np.log2(ref.size + out.size)))
    xcorr = np.fft.irfft(np.fft.rfft(out, size) * np.conj(np.fft.rfft(ref, size)), size)
    window = rate // 10
    lags = np.r_[0:window, -window:0]
    lag = int(lags[np.argmax(xcorr[lags])])
    a, b = (ref, out[lag:]) if lag >= 0 else (ref[-lag:], out)
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


async def _pair(codec: RtpCodec) -> tuple[RtpEndpoint, RtpEndpoint]:
    a, b = RtpEndpoint(codec, DTMF_PT, None), RtpEndpoint(codec, DTMF_PT, None)
    port_a, port_b = await a.open(HOST, PORTS), await b.open(HOST, PORTS)
    assert port_a % 2 == 0 and port_b % 2 == 0 and PORTS[0] <= port_a <= PORTS[1]
    a.set_remote(HOST, port_b)
    b.set_remote(HOST, port_a)
    return a, b


# ---------------------------------------------------------------- RTP


@pytest.mark.parametrize(
    ("codec", "rate", "at_least"),
    [(PCMU, 8000, 0.9), (PCMA, 8000, 0.9), (G722, 16000, 0.9), (OPUS, 48000, 0.8)],
    ids=["PCMU", "PCMA", "G722", "opus"],
)
async def test_audio_crosses_loopback_for_each_codec(codec: RtpCodec, rate: int, at_least: float) -> None:
    global _CLIP
    if _CLIP is None:
        _CLIP = _speech_clip()
    clip = _CLIP
    sender, receiver = await _pair(codec)
    try:
        sender.start_sending(ClipTrack(clip))
        frames = await _drain(receiver.track)
    finally:
        await sender.close()
        await receiver.close()
    assert frames and receiver.packets_in == sender.packets_out >= clip.size // FRAME_OUT - 2
    assert receiver.bad_packets == 0 and receiver.late == 0
    # pts in the codec's sample clock, continuous while nothing is lost
    assert all(f.sample_rate == rate and f.time_base == fractions.Fraction(1, rate) for f in frames)
    assert [f.pts for f in frames[1:]] == [f.pts + f.samples for f in frames[:-1]]
    compare = min(rate, 16000)
    resampler = FrameResampler(compare)
    heard = np.concatenate([resampler(f) for f in frames])
    corr = _aligned_correlation(resample(clip, 48000, compare), heard, compare)
    assert corr > at_least, f"{codec.name}: correlation {corr:.3f}"


async def test_first_packet_carries_the_marker_and_the_clock_advances_per_codec() -> None:
    peer = await Peer.open()
    endpoint = RtpEndpoint(G722, None, None)
    await endpoint.open(HOST, PORTS)
    endpoint.set_remote(HOST, peer.port)
    endpoint.start_sending(ClipTrack(np.zeros(6 * FRAME_OUT, dtype=np.float32)))
    await _until(lambda: len(peer.received) >= 4)
    await endpoint.close()
    peer.close()
    packets = [RtpPacket.parse(data) for data, _ in peer.received]
    assert [p.marker for p in packets[:3]] == [1, 0, 0]
    assert {p.payload_type for p in packets} == {9} and {p.ssrc for p in packets} == {endpoint.ssrc}
    assert all((b.sequence_number - a.sequence_number) & 0xFFFF == 1 for a, b in itertools.pairwise(packets))
    # G.722: 20 ms is 320 samples but 160 ticks of its 8 kHz RTP clock
    assert all((b.timestamp - a.timestamp) & 0xFFFFFFFF == 160 for a, b in itertools.pairwise(packets))


async def test_lost_packet_is_a_pts_jump_and_reordering_is_undone() -> None:
    peer = await Peer.open()
    endpoint = RtpEndpoint(PCMU, DTMF_PT, None)
    port = await endpoint.open(HOST, PORTS)
    endpoint.set_remote(HOST, peer.port)
    payloads = _pcmu_payloads(12)
    base_seq, base_ts = 65530, 2**32 - 480  # both wrap during the test
    order = [0, 1, 3, 2, 4, 2, 6, 7, 8, 9, 10, 11]  # 3/2 swapped, 2 again, 5 lost
    for i in order:
        peer.send(_rtp(base_seq + i, base_ts + 160 * i, payloads[i]), port)
    frames = await _drain(endpoint.track)
    assert [f.pts for f in frames] == [160 * i for i in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11)]
    assert all(f.samples == 160 and f.time_base.denominator == 8000 for f in frames)
    assert endpoint.late == 1 and endpoint.packets_in == len(order)

    # the stream pauses right after a gap: what is held comes out after REORDER_WAIT_S anyway
    peer.send(_rtp(base_seq + 13, base_ts + 160 * 13, payloads[0]), port)
    frames = await _drain(endpoint.track)
    assert [f.pts for f in frames] == [160 * 13]

    # a new SSRC (the caller's side restarted): new numbering, and pts keep going forward
    for i in range(3):
        peer.send(_rtp(7 + i, 999 + 160 * i, payloads[i], ssrc=0x9999), port)
    frames = await _drain(endpoint.track)
    assert len(frames) == 3 and frames[0].pts > 160 * 13
    assert [f.pts for f in frames[1:]] == [f.pts + 160 for f in frames[:-1]]
    await endpoint.close()
    peer.close()


async def test_audio_reader_sees_the_loss_in_stream_positions() -> None:
    """``AudioReader`` reads the endpoint's track like a WebRTC one: a lost packet moves the
    position of what follows instead of closing the gap."""

    class Vad:
        chunk_samples = 512

        def probability(self, chunk: np.ndarray) -> float:
            return 0.0

        def reset(self) -> None:
            pass

    pushed: list[int] = []

    class Buffer(FrameBuffer):
        def push(self, audio, vad=None, arrival=None, pos=None):  # type: ignore[no-untyped-def]
            pushed.append(int(pos))  # type: ignore[arg-type]
            super().push(audio, vad, arrival, pos)

    peer = await Peer.open()
    endpoint = RtpEndpoint(PCMU, DTMF_PT, None)
    port = await endpoint.open(HOST, PORTS)
    reader = AudioReader("caller", endpoint.track, Buffer(0.2), Vad(), lambda *_: None)  # type: ignore[arg-type]
    reader.start()
    payloads = _pcmu_payloads(20)
    for i in [*range(8), *range(10, 20)]:  # 40 ms lost
        peer.send(_rtp(i, 160 * i, payloads[i]), port)
    await _until(lambda: reader.frames_in == 18)
    await endpoint.close()  # ends the track: the reader scores what came and stops
    assert reader._task is not None
    await asyncio.wait_for(reader._task, 5)
    peer.close()
    steps = np.diff(pushed)
    assert (steps == 512).sum() == len(steps) - 1, pushed
    assert steps[steps != 512][0] > 512 + 320  # 8 frames = 2560 samples: 5 chunks, then the jump
    assert pushed[5] >= 10 * 320


async def test_dtmf_each_press_reported_once() -> None:
    digits: list[tuple[str, float]] = []
    peer = await Peer.open()
    endpoint = RtpEndpoint(PCMU, DTMF_PT, lambda digit, t: digits.append((digit, t)))
    port = await endpoint.open(HOST, PORTS)
    seq = 100

    def event(ts: int, code: int, end: bool, duration: int, same_seq: bool = False) -> None:
        nonlocal seq
        payload = struct.pack("!BBH", code, (0x80 if end else 0) | 10, duration)
        peer.send(_rtp(seq, ts, payload, pt=DTMF_PT, marker=int(duration == 160)), port)
        seq += 0 if same_seq else 1

    for d in (160, 320, 480):  # "1": updates, then the end three times (new sequence numbers)
        event(8000, 1, False, d)
    for _ in range(3):
        event(8000, 1, True, 800)
    seq += 1
    for d in (160, 320):  # "#": the end three times with one sequence number (Asterisk does)
        event(16000, 11, False, d)
    for _ in range(3):
        event(16000, 11, True, 640, same_seq=True)
    seq += 1
    for d in (160, 320):  # "5": its end packets are lost
        event(24000, 5, False, d)
    event(32000, 9, False, 160)  # "9" starts: "5" was pressed and must have been reported
    event(24000, 5, True, 480)  # "5"'s end comes late: not a second press
    for _ in range(3):
        event(32000, 9, True, 480)
    event(40000, 16, True, 480)  # flash: no digit
    await _until(lambda: endpoint.packets_in == 19)
    await asyncio.sleep(0.02)
    await endpoint.close()
    peer.close()
    assert [d for d, _ in digits] == ["1", "#", "5", "9"]
    assert [t for _, t in digits] == sorted(t for _, t in digits)
    assert endpoint.bad_packets == 0
    assert parse_telephone_event(b"\x0b\x8a\x02\x80") is not None
    ev = parse_telephone_event(b"\x0b\x8a\x02\x80")
    assert ev is not None and (ev.digit, ev.end, ev.volume, ev.duration) == ("#", True, 10, 640)
    assert parse_telephone_event(b"\x01\x00") is None


async def test_junk_is_counted_and_ignored() -> None:
    peer = await Peer.open()
    endpoint = RtpEndpoint(PCMU, DTMF_PT, None)
    port = await endpoint.open(HOST, PORTS)
    rng = np.random.default_rng(7)
    payload = _pcmu_payloads(1)[0]
    junk = [
        b"\x00" + rng.integers(0, 256, 171, dtype=np.uint8).tobytes(),  # random bytes, version 0
        b"\x40" + _rtp(1, 160, payload)[1:],  # an RTP version 1 header
        b"\x80\x00\x01",  # 3 bytes
        _rtp(2, 320, payload, pt=18),  # a payload type not negotiated (G.729)
        b"\x8f" + _rtp(3, 480, payload)[1:16],  # claims 15 CSRCs it does not carry
        _rtp(4, 640, b"\x01", pt=DTMF_PT),  # a telephone-event too short to read
    ]
    for data in junk:
        peer.send(data, port)
    peer.send(_rtp(5, 800, payload), port)
    frames = [await asyncio.wait_for(endpoint.track.recv(), 2)]
    assert endpoint.bad_packets == len(junk) and len(frames) == 1 and frames[0].samples == 160
    await endpoint.close()
    peer.close()


async def test_symmetric_rtp_replies_go_where_the_caller_sends_from() -> None:
    sdp_port, caller, stranger = await Peer.open(), await Peer.open(), await Peer.open()
    endpoint = RtpEndpoint(PCMU, DTMF_PT, None)
    port = await endpoint.open(HOST, PORTS)
    endpoint.set_remote(HOST, sdp_port.port)  # what the caller's SDP said (behind NAT: wrong)
    assert endpoint.target == (HOST, sdp_port.port)
    payloads = _pcmu_payloads(3)
    caller.send(_rtp(1, 0, payloads[0], ssrc=0xCAFE), port)
    await _until(lambda: endpoint.packets_in == 1)
    assert endpoint.target == (HOST, caller.port)

    # another source with another SSRC while the caller is alive: ignored
    stranger.send(_rtp(50, 0, payloads[1], ssrc=0xBAD), port)
    await asyncio.sleep(0.02)
    assert endpoint.foreign == 1 and endpoint.target == (HOST, caller.port)

    endpoint.start_sending(ClipTrack(np.zeros(5 * FRAME_OUT, dtype=np.float32)))
    await _until(lambda: len(caller.received) >= 2)
    assert not sdp_port.received and not stranger.received
    assert all(addr[1] == port for _, addr in caller.received)  # replies come from the port we bound

    # the caller's NAT rebinds: same SSRC from a new port takes the stream along at once
    moved = await Peer.open()
    moved.send(_rtp(2, 160, payloads[1], ssrc=0xCAFE), port)
    await _until(lambda: endpoint.target == (HOST, moved.port))
    await endpoint.close()
    for p in (sdp_port, caller, stranger, moved):
        p.close()


async def test_open_takes_an_even_free_port_and_close_ends_the_track() -> None:
    taken = RtpEndpoint(PCMU, None, None)
    port = await taken.open(HOST, PORTS)
    other = RtpEndpoint(PCMU, None, None)
    with pytest.raises(OSError):
        await other.open(HOST, (port, port + 1))  # the only even port is in use
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        with pytest.raises(OSError):
            probe.bind((HOST, port))

    waiting = asyncio.create_task(taken.track.recv())
    await asyncio.sleep(0.01)
    await taken.close()
    await taken.close()  # idempotent
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(MediaStreamError):
        await taken.track.recv()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, port))  # released
    await other.close()


def test_track_queue_drops_the_oldest_past_two_seconds() -> None:
    track = RtpAudioTrack()
    for i in range(150):  # 3 s of 20 ms frames nobody reads
        frame = make_frame(np.zeros(160, dtype=np.float32), i * 160, rate=8000)
        track.put(frame)
    assert 49 <= track.dropped <= 51
    assert track._frames[0].pts == track.dropped * 160
