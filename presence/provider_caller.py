"""A phone call as Twilio brings it: the provider's side of a media websocket, for benchmarks
and tests.

``TwilioCaller`` reaches the bot the way a call to a Twilio number does. Twilio's voice webhook
(``POST /twilio/voice``, form-encoded, signed when the caller knows the auth token) answers
TwiML whose ``<Connect><Stream>`` carries the stream's parameters (the one-time stream token);
the caller then opens ``/twilio/stream`` and speaks Twilio Media Streams: ``connected``,
``start``, a ``media`` message of 20 ms of mu-law every 20 ms in real time (the line's silence
between sayings), each ``mark`` sent back, ``stop`` to hang up. The bot's ``media`` are decoded
onto a track its ``Recorder`` reads. It has the ``Caller``'s interface (``connect``, ``say``,
``recorder``, ``hangup``), so ``presence bench latency --transports twilio`` runs the same trials
through it as over WebRTC and SIP.

``StreamClient`` is the part of it that Twilio and Telnyx share (one protocol in two spellings:
``StreamMessages``); the tests drive both providers' streams with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from twilio.request_validator import RequestValidator

from presence.caller import CallError, PlayerTrack, Recorder
from presence.clock import now, sleep_until
from presence.media.audio import resample
from presence.media.provider_stream import CHUNK_SAMPLES, MulawInbound, mulaw_payloads
from presence.seams import OUT_SAMPLE_RATE

CALLER_NUMBER = "+15551230001"
NUMBER = "+15559990000"  # the number called
ACCOUNT_SID = "AC" + "0" * 32
VOICE_PATH = "/twilio/voice"
STREAM_PATH = "/twilio/stream"
SILENCE = base64.b64encode(b"\xff" * CHUNK_SAMPLES).decode()  # 20 ms of mu-law silence


def websocket_url(base: str, path: str) -> str:
    """``path`` at the server ``base`` (http://host:port), as a websocket URL."""
    return base.rstrip("/").replace("http", "ws", 1) + path


# ------------------------------------------------------------------------------ the webhook


def voice_params(number: str = CALLER_NUMBER, call_sid: str | None = None) -> dict[str, str]:
    """What Twilio posts to the voice webhook when ``number`` calls the bot's number."""
    return {
        "AccountSid": ACCOUNT_SID, "ApiVersion": "2010-04-01", "CallSid": call_sid or "CA" + uuid.uuid4().hex,
        "CallStatus": "ringing", "Direction": "inbound", "From": number, "Caller": number,
        "To": NUMBER, "Called": NUMBER,
    }  # fmt: skip


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """The ``X-Twilio-Signature`` Twilio sends with a POST of ``params`` to ``url``."""
    return str(RequestValidator(auth_token).compute_signature(url, dict(params)))


async def post_voice_webhook(
    http: aiohttp.ClientSession, base: str, params: Mapping[str, str], signature: str | None
) -> tuple[int, str, str]:
    """Twilio's POST of a call to the number (form-encoded): status, content type, body."""
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    async with http.post(base.rstrip("/") + VOICE_PATH, data=dict(params), headers=headers) as response:
        return response.status, response.content_type, await response.text()


def twiml_stream(twiml: str) -> tuple[str, dict[str, str]]:
    """The ``<Connect><Stream>`` of a TwiML answer: its URL and its parameters."""
    try:
        stream = ET.fromstring(twiml).find("./Connect/Stream")
    except ET.ParseError:
        stream = None
    if stream is None:
        raise CallError(f"the TwiML connects no stream: {twiml[:200]}")
    params = {str(p.get("name")): str(p.get("value")) for p in stream.findall("Parameter")}
    return str(stream.get("url") or ""), params


# ------------------------------------------------------------------------------ the stream


@dataclass
class StreamMessages:
    """The messages a provider sends on one media stream, spelt and numbered as it does."""

    dialect: str = "twilio"  # "twilio" | "telnyx"
    stream_id: str = field(default_factory=lambda: "MZ" + uuid.uuid4().hex)
    call_ref: str = ""  # the provider's id of the call: Twilio's callSid, Telnyx's call_control_id
    seq: int = 0
    chunks: int = 0  # media messages so far

    def __post_init__(self) -> None:
        if not self.call_ref:
            self.call_ref = ("CA" if self.twilio else "v3:") + uuid.uuid4().hex

    @property
    def twilio(self) -> bool:
        return self.dialect == "twilio"

    def envelope(self, event: str, **body: Any) -> dict[str, Any]:
        self.seq += 1
        message = {"event": event, **body}
        message["sequenceNumber" if self.twilio else "sequence_number"] = str(self.seq)
        message["streamSid" if self.twilio else "stream_id"] = self.stream_id
        return message

    def connected(self) -> dict[str, Any]:
        message = {"event": "connected", "version": "1.0.0"}
        return {**message, "protocol": "Call"} if self.twilio else message

    def start(self, number: str, custom: Mapping[str, str], encoding: str | None = None) -> dict[str, Any]:
        if self.twilio:
            fmt = {"encoding": encoding or "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            start = {
                "accountSid": ACCOUNT_SID, "streamSid": self.stream_id, "callSid": self.call_ref,
                "tracks": ["inbound"], "mediaFormat": fmt, "customParameters": dict(custom),
            }  # fmt: skip
        else:
            fmt = {"encoding": encoding or "PCMU", "sample_rate": 8000, "channels": 1}
            start = {
                "user_id": str(uuid.uuid4()), "call_control_id": self.call_ref, "client_state": "",
                "from": number, "to": NUMBER, "media_format": fmt,
            }  # fmt: skip
            if custom:
                start["custom_parameters"] = [{"name": k, "value": v} for k, v in custom.items()]
        return self.envelope("start", start=start)

    def media(self, payload: str) -> dict[str, Any]:
        """20 ms of the caller's voice: its chunk number and its time (ms since the stream began)."""
        media = {"track": "inbound", "chunk": str(self.chunks + 1), "timestamp": str(self.chunks * 20)}
        self.chunks += 1
        return self.envelope("media", media={**media, "payload": payload})

    def mark(self, name: str) -> dict[str, Any]:
        return self.envelope("mark", mark={"name": name})

    def dtmf(self, digit: str) -> dict[str, Any]:
        key = {"track": "inbound_track", "digit": digit} if self.twilio else {"digit": digit}
        return self.envelope("dtmf", dtmf=key)

    def stop(self) -> dict[str, Any]:
        if self.twilio:
            return self.envelope("stop", stop={"accountSid": ACCOUNT_SID, "callSid": self.call_ref})
        return self.envelope("stop", stop={"call_control_id": self.call_ref})


@dataclass
class StreamClient:
    """The provider's end of one media websocket: the caller's voice from ``player`` paced in
    real time (silence between sayings), the bot's audio decoded onto ``inbound.track``, its
    marks sent back at once (the bot paces its audio, so what came has played), its clears
    noted. Messages that no provider would get (another stream's, unknown events) go to
    ``strays``."""

    url: str  # the websocket's: ws://host:port/twilio/stream
    dialect: str = "twilio"  # "twilio" | "telnyx"
    number: str = CALLER_NUMBER
    echo_marks: bool = True  # send marks back as the provider does once played
    messages: StreamMessages = field(init=False)
    player: PlayerTrack = field(default_factory=PlayerTrack)
    inbound: MulawInbound = field(default_factory=MulawInbound)
    marks: list[str] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)  # arrival of each clear
    strays: list[str] = field(default_factory=list)
    close_code: int | None = None
    _http: aiohttp.ClientSession | None = None
    _ws: aiohttp.ClientWebSocketResponse | None = None
    _heard: asyncio.Event = field(default_factory=asyncio.Event)  # the bot's first media came
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.messages = StreamMessages(self.dialect)

    @property
    def stream_id(self) -> str:
        return self.messages.stream_id

    async def open(self, **kwargs: Any) -> None:
        """Open the websocket (``kwargs`` go to ``ws_connect``) and say ``connected``."""
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(self.url, **kwargs)
        except BaseException:
            await self._http.close()
            raise
        self._tasks.append(asyncio.create_task(self._read()))
        await self.send(self.messages.connected())

    async def send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(message))

    async def start(
        self, token: str | None = None, encoding: str | None = None, custom: Mapping[str, str] | None = None
    ) -> None:
        """Send ``start`` (Twilio's custom parameters: ``from``, the stream ``token`` when
        given, and ``custom``), then the caller's line, 20 ms every 20 ms."""
        params = {"from": self.number} if self.messages.twilio else {}
        params |= dict(custom or {}) | ({"token": token} if token else {})
        await self.send(self.messages.start(self.number, params, encoding))
        self._tasks.append(asyncio.create_task(self._pump()))

    async def speak(self, audio48: np.ndarray) -> None:
        """Say 48 kHz audio and wait until the words are sent."""
        first = await self.player.play(audio48)
        await sleep_until(first + audio48.size / OUT_SAMPLE_RATE)

    async def dtmf(self, digit: str) -> None:
        await self.send(self.messages.dtmf(digit))

    async def answered(self, timeout: float) -> None:
        """Wait for the bot's first audio: the stream joined a call. CallError when the
        websocket closes first (the close code says why) or nothing comes within ``timeout``."""
        waiter = asyncio.ensure_future(self._heard.wait())
        try:
            await asyncio.wait([waiter, self._tasks[0]], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._heard.is_set():
            reason = f"closed ({self.close_code})" if self._tasks[0].done() else f"silent for {timeout:.0f} s"
            raise CallError(f"{self.dialect} stream {self.stream_id}: {reason} before the bot's audio came")

    async def _pump(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            async for payload in mulaw_payloads(self.player):
                if self._ws is None or self._ws.closed:
                    return
                await self.send(self.messages.media(payload))

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            try:
                data = json.loads(msg.data)
                await self._receive(data)
            except (ValueError, TypeError, KeyError, AttributeError):
                self.strays.append(str(msg.data)[:200])
        self.close_code = self._ws.close_code

    async def _receive(self, data: dict[str, Any]) -> None:
        if self.messages.twilio and data.get("streamSid") != self.stream_id:
            self.strays.append(json.dumps(data)[:200])
        event = data.get("event")
        if event == "media":
            self.on_media(data["media"]["payload"])
            self._heard.set()
        elif event == "mark":
            name = str(data["mark"]["name"])
            self.marks.append(name)
            if self.echo_marks:  # at once: the server paces its audio, so what came has played
                await self.send(self.messages.mark(name))
        elif event == "clear":
            self.clears.append(now())  # nothing to drop: nothing is buffered here
        else:
            self.strays.append(json.dumps(data)[:200])

    def on_media(self, payload: str) -> None:
        """20 ms of the bot's voice."""
        self.inbound.push(payload)

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait until the server closes the websocket; its close code."""
        await asyncio.wait_for(asyncio.shield(self._tasks[0]), timeout)
        return self.close_code

    async def stop(self) -> None:
        """Send ``stop`` (the call hung up) and close."""
        with contextlib.suppress(Exception):
            if self._ws is not None and not self._ws.closed:
                await self.send(self.messages.stop())
                await self._ws.close()
        self.player.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.inbound.close()
        if self._http is not None:
            await self._http.close()


@dataclass
class TwilioCaller:
    """A call to the bot's Twilio number, as Twilio brings it: the webhook, then the stream."""

    url: str  # the server: http://127.0.0.1:8080
    auth_token: str = ""  # the server's twilio_auth_token: sign the webhook with it (none: unsigned)
    number: str = CALLER_NUMBER
    recorder: Recorder = field(default_factory=Recorder)
    stream: StreamClient = field(init=False)
    twiml: str = ""  # what the webhook answered

    def __post_init__(self) -> None:
        self.stream = StreamClient(websocket_url(self.url, STREAM_PATH), "twilio", self.number)

    @property
    def player(self) -> PlayerTrack:
        return self.stream.player

    @property
    def clears(self) -> int:
        """Clears the bot sent (each a barge-in that emptied the playback buffer)."""
        return len(self.stream.clears)

    @property
    def marks(self) -> int:
        return len(self.stream.marks)

    async def connect(self, timeout: float = 20.0) -> None:
        """Call the number: the webhook's TwiML, then the stream it names (at this server's
        address: the TwiML's is the public one), until the bot's first audio comes."""
        params = voice_params(self.number, self.stream.messages.call_ref)
        url = self.url.rstrip("/") + VOICE_PATH
        signature = twilio_signature(self.auth_token, url, params) if self.auth_token else None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            status, _, self.twiml = await post_voice_webhook(http, self.url, params, signature)
        if status != 200:
            raise CallError(f"the voice webhook answered HTTP {status}: {self.twiml[:200]}")
        _, custom = twiml_stream(self.twiml)
        await asyncio.wait_for(self.stream.open(), timeout)
        try:
            self.recorder.attach(self.stream.inbound.track)
            await self.stream.start(custom=custom)
            await self.stream.answered(timeout)
        except BaseException:
            await self.hangup()
            raise

    def say(self, audio: np.ndarray, rate: int) -> asyncio.Future[float]:
        """Start sending a clip now (after what is queued); resolves to its first-sample time."""
        return self.player.play(resample(audio, rate, OUT_SAMPLE_RATE))

    async def hangup(self) -> None:
        await self.recorder.stop()
        await self.stream.stop()
