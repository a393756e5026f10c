"""An asyncio client of the Janus WebRTC server's HTTP API: REST requests plus one long poll.

Janus answers synchronous plugin requests (exists, list) in the POST's reply ("success") and
asynchronous ones (join, publish, start) with an "ack" there; their result comes later as an
"event" on the session's long poll, carrying the request's transaction. Every other event on the
long poll (a new publisher, webrtcup, hangup, ...) belongs to a handle, named by its "sender".
Measured against Janus 1.1.2 (shared/notes/telephony-and-sfu.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]

LOST = "lost"  # the "janus" kind of the event every handle's queue gets when its session is gone
EVENT_QUEUE_SIZE = 256
LONG_POLL_S = 30.0  # Janus answers an idle long poll with a keepalive after 30 s
NO_SUCH_SESSION = 458
RETRY_S = 0.5  # between long polls while the server does not answer


class JanusError(Exception):
    """Janus refused a request: ``code`` is Janus' (458 no such session) or the plugin's
    (VideoRoom: 426 no such room, 433 wrong pin, ...); None when Janus gave none."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{reason} (Janus error {code})" if code is not None else reason)
        self.code = code
        self.reason = reason


class JanusUnreachable(JanusError):
    """No HTTP answer from Janus: refused, reset or timed out."""


class JanusSessionLost(JanusError):
    """The session is gone: Janus forgot it (restart, session timeout) or stayed unreachable."""


def _transaction() -> str:
    return secrets.token_hex(8)


def make_jsep(kind: str, sdp: str) -> JsonDict:
    """An offer or answer for Janus. The SDP carries every candidate (aiortc does not trickle):
    "trickle": false tells Janus to expect none later."""
    return {"type": kind, "sdp": sdp, "trickle": False}


def _checked(reply: Any, url: str) -> JsonDict:
    if not isinstance(reply, dict):
        raise JanusError(None, f"Janus at {url} sent no JSON object: {reply!r:.200}")
    if reply.get("janus") == "error":
        error = reply.get("error") or {}
        code, reason = error.get("code"), str(error.get("reason", "unknown error"))
        raise (JanusSessionLost if code == NO_SUCH_SESSION else JanusError)(code, reason)
    return reply


def _plugin_data(reply: JsonDict) -> JsonDict:
    data = (reply.get("plugindata") or {}).get("data")
    if not isinstance(data, dict):
        raise JanusError(None, f"Janus reply without plugin data: {reply!r:.300}")
    # Plugins report failures in their data: VideoRoom as {"videoroom": "event", "error_code", "error"}.
    if "error_code" in data or "error" in data:
        raise JanusError(data.get("error_code"), str(data.get("error", "plugin error")))
    return data


async def _post(http: aiohttp.ClientSession, url: str, body: JsonDict, timeout: float) -> JsonDict:
    try:
        async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raise JanusError(None, f"Janus at {url} answered HTTP {resp.status}")
            reply = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise JanusUnreachable(None, f"Janus at {url} is unreachable ({type(exc).__name__}: {exc})") from exc
    except ValueError as exc:  # not JSON
        raise JanusError(None, f"Janus at {url} sent bad JSON: {exc}") from exc
    return _checked(reply, url)


