"""aiortc set-up that both the bot and the CLI caller share.

Two aiortc defaults are wrong for us: with no ICE servers it asks Google's public STUN server,
and aioice never offers 127.0.0.1 as a host candidate, so loopback calls cannot connect. Both
are settings here. The receiver's jitter buffer holds 4 packets (80 ms) before playout; the bot
re-times audio on its own clock, so that wait is pure latency and is a setting too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer

log = logging.getLogger(__name__)

_original_get_host_addresses = aioice.ice.get_host_addresses
_host_addresses: list[str] = []


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if not _host_addresses:
        return _original_get_host_addresses(use_ipv4, use_ipv6)
    return [a for a in _host_addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Offer exactly these local addresses as ICE host candidates (empty: every interface)."""
    _host_addresses[:] = list(addresses)
    aioice.ice.get_host_addresses = _get_host_addresses


def rtc_configuration(ice_servers: Sequence[str]) -> RTCConfiguration:
    # An explicit empty list keeps aiortc from contacting its default public STUN server.
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in ice_servers])


def new_peer_connection(ice_servers: Sequence[str], host_addresses: Sequence[str]) -> RTCPeerConnection:
    restrict_host_addresses(host_addresses)
    return RTCPeerConnection(configuration=rtc_configuration(ice_servers))


def replace_jitter_buffer(receiver: RTCRtpReceiver, buffer: object) -> bool:
    """Put ``buffer`` in place of an audio receiver's jitter buffer (aiortc keeps it private);
    False when the receiver is not audio or this aiortc version hides it elsewhere."""
    if receiver.track is None or receiver.track.kind != "audio":
        return False
    attr = "_RTCRtpReceiver__jitter_buffer"
    if not hasattr(receiver, attr):
        log.warning("this aiortc version hides its jitter buffer elsewhere; aiortc's own stays")
        return False
    setattr(receiver, attr, buffer)
    return True


def set_audio_prefetch(receiver: RTCRtpReceiver, packets: int) -> None:
    """Shrink the audio jitter buffer's playout wait."""
    replace_jitter_buffer(receiver, JitterBuffer(capacity=16, prefetch=max(0, packets)))


async def wait_ice_gathering(pc: RTCPeerConnection, timeout: float = 10.0) -> None:
    """aiortc gathers during setLocalDescription already; this guards other call orders."""
    if pc.iceGatheringState == "complete":
        return
    done = asyncio.Event()

    @pc.on("icegatheringstatechange")
    def _changed() -> None:
        if pc.iceGatheringState == "complete":
            done.set()

    await asyncio.wait_for(done.wait(), timeout)
