"""The call manager: answers offers, keeps sessions by room, hangs peers up, ends calls."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from presence.bot.backends.factory import Backends
from presence.bot.jobs.bridge import JobBridge
from presence.bot.session import CallSession
from presence.config import Settings
from presence.signaling.contract import PLAIN, Answer, CallRejected, JoinOptions, PeerLink
from presence.signaling.metrics import Metrics

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

log = logging.getLogger(__name__)
T = TypeVar("T")


class CallManager:
    """Implements ``signaling.contract.CallHost``."""

    def __init__(
        self,
        settings: Settings,
        backends: Backends,
        metrics: Metrics | None = None,
        jobs: JobBridge | None = None,
    ) -> None:
        self.settings = settings
        self.backends = backends
        self.jobs = jobs
        self.metrics = metrics if metrics is not None else Metrics.create(lambda: self.active_calls)
        if settings.policy == "model":
            from presence.model.scheduler import BatchSizeCollector

            self.metrics.registry.register(BatchSizeCollector())  # type: ignore[arg-type]
        self.sessions: dict[str, CallSession] = {}  # call id -> session
        self._rooms: dict[str, CallSession] = {}
        self._peers: dict[str, CallSession] = {}  # peer id -> session
        self.ended: list[str] = []

    @property
    def active_calls(self) -> int:
        return len(self.sessions)

    def get(self, call_id: str) -> CallSession | None:
        return self.sessions.get(call_id)

    async def answer(
        self, sdp: str, *, participant: str, room: str | None, options: JoinOptions = PLAIN
    ) -> Answer:
        session = self._session_for(room)
        answer = await self._admit(session, session.add_peer(sdp, participant, options))
        self._peers[answer.peer_id] = session
        log.info("call %s: %s joined (peer %s, room %s)", session.call_id, participant, answer.peer_id, room)
        return answer

    async def join(
        self, link: PeerLink, *, participant: str, room: str | None, options: JoinOptions = PLAIN
    ) -> tuple[str, str]:
        """A participant whose transport is connected already (a SIP call, a provider's
        media stream): (call id, peer id). Raises CallRejected like ``answer``."""
        session = self._session_for(room)
        peer_id = await self._admit(session, session.add_link(link, participant, options))
        self._peers[peer_id] = session
        log.info(
            "call %s: %s joined over %s (peer %s)", session.call_id, participant, link.transport, peer_id
        )
        return session.call_id, peer_id

    async def _admit(self, session: CallSession, joining: Awaitable[T]) -> T:
        """Await a participant's joining; a refused first participant leaves no empty call."""
        try:
            return await joining
        except CallRejected:
            if not session.peers:
                await self._ended(session)
            raise

    def _session_for(self, room: str | None) -> CallSession:
        session = self._rooms.get(room) if room else None
        if session is None:
            if self.active_calls >= self.settings.max_calls:
                raise CallRejected(
                    503, "busy", f"all {self.settings.max_calls} call slots are taken; try later"
                )
            call_id = uuid.uuid4().hex[:16]
            session = CallSession(
                call_id, room, self.settings, self.backends, self.metrics, self._ended, self.jobs
            )
            self.sessions[call_id] = session
            if room:
                self._rooms[room] = session
        return session

    def open_room(self, room: str) -> CallSession:
        """The call of a meeting the bot joins on an SFU: it lives until ``end`` (an empty
        meeting is not over), and its participants arrive through ``join``."""
        session = self._session_for(room)
        session.as_meeting()
        return session

    async def end(self, call_id: str) -> bool:
        """End a call and release everything it holds; False when it is unknown."""
        session = self.sessions.get(call_id)
        if session is None:
            return False
        await self._ended(session)
        return True

    def peer_connection(self, peer_id: str) -> RTCPeerConnection | None:
        session = self._peers.get(peer_id)
        return session.peer_connection(peer_id) if session is not None else None

    async def renegotiate(self, peer_id: str, sdp: str) -> Answer:
        session = self._peers.get(peer_id)
        if session is None:
            raise CallRejected(404, "unknown_peer", "no such peer connection (or it has hung up)")
        return await session.renegotiate(peer_id, sdp)

    async def hangup(self, peer_id: str) -> bool:
        session = self._peers.pop(peer_id, None)
        if session is None:
            return False
        return await session.remove_peer(peer_id)

    async def _ended(self, session: CallSession) -> None:
        if session.call_id not in self.sessions or session.closed:
            return
        await session.close()  # first: a call is gone from the list only once it is released
        self.sessions.pop(session.call_id, None)
        if session.room and self._rooms.get(session.room) is session:
            del self._rooms[session.room]
        for peer_id in [p for p, s in self._peers.items() if s is session]:
            del self._peers[peer_id]
        self.ended.append(session.call_id)
        del self.ended[:-100]
        log.info("call %s ended", session.call_id)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            await self._ended(session)
        if self.jobs is not None:
            await self.jobs.close()
