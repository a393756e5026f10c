"""Phone numbers at Twilio and Telnyx: their media websockets, played by test clients that
speak each provider's documented messages over real aiohttp websockets to a real server.

The callers' voices are piper's, sent as 20 ms mu-law chunks in real time; what a caller heard
is the bot's media messages, decoded and transcribed by the offline whisper.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc.codecs.g711 import PcmuDecoder, PcmuEncoder
from aiortc.jitterbuffer import JitterFrame
from conftest import BotServer, bot_heard, heard_as, rms
from twilio.request_validator import RequestValidator

from presence.bot.session import CallSession
from presence.events import Ev
from presence.media.audio import make_frame, resample
from presence.media.provider_stream import MulawInbound, Playback
from presence.seams import SAMPLE_RATE
from presence.signaling import tokens
from presence.signaling.provider_link import ProviderLink

pytestmark = pytest.mark.slow

AUTH_TOKEN = "test-twilio-auth-token"
SECRET = "provider-test-secret-" + "x" * 32
CALLER = "+15551230001"


def mulaw_chunks(audio48: np.ndarray) -> list[str]:
    """48 kHz float speech as base64 mu-law payloads of 20 ms, as a phone network sends them."""
    encoder = PcmuEncoder()
    n = audio48.size // 960 * 960
    out: list[str] = []
    for i in range(0, n, 960):
        payloads, _ = encoder.encode(make_frame(audio48[i : i + 960], i))
        out += [base64.b64encode(p).decode() for p in payloads]
    return out


SILENCE = mulaw_chunks(np.zeros(960 * 3, np.float32))[-1]


def decode(payloads: list[str]) -> np.ndarray:
    """The bot's media payloads as 8 kHz float audio."""
    decoder = PcmuDecoder()
    parts = []
    for p in payloads:
        for frame in decoder.decode(JitterFrame(base64.b64decode(p), 0)):
            parts.append(frame.to_ndarray().reshape(-1).astype(np.float32) / 32768)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


