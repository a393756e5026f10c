"""Pipecat SmallWebRTC clients against the real server and bot, unchanged.

``JsLikeClient`` plays what ``@pipecat-ai/small-webrtc-transport`` does in a browser, with aiortc:
an audio transceiver (sendrecv, the microphone), a camera video (sendrecv) and a screen video
(sendonly), a "chat" data channel; the offer posted as ``{"sdp", "type", "pc_id", "restart_pc",
"requestData"?}``, the answer's ``pc_id`` kept, ICE candidates PATCHed as
``{"pc_id", "candidates": [{"candidate", "sdp_mid", "sdp_mline_index"}]}`` when it trickles.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription
from conftest import BotServer, rms

from presence.caller import PlayerTrack, Recorder
from presence.clock import now
from presence.signaling import tokens
from presence.signaling.rtc import new_peer_connection

pytestmark = pytest.mark.slow

GREETING = (
    "Hello, this is Presence. I can hear you, and I will keep talking for a little while, "
    "so that a second offer on this same connection has something to carry."
)
SECRET = "smallwebrtc-test-secret-" + "0123456789abcdef" * 3


class JsLikeClient:
    """One SmallWebRTC client connection, shaped like the JS transport's peer connection."""

    def __init__(self, base_url: str, http: aiohttp.ClientSession) -> None:
        self.endpoint = base_url + "/api/offer"
        self.http = http
        self.pc: RTCPeerConnection = new_peer_connection([], ["127.0.0.1"])
        self.recorder = Recorder()
        self.pc_id: str | None = None
        self.held: list[str] = []  # candidates a trickled offer left out, for the PATCH
        mic = self.pc.addTransceiver("audio", direction="sendrecv")
        mic.sender.replaceTrack(PlayerTrack())  # an open microphone: paced silence
        self.pc.addTransceiver("video", direction="sendrecv")  # camera, off
        self.pc.addTransceiver("video", direction="sendonly")  # screen share, off
        self.pc.createDataChannel("chat", ordered=True)

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.recorder.attach(track)

    async def offer(self, *, restart_pc: bool = False, trickle: bool = False, **extra: Any) -> dict[str, Any]:
        """Post this connection's offer as the JS client does; the answer (not yet applied).
        With ``trickle`` the offer's SDP carries no candidates (``self.held`` has them)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        if trickle:
            sdp, self.held = without_candidates(sdp)
        body = {"sdp": sdp, "type": "offer", "pc_id": self.pc_id, "restart_pc": restart_pc, **extra}
        async with self.http.post(self.endpoint, json=body) as resp:
            answer = await resp.json(content_type=None)
            assert resp.status == 200, answer
        self.pc_id = answer["pc_id"]
        return answer

    async def accept(self, answer: dict[str, Any]) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    async def patch(self, candidates: list[dict[str, Any]], **kw: Any) -> tuple[int, Any]:
        body = {"pc_id": self.pc_id, "candidates": candidates}
        async with self.http.patch(self.endpoint, json=body, **kw) as resp:
            return resp.status, await resp.json(content_type=None)

    async def connected(self, timeout: float = 20.0) -> None:
        deadline = now() + timeout
        while self.pc.connectionState != "connected":
            assert self.pc.connectionState not in ("failed", "closed"), self.pc.connectionState
            assert now() < deadline, f"not connected in {timeout} s ({self.pc.connectionState})"
            await asyncio.sleep(0.02)

    async def hears_voice(self, after: float, seconds: float = 0.5, timeout: float = 30.0) -> None:
        """Until frames with sound worth ``seconds`` have arrived since ``after``."""
        deadline = now() + timeout
        while sum(1 for t in self.recorder.voiced if t > after) < seconds / 0.02:
            assert now() < deadline, f"no bot voice within {timeout} s after {after:.1f}"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.recorder.stop()
        await self.pc.close()


def without_candidates(sdp: str) -> tuple[str, list[str]]:
    """The offer a trickling browser sends before any candidate is known, and the candidates
    of its first (bundled) section as its icecandidate events give them: "candidate:..."."""
    kept, held, section = [], [], -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            section += 1
        if line.startswith("a=candidate:"):
            if section == 0:
                held.append(line.removeprefix("a="))
            continue
        if line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", held


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
async def clients(http: aiohttp.ClientSession) -> AsyncIterator[Callable[[BotServer], JsLikeClient]]:
    made: list[JsLikeClient] = []

    def make(server: BotServer) -> JsLikeClient:
        made.append(JsLikeClient(server.url, http))
        return made[-1]

    yield make
    for client in made:
        await client.close()


def remote_candidates(server: BotServer, pc_id: str) -> set[tuple[str, int, str, str]]:
    """What the bot's ICE agent knows of the caller's candidates (its one, bundled transport)."""
    pc = server.manager.peer_connection(pc_id)
    assert pc is not None
    ice = pc.getTransceivers()[0].receiver.transport.transport
    return {(c.ip, c.port, c.type, c.foundation) for c in ice.getRemoteCandidates()}


async def assert_error(resp: aiohttp.ClientResponse, status: int, code: str) -> None:
    body = await resp.text()
    assert resp.status == status, (resp.status, body)
    assert json.loads(body)["error"]["code"] == code, body


async def test_offer_as_pipecat_sends_it_is_answered_and_heard_then_renegotiated(
    bot_factory: Callable[..., Any], clients: Callable[[BotServer], JsLikeClient]
) -> None:
    server: BotServer = await bot_factory(greeting=GREETING)
    client = clients(server)
    # waitForICEGathering: the offer carries its candidates; requestData names us and the room
    answer = await client.offer(requestData={"name": "meeting-bot", "room": "standup"})
    assert answer["type"] == "answer" and answer["pc_id"] == answer["peer_id"]
    pc_id = answer["pc_id"]
    session = server.manager.get(answer["call_id"])
    assert session is not None and session.room == "standup"
    assert session.peers[pc_id].participant == "meeting-bot"
    # the screen section is let in and answered inactive; the bot's voice goes out on audio
    media = SessionDescription.parse(answer["sdp"]).media
    assert [(m.kind, m.direction) for m in media[:3]] == [
        ("audio", "sendrecv"),
        ("video", "recvonly"),
        ("video", "inactive"),
    ]
    await client.accept(answer)
    await client.connected()
    await client.hears_voice(after=0.0)  # the greeting
    assert rms(client.recorder.audio()) > 0.005

    # A second offer on the same connection with its pc_id: renegotiated, the call goes on.
    again = await client.offer(requestData={"name": "meeting-bot", "room": "standup"})
    assert again["pc_id"] == pc_id and again["call_id"] == answer["call_id"]
    await client.accept(again)
    renegotiated = now()
    assert list(session.peers) == [pc_id] and server.manager.active_calls == 1
    await client.hears_voice(after=renegotiated + 0.2, seconds=0.3)  # still talking to us
    assert client.pc.connectionState == "connected"

    # An offer from another connection under this pc_id restarts ICE: refused, call unharmed.
    other = new_peer_connection([], ["127.0.0.1"])
    try:
        other.addTransceiver("audio")
        await other.setLocalDescription(await other.createOffer())
        body = {"sdp": other.localDescription.sdp, "type": "offer", "pc_id": pc_id, "restart_pc": False}
        async with client.http.post(client.endpoint, json=body) as resp:
            await assert_error(resp, 409, "ice_restart_not_supported")
    finally:
        await other.close()
    assert server.manager.peer_connection(pc_id) is not None and client.pc.connectionState == "connected"


async def test_trickled_candidates_come_by_patch(
    bot_factory: Callable[..., Any], clients: Callable[[BotServer], JsLikeClient]
) -> None:
    server: BotServer = await bot_factory(greeting="Hello, this is Presence.")
    client = clients(server)
    answer = await client.offer(trickle=True)  # the JS default: offer at once, candidates later
    assert client.held, "aiortc gave no candidates to trickle"
    pc_id = answer["pc_id"]
    assert remote_candidates(server, pc_id) == set()  # the offer carried none
    # as the JS client flushes its queue: the candidate strings, sdpMid, sdpMLineIndex
    status, body = await client.patch(
        [{"candidate": c, "sdp_mid": "0", "sdp_mline_index": 0} for c in client.held]
    )
    assert (status, body) == (200, {"status": "success"})
    sent = set()
    for line in client.held:
        foundation, _, _, _, ip, port, _, kind = line.removeprefix("candidate:").split()[:8]
        sent.add((ip, int(port), kind, foundation))
    assert remote_candidates(server, pc_id) == sent
    # Firefox ends a section's candidates with an empty one: accepted
    status, _ = await client.patch([{"candidate": "", "sdp_mid": "0", "sdp_mline_index": 0}])
    assert status == 200
    await client.accept(answer)
    await client.connected()
    await client.hears_voice(after=0.0)


async def test_restart_pc_hangs_the_old_connection_up_and_answers_a_new_one(
    bot_factory: Callable[..., Any], clients: Callable[[BotServer], JsLikeClient]
) -> None:
    server: BotServer = await bot_factory(greeting="Hello, this is Presence.")
    first = clients(server)
    answer = await first.offer()
    await first.accept(answer)
    await first.connected()
    old_id = answer["pc_id"]
    # the JS client's reconnection: a new peer connection, the old pc_id, restart_pc true
    second = clients(server)
    second.pc_id = old_id
    restarted = await second.offer(restart_pc=True)
    assert restarted["pc_id"] != old_id
    assert server.manager.peer_connection(old_id) is None
    assert server.manager.peer_connection(restarted["pc_id"]) is not None
    assert server.manager.active_calls == 1
    await second.accept(restarted)
    await second.connected()
    await second.hears_voice(after=0.0)
    # an unknown pc_id (this server never gave it) is a new peer, as Pipecat's handler does
    third = clients(server)
    third.pc_id = "SmallWebRTCConnection#0-0123456789abcdef"
    fresh = await third.offer()
    assert fresh["pc_id"] not in (old_id, restarted["pc_id"])
    assert server.manager.active_calls == 2


async def test_bad_requests_get_json_errors(
    bot_factory: Callable[..., Any], clients: Callable[[BotServer], JsLikeClient], http: aiohttp.ClientSession
) -> None:
    server: BotServer = await bot_factory(offer_rate_per_min=1, offer_burst=6)
    url = server.url + "/api/offer"
    client = clients(server)
    answer = await client.offer()  # offer 1 of the burst
    pc_id, sdp = answer["pc_id"], client.pc.localDescription.sdp
    good = {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "sdp_mid": "0"}
    junk: list[object] = [
        "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",  # not an object
        {"candidate": "candidate:garbage", "sdp_mid": "0"},
        {"candidate": "candidate:1 1 udp 2130706431 999.1.1.1 9 typ host", "sdp_mid": "0"},
        {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 99999 typ host", "sdp_mid": "0"},
        {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ bogus", "sdp_mid": "0"},
        {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host"},  # no mid nor index
        {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "sdp_mline_index": -1},
        {"candidate": 5, "sdp_mid": "0"},
        {"candidate": "x" * 2000, "sdp_mid": "0"},
    ]
    patch_cases: list[tuple[dict[str, Any], int, str]] = [
        ({"json": {"pc_id": pc_id, "candidates": [item]}}, 400, "bad_candidate") for item in junk
    ]
    patch_cases += [
        ({"json": {"pc_id": pc_id, "candidates": "nope"}}, 400, "bad_request"),
        ({"json": {"pc_id": pc_id, "candidates": [good] * 65}}, 400, "bad_request"),
        ({"json": {"candidates": [good]}}, 400, "bad_request"),
        ({"json": {"pc_id": 7, "candidates": [good]}}, 400, "bad_request"),
        ({"json": [pc_id]}, 400, "bad_request"),
        ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ({"data": json.dumps({"pc_id": pc_id, "candidates": []})}, 415, "unsupported_media_type"),
        ({"json": {"pc_id": pc_id, "candidates": [good], "pad": "x" * 70_000}}, 413, "body_too_large"),
    ]
    for kw, status, code in patch_cases:
        async with http.patch(url, **kw) as resp:
            await assert_error(resp, status, code)
    offer_cases: list[tuple[dict[str, Any], int, str]] = [
        ({"sdp": sdp, "type": "answer", "pc_id": None, "restart_pc": False}, 400, "bad_request"),
        ({"sdp": sdp, "type": "offer", "pc_id": 7, "restart_pc": False}, 400, "bad_request"),
        ({"sdp": sdp, "type": "offer", "pc_id": None, "restart_pc": "yes"}, 400, "bad_request"),
        ({"sdp": sdp, "type": "offer", "request_data": {"room": "no such room!"}}, 400, "bad_request"),
        ({"sdp": "v=0" + "a" * 70_000, "type": "offer", "pc_id": None}, 413, "body_too_large"),
    ]  # offers 2-6 of the burst
    for body, status, code in offer_cases:
        async with http.post(url, json=body) as resp:
            await assert_error(resp, status, code)
    assert server.manager.active_calls == 1 and server.manager.peer_connection(pc_id) is not None

    # A PATCH naming no live peer is a 404, and spends an offer: the burst is gone now.
    body = {"pc_id": "0123456789abcdef", "candidates": [good]}
    async with http.patch(url, json=body) as resp:
        await assert_error(resp, 429, "rate_limited")
    # Trickling to a live peer spends nothing: still answered after the burst is spent.
    status, _ = await client.patch([good])
    assert status == 200
    unlimited: BotServer = await bot_factory()
    async with http.patch(unlimited.url + "/api/offer", json=body) as resp:
        await assert_error(resp, 404, "unknown_peer")


async def test_the_page_format_is_answered_with_a_pc_id_too(
    bot_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    server: BotServer = await bot_factory()
    pc = new_peer_connection([], ["127.0.0.1"])
    try:
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "name": "Ann", "room": "red"}
        async with http.post(server.url + "/api/offer", json=body) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
        assert set(answer) == {"sdp", "type", "pc_id", "call_id", "peer_id", "resource", "resource_token"}
        assert answer["pc_id"] == answer["peer_id"]
        assert answer["resource"] == f"/whip/resource/{answer['peer_id']}"
        session = server.manager.get(answer["call_id"])
        assert session is not None and session.room == "red"
        assert session.peers[answer["peer_id"]].participant == "Ann"
    finally:
        await pc.close()


async def test_join_token_for_offer_and_patch(
    bot_factory: Callable[..., Any], clients: Callable[[BotServer], JsLikeClient], http: aiohttp.ClientSession
) -> None:
    server: BotServer = await bot_factory(token_secret=SECRET)
    token = tokens.mint(SECRET, room="blue", sub="meeting-bot", ttl_s=60)
    client = clients(server)
    # the token in requestData, or in the headers the JS client sends with offer and PATCH
    answer = await client.offer(requestData={"token": token})
    session = server.manager.get(answer["call_id"])
    assert session is not None and session.room == "blue"
    body = {"sdp": client.pc.localDescription.sdp, "type": "offer", "pc_id": None, "restart_pc": False}
    async with http.post(client.endpoint, json=body) as resp:
        await assert_error(resp, 401, "missing_token")
    async with http.post(
        client.endpoint, json={**body, "requestData": {"room": "red", "token": token}}
    ) as resp:
        await assert_error(resp, 403, "wrong_room")  # the token's room decides
    bearer = {"Authorization": f"Bearer {token}"}
    async with http.post(client.endpoint, json=body, headers=bearer) as resp:
        assert resp.status == 200, await resp.text()
    candidate = {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "sdp_mid": "0"}
    status, error = await client.patch([candidate])
    assert (status, error["error"]["code"]) == (401, "missing_token")
    status, _ = await client.patch([candidate], headers=bearer)
    assert status == 200
    async with http.patch(
        client.endpoint + "?token=" + token, json={"pc_id": answer["pc_id"], "candidates": []}
    ) as resp:
        assert resp.status == 200, await resp.text()
