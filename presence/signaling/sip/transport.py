"""SIP over UDP: datagrams in, parsed messages out, and replies to whatever cannot be parsed.

The parsing is ``sipmessage``'s. What it refuses (random bytes, a request line it cannot read,
a header without a colon) is answered with ``400 Bad Request`` when enough of it can be read to
address a reply (a request line and a Via), and dropped otherwise; a datagram over
``max_bytes`` gets ``513 Message Too Large``. Nothing a peer sends can raise out of here: a
junk datagram costs one log line (rate-limited) and the transport keeps serving calls.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from sipmessage import Message, Request, Response, Via

from presence.aio import log_this_drop

log = logging.getLogger(__name__)

Addr = tuple[str, int]
MessageHandler = Callable[[Request | Response, Addr], None]

_VIA = re.compile(rb"^(?:via|v)[ \t]*:[ \t]*(.+)$", re.IGNORECASE | re.MULTILINE)
_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) SIP/2\.0\r?$", re.MULTILINE)
# RFC 3261 8.1.1: every request carries these; one without them cannot be answered in a dialog.
_MANDATORY = ("Via", "From", "To", "Call-ID", "CSeq")


@dataclass(slots=True)
class TransportStats:
    received: int = 0
    sent: int = 0
    bad: int = 0  # answered with 400 or 513
    dropped: int = 0  # unreadable: nothing to answer


class SipTransport(asyncio.DatagramProtocol):
    """One UDP socket for every SIP message of the user agent."""

    def __init__(self, on_message: MessageHandler, max_bytes: int = 16_384) -> None:
        self.on_message = on_message
        self.max_bytes = max_bytes
        self.stats = TransportStats()
        self._udp: asyncio.DatagramTransport | None = None
        self.local: Addr = ("", 0)

    async def open(self, host: str, port: int) -> Addr:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        assert self._udp is not None
        self.local = self._udp.get_extra_info("sockname")[:2]
        return self.local

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._udp = transport  # type: ignore[assignment]

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    def send(self, message: Request | Response, addr: Addr) -> None:
        if self._udp is None:
            return
        body = message.body or b""
        message.headers.set("Content-Length", str(len(body)))
        self._udp.sendto(bytes(message), addr)
        self.stats.sent += 1

    # ------------------------------------------------------------------ receiving
    def datagram_received(self, data: bytes, addr: Addr) -> None:  # type: ignore[override]
        addr = addr[:2]
        self.stats.received += 1
        if data in (b"\r\n\r\n", b"\r\n"):  # RFC 5626 keep-alive pings
            return
        if len(data) > self.max_bytes:
            self._refuse(data, addr, 513, "Message Too Large", f"{len(data)} bytes")
            return
        try:
            message = Message.parse(data)
            missing = [h for h in _MANDATORY if message.headers.get(h) is None]
            if missing:
                raise ValueError(f"no {', '.join(missing)} header")
            message.via  # noqa: B018 -- the typed headers parse lazily: read them here, once
            message.cseq  # noqa: B018
            message.from_address  # noqa: B018
            message.to_address  # noqa: B018
        except Exception as exc:  # sipmessage raises ValueError, IndexError, UnicodeError...
            self._refuse(data, addr, 400, "Bad Request", str(exc) or type(exc).__name__)
            return
        try:
            self.on_message(message, addr)
        except Exception:
            log.exception("SIP %s from %s:%d failed", _first_line(data), *addr)

    def _refuse(self, data: bytes, addr: Addr, code: int, phrase: str, why: str) -> None:
        reply = _reply_to_unparsed(data, code, phrase)
        if reply is None:
            self.stats.dropped += 1
            if log_this_drop(self.stats.dropped):
                log.warning(
                    "SIP: dropped %d unreadable datagram(s), latest from %s:%d (%s)",
                    self.stats.dropped,
                    *addr,
                    why,
                )
            return
        self.stats.bad += 1
        if log_this_drop(self.stats.bad):
            log.warning("SIP: %d %s to %s:%d: %s", code, phrase, *addr, why)
        if self._udp is not None:
            self._udp.sendto(reply, addr)
            self.stats.sent += 1


def _first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0][:80].decode("utf8", "replace")


def _reply_to_unparsed(data: bytes, code: int, phrase: str) -> bytes | None:
    """A response to a request sipmessage refused, built from the few headers that route it
    back (RFC 3261 8.2: copy Via, From, To, Call-ID, CSeq); None when it is no request or has
    no readable Via (a response to a response, or to noise, goes nowhere)."""
    head = data[:4096]
    line = _REQUEST_LINE.match(head)
    vias = _VIA.findall(head)
    if line is None or line.group(1) == b"ACK" or not vias:
        return None
    try:
        Via.parse(vias[0].strip().decode("utf8"))
    except Exception:
        return None
    reply = Response(code, phrase)
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        pattern = re.compile(rb"^(?:%s)[ \t]*:[ \t]*(.+?)\r?$" % re.escape(name.encode()), re.I | re.M)
        for value in pattern.findall(head):
            try:
                reply.headers.add(name, value.decode("utf8"))
            except UnicodeDecodeError:
                continue
    reply.headers.set("Content-Length", "0")
    return bytes(reply)