class JanusSession:
    """One Janus session: its long poll, keepalives and handles. Make it with ``create``."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        session_id: int,
        *,
        timeout: float,
        keepalive_s: float,
        unreachable_s: float,
    ) -> None:
        self.base_url = base_url
        self.id = session_id
        self.url = f"{base_url}/{session_id}"
        self.timeout = timeout
        self.unreachable_s = unreachable_s
        self.lost = asyncio.Event()  # set once, when the session is gone for good
        self.lost_reason: str | None = None
        self._http = http
        self._closed = False
        self._handles: dict[int, JanusHandle] = {}
        self._pending: dict[str, asyncio.Future[JsonDict]] = {}
        self._failing_since: float | None = None
        self._tasks = [
            asyncio.create_task(self._poll(), name=f"janus-poll-{session_id}"),
            asyncio.create_task(self._keepalive(keepalive_s), name=f"janus-keepalive-{session_id}"),
        ]

    @classmethod
    async def create(
        cls, base_url: str, *, timeout: float = 10.0, keepalive_s: float = 25.0, unreachable_s: float = 5.0
    ) -> JanusSession:
        """A new session at ``base_url`` ("http://HOST:8088/janus"). ``unreachable_s``: how long the
        server may not answer before the session counts as lost."""
        base_url = base_url.rstrip("/")
        http = aiohttp.ClientSession()
        try:
            reply = await _post(http, base_url, {"janus": "create", "transaction": _transaction()}, timeout)
            session_id = int(reply["data"]["id"])
        except (KeyError, TypeError, ValueError) as exc:  # a server that is not Janus
            await http.close()
            raise JanusError(None, f"{base_url} did not create a Janus session: {exc!r}") from exc
        except BaseException:
            await http.close()
            raise
        return cls(
            http, base_url, session_id, timeout=timeout, keepalive_s=keepalive_s, unreachable_s=unreachable_s
        )

    @property
    def closed(self) -> bool:
        return self._closed

    async def attach(self, plugin: str = "janus.plugin.videoroom") -> JanusHandle:
        reply = await self._send(self.url, {"janus": "attach", "plugin": plugin}, self.timeout)
        handle = JanusHandle(self, int(reply["data"]["id"]), plugin)
        self._handles[handle.id] = handle
        return handle

    async def destroy(self) -> None:
        """End the session (idempotent). A dead server is fine: Janus drops the session itself
        after its session_timeout. Handle queues get no event: the caller knows it left."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.lost.is_set():
            with contextlib.suppress(JanusError):
                body = {"janus": "destroy", "transaction": _transaction()}
                await _post(self._http, self.url, body, min(self.timeout, 2.0))
        self._fail_pending(JanusSessionLost(None, "the session was destroyed"))
        self._handles.clear()
        await self._http.close()

    async def _send(self, url: str, body: JsonDict, timeout: float) -> JsonDict:
        """POST one request; after an "ack" its result comes on the long poll."""
        if self._closed or self.lost.is_set():
            raise JanusSessionLost(None, self.lost_reason or "the session was destroyed")
        tx = _transaction()
        # Registered before the POST: the long poll may bring the result before the ack arrives.
        waiter: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self._pending[tx] = waiter
        try:
            reply = await _post(self._http, url, {**body, "transaction": tx}, timeout)
            if reply.get("janus") == "ack":
                what = (body.get("body") or {}).get("request") or body.get("janus")
                try:
                    reply = _checked(await asyncio.wait_for(waiter, timeout), url)
                except TimeoutError:
                    raise JanusError(None, f"Janus did not answer {what!r} within {timeout:g} s") from None
            return reply
        except JanusSessionLost as exc:
            self._mark_lost(exc.reason)
            raise
        finally:
            self._pending.pop(tx, None)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: no "never retrieved" warning for a result set too late

    async def _poll(self) -> None:
        timeout = aiohttp.ClientTimeout(total=LONG_POLL_S + self.timeout, connect=self.timeout)
        while not self.lost.is_set():
            url = f"{self.url}?maxev=10&rid={int(time.time() * 1000)}"
            try:
                async with self._http.get(url, timeout=timeout) as resp:
                    if resp.status == 404:  # Janus' bare answer to a poll for a session it does not know
                        self._mark_lost(f"Janus at {self.base_url} no longer knows session {self.id}")
                        return
                    if resp.status != 200:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, resp.history, status=resp.status, message=resp.reason or ""
                        )
                    events = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self._unreachable(exc)
                await asyncio.sleep(RETRY_S)
                continue
            self._failing_since = None
            for event in events if isinstance(events, list) else [events]:
                if isinstance(event, dict):
                    self._dispatch(event)

    async def _keepalive(self, every_s: float) -> None:
        # A long poll does not count as activity for Janus' session_timeout; a keepalive does.
        while not self.lost.is_set():
            await asyncio.sleep(every_s)
            try:
                await _post(
                    self._http, self.url, {"janus": "keepalive", "transaction": _transaction()}, self.timeout
                )
                self._failing_since = None
            except JanusSessionLost as exc:
                self._mark_lost(exc.reason)
            except JanusUnreachable as exc:
                # a server that accepts connections but hangs fails no long poll quickly; this does
                self._unreachable(exc)
            except JanusError as exc:
                log.warning("Janus keepalive failed: %s", exc)

    def _unreachable(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning(
                "Janus at %s does not answer (%s: %s); retrying", self.base_url, type(exc).__name__, exc
            )
        elif now - self._failing_since > self.unreachable_s:
            self._mark_lost(
                f"Janus at {self.base_url} unreachable for {now - self._failing_since:.1f} s: {exc}"
            )

    def _dispatch(self, event: JsonDict) -> None:
        kind = event.get("janus")
        if kind == "keepalive":
            return
        if kind == "timeout":  # Janus dropped the session for inactivity
            self._mark_lost(f"Janus timed out session {self.id}")
            return
        waiter = self._pending.get(str(event.get("transaction")))
        if waiter is not None and kind in ("event", "success", "error"):
            if not waiter.done():
                waiter.set_result(event)
            return
        handle = self._handles.get(event.get("sender"))  # type: ignore[arg-type]
        if handle is not None:
            handle._deliver(event)
        else:
            log.debug("Janus event %r for no handle of ours", kind)

    def _fail_pending(self, error: JanusError) -> None:
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(error)

    def _mark_lost(self, reason: str) -> None:
        if self.lost.is_set() or self._closed:
            return
        log.warning("Janus session %s lost: %s", self.id, reason)
        self.lost_reason = reason
        self._fail_pending(JanusSessionLost(None, reason))
        for handle in self._handles.values():
            handle._deliver({"janus": LOST, "reason": reason})
        self.lost.set()


class JanusHandle:
    """A plugin handle. ``events``: what Janus pushes unasked (a new publisher, "leaving",
    "unpublished", "webrtcup", "media", "slowlink", "hangup", "detached", and ``LOST`` last)."""

    def __init__(self, session: JanusSession, handle_id: int, plugin: str) -> None:
        self.session = session
        self.id = handle_id
        self.plugin = plugin
        self.url = f"{session.url}/{handle_id}"
        self.events: asyncio.Queue[JsonDict] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self.dropped = 0

    def _deliver(self, event: JsonDict) -> None:
        if self.events.full():  # a reader that stalls loses the oldest news, not our memory
            self.events.get_nowait()
            self.dropped += 1
            log.warning("Janus handle %s: event queue full, dropped the oldest event", self.id)
        self.events.put_nowait(event)

    async def request(self, body: JsonDict, timeout: float | None = None) -> JsonDict:
        """A synchronous plugin request (exists, list, listparticipants): the plugin's data."""
        reply = await self.session._send(
            self.url, {"janus": "message", "body": body}, timeout or self.session.timeout
        )
        return _plugin_data(reply)

    async def message(
        self, body: JsonDict, jsep: JsonDict | None = None, timeout: float = 10.0
    ) -> tuple[JsonDict, JsonDict | None]:
        """An asynchronous plugin request (join, publish, configure, start): the data and the
        JSEP of the event that answers it."""
        msg: JsonDict = {"janus": "message", "body": body}
        if jsep is not None:
            msg["jsep"] = {"trickle": False, **jsep}
        reply = await self.session._send(self.url, msg, timeout)
        return _plugin_data(reply), reply.get("jsep")

    async def hangup(self) -> None:
        """Close this handle's PeerConnection on the Janus side; the handle stays."""
        await self.session._send(self.url, {"janus": "hangup"}, self.session.timeout)

    async def detach(self) -> None:
        """Drop the handle (idempotent; errors from a dead server or session are ignored)."""
        if self.session._handles.pop(self.id, None) is None:
            return
        with contextlib.suppress(JanusError):
            await self.session._send(self.url, {"janus": "detach"}, min(self.session.timeout, 5.0))


@dataclass(frozen=True)
class JanusRoomURL:
    """Where a VideoRoom meeting is: ``http_base`` of the Janus HTTP API and the room number."""

    http_base: str
    room: int
    pin: str | None = None
    display: str | None = None


_SCHEMES = {"janus": "http", "janus+http": "http", "janus+https": "https"}
_DEFAULT_PORTS = {"http": 8088, "https": 8089}  # Janus' own defaults
_QUERY_KEYS = ("pin", "display", "base_path")


def parse_janus_url(url: str) -> JanusRoomURL:
    """``janus://HOST[:PORT]/ROOM[?pin=...&display=...&base_path=/janus]`` (also janus+http://,
    janus+https://) as a ``JanusRoomURL``; ValueError saying what is wrong otherwise."""
    parts = urlsplit(url.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"not a Janus room URL (want janus://HOST:PORT/ROOM): {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in Janus URL {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in Janus URL {url!r}: {exc}") from None
    if port == 0:
        raise ValueError(f"bad port in Janus URL {url!r}: 0")
    room = parts.path.strip("/")
    if not room:
        raise ValueError(f"no room in Janus URL {url!r} (want janus://HOST:PORT/ROOM)")
    if not re.fullmatch(r"[0-9]{1,18}", room) or int(room) == 0:
        raise ValueError(f"the Janus room must be a positive integer, not {room!r}, in {url!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if unknown := sorted(set(query) - set(_QUERY_KEYS)):
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} in Janus URL {url!r} (known: {_QUERY_KEYS})"
        )
    base_path = "/" + query.get("base_path", "/janus").strip("/")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return JanusRoomURL(
        http_base=f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}{base_path.rstrip('/')}",
        room=int(room),
        pin=query.get("pin") or None,
        display=query.get("display") or None,
    )
