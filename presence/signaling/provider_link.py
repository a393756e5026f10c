"""One phone call from a provider's media websocket (Twilio, Telnyx) as a ``PeerLink``.

Both providers speak one protocol in two spellings (``Dialect``): ``connected``, ``start``,
``media``, ``dtmf``, ``mark``, ``stop`` in; ``media``, ``mark``, ``clear`` out. The link joins
the call at ``start`` and reads the websocket until it ends. A barge-in (``playback_flushed``)
sends ``clear``, which empties the provider's playback buffer; a ``mark`` goes out every
``MARK_EVERY`` chunks and the provider returns it once the audio before it has played, so the
returned marks are the caller's playback position (``played_samples``, ``lag_s``).

Anything malformed (not JSON, binary, an unknown event, media before ``start``, another audio
format, a frame over the websocket's size limit) closes that websocket with the reason logged
and hangs that participant up, nobody else. The websocket's end (or ``stop``) hangs the
participant up; the call's end closes the websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiortc.mediastreams import MediaStreamTrack

from presence.clock import now
from presence.events import Ev
from presence.media.provider_stream import MulawInbound, PayloadError, Playback, mulaw_payloads
from presence.media.rtp import DTMF_EVENTS
from presence.seams import CallEvent
from presence.signaling.contract import CallHost, CallRejected

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0  # a websocket that sends no start by then is let go
MARK_EVERY = 5  # chunks (100 ms) between marks: the precision of the playback position
EVENTS = frozenset({"connected", "start", "media", "dtmf", "mark", "stop"})
INBOUND_TRACKS = frozenset({"inbound", "inbound_track"})  # "outbound" is the bot's own audio echoed


@dataclass(frozen=True, slots=True)
class Dialect:
    """One provider's names for the same protocol."""

    transport: str  # the PeerLink's transport
    stream_id: str
    call_ref: str  # the provider's id of the phone call, for logs
    media_format: str
    sample_rate: str
    encoding: str  # 8 kHz mu-law, as the provider spells it
    custom: str  # the stream's custom parameters in ``start``
    stream_id_out: bool  # whether what we send must name the stream
    events: frozenset[str] = EVENTS


