"""Phone numbers at Twilio and Telnyx: their media websockets, played by test clients that
speak each provider's documented messages over real aiohttp websockets to a real server.

The callers' voices are piper's, sent as 20 ms mu-law chunks in real time; what a caller heard
is the bot's media messages, decoded and transcribed by the offline whisper.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc.codecs.g711 import PcmuDecoder
from aiortc.jitterbuffer import JitterFrame
from conftest import BotServer, bot_heard, heard_as, rms

from presence.bot.session import CallSession
from presence.events import Ev
from presence.media.audio import resample
from presence.media.provider_stream import MulawInbound, Playback
from presence.provider_caller import (
    CALLER_NUMBER,
    SILENCE,
    StreamClient,
    post_voice_webhook,
    twilio_signature,
    twiml_stream,
    voice_params,
    websocket_url,
)
from presence.seams import SAMPLE_RATE
from presence.signaling import tokens
from presence.signaling.provider_link import ProviderLink

pytestmark = pytest.mark.slow

AUTH_TOKEN = "test-twilio-auth-token"
SECRET = "provider-test-secret-" + "x" * 32
CALLER = CALLER_NUMBER


def decode(payloads: list[str]) -> np.ndarray:
    """The bot's media payloads as 8 kHz float audio."""
    decoder = PcmuDecoder()
    parts = []
    for p in payloads:
        for frame in decoder.decode(JitterFrame(base64.b64decode(p), 0)):
            parts.append(frame.to_ndarray().reshape(-1).astype(np.float32) / 32768)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


@dataclass
class Client(StreamClient):
    """A provider's side of one call (``StreamClient``: Twilio's or Telnyx's messages, a
    caller's voice paced in real time), keeping the bot's media payloads as they came."""

    media: list[tuple[float, str]] = field(default_factory=list)  # (arrival, payload)

    async def connect(self, **kwargs: Any) -> Client:
        await self.open(**kwargs)
        return self

    def on_media(self, payload: str) -> None:
        self.media.append((time.monotonic(), payload))

    def heard(self, after: float = 0.0) -> np.ndarray:
        return decode([p for t, p in self.media if t >= after])


def ws_url(server: BotServer, path: str) -> str:
    return websocket_url(server.url, path)


def link_of(server: BotServer, client: Client) -> tuple[CallSession, ProviderLink] | None:
    for session in server.manager.sessions.values():
        for peer in session.peers.values():
            if isinstance(peer.link, ProviderLink) and peer.link.stream_id == client.stream_id:
                return session, peer.link
    return None


async def joined(
    server: BotServer, client: Client, timeout: float = 10.0
) -> tuple[CallSession, ProviderLink]:
    for _ in range(int(timeout / 0.02)):
        found = link_of(server, client)
        if found is not None:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"{client.dialect} stream {client.stream_id} never joined a call")


@dataclass
class Answer:
    status: int
    content_type: str
    text: str

    def error_code(self) -> str:
        return str(json.loads(self.text)["error"]["code"])


async def webhook(server: BotServer, params: dict[str, str], signature: str | None) -> Answer:
    """Twilio's POST of a call to the number (form-encoded)."""
    async with aiohttp.ClientSession() as http:
        return Answer(*await post_voice_webhook(http, server.url, params, signature))


def signed(server: BotServer, params: dict[str, str]) -> str:
    return twilio_signature(AUTH_TOKEN, server.url + "/twilio/voice", params)


async def twilio_token(server: BotServer) -> str:
    """A call to the number: the signed webhook's TwiML, its stream URL and one-time token."""
    params = voice_params(CALLER)
    response = await webhook(server, params, signed(server, params))
    assert response.status == 200 and response.content_type == "text/xml", response
    url, values = twiml_stream(response.text)
    assert url == ws_url(server, "/twilio/stream")
    assert values["from"] == CALLER
    return values["token"]


async def transcript(backends, audio8: np.ndarray) -> str:  # type: ignore[no-untyped-def]
    audio16 = resample(audio8, 8000, SAMPLE_RATE)
    return (await asyncio.to_thread(backends.transcriber.transcribe, audio16)).text.lower()


# ---------------------------------------------------------------------------- calls


