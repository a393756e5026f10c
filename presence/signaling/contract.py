"""What signaling needs from the bot side: the seam between HTTP and call sessions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class CallRejected(Exception):
    """The offer cannot be answered; ``status`` is the HTTP status signaling should send."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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

    async def answer(self, sdp: str, *, participant: str, room: str | None) -> Answer:
        """Answer an offer (raises CallRejected for a bad offer or when full)."""
        ...

    async def hangup(self, peer_id: str) -> bool:
        """Hang one peer up; False when it is unknown or already gone."""
        ...

    async def close(self) -> None: ...
