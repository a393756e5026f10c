"""aiortc set-up that both the bot and the CLI caller share.

Two aiortc defaults are wrong for us: with no ICE servers it asks Google's public STUN server,
and aioice never offers 127.0.0.1 as a host candidate, so loopback calls cannot connect. Both
are settings here. The receiver's jitter buffer holds 4 packets (80 ms) before playout; the bot
re-times audio on its own clock, so that wait is pure latency and is a setting too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aioice.ice
from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamTrack

if TYPE_CHECKING:
    from presence.media.opus_plc import LossJitterBuffer
    from presence.seams import CallEvent

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


class RtcLink:
    """A WebRTC participant as a ``PeerLink``: its peer connection and data channels."""

    transport = "webrtc"

    def __init__(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        self.channels: list[RTCDataChannel] = []
        self.rx_buffer: LossJitterBuffer | None = None  # ours, on the audio receiver
        self.on_dtmf: Callable[[str, float], None] | None = None  # WebRTC peers send none
        self.audio: MediaStreamTrack | None = None  # set when the offer's audio track arrives

    def play(self, track: MediaStreamTrack) -> None:
        self.pc.addTrack(track)

    def last_heard(self) -> float:
        # a packet off the network: a busy machine may decode it seconds later
        return self.rx_buffer.last_packet_at if self.rx_buffer is not None else -1e9

    def on_event(self, event: CallEvent) -> None:
        payload: str | None = None
        for channel in self.channels:
            if channel.readyState != "open":
                continue
            if payload is None:
                payload = json.dumps(event.to_json(), default=str)
            # A page that stops reading must not grow our memory without bound.
            if channel.bufferedAmount < 1_000_000:
                channel.send(payload)

    async def transfer(self, target: str) -> bool:
        return False  # a browser has nowhere to be handed to

    async def close(self) -> None:
        await self.pc.close()
