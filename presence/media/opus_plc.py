"""Opus audio that survives packet loss: concealment on the bot's receivers, FEC on every sender.

Why: aiortc has no packet-loss concealment. Its audio jitter buffer stops at a missing packet
until 16 packets (320 ms) pile up behind it, and its FFmpeg decoder never hears of the gap, so
with 5 % loss a fifth of a caller's audio never reached VAD and ASR. Here a receiver gets a
jitter buffer that steps over a missing packet as soon as ``prefetch`` later ones are in and
tells the decoder how many packets it stepped over; the decoder (libopus through
``opuslib_next``) rebuilds the last of them from the in-band FEC that the next packet carries
(browsers send it) and the ones before with libopus' PLC. Each opus encoder aiortc builds gets
in-band FEC and an expected loss rate, so callers can recover the bot's audio the same way.

aiortc picks codecs with module-level ``get_decoder``/``get_encoder``; both are wrapped once per
process. A decoder only conceals frames that come from a :class:`LossJitterBuffer` (installed
per receiver by :func:`configure_receiver`); every other receiver decodes as aiortc does.
"""

from __future__ import annotations

import fractions
import logging
from typing import Any

import av
import numpy as np
from aiortc import RTCRtpReceiver, RTCRtpTransceiver
from aiortc.codecs import base as codecs_base
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket

from presence.clock import now
from presence.signaling.rtc import replace_jitter_buffer, set_audio_prefetch

log = logging.getLogger(__name__)

RATE = 48_000
CHANNELS = 2  # what aiortc's decoder hands out: s16 stereo at 48 kHz
MAX_FRAME = 5760  # 120 ms, the longest opus packet
MAX_CONCEAL = RATE * 200 // 1000  # a longer gap (a restart, a stall) is left as a gap
TIME_BASE = fractions.Fraction(1, RATE)

try:  # libopus itself (Debian: libopus0); the import fails when the library is missing
    import opuslib_next as _opus
    from opuslib_next.api import c_int16_pointer as _c_int16_pointer
    from opuslib_next.api.decoder import libopus_decode as _libopus_decode
except Exception as exc:  # pragma: no cover - depends on the machine
    _opus = None
    _import_error: str = str(exc)
else:
    _import_error = ""

_installed = False


def available() -> bool:
    """True when libopus can be used (``opuslib_next`` imported and found the library)."""
    return _opus is not None


def unavailable_reason() -> str:
    return _import_error


class LossFrame(JitterFrame):
    """An encoded frame and how many packets were lost just before it."""

    def __init__(self, data: bytes, timestamp: int, lost: int) -> None:
        super().__init__(data, timestamp)
        self.lost = lost


class LossJitterBuffer:
    """An audio jitter buffer (one RTP packet per frame, as opus sends) that never waits at a
    gap: the oldest packet is handed out once ``prefetch`` newer ones have arrived, whatever is
    missing between. Packets older than the last one handed out are dropped. Drop-in for
    aiortc's ``JitterBuffer.add`` on audio receivers."""

    def __init__(self, prefetch: int = 1, capacity: int = 16) -> None:
        self.prefetch = max(0, prefetch)
        self.capacity = capacity
        self._held: dict[int, RtpPacket] = {}  # unwrapped sequence number -> packet
        self._last: int | None = None  # unwrapped sequence number of the last packet handed out
        self._top: int | None = None  # highest unwrapped sequence number seen
        self.late = 0
        self.lost = 0
        # When the last packet came off the network: a peer is alive while packets arrive, even
        # when the machine is too busy to decode them at once.
        self.last_packet_at = now()

    def _unwrap(self, seq: int) -> int:
        if self._top is None:
            return seq
        delta = (seq - self._top) & 0xFFFF
        return self._top + (delta - 0x10000 if delta >= 0x8000 else delta)

    def add(self, packet: RtpPacket) -> tuple[bool, LossFrame | None]:
        self.last_packet_at = now()
        seq = self._unwrap(packet.sequence_number)
        if self._top is not None and abs(seq - self._top) > 1000:  # the sender restarted
            self._held.clear()
            self._last = None
            self._top = None
            seq = packet.sequence_number
        if self._last is not None and seq <= self._last:
            self.late += 1
            return False, None
        self._held[seq] = packet
        self._top = seq if self._top is None else max(self._top, seq)
        oldest = min(self._held)
        if self._top - oldest < self.prefetch and len(self._held) <= self.capacity:
            return False, None
        out = self._held.pop(oldest)
        lost = 0 if self._last is None else oldest - self._last - 1
        self.lost += lost
        self._last = oldest
        data = getattr(out, "_data", out.payload)  # aiortc stores the depayloaded bytes there
        return False, LossFrame(bytes(data), out.timestamp, lost)


