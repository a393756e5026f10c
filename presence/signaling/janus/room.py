"""Presence as one participant of a Janus VideoRoom.

The bot publishes its voice once, and subscribes to each human publisher on its own, so every
speaker reaches the micro-turn assembler as their own stream with their display name (a
``JanusFeedLink`` per speaker, added to the call like any other ``PeerLink``). New publishers,
leaving ones and a lost Janus session are followed live: a lost session (Janus restarted, the
network went away) is rejoined with back-off, and the call itself (transcript, context) stays,
because a meeting's call outlives an empty room (``CallManager.open_room``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from presence.aio import run_blocking
from presence.clock import now
from presence.media.opus_plc import configure_receiver, configure_sender
from presence.signaling.contract import CallRejected
from presence.signaling.janus.api import (
    LOST,
    JanusError,
    JanusHandle,
    JanusSession,
    JanusSessionLost,
    JanusUnreachable,
    parse_janus_url,
)
from presence.signaling.rooms import RoomJoiner, RoomJoinError, RoomRequest, register_joiner
from presence.signaling.rtc import new_peer_connection

if TYPE_CHECKING:
    from presence.bot.calls import CallManager
    from presence.config import Settings
    from presence.seams import CallEvent

log = logging.getLogger(__name__)

VIDEOROOM = "janus.plugin.videoroom"
# the videoroom's error codes that retrying cannot fix
_FINAL = {426: "no_such_room", 433: "unauthorized", 432: "room_full", 436: "already_joined"}


@dataclass(frozen=True, slots=True)
class MeetingOptions:
    rejoin_first_s: float = 0.5  # back-off after a lost session, doubling ...
    rejoin_max_s: float = 10.0  # ... up to this
    give_up_s: float = 120.0  # a room unreachable this long is left ("lost: ...")
    notes_timeout_s: float = 60.0  # the notes' summary job, at the end


def _data(event: dict[str, Any]) -> dict[str, Any]:
    return event.get("plugindata", {}).get("data", {}) if "plugindata" in event else event


def join_error(exc: Exception) -> RoomJoinError:
    """A Janus failure as the error whoever asked for the join is told about."""
    if isinstance(exc, JanusUnreachable | JanusSessionLost):
        return RoomJoinError("sfu_unreachable", str(exc), retry=True)
    if isinstance(exc, JanusError) and exc.code in _FINAL:
        return RoomJoinError(_FINAL[exc.code], f"Janus refused: {exc.reason} (error {exc.code})", retry=False)
    if isinstance(exc, JanusError):
        return RoomJoinError("janus_error", f"Janus error {exc.code}: {exc.reason}", retry=False)
    return RoomJoinError("join_failed", f"{type(exc).__name__}: {exc}", retry=True)


class JanusFeedLink:
    """One speaker of the room as a ``PeerLink``: the bot's subscription to their feed."""

    transport = "janus"

    def __init__(self, feed: int, display: str, handle: JanusHandle, pc: RTCPeerConnection) -> None:
        self.feed = feed
        self.display = display
        self.handle = handle
        self.pc = pc
        self.audio: MediaStreamTrack | None = None
        self.on_dtmf = None
        self.peer_id = ""

    def play(self, track: MediaStreamTrack) -> None:
        pass  # the bot's voice reaches the room through its one publisher, not per speaker

    def last_heard(self) -> float:
        # A muted speaker sends nothing and is still in the meeting: alive while subscribed;
        # Janus says when they leave.
        return -1e9 if self.pc.connectionState in ("failed", "closed") else now()

    def on_event(self, event: CallEvent) -> None:
        pass  # the room's people see the bot's state in its voice, not in a data channel

    async def transfer(self, target: str) -> bool:
        return False

    async def close(self) -> None:
        await self.pc.close()
        with contextlib.suppress(Exception):
            await self.handle.detach()