@pytest.mark.parametrize("dialect", ["twilio", "telnyx"])
async def test_a_caller_asks_and_hears_the_answer(bot_factory, speech, backends, dialect) -> None:  # type: ignore[no-untyped-def]
    if dialect == "twilio":
        server: BotServer = await bot_factory(
            greeting="Hello, this is Presence.", twilio_auth_token=AUTH_TOKEN
        )
        client = await Client(ws_url(server, "/twilio/stream"), dialect).connect()
        await client.start(await twilio_token(server))
    else:
        server = await bot_factory(greeting="Hello, this is Presence.", token_secret=SECRET)
        url = ws_url(server, "/telnyx/stream")
        for token, status in ((None, 401), (tokens.mint(SECRET, room=None, sub="x", ttl_s=60), 403)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await Client(url + (f"?token={token}" if token else ""), dialect).connect()
            assert refused.value.status == status
        token = tokens.mint(SECRET, room=None, sub="telnyx", ttl_s=60, role="provider")
        client = await Client(f"{url}?token={token}", dialect).connect()
        await client.start()
    try:
        session, link = await joined(server, client)
        greeted = await session.events.wait_for(Ev.BOT_SPEECH_END, timeout=15)
        await asyncio.sleep(0.3)
        await client.speak(speech("What is your name?"))
        try:
            await session.events.wait_for(Ev.BOT_SPEECH_END, after=greeted.t + 0.01, timeout=30)
        except TimeoutError:
            pytest.fail(f"no answer to the question; the bot heard {bot_heard(session)}")
        await asyncio.sleep(0.5)  # the tail in flight, its marks back
        said = [m.content for m in session.engine.history if m.role == "assistant"]
        joined_event = session.events.first(Ev.PARTICIPANT_JOINED)
        assert joined_event is not None and joined_event.data == {"participant": CALLER, "transport": dialect}
        # the returned marks are the playback position: all but the last few chunks
        assert client.marks and link.played_samples > 0.8 * link.playback.sent, link.playback
        assert link.lag_s < 0.5 and link.playback.unknown_marks == 0, link.playback
        assert not client.strays, client.strays  # only media, marks and clears, all of this stream
    finally:
        await client.stop()
    await ended(server)
    text = await transcript(backends, client.heard())
    assert len(said) == 2 and "prese" in text, (text, said)
    assert heard_as(text, " ".join(said), 0.6), f"the caller heard {text!r}; the bot said {said!r}"


async def ended(server: BotServer, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if not server.manager.sessions:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the call did not end: {list(server.manager.sessions)}")


async def test_a_barge_in_clears_the_providers_playback(bot_factory, speech) -> None:  # type: ignore[no-untyped-def]
    greeting = (
        "Hello, this is Presence calling about your appointment next week. I have a few details "
        "to go through with you, so please bear with me while I read them all out slowly."
    )
    server: BotServer = await bot_factory(greeting=greeting)
    client = await Client(ws_url(server, "/twilio/stream"), "twilio").connect()
    try:
        await client.start()  # dev mode: no token needed
        session, link = await joined(server, client)
        await session.events.wait_for(Ev.BOT_SPEECH_START, timeout=15)
        await asyncio.sleep(1.0)
        spoke = time.monotonic()
        await client.speak(speech("Wait, stop. I have a question."))
        for _ in range(250):
            if client.clears:
                break
            await asyncio.sleep(0.02)
        assert client.clears, f"no clear; events {[(e.name, e.data) for e in session.events.history][-20:]}"
        assert session.events.first(Ev.PLAYBACK_FLUSHED) is not None
        await asyncio.sleep(0.6)
        cleared = client.clears[0]
        before = decode([p for t, p in client.media if spoke - 1.0 <= t <= spoke])
        after = decode([p for t, p in client.media if cleared + 0.1 <= t <= cleared + 0.5])
        assert rms(before) > 0.01 and rms(after) < 0.003, (rms(before), rms(after))
        assert link.playback.skipped >= 0 and link.played_samples <= link.playback.sent
    finally:
        await client.stop()


async def test_dtmf_reaches_the_session_and_a_hang_up_closes_the_socket(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory()
    for dialect in ("twilio", "telnyx"):
        client = await Client(ws_url(server, f"/{dialect}/stream"), dialect).connect()
        try:
            await client.start()
            session, _ = await joined(server, client)
            await client.dtmf("5")
            pressed = await session.events.wait_for(Ev.DTMF, timeout=5)
            assert pressed.data == {"digit": "5", "participant": CALLER}
            # the bot hangs up (as its manners would): the call's end closes the websocket
            assert await server.manager.hangup(next(iter(session.peers)))
            assert await client.closed() == 1000
        finally:
            await client.stop()


# ---------------------------------------------------------------------------- security


async def test_the_webhook_signature_and_the_one_time_stream_token(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(twilio_auth_token=AUTH_TOKEN)
    params = {"CallSid": "CA1", "From": CALLER, "To": "+15559990000"}
    for signature, code in (("bm90IGl0", "bad_signature"), (None, "missing_signature")):
        response = await webhook(server, params, signature)
        assert (response.status, response.error_code()) == (403, code)
    tampered = await webhook(server, {**params, "From": "+10000000000"}, signed(server, params))
    assert (tampered.status, tampered.error_code()) == (403, "bad_signature")
    token = await twilio_token(server)
    url = ws_url(server, "/twilio/stream")
    wrong = await Client(url, "twilio").connect()
    await wrong.start("not-the-token")
    assert await wrong.closed() == 1008
    good = await Client(url, "twilio").connect()
    await good.start(token)
    await joined(server, good)
    again = await Client(url, "twilio").connect()  # one time only
    await again.start(token)
    assert await again.closed() == 1008
    without = await Client(url, "twilio").connect()  # dev mode (no token_secret): taken
    await without.start()
    await joined(server, without)
    assert len(server.manager.sessions) == 2
    for client in (wrong, good, again, without):
        await client.stop()


async def test_the_webhook_refuses_unsigned_calls_without_an_auth_token_outside_dev_mode(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(token_secret=SECRET)
    response = await webhook(server, {"From": CALLER}, None)
    assert (response.status, response.error_code()) == (503, "twilio_not_configured")
    client = await Client(ws_url(server, "/twilio/stream"), "twilio").connect()
    await client.start()  # no token: outside dev mode, refused
    assert await client.closed() == 1008
    await client.stop()
    assert not server.manager.sessions


async def test_junk_closes_only_its_own_socket(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory()
    url = ws_url(server, "/twilio/stream")
    keeper = await Client(url, "twilio").connect()
    await keeper.start()
    session, _ = await joined(server, keeper)

    async def junk(kind: str) -> int | None:
        client = await Client(url, "twilio").connect()
        try:
            if kind == "media before start":
                await client.send(client.messages.media(SILENCE))
                return await client.closed()
            if kind == "wrong format":
                await client.start(encoding="audio/x-alaw")
                return await client.closed()
            await client.start()
            _, link = await joined(server, client)
            assert client._ws is not None
            if kind == "not JSON":
                await client._ws.send_str("{nope")
            elif kind == "binary":
                await client._ws.send_bytes(b"\x00\x01")
            elif kind == "unknown event":
                await client.send(client.messages.envelope("surprise"))
            elif kind == "oversized":
                await client.send(client.messages.media("A" * 70_000))
                code = await client.closed()
                # aiohttp sends 1009 and closes with the rest of the frame unread, so the kernel
                # may reset the connection before this side reads the close frame (1006 then):
                # the server's reason is what must say "too big".
                assert "exceeds limit" in (link.closed_because or ""), link.closed_because
                return 1009 if code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE else code
            elif kind == "bad payload":
                await client.send(client.messages.media("!!not base64!!"))
            return await client.closed()
        finally:
            await client.stop()

    kinds = [
        "not JSON",
        "binary",
        "unknown event",
        "media before start",
        "wrong format",
        "oversized",
        "bad payload",
    ]
    codes = dict(zip(kinds, await asyncio.gather(*(junk(k) for k in kinds)), strict=True))
    assert codes == {
        "not JSON": 1003, "binary": 1003, "unknown event": 1008, "media before start": 1008,
        "wrong format": 1003, "oversized": 1009, "bad payload": 1003,
    }  # fmt: skip
    for _ in range(100):  # the junk callers' calls end; the keeper's goes on
        if list(server.manager.sessions) == [session.call_id]:
            break
        await asyncio.sleep(0.05)
    assert list(server.manager.sessions) == [session.call_id] and len(session.peers) == 1
    received = len(keeper.media)
    await asyncio.sleep(0.3)
    assert len(keeper.media) > received + 5 and keeper.close_code is None
    await keeper.stop()
    await ended(server)


# ---------------------------------------------------------------------------- the audio adapter


def test_inbound_chunks_are_placed_by_their_timestamps() -> None:
    inbound = MulawInbound()
    for ms in (1000, 1020, 1080, 1060, 1100):  # 1040 lost, 1060 late
        inbound.push(SILENCE, timestamp_ms=ms)
    frames = list(inbound.track._frames)
    assert [f.pts for f in frames] == [0, 160, 640, 800]  # the gap is a jump; the late one dropped
    assert (inbound.gaps, inbound.late, frames[0].sample_rate) == (1, 1, 8000)
    chunked = MulawInbound()
    for chunk in (1, 2, 4):
        chunked.push(SILENCE, chunk=chunk)
    assert [f.pts for f in chunked.track._frames] == [0, 160, 480]


def test_playback_counts_what_a_clear_skipped() -> None:
    p = Playback()
    names = []
    for _ in range(10):
        p.chunk_sent()
        names.append(p.mark())
    assert p.returned(names[3]) and p.played == 640 and p.lag_s == pytest.approx(0.12)
    p.cleared()  # 960 samples still queued: thrown away
    assert (p.skipped, p.played) == (960, 640)
    assert p.returned(names[5]) and p.played == 640  # a clear sends the pending marks back at once
    p.chunk_sent()
    p.cleared()  # a second clear before the first's marks are all back: only the new chunk
    assert p.skipped == 1120 and p.returned(names[9]) and (p.acked, p.played) == (1600, 640)
    p.chunk_sent()
    assert p.returned(p.mark()) and (p.acked, p.played) == (1920, 800)
    assert not p.returned("12345") and not p.returned(None) and p.unknown_marks == 2
