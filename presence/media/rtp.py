"""The media of one SIP call: plain RTP over an asyncio UDP socket, aiortc's codecs, no SIP library.

Inbound packets are put back in order (a missing one is waited for while a few newer ones come,
at most ``REORDER_WAIT_S``), decoded with aiortc's decoders and queued on ``track``, a
``MediaStreamTrack`` whose frames carry their RTP position as ``pts``: ``AudioReader`` reads it
like a WebRTC track and sees a lost packet as a jump. RFC 4733 telephone-events go to
``on_dtmf``, once per key press. Outbound, ``start_sending`` pulls a self-paced track (20 ms,
48 kHz) and sends what aiortc's encoder makes of it.

Callers behind NAT send from an address their SDP does not name and only get packets sent back
there (symmetric RTP, RFC 4961): the first packet of our payload types latches the source, and
replies go to it. A new address with the same SSRC (a NAT rebinding) takes over at once; a new
SSRC from a new address only once the latched source has been silent for ``RELATCH_AFTER_S``, so
a stray or spoofed stream cannot take the call's audio over.

Everything runs on the loop: G.711/G.722 take microseconds a packet, opus about 0.2 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fractions
import ipaddress
import logging
import secrets
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import av
from aiortc import codecs as aiortc_codecs
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from presence.aio import log_this_drop
from presence.clock import now
from presence.signaling.sip.sdp import RtpCodec

log = logging.getLogger(__name__)

DtmfCallback = Callable[[str, float], None]  # digit, bot-clock time of the key press
Addr = tuple[str, int]

FRAME_MS = 20  # what aiortc's audio encoders put in one packet
REORDER_PACKETS = 3  # newer packets held before a missing one is given up
REORDER_WAIT_S = 0.06  # ... or this long, when the stream pauses just after a gap
MAX_QUEUE_S = 2.0  # decoded audio a slow reader may leave on the track before the oldest goes
MAX_MISORDER = 100  # a sequence number this far back means the sender restarted, not reordering
MAX_DROPOUT = 3000  # ... and this far ahead
RELATCH_AFTER_S = 0.5
MAX_TS_JUMP_S = 60  # a longer leap of the RTP clock is taken for a new stream
OPUS_BITRATE = 32_000  # aiortc's default is 96 kb/s stereo: far more than a phone call needs
DTMF_EVENTS = "0123456789*#ABCD"  # RFC 4733 event codes 0-15
_SEEN_DTMF = 16  # event timestamps remembered for deduplication


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """One RFC 4733 event payload (the first block; senders put one per packet)."""

    event: int
    end: bool
    volume: int  # -dBm0
    duration: int  # in RTP clock units since the event's timestamp

    @property
    def digit(self) -> str | None:
        return DTMF_EVENTS[self.event] if self.event < len(DTMF_EVENTS) else None


def parse_telephone_event(payload: bytes) -> TelephoneEvent | None:
    if len(payload) < 4:
        return None
    event, flags, duration = struct.unpack_from("!BBH", payload)
    return TelephoneEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


class RtpAudioTrack(MediaStreamTrack):
    """The decoded inbound audio; frames keep their RTP position (``pts``, ``time_base``)."""

    kind = "audio"

    def __init__(self, max_queue_s: float = MAX_QUEUE_S) -> None:
        super().__init__()
        self.max_queue_s = max_queue_s
        self.dropped = 0  # frames let go because nobody read them for max_queue_s
        self._frames: deque[av.AudioFrame] = deque()
        self._queued_s = 0.0
        self._ready = asyncio.Event()

    def put(self, frame: av.AudioFrame) -> None:
        if self.readyState != "live":
            return
        self._frames.append(frame)
        self._queued_s += frame.samples / frame.sample_rate
        while self._queued_s > self.max_queue_s and len(self._frames) > 1:
            old = self._frames.popleft()
            self._queued_s -= old.samples / old.sample_rate
            self.dropped += 1
            if log_this_drop(self.dropped):
                log.warning("RTP track not read: %d frames dropped", self.dropped)
        self._ready.set()

    async def recv(self) -> av.AudioFrame:
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        frame = self._frames.popleft()
        self._queued_s -= frame.samples / frame.sample_rate
        return frame

    def stop(self) -> None:
        super().stop()
        self._frames.clear()
        self._ready.set()  # wake a reader waiting in recv()


class _Sequencer:
    """Puts one source's packets back in sequence order and steps over gaps."""

    def __init__(self) -> None:
        self._held: dict[int, RtpPacket] = {}  # unwrapped sequence number -> packet
        self._next: int | None = None  # unwrapped sequence number due next
        self.late = 0  # duplicates and packets that came after their turn

    def push(self, packet: RtpPacket) -> list[RtpPacket]:
        """The packets now due, in order (none while a missing one is still waited for)."""
        out: list[RtpPacket] = []
        seq = packet.sequence_number
        if self._next is not None:
            seq = self._next + ((seq - self._next + 0x8000) & 0xFFFF) - 0x8000
            if not -MAX_MISORDER <= seq - self._next < MAX_DROPOUT:  # the sender restarted
                out = self.flush()
                self._next, seq = None, packet.sequence_number
        if self._next is None:
            self._next = seq
        if seq < self._next or seq in self._held:
            self.late += 1
            return out
        self._held[seq] = packet
        while self._held:
            if self._next in self._held:
                out.append(self._held.pop(self._next))
                self._next += 1
            elif len(self._held) >= REORDER_PACKETS:
                self._next = min(self._held)  # the missing ones are lost
            else:
                break
        return out

    def restart(self) -> list[RtpPacket]:
        """What is held of the old stream; the next packet starts a new numbering."""
        out = self.flush()
        self._next = None
        return out

    def flush(self) -> list[RtpPacket]:
        """Everything held, in order, skipping what is missing."""
        out = [self._held[seq] for seq in sorted(self._held)]
        if out:
            self._next = max(self._held) + 1
        self._held.clear()
        return out

    @property
    def waiting(self) -> bool:
        return bool(self._held)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: RtpEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.endpoint._datagram(data, addr[:2])

    def error_received(self, exc: Exception) -> None:
        log.debug("RTP socket error: %s", exc)  # ICMP unreachable: the far end is not (yet) open