@dataclass
class Client:
    """A provider's side of one call: Twilio's or Telnyx's messages, a caller's voice paced in
    real time (silence between sayings), the bot's media, marks and clears as they come."""

    url: str
    dialect: str  # "twilio" | "telnyx"
    echo_marks: bool = True  # send marks back as the provider does once played
    stream_id: str = field(default_factory=lambda: "MZ" + uuid.uuid4().hex)
    media: list[tuple[float, str]] = field(default_factory=list)  # (arrival, payload)
    marks: list[str] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    close_code: int | None = None
    _http: aiohttp.ClientSession | None = None
    _ws: aiohttp.ClientWebSocketResponse | None = None
    _voice: deque[str] = field(default_factory=deque)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _seq: int = 0
    _sent: int = 0

    @property
    def twilio(self) -> bool:
        return self.dialect == "twilio"

    async def connect(self, **kwargs: Any) -> Client:
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(self.url, **kwargs)
        except BaseException:
            await self._http.close()
            raise
        self._tasks.append(asyncio.create_task(self._read()))
        await self.send({"event": "connected", "version": "1.0.0"})
        return self

    def _envelope(self, event: str, **body: Any) -> dict[str, Any]:
        self._seq += 1
        msg = {"event": event, **body}
        msg["sequenceNumber" if self.twilio else "sequence_number"] = str(self._seq)
        msg["streamSid" if self.twilio else "stream_id"] = self.stream_id
        return msg

    async def send(self, msg: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(msg))

    async def start(self, token: str | None = None, encoding: str | None = None) -> None:
        if self.twilio:
            custom = {"from": CALLER} | ({"token": token} if token else {})
            fmt = {"encoding": encoding or "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            start = {
                "accountSid": "AC" + "0" * 32, "streamSid": self.stream_id, "callSid": "CA" + uuid.uuid4().hex,
                "tracks": ["inbound"], "mediaFormat": fmt, "customParameters": custom,
            }  # fmt: skip
        else:
            fmt = {"encoding": encoding or "PCMU", "sample_rate": 8000, "channels": 1}
            start = {
                "user_id": str(uuid.uuid4()), "call_control_id": "v3:" + uuid.uuid4().hex, "client_state": "",
                "from": CALLER, "to": "+15559990000", "media_format": fmt,
            }  # fmt: skip
        await self.send(self._envelope("start", start=start))
        self._tasks.append(asyncio.create_task(self._pump()))

    def media_message(self, payload: str) -> dict[str, Any]:
        chunk = self._sent + 1
        media = {
            "track": "inbound",
            "chunk": str(chunk),
            "timestamp": str(self._sent * 20),
            "payload": payload,
        }
        self._sent += 1
        return self._envelope("media", media=media)

    async def _pump(self) -> None:
        """20 ms of the caller's voice (or silence) every 20 ms, on the wall clock."""
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionError, RuntimeError):
            while self._ws is not None and not self._ws.closed:
                payload = self._voice.popleft() if self._voice else SILENCE
                await self.send(self.media_message(payload))
                await asyncio.sleep(max(0.0, t0 + self._sent * 0.02 - time.monotonic()))

    async def say(self, audio48: np.ndarray) -> None:
        """Speak and wait until the words are sent."""
        self._voice.extend(mulaw_chunks(audio48))
        while self._voice:
            await asyncio.sleep(0.02)

    async def dtmf(self, digit: str) -> None:
        dtmf = {"track": "inbound_track", "digit": digit} if self.twilio else {"digit": digit}
        await self.send(self._envelope("dtmf", dtmf=dtmf))

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if self.twilio:
                assert data.get("streamSid") == self.stream_id, data
            if data["event"] == "media":
                self.media.append((time.monotonic(), data["media"]["payload"]))
            elif data["event"] == "mark":
                self.marks.append(data["mark"]["name"])
                if self.echo_marks:  # at once: the server paces its audio, so sent is played
                    await self.send(self._envelope("mark", mark={"name": data["mark"]["name"]}))
            elif data["event"] == "clear":
                self.clears.append(time.monotonic())
        self.close_code = self._ws.close_code

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait until the server closes the websocket; its close code."""
        assert self._ws is not None
        await asyncio.wait_for(asyncio.shield(self._tasks[0]), timeout)
        return self.close_code

    def heard(self, after: float = 0.0) -> np.ndarray:
        return decode([p for t, p in self.media if t >= after])

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self._ws is not None and not self._ws.closed:
                await self.send(self._envelope("stop", stop={}))
                await self._ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()


def ws_url(server: BotServer, path: str) -> str:
    return server.url.replace("http", "ws", 1) + path


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
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/twilio/voice", data=params, headers=headers) as response:
            return Answer(response.status, response.content_type, await response.text())


def signed(server: BotServer, params: dict[str, str]) -> str:
    return RequestValidator(AUTH_TOKEN).compute_signature(server.url + "/twilio/voice", params)


async def twilio_token(server: BotServer) -> str:
    """A call to the number: the signed webhook's TwiML, its stream URL and one-time token."""
    params = {"CallSid": "CA" + uuid.uuid4().hex, "From": CALLER, "To": "+15559990000"}
    response = await webhook(server, params, signed(server, params))
    assert response.status == 200 and response.content_type == "text/xml", response
    stream = ET.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == ws_url(server, "/twilio/stream")
    values = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
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
        await client.say(speech("What is your name?"))
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
        await client.say(speech("Wait, stop. I have a question."))
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
                await client.send(client.media_message(SILENCE))
                return await client.closed()
            if kind == "wrong format":
                await client.start(encoding="audio/x-alaw")
                return await client.closed()
            await client.start()
            await joined(server, client)
            assert client._ws is not None
            if kind == "not JSON":
                await client._ws.send_str("{nope")
            elif kind == "binary":
                await client._ws.send_bytes(b"\x00\x01")
            elif kind == "unknown event":
                await client.send(client._envelope("surprise"))
            elif kind == "oversized":
                await client.send(client.media_message("A" * 70_000))
            elif kind == "bad payload":
                await client.send(client.media_message("!!not base64!!"))
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
