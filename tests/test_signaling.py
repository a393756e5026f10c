"""Signaling against a real server and real aiortc peers on loopback.

``HarnessCallHost`` below is a TEST HARNESS standing in for the bot's CallManager: it answers
each offer with a real aiortc peer connection and nothing else (no bot behind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import aioice.ice
import jwt
import numpy as np
import pytest
from aiortc import (
    AudioStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import SessionDescription
from av import AudioFrame

from presence.config import Settings
from presence.signaling import tokens
from presence.signaling.app import (
    RESOURCE_TOKEN_HEADER,
    create_app,
    dev_join_url,
    run_server,
    validate_offer_sdp,
)
from presence.signaling.contract import PLAIN, Answer, CallRejected, JoinOptions
from presence.signaling.errors import ApiError
from presence.signaling.limits import RateLimiter

SECRET = "test-secret-do-not-use-" + "0123456789abcdef" * 3  # 64+ bytes: HS256 wants 32, HS512 64


# ---------------------------------------------------------------------------- test harness


def loopback_only(sdp: str) -> str:
    """Drop candidates outside 127.0.0.0/8 so the harness never sends to other addresses."""
    kept = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 5 or not parts[4].startswith("127."):
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone, so a browser test can see audio arrive from the harness."""

    def __init__(self) -> None:
        super().__init__()
        self._sample = 0

    async def recv(self) -> AudioFrame:
        frame = await super().recv()  # paced silence (8 kHz mono s16); fill it with the tone
        n, rate = frame.samples, frame.sample_rate
        t = (np.arange(n) + self._sample) / rate
        self._sample += n
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440.0 * t)).astype(np.int16)
        frame.planes[0].update(pcm.tobytes())
        frame.time_base = fractions.Fraction(1, rate)
        return frame


# Events the harness sends on the page's data channel when ``greet`` is set (page tests).
# Shaped like CallEvent.to_json(): the data is spread into the message. A latency event's own
# "name" would shadow the event name there, so the page accepts both forms shown below.
GREETING_EVENTS: list[dict[str, Any]] = [
    {"name": "state", "state": "listening"},
    {"name": "caption", "who": "caller", "text": "hel", "final": False},
    {"name": "caption", "who": "caller", "text": "hello there", "final": True},
    {"name": "state", "state": "thinking"},
    {"name": "latency", "data": {"name": "voice_to_voice", "ms": 412}},
    {"name": "barge_in_stop", "ms": 95},  # the flat form after to_json's spread overwrote "latency"
    {"name": "caption", "who": "bot", "text": "Hi, I'm the test harness.", "final": True},
    {"name": "state", "state": "speaking"},
]


class HarnessCallHost:
    """TEST HARNESS implementing CallHost: accepts the offer with a bare aiortc peer.

    Special rooms exercise the error paths: ``full`` raises CallRejected(503) and ``boom``
    raises an unexpected exception. ``tone`` sends a sine back; ``greet`` sends page events.
    """

    def __init__(self, *, tone: bool = False, greet: bool = False) -> None:
        self.tone = tone
        self.greet = greet
        self.peers: dict[str, tuple[str, RTCPeerConnection]] = {}
        self.joins: list[tuple[str, str | None]] = []  # (participant, room) per answered offer
        self.closed = False

    @property
    def active_calls(self) -> int:
        return len({call_id for call_id, _ in self.peers.values()})

    async def answer(
        self, sdp: str, *, participant: str, room: str | None, options: JoinOptions = PLAIN
    ) -> Answer:
        if room == "full":
            raise CallRejected(503, "too_many_calls", "the harness is full")
        if room == "boom":
            raise RuntimeError("harness exploded on purpose")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=loopback_only(sdp), type="offer"))
        except ValueError as exc:
            await pc.close()
            raise CallRejected(400, "malformed_sdp", str(exc)) from None
        if self.tone and any(t.kind == "audio" for t in pc.getTransceivers()):
            pc.addTrack(ToneTrack())
        if self.greet:
            pc.on("datachannel", self._greet)
        await pc.setLocalDescription(await pc.createAnswer())  # aiortc gathers fully here
        peer_id = secrets.token_urlsafe(12)
        call_id = f"call-{room or 'lobby'}"
        self.peers[peer_id] = (call_id, pc)
        self.joins.append((participant, room))
        return Answer(call_id=call_id, peer_id=peer_id, sdp=pc.localDescription.sdp)

    def _greet(self, channel: RTCDataChannel) -> None:
        def send_all() -> None:
            for i, event in enumerate(GREETING_EVENTS):
                channel.send(json.dumps({"type": "event", "t": i * 0.1, "call": "h", **event}))

        if channel.readyState == "open":
            send_all()
        else:
            channel.on("open", send_all)

    async def hangup(self, peer_id: str) -> bool:
        entry = self.peers.pop(peer_id, None)
        if entry is None:
            return False
        await entry[1].close()
        return True

    async def close(self) -> None:
        self.closed = True
        peers, self.peers = self.peers, {}
        await asyncio.gather(*(pc.close() for _, pc in peers.values()))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice never offers 127.0.0.1 on its own; the bot does the same in signaling/rtc.py
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


