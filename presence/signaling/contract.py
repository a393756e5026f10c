"""What signaling needs from the bot side: the seam between HTTP and call sessions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import MediaStreamTrack

    from presence.seams import CallEvent


class CallRejected(Exception):
    """The offer cannot be answered; ``status`` is the HTTP status signaling should send."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class JoinOptions:
    """How a participant takes part, beyond who they are and which room."""

    language: str | None = None  # the language they speak and hear: the room gets an interpreter
    original: bool = True  # with an interpreter: also hear the other speakers' own voices, ducked


PLAIN = JoinOptions()  # no language declared, the others' voices heard


@dataclass(frozen=True, slots=True)
class Answer:
    call_id: str  # the session (one per room)
    peer_id: str  # this participant's peer connection; the WHIP resource id
    sdp: str
    type: str = "answer"


class CallHost(Protocol):
    """Implemented by ``presence.bot.calls.CallManager``."""

    @property
    def active_calls(self) -> int: ...

    async def answer(
        self, sdp: str, *, participant: str, room: str | None, options: JoinOptions = PLAIN
    ) -> Answer:
        """Answer an offer (raises CallRejected for a bad offer or when full)."""
        ...

    async def join(
        self, link: PeerLink, *, participant: str, room: str | None, options: JoinOptions = PLAIN
    ) -> tuple[str, str]:
        """Add a participant whose transport is connected already (a SIP call, a provider's
        media stream) to a call, a new one when ``room`` is None: (call id, peer id)."""
        ...

    async def hangup(self, peer_id: str) -> bool:
        """Hang one peer up; False when it is unknown or already gone."""
        ...

    def peer_connection(self, peer_id: str) -> RTCPeerConnection | None:
        """A live WebRTC peer's connection (to add the ICE candidates a client trickles);
        None when the peer is unknown, gone, or not on WebRTC."""
        ...

    async def renegotiate(self, peer_id: str, sdp: str) -> Answer:
        """Answer a new offer on a live WebRTC peer's own connection; CallRejected 404 when
        there is no such peer, 409 when the offer restarts ICE (aiortc cannot)."""
        ...

    async def close(self) -> None: ...


class PeerLink(Protocol):
    """One participant's connection to a call, whatever carries it: a WebRTC peer connection,
    a SIP dialog with its RTP, a provider's media websocket. The session reads the caller's
    audio from ``audio``, hands the bot's voice to ``play`` and every call event to
    ``on_event``; it never needs to know which transport it holds."""

    transport: str  # "webrtc" | "sip" | "twilio" | "telnyx": echo_cancel=auto and logs read it
    on_dtmf: Callable[[str, float], None] | None  # set by the session: (digit, bot-clock time)

    @property
    def audio(self) -> MediaStreamTrack | None:
        """The participant's voice as decoded audio frames (None until it arrives)."""
        ...

    def play(self, track: MediaStreamTrack) -> None:
        """Send the bot's voice: ``track`` yields paced 20 ms, 48 kHz mono frames."""
        ...

    def last_heard(self) -> float:
        """When media last arrived from the participant (the watchdog ends silent links)."""
        ...

    def on_event(self, event: CallEvent) -> None:
        """A call event: a page shows it, a provider's stream clears its playback on a flush."""
        ...

    async def transfer(self, target: str) -> bool:
        """Hand the participant over to ``target`` (a SIP URI of a person); False when this
        transport cannot, or the far end refused."""
        ...

    async def close(self) -> None:
        """Hang up and release the link's sockets and tasks; idempotent."""
        ...