class JanusMeeting:
    """Implements ``signaling.rooms.RoomPresence`` for a Janus VideoRoom."""

    def __init__(
        self, manager: CallManager, request: RoomRequest, settings: Settings, options: MeetingOptions
    ) -> None:
        self.manager = manager
        self.request = request
        self.settings = settings
        self.o = options
        self.target = parse_janus_url(request.url)
        self.pin = request.pin or self.target.pin
        self.display = request.display or self.target.display or settings.bot_name
        self.key = f"janus:{self.target.http_base}/{self.target.room}"
        self.call_id = ""
        self.feeds: dict[int, JanusFeedLink] = {}
        self.rejoins = 0
        self.joined_at = 0.0  # bot clock, of the latest (re)join
        self._janus: JanusSession | None = None
        self._publisher: tuple[JanusHandle, RTCPeerConnection] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._reason = ""
        self._leaving = False
        self.notes = ""  # the meeting's notes, once it has ended

    @classmethod
    async def join(
        cls,
        manager: CallManager,
        request: RoomRequest,
        settings: Settings,
        options: MeetingOptions | None = None,
    ) -> JanusMeeting:
        """Join the room (raises ``RoomJoinError``), then follow it in the background."""
        try:
            meeting = cls(manager, request, settings, options or MeetingOptions())
        except ValueError as exc:
            raise RoomJoinError("bad_url", str(exc), retry=False) from exc
        try:
            session = manager.open_room(meeting.key)
        except CallRejected as exc:
            raise RoomJoinError(exc.code, exc.message, retry=exc.status == 503) from exc
        meeting.call_id = session.call_id
        try:
            await meeting._connect()
        except Exception as exc:
            await meeting._disconnect()
            await manager.end(meeting.call_id)
            raise join_error(exc) from exc
        meeting._task = asyncio.get_running_loop().create_task(
            meeting._run(), name=f"janus-{meeting.call_id}"
        )
        return meeting

    # ------------------------------------------------------------------ RoomPresence
    async def wait_closed(self) -> str:
        await self._closed.wait()
        return self._reason

    async def leave(self) -> None:
        if self._leaving:
            await self._closed.wait()
            return
        self._leaving = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._finish("left")

    # ------------------------------------------------------------------ connection
    async def _connect(self) -> None:
        janus = self._janus = await JanusSession.create(self.target.http_base)
        handle = await janus.attach(VIDEOROOM)
        pin = {"pin": self.pin} if self.pin else {}
        joined, _ = await handle.message(
            {
                "request": "join",
                "ptype": "publisher",
                "room": self.target.room,
                "display": self.display,
                **pin,
            }
        )
        s = self.settings
        pc = new_peer_connection(s.ice_servers, s.ice_host_addresses)
        self._publisher = (handle, pc)
        session = self.manager.get(self.call_id)
        if session is None:
            raise RuntimeError("the meeting's call has ended")
        transceiver = pc.addTransceiver(session.voice(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        configure_sender(transceiver, s.opus_fec_loss_pct)
        _, answer = await handle.message(
            {"request": "publish", "audio": True, "video": False},
            jsep={"type": "offer", "sdp": pc.localDescription.sdp},
        )
        if not answer:
            raise JanusError(None, "Janus answered the publish with no SDP")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        self.joined_at = now()
        log.info(
            "meeting %s: joined %s as %r (feed %s), %d publishers there",
            self.call_id, self.key, self.display, joined.get("id"), len(joined.get("publishers", [])),
        )  # fmt: skip
        for publisher in joined.get("publishers", []):
            await self._subscribe(publisher)

    async def _subscribe(self, publisher: dict[str, Any]) -> None:
        feed = int(publisher.get("id", 0))
        display = str(publisher.get("display") or f"participant-{feed}")
        # the bot's own ghost from before a failover carries the bot's name: never listen to it
        if feed in self.feeds or display == self.display or self._janus is None:
            return
        audio = [
            st for st in publisher.get("streams", []) if st.get("type") == "audio" and not st.get("disabled")
        ]
        if publisher.get("streams") is not None and not audio:
            return  # video only (for now): nothing to hear; an "updated" event brings it back
        pin = {"pin": self.pin} if self.pin else {}
        stream: dict[str, Any] = {"feed": feed}
        if audio and audio[0].get("mid") is not None:
            stream["mid"] = audio[0]["mid"]  # audio only: decoding their video would cost a core
        handle = await self._janus.attach(VIDEOROOM)
        s = self.settings
        pc = new_peer_connection(s.ice_servers, s.ice_host_addresses)
        link = JanusFeedLink(feed, display, handle, pc)
        try:
            _, offer = await handle.message(
                {
                    "request": "join",
                    "ptype": "subscriber",
                    "room": self.target.room,
                    "streams": [stream],
                    **pin,
                }
            )
            if not offer:
                raise JanusError(None, f"no offer for feed {feed}")

            @pc.on("track")
            def on_track(track: MediaStreamTrack) -> None:
                if track.kind == "audio" and link.audio is None:
                    link.audio = track

            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "audio":
                    configure_receiver(transceiver.receiver, s.rx_prefetch_packets, conceal=s.opus_plc)
            await pc.setLocalDescription(await pc.createAnswer())
            await handle.message(
                {"request": "start", "room": self.target.room},
                jsep={"type": "answer", "sdp": pc.localDescription.sdp},
            )
            _, link.peer_id = await self.manager.join(link, participant=display, room=self.key)
        except CallRejected as exc:
            log.warning("meeting %s: not listening to %r: %s", self.call_id, display, exc.message)
            await link.close()
            return
        except BaseException:
            await link.close()
            raise
        self.feeds[feed] = link
        log.info("meeting %s: listening to %r (feed %d)", self.call_id, display, feed)

    async def _unsubscribe(self, feed: int) -> None:
        link = self.feeds.pop(feed, None)
        if link is not None:
            log.info("meeting %s: %r left", self.call_id, link.display)
            if not await self.manager.hangup(link.peer_id):
                await link.close()

    async def _disconnect(self) -> None:
        """Drop every subscription, the publisher and the Janus session; the call stays."""
        for feed in list(self.feeds):
            await self._unsubscribe(feed)
        if self._publisher is not None:
            handle, pc = self._publisher
            self._publisher = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handle.request({"request": "leave"}), 2.0)
            await pc.close()
        if self._janus is not None:
            janus, self._janus = self._janus, None
            with contextlib.suppress(Exception):
                await janus.destroy()

    # ------------------------------------------------------------------ following the room
    async def _run(self) -> None:
        reason = "ended"
        try:
            while True:
                try:
                    if await self._follow():
                        break  # the room was destroyed
                except (JanusSessionLost, JanusUnreachable, ConnectionError, OSError, TimeoutError) as exc:
                    log.warning("meeting %s: lost the Janus session (%s); rejoining", self.call_id, exc)
                if not await self._rejoin():
                    reason = f"lost: {self.key} unreachable for {self.o.give_up_s:.0f} s"
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("meeting %s: following the room failed", self.call_id)
            reason = f"lost: {type(exc).__name__}: {exc}"
        self._task = None
        await self._finish(reason)

    async def _follow(self) -> bool:
        """Follow the room's events until the session is lost (raises) or the room goes (True)."""
        assert self._janus is not None and self._publisher is not None
        janus, (handle, pc) = self._janus, self._publisher
        lost = asyncio.ensure_future(janus.lost.wait())
        try:
            while True:
                get = asyncio.ensure_future(handle.events.get())
                done, _ = await asyncio.wait({get, lost}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if lost in done:
                    get.cancel()
                    raise JanusSessionLost(None, "the Janus session was lost")
                if get not in done:
                    get.cancel()
                    if pc.connectionState == "failed":
                        raise JanusSessionLost(None, "the publisher's media connection failed")
                    for feed, link in list(self.feeds.items()):
                        if link.pc.connectionState in ("failed", "closed"):
                            await self._unsubscribe(feed)
                    continue
                event = get.result()
                if event.get("janus") == LOST:
                    raise JanusSessionLost(None, str(event.get("reason") or "the Janus session was lost"))
                data = _data(event)
                if data.get("videoroom") == "destroyed":
                    return True
                for publisher in data.get("publishers", []):
                    await self._subscribe(publisher)
                for key in ("leaving", "unpublished", "kicked"):
                    feed = data.get(key)
                    if isinstance(feed, int):
                        await self._unsubscribe(feed)
        finally:
            lost.cancel()

    async def _rejoin(self) -> bool:
        """Reconnect with back-off; False once ``give_up_s`` has passed."""
        await self._disconnect()
        delay, started = self.o.rejoin_first_s, time.monotonic()
        while time.monotonic() - started < self.o.give_up_s:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except Exception as exc:
                err = join_error(exc)
                log.info("meeting %s: rejoin failed (%s); again in %.1f s", self.call_id, err, delay)
                await self._disconnect()
                if not err.retry:
                    return False
                delay = min(delay * 2, self.o.rejoin_max_s)
                continue
            self.rejoins += 1
            log.info("meeting %s: rejoined after %.1f s", self.call_id, time.monotonic() - started)
            return True
        return False

    async def _finish(self, reason: str) -> None:
        if self._closed.is_set():
            return
        await self._disconnect()
        session = self.manager.get(self.call_id)
        if session is not None:
            self.notes = await session.meeting_notes(self.o.notes_timeout_s)
            await run_blocking(save_notes, self.settings.notes_dir, self.call_id, self.notes)
        await self.manager.end(self.call_id)
        self._reason = reason
        self._closed.set()
        log.info("meeting %s: %s", self.call_id, reason)


def save_notes(folder: str, call_id: str, notes: str) -> None:
    """Write a meeting's notes to ``folder`` (nothing when it is unset)."""
    if not folder:
        return
    path = os.path.join(os.path.expanduser(folder), f"meeting-{call_id}.md")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(notes)
        log.info("meeting %s: notes in %s", call_id, path)
    except OSError as exc:
        log.warning("meeting %s: cannot write the notes to %s: %s", call_id, path, exc)


def janus_joiner(settings: Settings, host: CallManager) -> RoomJoiner:
    """The ``RoomJoiner`` of ``janus://`` rooms for this process's calls."""

    async def join(request: RoomRequest) -> JanusMeeting:
        return await JanusMeeting.join(host, request, settings)

    return join


for _scheme in ("janus", "janus+http", "janus+https"):
    register_joiner(_scheme, janus_joiner)  # type: ignore[arg-type]
