"""The seam between "join this meeting" requests and the code that joins a room on an SFU.

A :class:`RoomJoiner` takes a :class:`RoomRequest` and returns a :class:`RoomPresence` once the
bot is in the room, or raises :class:`RoomJoinError`. Joiners are registered per URL scheme in
:data:`JOINERS` (``register_joiner("janus", factory)``); ``factory(settings, host)`` is called
once per server when ``rooms`` is on. Every node that takes room requests must register the
same schemes: a node given a URL it has no joiner for fails that request.

A joiner must clean up when its coroutine is cancelled (the request was left, or the node is
shutting down, while it was joining).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from presence.config import Settings
    from presence.signaling.contract import CallHost

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")
MAX_URL_CHARS = 2048
MAX_PIN_CHARS = 128
MAX_DISPLAY_CHARS = 64


@dataclass(frozen=True, slots=True)
class RoomRequest:
    id: str  # request id (uuid hex)
    url: str  # e.g. "janus://10.77.0.1:8088/1234"
    pin: str = ""
    display: str = ""  # the bot's display name in the room; "" = settings.bot_name (the joiner's call)

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0].lower()

    def to_fields(self) -> dict[str, str]:
        return {"id": self.id, "url": self.url, "pin": self.pin, "display": self.display}

    @classmethod
    def from_fields(cls, fields: dict) -> RoomRequest:  # type: ignore[type-arg]
        """A request from a stream entry's fields; ValueError says what is wrong with junk."""
        if not isinstance(fields, dict):
            raise ValueError("a room request must be a mapping of fields")
        values = {}
        for name, limit in (("id", 64), ("url", MAX_URL_CHARS), ("pin", MAX_PIN_CHARS), ("display", 256)):
            value = fields.get(name, "")
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if not isinstance(value, str) or len(value) > limit:
                raise ValueError(f"{name} must be a string of at most {limit} characters")
            values[name] = value
        if not ID_RE.match(values["id"]):
            raise ValueError("id must be 1-64 letters, digits, '_' or '-'")
        scheme, sep, rest = values["url"].partition("://")
        if not sep or not SCHEME_RE.match(scheme.lower()) or not rest:
            raise ValueError(f"url must look like scheme://host/room, got {values['url'][:100]!r}")
        return cls(**values)


class RoomJoinError(Exception):
    """Joining failed. ``retry``: worth trying again later (SFU unreachable, session lost); not
    for a wrong pin, no such room or a full room. ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str, *, retry: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry = retry


class RoomPresence(Protocol):
    call_id: str

    async def wait_closed(self) -> str:
        """Why the bot left: "left" (asked to leave), "ended" (the room closed or everyone is
        gone for good) or "lost: <why>" (the connection was lost and rejoining gave up)."""
        ...

    async def leave(self) -> None: ...


RoomJoiner = Callable[[RoomRequest], Awaitable[RoomPresence]]  # raises RoomJoinError
JoinerFactory = Callable[["Settings", "CallHost"], RoomJoiner]

# URL scheme -> factory; filled by the connectors (e.g. "janus") when they are imported.
JOINERS: dict[str, JoinerFactory] = {}


def register_joiner(scheme: str, factory: JoinerFactory) -> None:
    """Make ``scheme://`` URLs joinable: ``factory(settings, host)`` builds the joiner."""
    if not SCHEME_RE.match(scheme):
        raise ValueError(f"not a URL scheme: {scheme!r}")
    JOINERS[scheme] = factory