class ConcealingOpusDecoder(codecs_base.Decoder):
    """libopus decoding that fills the packets a :class:`LossFrame` reports lost: the last
    one from the FEC in the frame's own packet, earlier ones with PLC. Output matches aiortc's
    decoder (s16 stereo, 48 kHz, pts in RTP time). Other frames go to aiortc's decoder."""

    def __init__(self) -> None:
        assert _opus is not None, "libopus is not available"
        self._decoder = _opus.Decoder(RATE, CHANNELS)
        self._aiortc: OpusDecoder | None = None
        self._end: int | None = None  # RTP timestamp just past the last decoded sample
        self._last_samples = 960
        self.concealed = 0  # packets filled by PLC
        self.recovered = 0  # packets rebuilt from the next packet's FEC (when it can carry FEC)

    def _pcm(self, data: bytes, samples: int, fec: bool = False) -> np.ndarray:
        # libopus straight into a numpy buffer: opuslib's Decoder.decode copies the samples
        # out through a Python list (~200 us a packet, all of it holding the GIL).
        out = np.empty(samples * CHANNELS, dtype=np.int16)
        n = _libopus_decode(
            self._decoder.decoder_state,
            data,
            len(data),
            out.ctypes.data_as(_c_int16_pointer),
            samples,
            int(fec),
        )
        if n < 0:
            raise _opus.OpusError(n)  # type: ignore[union-attr]
        return out[: n * CHANNELS]

    def decode(self, encoded_frame: JitterFrame) -> list[av.AudioFrame]:  # type: ignore[override]
        if not isinstance(encoded_frame, LossFrame):
            if self._aiortc is None:
                self._aiortc = OpusDecoder()
            return self._aiortc.decode(encoded_frame)  # type: ignore[return-value]
        data, ts = encoded_frame.data, encoded_frame.timestamp
        parts: list[np.ndarray] = []
        start = ts
        try:
            gap = ts - self._end if self._end is not None else 0
            lost = encoded_frame.lost
            if lost > 0 and 0 < gap <= MAX_CONCEAL:
                each = gap // lost if gap % lost == 0 and (gap // lost) % 120 == 0 else self._last_samples
                sizes = [each] * (gap // each)
                for i, size in enumerate(sizes):
                    fec = i == len(sizes) - 1 and bool(data)
                    parts.append(self._pcm(data if fec else b"", size, fec))
                    # Only SILK and hybrid packets (TOC config < 16) can carry FEC; libopus falls
                    # back to PLC for the rest, and for packets sent without it.
                    recovered = fec and data[0] >> 3 < 16
                    self.recovered += recovered
                    self.concealed += not recovered
                start = ts - sum(sizes)
            pcm = self._pcm(data, MAX_FRAME)
        except _opus.OpusError as exc:  # type: ignore[union-attr]
            # aiortc's decoder thread only survives FFmpeg errors: never let this one escape.
            log.warning("opus decode failed: %s", exc)
            return []
        self._last_samples = pcm.size // CHANNELS or self._last_samples
        parts.append(pcm)
        self._end = ts + pcm.size // CHANNELS
        audio = np.concatenate(parts)
        frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = RATE
        frame.pts = start
        frame.time_base = TIME_BASE
        return [frame]


def fec_encoder(loss_pct: int) -> OpusEncoder:
    """aiortc's opus encoder with libopus' in-band FEC for an expected loss of ``loss_pct``."""
    encoder = OpusEncoder()
    if loss_pct > 0:
        # FFmpeg takes these when the codec opens (at the first frame) and empties the dict
        encoder.codec.options = {**encoder.codec.options, "fec": "1", "packet_loss": str(int(loss_pct))}
    encoder.fec_loss_pct = loss_pct  # type: ignore[attr-defined]  # what it was built for, to check
    return encoder


def _install() -> None:
    """Wrap aiortc's decoder factory (once per process)."""
    global _installed
    if _installed:
        return
    import aiortc.rtcrtpreceiver as receiver_module

    original_decoder = receiver_module.get_decoder

    def get_decoder(codec: Any) -> codecs_base.Decoder:
        if codec.mimeType.lower() == "audio/opus" and _opus is not None:
            return ConcealingOpusDecoder()
        return original_decoder(codec)

    receiver_module.get_decoder = get_decoder
    _installed = True


def configure_sender(transceiver: RTCRtpTransceiver, loss_pct: int) -> bool:
    """In-band FEC for an expected loss of ``loss_pct`` % on this transceiver's opus encoder
    (this call only). Call it after the answer, before media flows: aiortc builds a sender's
    encoder at its first frame and keeps one already there. False: no opus, FEC off, or an
    aiortc whose sender no longer looks as expected."""
    codecs = getattr(transceiver, "_codecs", None) or []
    if loss_pct <= 0 or not codecs or codecs[0].mimeType.lower() != "audio/opus":
        return False
    sender = transceiver.sender
    if getattr(sender, "_RTCRtpSender__encoder", "missing") is not None:
        log.warning("aiortc's sender has no unset encoder to preset: no opus FEC on this call")
        return False
    sender._RTCRtpSender__encoder = fec_encoder(min(100, int(loss_pct)))  # type: ignore[attr-defined]
    return True


def configure_receiver(
    receiver: RTCRtpReceiver, prefetch: int, conceal: bool = True
) -> LossJitterBuffer | None:
    """Set an audio receiver's playout wait to ``prefetch`` packets and, with ``conceal``, step
    over lost packets and fill them (FEC, then PLC); without it aiortc's own buffer stays.
    Returns the buffer put in (it knows when the last packet arrived), or None."""
    if not conceal:
        set_audio_prefetch(receiver, prefetch)
        return None
    buffer = LossJitterBuffer(prefetch)
    if not replace_jitter_buffer(receiver, buffer):
        return None
    if _opus is None:
        log.warning("libopus not found (%s): lost packets stay gaps", _import_error)
    _install()
    return buffer
