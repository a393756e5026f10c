"""What an offer and a trickled ICE candidate must look like before aiortc sees them.

aiortc's parsers raise assorted errors (and asserts) on junk, or fail deep inside
``setRemoteDescription``; these checks say what is wrong instead, as ``ApiError`` s.
"""

from __future__ import annotations

import ipaddress
import re

from aiortc import RTCIceCandidate
from aiortc.sdp import SessionDescription, candidate_from_sdp

from presence.signaling.errors import ApiError

MAX_MEDIA_SECTIONS = 16  # a browser sends 2-3; hundreds would only be an attack on the parser
MAX_TRICKLED_CANDIDATES = 64  # per PATCH; a browser trickles a handful at a time
MAX_CANDIDATE_CHARS = 1024
CANDIDATE_TYPES = frozenset({"host", "srflx", "prflx", "relay"})
MDNS_HOST_RE = re.compile(r"^[A-Za-z0-9-]{1,63}\.local$")  # a browser hiding its address


def validate_offer_sdp(sdp: str) -> str:
    """The offer unchanged when it looks like a usable SDP offer, else ``malformed_sdp``."""

    def bad(message: str) -> ApiError:
        return ApiError(400, "malformed_sdp", message)

    if not sdp.strip():
        raise bad("the SDP offer is empty")
    if not sdp.startswith("v=0"):
        raise bad("an SDP offer must start with v=0")
    media_lines = sum(1 for line in sdp.splitlines() if line.startswith("m="))
    if media_lines == 0:
        raise bad("the SDP offer has no m= line")
    if media_lines > MAX_MEDIA_SECTIONS:
        raise bad(f"the SDP offer has more than {MAX_MEDIA_SECTIONS} m= lines")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception:  # aiortc's parser raises assorted errors (and asserts) on junk
        raise bad("the SDP offer cannot be parsed") from None
    # One track of each kind per caller: aiortc would queue the frames of any other without
    # bound, since the bot reads only the first (a rejected section has port 0). A second video
    # section is let through, answered inactive (CallSession): a SmallWebRTC client offers its
    # camera and its screen.
    for kind, most in (("audio", 1), ("video", 2), ("application", 1)):
        count = sum(1 for m in parsed.media if m.kind == kind and m.port != 0)
        if count > most:
            raise ApiError(
                400,
                "too_many_tracks",
                f"the SDP offer has {count} {kind} sections; the bot takes one audio, one data "
                "and two video sections (camera, and a screen it leaves inactive) per caller",
            )
    for media in parsed.media:
        # without these aiortc fails deep inside setRemoteDescription; say so here instead
        if not (media.ice.usernameFragment and media.ice.password):
            raise bad(f"the {media.kind} section lacks ICE credentials")
        if media.dtls is None or not media.dtls.fingerprints:  # aiortc: None without a=setup
            raise bad(f"the {media.kind} section lacks a DTLS fingerprint or setup role")
    return sdp


def parse_candidate(item: object) -> RTCIceCandidate | None:
    """One trickled ICE candidate as SmallWebRTC sends it, ``{"candidate", "sdp_mid",
    "sdp_mline_index"}`` (or a browser's ``sdpMid``/``sdpMLineIndex``); None for an empty
    candidate, the end of candidates (RFC 8840)."""

    def bad(message: str) -> ApiError:
        return ApiError(400, "bad_candidate", message)

    if not isinstance(item, dict):
        raise bad("each candidate must be a JSON object")
    line = item.get("candidate")
    mid = item.get("sdp_mid", item.get("sdpMid"))
    index = item.get("sdp_mline_index", item.get("sdpMLineIndex"))
    if not isinstance(line, str) or len(line) > MAX_CANDIDATE_CHARS:
        raise bad(f"candidate must be an SDP candidate line of at most {MAX_CANDIDATE_CHARS} characters")
    if mid is not None and (not isinstance(mid, str) or len(mid) > 32):
        raise bad("sdp_mid must be a string")
    if index is not None and (
        not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_MEDIA_SECTIONS
    ):
        raise bad(f"sdp_mline_index must be an integer from 0 to {MAX_MEDIA_SECTIONS - 1}")
    text = line.strip().removeprefix("a=").removeprefix("candidate:")
    if not text:
        return None
    if mid is None and index is None:
        raise bad("a candidate needs sdp_mid or sdp_mline_index")
    try:
        bits = text.split()
        candidate = candidate_from_sdp(text)
        if not MDNS_HOST_RE.match(candidate.ip):
            ipaddress.ip_address(candidate.ip)  # ValueError: neither an address nor an mDNS name
        well_formed = (
            bits[6] == "typ"
            and candidate.type in CANDIDATE_TYPES
            and candidate.protocol.lower() in ("udp", "tcp")
            and 1 <= candidate.component <= 256
            and 0 <= candidate.port <= 65535
            and 0 <= candidate.priority < 2**32
        )
    except (AssertionError, IndexError, ValueError):
        well_formed = False
    if not well_formed:
        raise bad(f"not an ICE candidate: {line[:100]!r}")
    candidate.sdpMid, candidate.sdpMLineIndex = mid, index
    return candidate
