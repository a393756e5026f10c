"""Plain RTP/AVP SDP for SIP calls (RFC 4566, 3264): one audio stream, no ICE, no DTLS.

Parsing is aiortc's ``SessionDescription.parse``: it reads baresip's and sipp's offers as they
are. It asserts on whatever it does not expect, though (``a=ssrc`` without a value, a T.38
``m=image 0 udptl t38`` section, a ``port/count`` in m=), so it is handed only what we use: the
session's ``c=`` and the first audio section's ``m=``, ``c=``, ``a=rtpmap`` and direction lines.
What it leaves out is read here: rtpmap-less static payload types (0, 8, 9), ``a=ptime`` and a
direction at session level. Any error it raises becomes an :class:`SdpError`.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from aiortc.sdp import SessionDescription, grouplines

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_HOLD_ADDRESSES = ("0.0.0.0", "::")  # RFC 2543 hold: "do not send to me"
_M_LINE = re.compile(r"^m=(\S+) (\d+)(?:/\d+)? (\S+)(?: (.*))?$")


class SdpError(ValueError):
    """An SDP we cannot set up audio with; the message says why (it goes into a 488 reason)."""


@dataclass(frozen=True)
class RtpCodec:
    name: str  # "PCMU" | "PCMA" | "G722" | "opus"
    payload_type: int
    clock_rate: int  # the RTP clock: 8000 for G.722 too (RFC 3551), though it samples at 16 kHz
    channels: int = 1  # opus is always signaled as 2 (RFC 7587); what it carries may be mono


PCMU = RtpCodec("PCMU", 0, 8000)
PCMA = RtpCodec("PCMA", 8, 8000)
G722 = RtpCodec("G722", 9, 8000)
OPUS = RtpCodec("opus", 111, 48000, 2)
SUPPORTED = {c.name.lower(): c for c in (PCMU, PCMA, G722, OPUS)}
_STATIC = {c.payload_type: c for c in (PCMU, PCMA, G722)}
TELEPHONE_EVENT = "telephone-event"


@dataclass(frozen=True)
class MediaOffer:
    """What one side proposed (or accepted) for audio."""

    address: str
    port: int
    codecs: tuple[RtpCodec, ...]  # in the sender's order of preference
    dtmf_payload_type: int | None
    direction: str  # from the sender's side: "sendonly" means it sends and will not listen
    ptime_ms: int = 20
    dtmf_clock_rate: int = 8000

    @property
    def held(self) -> bool:
        """The other side put the call on hold: it does not want our audio."""
        return self.direction in ("sendonly", "inactive") or self.address in _HOLD_ADDRESSES


def parse_sdp(text: str) -> MediaOffer:
    """The first audio stream of an SDP body; SdpError when no audio can be set up from it."""
    session_lines, media = grouplines(text)
    audio = next((lines for lines in media if lines[0].startswith("m=audio ")), None)
    if audio is None:
        raise SdpError("no audio stream (m=audio) in the SDP")
    m = _M_LINE.match(audio[0].strip())
    if m is None:
        raise SdpError(f"malformed media line: {audio[0].strip()!r}")
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise SdpError(f"audio port {port} out of range (0 means the stream is refused)")
    if not m.group(3).startswith("RTP/AVP"):  # RTP/SAVP needs SRTP keys we cannot use
        raise SdpError(f"unsupported audio transport {m.group(3)} (plain RTP/AVP only)")
    formats = (m.group(4) or "").split()
    if not formats:
        raise SdpError("no supported audio codec offered: the media line lists no payload types")
    if not all(f.isdigit() and int(f) < 128 for f in formats):
        raise SdpError(f"bad payload types in the media line: {audio[0].strip()!r}")

    wanted = _kept_lines(session_lines, audio, m.group(2), formats)
    try:
        description = SessionDescription.parse("\r\n".join(wanted) + "\r\n")
    except (AssertionError, AttributeError, IndexError, KeyError, StopIteration, ValueError) as exc:
        raise SdpError(f"malformed SDP ({type(exc).__name__}: {exc})") from None
    section = description.media[0]
    address = section.host or description.host
    if not address:
        raise SdpError("no connection address (c=) for the audio stream")
    try:
        ipaddress.ip_address(address)
    except ValueError:  # a host name (or multicast TTL): resolving it would block on every packet
        raise SdpError(f"connection address {address!r} is not an IP address") from None

    mapped = {c.payloadType: c for c in section.rtp.codecs}
    codecs: list[RtpCodec] = []
    dtmf: tuple[int, int] | None = None
    for pt in (int(f) for f in formats):
        known = mapped.get(pt)
        if known is None:
            if pt in _STATIC:  # a static type needs no rtpmap (RFC 3551)
                codecs.append(_STATIC[pt])
            continue
        name = known.mimeType.split("/", 1)[1].lower()
        if name == TELEPHONE_EVENT:
            # One event type is kept: the 8 kHz one (every narrowband codec's clock) if offered.
            if dtmf is None or (known.clockRate == 8000 and dtmf[1] != 8000):
                dtmf = (pt, known.clockRate)
        elif name in SUPPORTED and _clock_ok(name, known.clockRate):
            base = SUPPORTED[name]
            codecs.append(RtpCodec(base.name, pt, base.clock_rate, base.channels))
    if not codecs:
        raise SdpError(
            f"no supported audio codec offered (we take {', '.join(c.name for c in SUPPORTED.values())})"
        )

    direction = section.direction or _session_direction(session_lines) or "sendrecv"
    return MediaOffer(
        address=address,
        port=port,
        codecs=tuple(codecs),
        dtmf_payload_type=dtmf[0] if dtmf else None,
        direction=direction,
        ptime_ms=_ptime(audio),
        dtmf_clock_rate=dtmf[1] if dtmf else 8000,
    )


def choose(offer: MediaOffer, preference: Sequence[str] = ("G722", "opus", "PCMU", "PCMA")) -> RtpCodec:
    """The first codec of ``preference`` the offer has (with the offer's payload type)."""
    by_name = {c.name.lower(): c for c in reversed(offer.codecs)}  # the offer's first of a name wins
    for name in preference:
        if name.lower() in by_name:
            return by_name[name.lower()]
    raise SdpError(
        f"none of {', '.join(preference)} offered (offer has {', '.join(c.name for c in offer.codecs)})"
    )


def build_sdp(
    address: str,
    port: int,
    codecs: Sequence[RtpCodec],
    dtmf_payload_type: int | None,
    direction: str = "sendrecv",
    session_id: int | None = None,
    version: int = 0,
    *,
    dtmf_clock_rate: int = 8000,
    ptime_ms: int = 20,
) -> str:
    """An SDP body: an answer (one codec and telephone-event) or an offer (several), CRLF lines.

    Keep ``session_id`` for the call and bump ``version`` on every re-INVITE (RFC 3264 8)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} out of range")
    if not codecs:
        raise ValueError("an SDP needs at least one codec")
    family = "IP6" if ipaddress.ip_address(address).version == 6 else "IP4"
    if session_id is None:
        session_id = secrets.randbits(62)
    payload_types = [c.payload_type for c in codecs]
    if dtmf_payload_type is not None:
        payload_types.append(dtmf_payload_type)
    lines = [
        "v=0",
        f"o=presence {session_id} {version} IN {family} {address}",
        "s=presence",
        f"c=IN {family} {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(map(str, payload_types))}",
    ]
    for codec in codecs:
        channels = "/2" if codec.name == "opus" else ("" if codec.channels == 1 else f"/{codec.channels}")
        lines.append(f"a=rtpmap:{codec.payload_type} {codec.name}/{codec.clock_rate}{channels}")
    if dtmf_payload_type is not None:
        lines.append(f"a=rtpmap:{dtmf_payload_type} {TELEPHONE_EVENT}/{dtmf_clock_rate}")
        lines.append(f"a=fmtp:{dtmf_payload_type} 0-16")  # digits, *, #, A-D and flash
    lines += [f"a=ptime:{ptime_ms}", f"a={direction}"]
    return "\r\n".join(lines) + "\r\n"


def _kept_lines(session: list[str], audio: list[str], port: str, formats: list[str]) -> list[str]:
    """The lines aiortc gets: enough for c=, rtpmap and direction, nothing it could trip on."""
    kept = [line.strip() for line in session if line.startswith(("v=", "o=", "s=", "c=", "t="))]
    kept.append(f"m=audio {port} RTP/AVP {' '.join(formats)}".rstrip())
    for line in audio[1:]:
        line = line.strip()
        if line.startswith("c=") or line[2:] in DIRECTIONS:
            kept.append(line)
        elif line.startswith("a=rtpmap:") and line[9:].split(" ", 1)[0] in formats:
            kept.append(line)
    return kept


def _clock_ok(name: str, clock_rate: int) -> bool:
    if name == "g722":
        # 8000 by RFC 3551; a few old phones write 16000 and still mean G.722
        return clock_rate in (8000, 16000)
    return clock_rate == SUPPORTED[name].clock_rate


def _session_direction(session: list[str]) -> str | None:
    # Some older UAs hold a call with a=sendonly above the m= lines (it applies to all streams).
    for line in session:
        if line.strip()[2:] in DIRECTIONS and line.startswith("a="):
            return line.strip()[2:]
    return None


def _ptime(audio: list[str]) -> int:
    for line in audio[1:]:
        if line.startswith("a=ptime:"):
            try:
                return max(10, min(120, int(float(line[8:].strip()))))
            except ValueError:
                break
    return 20