TWILIO = Dialect(
    "twilio", "streamSid", "callSid", "mediaFormat", "sampleRate", "audio/x-mulaw", "customParameters", True
)
TELNYX = Dialect(
    "telnyx", "stream_id", "call_control_id", "media_format", "sample_rate", "PCMU", "custom_parameters",
    False, EVENTS | {"error"},
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Grant:
    """Who a stream may join as: from the webhook's ticket or the stream's join token."""

    participant: str | None  # the caller's number, when known
    room: str | None


class Refusal(Exception):
    """Close the websocket with ``code``; ``reason`` goes to the log and the close frame."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Admit = Callable[[Mapping[str, Any], Mapping[str, str]], Grant]  # (start body, custom parameters)


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    with contextlib.suppress(TypeError, ValueError, OverflowError):  # JSON allows Infinity
        return int(value)  # type: ignore[call-overload, no-any-return]
    return None


def _params(raw: object) -> dict[str, str]:
    """Custom parameters: an object (Twilio) or a list of {name, value} (Telnyx's API shape)."""
    if isinstance(raw, list):
        raw = {str(p.get("name")): p.get("value") for p in raw if isinstance(p, dict)}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


class ProviderLink:
    """One provider call as a ``PeerLink``: its media websocket, read by ``serve``."""

    def __init__(self, ws: web.WebSocketResponse, dialect: Dialect, host: CallHost) -> None:
        self.ws = ws
        self.dialect = dialect
        self.host = host
        self.transport = dialect.transport
        self.on_dtmf: Callable[[str, float], None] | None = None
        self.inbound = MulawInbound()
        self.playback = Playback()
        self.stream_id = ""
        self.call_ref = ""
        self.call_id = ""
        self.peer_id = ""  # set once joined
        self.closed_because = ""  # why we closed the websocket, when we did
        self.last_media_at = now()
        self._clear = False  # a clear is due before the next chunk
        self._send_task: asyncio.Task[None] | None = None
        self._closed = False

    def __str__(self) -> str:
        return f"{self.transport} stream {self.stream_id or '-'}"

    # ------------------------------------------------------------------ PeerLink
    @property
    def audio(self) -> MediaStreamTrack:
        return self.inbound.track

    def play(self, track: MediaStreamTrack) -> None:
        if self._closed:
            return
        if self._send_task is not None:
            self._send_task.cancel()
        self._send_task = asyncio.create_task(self._send(track), name=f"{self.transport}-send")

    def last_heard(self) -> float:
        return self.last_media_at

    def on_event(self, event: CallEvent) -> None:
        if event.name == Ev.PLAYBACK_FLUSHED:
            self._clear = True  # the sender sends it before the next chunk: within 20 ms

    async def transfer(self, target: str) -> bool:
        return False  # a provider's call is moved with its REST API, which the bot does not hold

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._send_task is not None and self._send_task is not asyncio.current_task():
            self._send_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._send_task
        self.inbound.close()
        if not self.ws.closed:
            await self.ws.close()

    @property
    def played_samples(self) -> int:
        """8 kHz samples of the bot's voice the caller has heard: the playback position the
        provider's returned marks confirm (what a ``clear`` skipped not counted)."""
        return self.playback.played

    @property
    def lag_s(self) -> float:
        """Seconds of the bot's voice sent but not yet confirmed played."""
        return self.playback.lag_s

    # ------------------------------------------------------------------ websocket in
    async def serve(self, admit: Admit) -> None:
        """Read the websocket until it ends, then let the participant go."""
        try:
            await self._read(admit)
        except Refusal as exc:
            self.closed_because = exc.reason
            log.warning("%s (call %s): closed (%d): %s", self, self.call_ref or "-", exc.code, exc.reason)
            await self.ws.close(code=exc.code, message=exc.reason.encode()[:120])
        except Exception:
            log.exception("%s failed", self)
            await self.ws.close(code=WSCloseCode.INTERNAL_ERROR)
        finally:
            if not (self.peer_id and await self.host.hangup(self.peer_id)):
                await self.close()

    async def _read(self, admit: Admit) -> None:
        while True:
            try:
                msg = await self.ws.receive(timeout=None if self.peer_id else START_TIMEOUT_S)
            except TimeoutError:
                raise Refusal(
                    WSCloseCode.POLICY_VIOLATION, f"no start within {START_TIMEOUT_S:.0f} s"
                ) from None
            if msg.type is WSMsgType.TEXT:
                if not await self._message(msg.data, admit):
                    return
            elif msg.type is WSMsgType.BINARY:
                raise Refusal(WSCloseCode.UNSUPPORTED_DATA, "a binary frame: the protocol is JSON text")
            else:
                if msg.type is WSMsgType.ERROR:  # aiohttp closed it already (1009 for a frame too big)
                    self.closed_because = str(msg.data)
                    log.warning("%s (call %s): closed: %s", self, self.call_ref or "-", msg.data)
                return

    async def _message(self, text: str, admit: Admit) -> bool:
        """Handle one message; False once the stream has stopped."""
        try:
            data = json.loads(text)
        except ValueError:
            raise Refusal(WSCloseCode.UNSUPPORTED_DATA, "a frame that is not JSON") from None
        if not isinstance(data, dict):
            raise Refusal(WSCloseCode.UNSUPPORTED_DATA, "a frame that is not a JSON object")
        event = data.get("event")
        if event not in self.dialect.events:
            raise Refusal(WSCloseCode.POLICY_VIOLATION, f"unknown event {str(event)[:40]!r}")
        if event == "stop":
            log.info("%s (call %s): stop", self, self.call_ref or "-")
            return False
        if event == "connected":
            return True
        if event == "error":  # Telnyx reports a failure of its own; the stream may go on
            log.warning("%s: the provider reports %s", self, str(data.get("payload"))[:200])
            return True
        if event == "start":
            if self.peer_id:
                raise Refusal(WSCloseCode.POLICY_VIOLATION, "a second start")
            await self._start(data, admit)
        elif not self.peer_id:
            raise Refusal(WSCloseCode.POLICY_VIOLATION, f"{event} before start")
        elif event == "media":
            self._media(data.get("media"))
        elif event == "dtmf":
            self._dtmf(data.get("dtmf"))
        elif event == "mark":
            mark = data.get("mark")
            if not self.playback.returned(mark.get("name") if isinstance(mark, dict) else None):
                log.debug("%s: a mark we did not send: %s", self, str(mark)[:80])
        return True

    async def _start(self, data: dict[str, Any], admit: Admit) -> None:
        from presence.signaling.app import _pick_name

        d = self.dialect
        body = data.get("start")
        if not isinstance(body, dict):
            raise Refusal(WSCloseCode.POLICY_VIOLATION, "a start without its start object")
        self.stream_id = str(data.get(d.stream_id) or body.get(d.stream_id) or "")[:64]
        self.call_ref = str(body.get(d.call_ref) or "")[:128]
        fmt = body.get(d.media_format)
        fmt = fmt if isinstance(fmt, dict) else {}
        got = (str(fmt.get("encoding"))[:40], _int(fmt.get(d.sample_rate)), _int(fmt.get("channels", 1)))
        if (got[0].lower(), got[1], got[2]) != (d.encoding.lower(), 8000, 1):
            raise Refusal(
                WSCloseCode.UNSUPPORTED_DATA, f"media format {got}: only ({d.encoding!r}, 8000, 1) is taken"
            )
        custom = _params(body.get(d.custom))
        grant = admit(body, custom)
        number = grant.participant or body.get("from") or custom.get("from")
        name = _pick_name(number if isinstance(number, str) else None, None, default="caller")
        try:
            self.call_id, self.peer_id = await self.host.join(self, participant=name, room=grant.room)
        except CallRejected as exc:
            busy = exc.status == 503
            code = WSCloseCode.TRY_AGAIN_LATER if busy else WSCloseCode.POLICY_VIOLATION
            raise Refusal(code, f"the call was refused: {exc.message}") from None
        log.info("%s (call %s): %s joined call %s", self, self.call_ref or "-", name, self.call_id)

    def _media(self, media: object) -> None:
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            raise Refusal(WSCloseCode.POLICY_VIOLATION, "a media message without a payload")
        if media.get("track", "inbound") not in INBOUND_TRACKS:
            return
        try:
            self.inbound.push(media["payload"], _int(media.get("timestamp")), _int(media.get("chunk")))
        except PayloadError as exc:
            raise Refusal(WSCloseCode.UNSUPPORTED_DATA, str(exc)) from None
        self.last_media_at = now()

    def _dtmf(self, dtmf: object) -> None:
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not (isinstance(digit, str) and len(digit) == 1 and digit.upper() in DTMF_EVENTS):
            log.info("%s: a dtmf event without a key: %s", self, str(dtmf)[:80])
            return
        if self.on_dtmf is not None:
            self.on_dtmf(digit.upper(), now())

    # ------------------------------------------------------------------ websocket out
    async def _send(self, track: MediaStreamTrack) -> None:
        chunks = 0
        try:
            async for payload in mulaw_payloads(track):
                if self.ws.closed:
                    return
                if self._clear:
                    self._clear = False
                    await self._out({"event": "clear"})
                    self.playback.cleared()
                await self._out({"event": "media", "media": {"payload": payload}})
                self.playback.chunk_sent()
                chunks += 1
                if chunks % MARK_EVERY == 0:
                    await self._out({"event": "mark", "mark": {"name": self.playback.mark()}})
        except ConnectionError:
            log.debug("%s: the websocket went while sending", self)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: sending failed", self)

    async def _out(self, message: dict[str, Any]) -> None:
        if self.dialect.stream_id_out:
            message[self.dialect.stream_id] = self.stream_id
        await self.ws.send_str(json.dumps(message, separators=(",", ":")))