Serve = Callable[..., Awaitable[tuple[Settings, HarnessCallHost]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[Any] = []

    async def start(
        host: HarnessCallHost | None = None, **overrides: Any
    ) -> tuple[Settings, HarnessCallHost]:
        settings = Settings(port=0, **overrides)
        host = host or HarnessCallHost()
        runners.append(await run_server(settings, host))
        return settings, host

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.asynccontextmanager
async def offerer() -> AsyncIterator[RTCPeerConnection]:
    """A browser-like aiortc caller: sendrecv audio plus the "events" channel, fully gathered."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        yield pc
    finally:
        await pc.close()


async def wait_connected(pc: RTCPeerConnection, timeout: float = 15.0) -> None:
    async def poll() -> None:
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed"):
                raise AssertionError(f"connection {pc.connectionState}")
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


async def assert_error(resp: aiohttp.ClientResponse, status: int, code: str) -> None:
    body = await resp.text()
    assert resp.status == status, (resp.status, body)
    assert resp.content_type == "application/json", body
    error = json.loads(body)["error"]
    assert error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"]


async def json_call(
    http: aiohttp.ClientSession, settings: Settings, **extra: Any
) -> tuple[RTCPeerConnection, dict[str, Any], contextlib.AsyncExitStack]:
    """Place a JSON-API call and wait until ICE/DTLS connect; the stack closes the caller."""
    stack = contextlib.AsyncExitStack()
    pc = await stack.enter_async_context(offerer())
    body = {"sdp": pc.localDescription.sdp, "type": "offer", **extra}
    async with http.post(settings.base_url + "/api/offer", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    await wait_connected(pc)
    return pc, answer, stack


# ---------------------------------------------------------------------------- tokens


def test_token_roundtrip() -> None:
    token = tokens.mint(SECRET, room="blue", sub="ann", ttl_s=60, name="Ann B.", role="host")
    claims = tokens.verify(SECRET, token)
    assert (claims.room, claims.sub, claims.name, claims.role) == ("blue", "ann", "Ann B.", "host")
    assert claims.iat is not None and claims.exp == claims.iat + 60
    # a standard HS256 JWT: any JWT library reads it
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    unbound = tokens.verify(SECRET, tokens.mint(SECRET, room=None, sub="x", ttl_s=5))
    assert (unbound.room, unbound.name, unbound.role) == (None, None, "caller")


def test_token_expired() -> None:
    token = tokens.mint(SECRET, room=None, sub="ann", ttl_s=60, now=time.time() - 120)
    with pytest.raises(tokens.TokenError) as info:
        tokens.verify(SECRET, token)
    assert info.value.code == "expired_token"


def test_token_tampered_and_wrong_secret() -> None:
    token = tokens.mint(SECRET, room="blue", sub="ann", ttl_s=60)
    header, body, sig = token.split(".")
    forged_body = jwt.utils.base64url_encode(
        json.dumps({"exp": 2**40, "room": "red", "sub": "ann"}).encode()
    ).decode()
    flipped_sig = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    for bad in (f"{header}.{forged_body}.{sig}", f"{header}.{body}.{flipped_sig}"):
        with pytest.raises(tokens.TokenError) as info:
            tokens.verify(SECRET, bad)
        assert info.value.code == "bad_signature"
    with pytest.raises(tokens.TokenError) as info:
        tokens.verify("another-secret-also-32-bytes-long!!", token)
    assert info.value.code == "bad_signature"


def test_token_alg_none_and_other_algorithms_refused() -> None:
    claims = {"sub": "mallory", "room": "blue", "exp": int(time.time()) + 60}
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert unsigned.endswith(".")  # no signature at all
    hs512 = jwt.encode(claims, SECRET, algorithm="HS512")  # right secret, other algorithm
    # an HS256 signature under a header that claims another algorithm
    good = tokens.mint(SECRET, room="blue", sub="mallory", ttl_s=60)
    relabeled_header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    relabeled = relabeled_header + good[good.index(".") :]
    for bad in (unsigned, unsigned + "c2ln", hs512, relabeled):
        with pytest.raises(tokens.TokenError) as info:
            tokens.verify(SECRET, bad)
        assert info.value.code == "unsupported_algorithm", bad


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, "missing_token"),
        ("", "missing_token"),
        ("no-dot-here", "malformed_token"),
        ("a.b", "malformed_token"),
        ("a.b.c", "malformed_token"),
        ("!!!.###.$$$", "malformed_token"),
        ("é.é.é", "malformed_token"),
        ("eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln", "bad_signature"),  # checked before the payload
        ("x" * 5000 + ".y.z", "malformed_token"),
    ],
)
def test_token_malformed(token: str | None, code: str) -> None:
    with pytest.raises(tokens.TokenError) as info:
        tokens.verify(SECRET, token)
    assert info.value.code == code


def test_token_signed_junk_payload_is_malformed() -> None:
    # correctly signed but not our claims: only possible with the secret, still refused cleanly
    future = int(time.time()) + 60
    raw_payloads = [b"not json", b"[1,2]"]
    claim_sets: list[dict[str, Any]] = [
        {"exp": "soon", "sub": "a"},
        {"exp": future},  # no sub
        {"sub": "a"},  # no exp: tokens must expire
        {"exp": future, "sub": 5},
        {"exp": future, "sub": ""},
        {"exp": future, "sub": "a", "room": "bad room"},
        {"exp": future, "sub": "a", "room": 7},
        {"exp": future, "sub": "a", "name": ["x"]},
        {"exp": future, "sub": "a", "role": ""},
        {"exp": future, "sub": "a", "iat": "yesterday"},
    ]
    tokens_ = [jwt.api_jws.encode(raw, SECRET, algorithm="HS256") for raw in raw_payloads]
    tokens_ += [jwt.encode(claims, SECRET, algorithm="HS256") for claims in claim_sets]
    for token in tokens_:
        with pytest.raises(tokens.TokenError) as info:
            tokens.verify(SECRET, token)
        assert info.value.code == "malformed_token", token
    issued_later = jwt.encode({"exp": future + 3600, "iat": future + 600, "sub": "a"}, SECRET)
    with pytest.raises(tokens.TokenError) as info:
        tokens.verify(SECRET, issued_later)
    assert info.value.code == "not_yet_valid"


def test_resource_tokens() -> None:
    resources = tokens.ResourceTokens()
    token = resources.issue("peer-1")
    assert len(token) >= 32 and resources.check("peer-1", token)
    assert not resources.check("peer-2", token)  # another call's token
    assert not resources.check("peer-1", None) and not resources.check("peer-1", "")
    assert not resources.check("peer-1", token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert not tokens.ResourceTokens().check("peer-1", token)  # another process's key


def test_rate_limiter_refills_and_stays_bounded() -> None:
    t = [0.0]
    limiter = RateLimiter(60, 2, max_keys=3, clock=lambda: t[0])  # 1 per second, burst 2
    assert [limiter.take("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(1.0)
    t[0] += 0.5
    assert limiter.take("a") == pytest.approx(0.5)  # a refused offer spends nothing
    t[0] += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("b") == 0.0  # other addresses have their own bucket
    for key in "cdefgh":
        limiter.take(key)
    assert len(limiter) == 3  # the least recently seen were dropped
    assert all(RateLimiter(0, 1).take("a") == 0.0 for _ in range(100))  # 0 = no limit


def test_mint_needs_secret() -> None:
    with pytest.raises(ValueError):
        tokens.mint("", room=None, sub="a", ttl_s=10)


def test_dev_join_url() -> None:
    dev = Settings(port=8123)
    assert dev_join_url(dev) == "http://127.0.0.1:8123/"
    secured = Settings(port=8123, token_secret=SECRET, token_ttl_s=120)
    url = dev_join_url(secured, room="blue")
    assert url.startswith("http://127.0.0.1:8123/?token=")
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    claims = tokens.verify(SECRET, query["token"])
    assert claims.room == "blue" and query["room"] == "blue"


# ---------------------------------------------------------------------------- happy paths


async def test_whip_happy_path(serve: Serve, http: aiohttp.ClientSession) -> None:
    settings, host = await serve()
    assert settings.port != 0  # written back by run_server
    async with http.options(settings.base_url + "/whip") as resp:
        assert resp.status == 204
        assert resp.headers["Accept-Post"] == "application/sdp"
    async with offerer() as pc:
        async with http.post(
            settings.base_url + "/whip/blue?name=obs",
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            answer_sdp = await resp.text()
            assert resp.status == 201, answer_sdp
            assert resp.content_type == "application/sdp"
            location = resp.headers["Location"]
            assert location.startswith("/whip/resource/")
            assert resp.headers["X-Presence-Call"] == "call-blue"
            resource_token = resp.headers[RESOURCE_TOKEN_HEADER]
        parsed = SessionDescription.parse(answer_sdp)
        assert [m.kind for m in parsed.media] == ["audio", "application"]
        assert host.joins == [("obs", "blue")]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        await wait_connected(pc)
        async with http.get(settings.base_url + "/healthz") as resp:
            assert await resp.json() == {"status": "ok", "calls": 1}
        async with http.patch(settings.base_url + location, data="a=candidate:x") as resp:
            await assert_error(resp, 405, "trickle_not_supported")
        owner = {"Authorization": f"Bearer {resource_token}"}
        async with http.delete(settings.base_url + location, headers=owner) as resp:
            assert resp.status == 200
            assert await resp.read() == b""
        async with http.delete(settings.base_url + location, headers=owner) as resp:  # replayed
            await assert_error(resp, 404, "unknown_resource")
    assert host.active_calls == 0


async def test_json_offer_happy_path(serve: Serve, http: aiohttp.ClientSession) -> None:
    settings, host = await serve()
    _, answer, stack = await json_call(http, settings, room="red", name="Ann")
    async with stack:
        assert answer["type"] == "answer"
        assert answer["call_id"] == "call-red"
        assert answer["resource"] == f"/whip/resource/{answer['peer_id']}"
        assert host.joins == [("Ann", "red")]
        url = f"{settings.base_url}/api/calls/{answer['peer_id']}"
        owner = {"Authorization": f"Bearer {answer['resource_token']}"}
        async with http.delete(url, headers=owner) as resp:
            assert resp.status == 200
            assert (await resp.json())["hung_up"] is True
        async with http.delete(url, headers=owner) as resp:  # double hang-up, same token
            await assert_error(resp, 404, "unknown_resource")


async def test_page_config_and_static(serve: Serve, http: aiohttp.ClientSession) -> None:
    settings, _ = await serve(ice_servers=["stun:stun.example.org:3478"], micro_turn_ms=160)
    async with http.get(settings.base_url + "/") as resp:
        assert resp.status == 200
        assert "/static/app.js" in await resp.text()
    async with http.get(settings.base_url + "/static/app.js") as resp:
        assert resp.status == 200
        assert "javascript" in resp.content_type
    async with http.get(settings.base_url + "/static/style.css") as resp:
        assert resp.status == 200
    async with http.get(settings.base_url + "/static/%2e%2e/__init__.py") as resp:
        await assert_error(resp, 404, "not_found")
    async with http.get(settings.base_url + "/static/missing.js") as resp:
        await assert_error(resp, 404, "not_found")
    async with http.get(settings.base_url + "/api/config") as resp:
        assert await resp.json() == {
            "ice_servers": [{"urls": "stun:stun.example.org:3478"}],
            "token_required": False,
            "micro_turn_ms": 160,
            "video_fps": 2.0,
            "video_max_width": 320,
            "interpret_languages": [{"code": "en", "name": "English"}, {"code": "es", "name": "Spanish"}],
        }


# ---------------------------------------------------------------------------- bad input


OFFER_SKELETON = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


async def test_bad_input_while_a_call_runs(serve: Serve, http: aiohttp.ClientSession) -> None:
    settings, host = await serve(max_body_bytes=4096, offer_rate_per_min=0)
    base = settings.base_url
    good_pc, good, stack = await json_call(http, settings)
    async with stack:
        sdp = good_pc.localDescription.sdp
        no_ice = "\r\n".join(line for line in sdp.splitlines() if not line.startswith("a=ice-")) + "\r\n"
        whip_sdp = {"Content-Type": "application/sdp"}

        async def chunked_big() -> AsyncIterator[bytes]:
            for _ in range(8):  # no Content-Length: client_max_size must catch it
                yield b"a" * 1024

        cases: list[tuple[str, str, dict[str, Any], int, str]] = [
            ("POST", "/whip", {"data": "hello", "headers": whip_sdp}, 400, "malformed_sdp"),
            ("POST", "/whip", {"data": "", "headers": whip_sdp}, 400, "malformed_sdp"),
            ("POST", "/whip", {"data": b"v=0\xff\xfe", "headers": whip_sdp}, 400, "malformed_sdp"),
            ("POST", "/whip", {"data": OFFER_SKELETON, "headers": whip_sdp}, 400, "malformed_sdp"),
            (
                "POST",
                "/whip",
                {"data": OFFER_SKELETON + "m=audio x RTP/AVP zz\r\n", "headers": whip_sdp},
                400,
                "malformed_sdp",
            ),
            ("POST", "/whip", {"data": no_ice, "headers": whip_sdp}, 400, "malformed_sdp"),
            (
                "POST",
                "/whip",
                {"data": sdp, "headers": {"Content-Type": "text/plain"}},
                415,
                "unsupported_media_type",
            ),
            ("POST", "/whip", {"data": "v=0" + "a" * 5000, "headers": whip_sdp}, 413, "body_too_large"),
            ("POST", "/whip", {"data": chunked_big(), "headers": whip_sdp}, 413, "body_too_large"),
            ("POST", "/whip/full", {"data": sdp, "headers": whip_sdp}, 503, "too_many_calls"),
            ("POST", "/whip/boom", {"data": sdp, "headers": whip_sdp}, 500, "internal"),
            ("POST", "/whip/bad%20room", {"data": sdp, "headers": whip_sdp}, 400, "bad_request"),
            ("PATCH", "/whip/resource/nope", {}, 405, "trickle_not_supported"),
            ("DELETE", "/whip/resource/nope", {}, 401, "missing_resource_token"),
            ("DELETE", "/api/calls/nope", {}, 401, "missing_resource_token"),
            (
                "DELETE",
                "/api/calls/nope",
                {"headers": {"Authorization": "Bearer x"}},
                403,
                "bad_resource_token",
            ),
            (
                "DELETE",
                "/api/calls/" + "x" * 300,
                {"headers": {"Authorization": "Bearer " + good["resource_token"]}},
                403,
                "bad_resource_token",
            ),
            ("DELETE", "/api/calls/" + good["peer_id"], {}, 401, "missing_resource_token"),
            (
                "POST",
                "/api/offer",
                {"json": {"sdp": sdp, "type": "offer", "token": 7}},
                400,
                "bad_request",
            ),
            ("GET", "/no/such/page", {}, 404, "not_found"),
            ("PUT", "/api/offer", {}, 405, "method_not_allowed"),
            (
                "POST",
                "/api/offer",
                {"data": "{not json", "headers": {"Content-Type": "application/json"}},
                400,
                "bad_request",
            ),
            ("POST", "/api/offer", {"json": [1, 2]}, 400, "bad_request"),
            ("POST", "/api/offer", {"json": {"sdp": sdp, "type": "answer"}}, 400, "bad_request"),
            ("POST", "/api/offer", {"json": {"type": "offer"}}, 400, "bad_request"),
            ("POST", "/api/offer", {"json": {"sdp": 5, "type": "offer"}}, 400, "bad_request"),
            ("POST", "/api/offer", {"json": {"sdp": "", "type": "offer"}}, 400, "malformed_sdp"),
            ("POST", "/api/offer", {"json": {"sdp": "junk", "type": "offer"}}, 400, "malformed_sdp"),
            ("POST", "/api/offer", {"json": {"sdp": sdp, "type": "offer", "room": 7}}, 400, "bad_request"),
            ("POST", "/api/offer", {"json": {"sdp": sdp, "type": "offer", "name": []}}, 400, "bad_request"),
            ("POST", "/api/offer", {"data": sdp, "headers": whip_sdp}, 415, "unsupported_media_type"),
            (
                "POST",
                "/api/offer",
                {"json": {"sdp": "v=0" + "a" * 5000, "type": "offer"}},
                413,
                "body_too_large",
            ),
        ]

        async def check(method: str, path: str, kw: dict[str, Any], status: int, code: str) -> None:
            async with http.request(method, base + path, **kw) as resp:
                await assert_error(resp, status, code)

        await asyncio.gather(*(check(*case) for case in cases))

        # the good call never noticed
        assert good_pc.connectionState == "connected"
        async with http.get(base + "/healthz") as resp:
            assert await resp.json() == {"status": "ok", "calls": 1}
        # and the server still answers new offers
        async with offerer() as pc:
            async with http.post(base + "/whip", data=pc.localDescription.sdp, headers=whip_sdp) as resp:
                assert resp.status == 201, await resp.text()
                await pc.setRemoteDescription(RTCSessionDescription(sdp=await resp.text(), type="answer"))
            await wait_connected(pc)

        async with http.get(base + "/metrics") as resp:
            text = await resp.text()
        assert 'presence_offers_rejected_total{code="malformed_sdp"} 8.0' in text
        assert 'presence_offers_rejected_total{code="internal"} 1.0' in text
        assert 'presence_offers_rejected_total{code="body_too_large"} 3.0' in text
        assert 'presence_http_requests_total{route="/whip",status="201"} 1.0' in text
        assert good["peer_id"] in host.peers


async def test_tokens_enforced(serve: Serve, http: aiohttp.ClientSession) -> None:
    settings, host = await serve(token_secret=SECRET, offer_rate_per_min=0)
    base = settings.base_url
    valid = tokens.mint(SECRET, room=None, sub="ann", ttl_s=60)
    expired = tokens.mint(SECRET, room=None, sub="ann", ttl_s=60, now=1000.0)
    wrong = tokens.mint("other-secret-of-32-bytes-or-more!!", room=None, sub="ann", ttl_s=60)
    unsigned = jwt.encode({"sub": "ann", "exp": int(time.time()) + 60}, None, algorithm="none")
    async with http.get(base + "/api/config") as resp:
        assert (await resp.json())["token_required"] is True

    good_pc, _, stack = await json_call(http, settings, token=valid)
    async with stack:
        sdp = good_pc.localDescription.sdp
        whip_sdp = {"Content-Type": "application/sdp"}

        def bearer(tok: str) -> dict[str, str]:
            return {**whip_sdp, "Authorization": f"Bearer {tok}"}

        cases: list[tuple[str, dict[str, Any], str]] = [
            ("/whip", {"data": sdp, "headers": whip_sdp}, "missing_token"),
            ("/whip", {"data": sdp, "headers": bearer(expired)}, "expired_token"),
            ("/whip", {"data": sdp, "headers": bearer(wrong)}, "bad_signature"),
            ("/whip", {"data": sdp, "headers": bearer("garbage")}, "malformed_token"),
            ("/whip", {"data": sdp, "headers": bearer(unsigned)}, "unsupported_algorithm"),
            ("/whip?token=" + expired, {"data": sdp, "headers": whip_sdp}, "expired_token"),
            ("/api/offer", {"json": {"sdp": sdp, "type": "offer"}}, "missing_token"),
            ("/api/offer", {"json": {"sdp": sdp, "type": "offer", "token": expired}}, "expired_token"),
            ("/api/offer", {"json": {"sdp": sdp, "type": "offer", "token": wrong}}, "bad_signature"),
            (
                "/api/offer",
                {"json": {"sdp": sdp, "type": "offer", "token": unsigned}},
                "unsupported_algorithm",
            ),
            ("/api/offer", {"json": {"sdp": sdp, "type": "offer", "token": "x" * 5000}}, "malformed_token"),
            ("/api/offer?token=eA.eQ", {"json": {"sdp": sdp, "type": "offer"}}, "malformed_token"),
        ]

        async def check(path: str, kw: dict[str, Any], code: str) -> None:
            async with http.post(base + path, **kw) as resp:
                await assert_error(resp, 401, code)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")

        await asyncio.gather(*(check(*case) for case in cases))
        assert good_pc.connectionState == "connected"

        # rooms: a room-bound token joins its room only; a token without a room joins none
        bound = tokens.mint(SECRET, room="green", sub="bob", ttl_s=60)
        room_cases: list[tuple[str, dict[str, Any]]] = [
            ("/whip/red", {"data": sdp, "headers": bearer(bound)}),
            ("/whip?room=red", {"data": sdp, "headers": bearer(bound)}),
            ("/whip/red", {"data": sdp, "headers": bearer(valid)}),
            ("/api/offer", {"json": {"sdp": sdp, "type": "offer", "token": bound, "room": "red"}}),
            ("/api/offer", {"json": {"sdp": sdp, "type": "offer", "token": valid, "room": "green"}}),
        ]
        for path, kw in room_cases:
            async with http.post(base + path, **kw) as resp:
                await assert_error(resp, 403, "wrong_room")
        assert good_pc.connectionState == "connected"

        # a valid bearer token works for WHIP, in its room (asked for or not)
        for path in ("/whip/green", "/whip"):
            async with offerer() as pc:
                async with http.post(
                    base + path, data=pc.localDescription.sdp, headers=bearer(bound)
                ) as resp:
                    assert resp.status == 201, await resp.text()
                    assert resp.headers["X-Presence-Call"] == "call-green"
        async with offerer() as pc:
            async with http.post(
                base + "/whip?token=" + valid, data=pc.localDescription.sdp, headers=whip_sdp
            ) as resp:
                assert resp.status == 201, await resp.text()
                assert resp.headers["X-Presence-Call"] == "call-lobby"  # a one-to-one call
        # a name in the token is forced over the one asked for
        named = tokens.mint(SECRET, room="green", sub="carol-id", ttl_s=60, name="Carol")
        _, answer, named_stack = await json_call(http, settings, token=named, name="Mallory")
        await named_stack.aclose()
        assert answer["call_id"] == "call-green"
        assert host.joins[0] == ("ann", None)  # token sub names the participant
        assert host.joins[1:] == [("bob", "green"), ("bob", "green"), ("ann", None), ("Carol", "green")]


async def test_hangup_needs_the_callers_resource_token(serve: Serve, http: aiohttp.ClientSession) -> None:
    # two people in one room: neither can hang the other up, whatever they learn of the other's id
    settings, host = await serve(token_secret=SECRET)
    base = settings.base_url
    token = tokens.mint(SECRET, room="team", sub="member", ttl_s=60)
    ann_pc, ann, ann_stack = await json_call(http, settings, token=token, name="ann")
    bob_pc, bob, bob_stack = await json_call(http, settings, token=token, name="bob")
    async with ann_stack, bob_stack:
        assert ann["resource_token"] != bob["resource_token"]
        for path in (f"/api/calls/{ann['peer_id']}", f"/whip/resource/{ann['peer_id']}"):
            async with http.delete(base + path) as resp:
                await assert_error(resp, 401, "missing_resource_token")
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            for wrong in (bob["resource_token"], token, "x" * 43, "Bearer"):
                headers = {"Authorization": f"Bearer {wrong}"}
                async with http.delete(base + path, headers=headers) as resp:
                    await assert_error(resp, 403, "bad_resource_token")
            async with http.delete(base + path, headers={"Authorization": ann["resource_token"]}) as resp:
                await assert_error(resp, 401, "missing_resource_token")  # not a Bearer credential
        await asyncio.sleep(0.3)
        assert ann_pc.connectionState == "connected" and ann["peer_id"] in host.peers
        assert bob_pc.connectionState == "connected" and bob["peer_id"] in host.peers

        owner = {"Authorization": f"Bearer {ann['resource_token']}"}
        async with http.delete(f"{base}/whip/resource/{ann['peer_id']}", headers=owner) as resp:
            assert resp.status == 200, await resp.text()
        assert ann["peer_id"] not in host.peers and bob["peer_id"] in host.peers
        for path in (f"/api/calls/{ann['peer_id']}", f"/whip/resource/{ann['peer_id']}"):
            async with http.delete(base + path, headers=owner) as resp:  # replayed after the hang-up
                await assert_error(resp, 404, "unknown_resource")
        assert bob_pc.connectionState == "connected"


class CappedHarness(HarnessCallHost):
    """TEST HARNESS: refuses a room's next peer as CallSession does (409 room_full)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    async def answer(
        self, sdp: str, *, participant: str, room: str | None, options: JoinOptions = PLAIN
    ) -> Answer:
        if room and sum(1 for call_id, _ in self.peers.values() if call_id == f"call-{room}") >= self.cap:
            raise CallRejected(409, "room_full", f"this room is full: at most {self.cap} participants")
        return await super().answer(sdp, participant=participant, room=room, options=options)


async def test_room_full_is_a_clear_409(serve: Serve, http: aiohttp.ClientSession) -> None:
    # the cap itself is CallSession's (tests/test_call.py checks it with the real bot); here:
    # its refusal reaches the client as JSON and leaves the room as it was
    settings, host = await serve(CappedHarness(2))
    calls = [await json_call(http, settings, room="small", name=n) for n in ("ann", "bob")]
    async with contextlib.AsyncExitStack() as stack:
        for _, _, call_stack in calls:
            await stack.enter_async_context(call_stack)
        async with offerer() as pc:
            body = {"sdp": pc.localDescription.sdp, "type": "offer", "room": "small"}
            async with http.post(settings.base_url + "/api/offer", json=body) as resp:
                await assert_error(resp, 409, "room_full")
        assert all(pc.connectionState == "connected" for pc, _, _ in calls)
        assert len(host.peers) == 2
        _, _, other = await json_call(http, settings, room="other")  # other rooms are unaffected
        await other.aclose()


async def test_offers_over_the_rate_limit_get_429(serve: Serve, http: aiohttp.ClientSession) -> None:
    settings, host = await serve(offer_rate_per_min=6, offer_burst=3)
    base = settings.base_url
    good_pc, good, stack = await json_call(http, settings)
    async with stack:
        whip_sdp = {"Content-Type": "application/sdp"}
        for _ in range(2):  # refused offers spend the budget too: a flood costs no parsing
            async with http.post(base + "/whip", data="junk", headers=whip_sdp) as resp:
                await assert_error(resp, 400, "malformed_sdp")
        sdp = good_pc.localDescription.sdp
        for path, kw in [
            ("/whip", {"data": sdp, "headers": whip_sdp}),
            ("/api/offer", {"json": {"sdp": sdp, "type": "offer"}}),
            ("/api/offer", {"data": "{not json", "headers": {"Content-Type": "application/json"}}),
        ]:
            async with http.post(base + path, **kw) as resp:
                await assert_error(resp, 429, "rate_limited")
                assert 1 <= int(resp.headers["Retry-After"]) <= 10
        assert good_pc.connectionState == "connected" and len(host.peers) == 1
        # what is not an offer is not limited: the caller can still hang up
        owner = {"Authorization": f"Bearer {good['resource_token']}"}
        async with http.delete(f"{base}/api/calls/{good['peer_id']}", headers=owner) as resp:
            assert resp.status == 200
        async with http.get(base + "/metrics") as resp:
            assert 'presence_offers_rejected_total{code="rate_limited"} 3.0' in await resp.text()


async def test_healthz_and_metrics(serve: Serve, http: aiohttp.ClientSession) -> None:
    settings, _ = await serve()
    base = settings.base_url
    async with http.get(base + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "calls": 0}
    _, _, stack = await json_call(http, settings)
    async with stack:
        async with http.get(base + "/metrics") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            text = await resp.text()
    assert "presence_calls_active 1.0" in text
    assert 'presence_http_requests_total{route="/api/offer",status="200"} 1.0' in text
    for name in (
        "presence_voice_to_voice_seconds",
        "presence_barge_in_stop_seconds",
        "presence_microturn_step_seconds",
        "presence_microturns_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text


async def test_metrics_registry_is_per_app() -> None:
    # two apps in one process must not clash on metric names
    a = create_app(Settings(), HarnessCallHost())
    b = create_app(Settings(), HarnessCallHost())
    assert a["metrics"].registry is not b["metrics"].registry
    a["metrics"].microturns.inc()
    assert b"presence_microturns_total 0.0" in b["metrics"].render()


async def test_shutdown_closes_host(http: aiohttp.ClientSession) -> None:
    host = HarnessCallHost()
    settings = Settings(port=0)
    runner = await run_server(settings, host)
    async with http.get(settings.base_url + "/healthz") as resp:
        assert resp.status == 200
    await runner.cleanup()
    assert host.closed


async def test_an_offer_with_extra_tracks_is_refused() -> None:
    """One audio, one video and one data section per caller: the bot would read only the first
    track of a kind while aiortc queued the others' frames without bound."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    pc.addTransceiver("video")
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    one_each = pc.localDescription.sdp
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    two_audio = pc.localDescription.sdp
    await pc.close()
    assert validate_offer_sdp(one_each) == one_each
    with pytest.raises(ApiError) as refused:
        validate_offer_sdp(two_audio)
    assert refused.value.status == 400 and refused.value.code == "too_many_tracks"
    assert "2 audio sections" in refused.value.message