def codec_parameters(c: RtpCodec) -> RTCRtpCodecParameters:
    return RTCRtpCodecParameters(f"audio/{c.name}", c.clock_rate, c.channels, c.payload_type)


async def encoded(track: MediaStreamTrack, codec: RtpCodec) -> AsyncIterator[bytes]:
    """The payloads of ``track`` (self-paced 20 ms frames, s16) in ``codec`` with aiortc's
    encoder, which resamples (to 8/16/48 kHz) in 20 ms frames itself; ends with the track."""
    encoder = aiortc_codecs.get_encoder(codec_parameters(codec))
    if codec.name == "opus":
        encoder.codec.bit_rate = OPUS_BITRATE  # read when the codec opens, at the first frame
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        payloads, _ = encoder.encode(frame)
        for payload in payloads:
            yield payload


class RtpEndpoint:
    """One call's RTP: a UDP socket, the decoded inbound ``track`` and an outbound sender."""

    def __init__(
        self,
        codec: RtpCodec,
        dtmf_payload_type: int | None = None,
        on_dtmf: DtmfCallback | None = None,
    ) -> None:
        self.codec = codec
        self.dtmf_payload_type = dtmf_payload_type
        self.on_dtmf = on_dtmf
        self.track = RtpAudioTrack()
        self.port: int | None = None
        self.ssrc = secrets.randbits(32)
        # Starts at creation: a call that never gets a packet times out like one that stops.
        self.last_packet_at = now()
        self.packets_in = 0
        self.packets_out = 0
        self.bad_packets = 0  # junk: not RTP v2, truncated, a payload type not negotiated, undecodable
        self.foreign = 0  # RTP from another source while the latched one is alive
        self._transport: asyncio.DatagramTransport | None = None
        self._remote: Addr | None = None  # from the SDP
        self._source: Addr | None = None  # where the latched stream comes from
        self._source_ssrc: int | None = None
        self._sequencer = _Sequencer()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._decoder = aiortc_codecs.get_decoder(codec_parameters(codec))
        self._ts: int | None = None  # unwrapped RTP timestamp of the last frame played
        self._pts = 0  # its pts (decoded samples)
        self._end_pts = 0  # pts just past it
        self._played_at: float | None = None  # bot-clock time of the last frame played
        self._dtmf_seen: deque[int] = deque(maxlen=_SEEN_DTMF)
        self._seq = secrets.randbits(16)
        self._out_ts = secrets.randbits(32)
        self._send_task: asyncio.Task[None] | None = None
        self._closed = False

    async def open(self, host: str, port_range: tuple[int, int]) -> int:
        """Bind an even free port in ``port_range`` (inclusive) on ``host`` (an IP); returns it."""
        if self._transport is not None or self._closed:
            raise RuntimeError("RTP endpoint already opened")
        low, high = port_range
        evens = list(range(low + low % 2, high + 1, 2))
        if not evens:
            raise ValueError(f"no even port in {low}-{high}")
        start = secrets.randbelow(len(evens))  # calls opening at once do not race for one port
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        for port in evens[start:] + evens[:start]:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
            self.port = port
            return port
        raise OSError(errno.EADDRINUSE, f"no free even UDP port in {low}-{high} on {host}")

    def set_codec(self, codec: RtpCodec, dtmf_payload_type: int | None) -> None:
        """The codec the far end chose: a call we place offers several before it knows. Before
        any media flows only (the decoder starts afresh)."""
        if codec != self.codec:
            self.codec = codec
            self._decoder = aiortc_codecs.get_decoder(codec_parameters(codec))
        self.dtmf_payload_type = dtmf_payload_type

    def set_remote(self, address: str, port: int) -> None:
        """Where the SDP says to send (an IP: a name would be resolved, blocking, per packet).
        ``0.0.0.0`` (an old-style hold) stops sending."""
        ipaddress.ip_address(address)  # ValueError for a host name
        remote = None if address in ("0.0.0.0", "::") or not port else (address, port)
        if remote != self._remote:
            self._remote = remote
            self._source = self._source_ssrc = None  # media moved (re-INVITE): latch anew

    @property
    def target(self) -> Addr | None:
        """Where packets go now: the latched source, else the SDP's address, else nowhere."""
        return None if self._remote is None else (self._source or self._remote)

    @property
    def dropped(self) -> int:
        return self.track.dropped

    @property
    def late(self) -> int:
        return self._sequencer.late

    def _datagram(self, data: bytes, addr: Addr) -> None:
        if self._closed:
            return
        if len(data) >= 2 and 192 <= data[1] <= 223:
            return  # RTCP multiplexed on this port (RFC 5761): nothing we use
        try:
            packet = RtpPacket.parse(data)
        except ValueError:
            self._bad(addr, "not RTP")
            return
        is_dtmf = packet.payload_type == self.dtmf_payload_type
        if packet.payload_type != self.codec.payload_type and not is_dtmf:
            self._bad(addr, f"payload type {packet.payload_type}")
            return
        new_stream = packet.ssrc != self._source_ssrc
        if not self._latch(packet.ssrc, addr):
            return
        self.packets_in += 1
        self.last_packet_at = now()
        try:
            if is_dtmf:
                self._dtmf(packet)  # at once: events are not audio, only their numbering is shared
            due = self._sequencer.restart() if new_stream else []  # its numbering is its own
            for packet_due in due + self._sequencer.push(packet):
                self._play(packet_due)
        except Exception:  # a peer's packet must never take the socket down
            log.exception("RTP packet from %s failed", addr)
        if self._sequencer.waiting and self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(REORDER_WAIT_S, self._flush)

    def _bad(self, addr: Addr, why: str) -> None:
        self.bad_packets += 1
        if log_this_drop(self.bad_packets):
            log.info("junk datagram from %s (%s): %d so far", addr, why, self.bad_packets)

    def _latch(self, ssrc: int, addr: Addr) -> bool:
        """Whether a packet's source is the call's; moves the send target to it (NAT)."""
        if self._source_ssrc is not None and ssrc != self._source_ssrc and addr != self._source:
            if now() - self.last_packet_at < RELATCH_AFTER_S:
                self.foreign += 1
                if log_this_drop(self.foreign):
                    log.warning("RTP from %s ignored: the call's stream comes from %s", addr, self._source)
                return False
        if addr != self._source:
            log.info("RTP latched to %s (SDP said %s, ssrc %08x)", addr, self._remote, ssrc)
            self._source = addr
        self._source_ssrc = ssrc
        return True

    def _flush(self) -> None:
        self._flush_handle = None
        if self._closed:
            return
        try:
            for due in self._sequencer.flush():
                self._play(due)
        except Exception:
            log.exception("RTP playout failed")

    def _play(self, packet: RtpPacket) -> None:
        """Decode one in-order packet onto the track, placed by its RTP timestamp."""
        if packet.payload_type != self.codec.payload_type:
            return  # a telephone-event: it only held a sequence number
        ts = packet.timestamp
        if self._ts is not None:  # unwrapped: a call outlives the 32-bit clock (~6 days at 8 kHz)
            ts = self._ts + ((ts - self._ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        try:
            frames = self._decoder.decode(JitterFrame(data=packet.payload, timestamp=ts & 0xFFFFFFFF))
        except (av.error.FFmpegError, ValueError) as exc:
            self._bad(self._source or ("?", 0), f"undecodable: {exc}")
            return
        if not frames:
            return
        t = now()
        rate = frames[0].sample_rate  # 8 kHz G.711, 16 kHz G.722, 48 kHz opus
        clock = self.codec.clock_rate
        if self._ts is not None and 0 < ts - self._ts < MAX_TS_JUMP_S * clock:
            pts = self._pts + (ts - self._ts) * rate // clock
        elif self._played_at is None:
            pts = 0
        else:
            # A new stream (SSRC, restarted numbering) or a timestamp that went back or leapt:
            # continue after the last frame, as far on as the wall clock went.
            pts = max(self._end_pts, self._pts + round((t - self._played_at) * rate))
        self._ts, self._pts, self._played_at = ts, pts, t
        for frame in frames:
            frame.pts = pts
            frame.time_base = fractions.Fraction(1, rate)
            pts += frame.samples
            self.track.put(frame)
        self._end_pts = pts

    def _dtmf(self, packet: RtpPacket) -> None:
        event = parse_telephone_event(packet.payload)
        if event is None:
            self._bad(self._source or ("?", 0), "short telephone-event")
            return
        # Every packet of one key press (updates, then the end three times) has its timestamp.
        # Reporting at its first packet makes a press count once even when its end is lost.
        if packet.timestamp in self._dtmf_seen:
            return
        self._dtmf_seen.append(packet.timestamp)
        if event.digit is not None and self.on_dtmf is not None:
            try:
                self.on_dtmf(event.digit, now())
            except Exception:
                log.exception("DTMF callback failed")

    def start_sending(self, track: MediaStreamTrack) -> None:
        """Send ``track`` (self-paced 20 ms frames, s16) until it ends; replaces an earlier one."""
        if self._closed:
            raise RuntimeError("RTP endpoint closed")
        if self._send_task is not None:
            self._send_task.cancel()
        self._send_task = asyncio.create_task(self._send(track), name=f"rtp-send-{self.port}")

    async def _send(self, track: MediaStreamTrack) -> None:
        step = self.codec.clock_rate * FRAME_MS // 1000
        marker = 1  # the first packet of a talkspurt
        try:
            async for payload in encoded(track, self.codec):
                # After a pause (hold) the next packet sent starts a talkspurt again.
                marker = 0 if self._send_packet(payload, marker) else 1
                self._out_ts = (self._out_ts + step) & 0xFFFFFFFF
            log.debug("outbound track ended")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("RTP sender failed")

    def _send_packet(self, payload: bytes, marker: int) -> bool:
        target = self.target
        if target is None or self._transport is None or self._transport.is_closing():
            return False  # on hold (or not set up): the RTP clock runs on, the numbering waits
        packet = RtpPacket(self.codec.payload_type, marker, self._seq, self._out_ts, self.ssrc, payload)
        self._transport.sendto(packet.serialize(), target)
        self._seq = (self._seq + 1) & 0xFFFF
        self.packets_out += 1
        return True

    async def close(self) -> None:
        """Stop sending, end ``track`` and release the socket; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._send_task is not None:
            self._send_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._send_task
            self._send_task = None
        if self._transport is not None:
            self._transport.close()
        self.track.stop()
