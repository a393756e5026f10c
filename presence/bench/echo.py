"""A bare aiortc echo server: the baseline a bot call's CPU is compared with.

It answers offers through the same signaling app and sends each caller's audio straight back
(``MediaRelay``), so the cost is decode, encode and transport only.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from collections.abc import Sequence

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

from presence.config import Settings
from presence.signaling.contract import PLAIN, Answer, CallRejected, JoinOptions
from presence.signaling.rtc import new_peer_connection


class EchoHost:
    """Implements ``signaling.contract.CallHost`` with an echo behind every offer.

    ``attach`` wires one answered peer; subclasses (the calibration echo) change only that.
    """

    def __init__(
        self, ice_servers: Sequence[str] = (), host_addresses: Sequence[str] = ("127.0.0.1",)
    ) -> None:
        self.ice_servers = list(ice_servers)
        self.host_addresses = list(host_addresses)
        self.relay = MediaRelay()
        self.peers: dict[str, RTCPeerConnection] = {}

    @property
    def active_calls(self) -> int:
        return len(self.peers)

    async def answer(
        self, sdp: str, *, participant: str, room: str | None, options: JoinOptions = PLAIN
    ) -> Answer:
        pc = new_peer_connection(self.ice_servers, self.host_addresses)
        peer_id = secrets.token_hex(8)
        self.peers[peer_id] = pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.hangup(peer_id)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            self.attach(pc, peer_id)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await self.hangup(peer_id)
            raise CallRejected(400, "bad_offer", f"cannot answer this offer: {exc}") from exc
        return Answer(call_id=peer_id, peer_id=peer_id, sdp=pc.localDescription.sdp)

    def attach(self, pc: RTCPeerConnection, peer_id: str) -> None:
        """The bare echo: each received audio track goes straight back."""
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "audio" and transceiver.receiver.track is not None:
                pc.addTrack(self.relay.subscribe(transceiver.receiver.track))

    async def hangup(self, peer_id: str) -> bool:
        pc = self.peers.pop(peer_id, None)
        if pc is None:
            return False
        await pc.close()
        return True

    async def close(self) -> None:
        for peer_id in list(self.peers):
            await self.hangup(peer_id)


async def _serve(port: int) -> None:
    from presence.signaling.app import run_server

    settings = Settings.from_env(port=port)
    runner = await run_server(settings, EchoHost(settings.ice_servers, settings.ice_host_addresses))
    print(f"echo server listening on {settings.base_url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a bare aiortc echo server (benchmark baseline)")
    parser.add_argument("--port", type=int, default=8090)
    asyncio.run(_serve(parser.parse_args().port))
