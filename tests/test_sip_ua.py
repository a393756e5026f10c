"""The SIP user agent of a real server, on the wire: junk, OPTIONS, unknown dialogs, floods.

Datagrams are written by hand here on purpose: they are what a broken or hostile peer sends,
which no SIP tool would. Calls with real peers (baresip, sipp, kamailio) are in test_sip.py.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest
from conftest import BotServer

from presence.signaling.sip.transport import SipTransport

pytestmark = pytest.mark.slow


class _Peer(asyncio.DatagramProtocol):
    """A UDP socket that keeps every datagram it receives."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()
        self.udp: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.udp = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.put_nowait(data)

    @property
    def port(self) -> int:
        assert self.udp is not None
        return int(self.udp.get_extra_info("sockname")[1])

    def send(self, data: bytes, port: int) -> None:
        assert self.udp is not None
        self.udp.sendto(data, ("127.0.0.1", port))

    async def reply(self, timeout: float = 3.0) -> bytes:
        return await asyncio.wait_for(self.got.get(), timeout)


async def _peer() -> _Peer:
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(_Peer, local_addr=("127.0.0.1", 0))
    return peer


def _request(method: str, port: int, *, to_tag: str = "", body: str = "", extra: str = "") -> bytes:
    branch = "z9hG4bK" + secrets.token_hex(6)
    to = f"<sip:presence@127.0.0.1>{';tag=' + to_tag if to_tag else ''}"
    return (
        f"{method} sip:presence@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:tester@127.0.0.1>;tag={secrets.token_hex(4)}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {secrets.token_hex(8)}@127.0.0.1\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:tester@127.0.0.1:{port}>\r\n"
        f"{extra}"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def _status(data: bytes) -> int:
    line = data.split(b"\r\n", 1)[0].decode()
    assert line.startswith("SIP/2.0 "), line
    return int(line.split()[1])


async def test_options_are_answered_and_junk_gets_400_or_nothing(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0)
    port = server.settings.sip_port
    peer = await _peer()
    peer.send(_request("OPTIONS", peer.port), port)
    ok = await peer.reply()
    assert _status(ok) == 200 and b"Allow: INVITE" in ok
    # noise, a truncated request, a header with no colon, a bad CSeq, a request line only
    for junk in (
        os.urandom(700),
        b"\x00\xff" * 40,
        _request("OPTIONS", peer.port)[:60],
        _request("OPTIONS", peer.port, extra="Broken header line\r\n"),
        _request("OPTIONS", peer.port).replace(b"CSeq: 1 OPTIONS", b"CSeq: one OPTIONS"),
        b"INVITE sip:presence@127.0.0.1 SIP/2.0\r\n\r\n",
    ):
        peer.send(junk, port)
    answers = []
    while True:
        try:
            answers.append(_status(await peer.reply(1.0)))
        except TimeoutError:
            break
    # the two readable requests with a Via get 400; noise and the Via-less line get nothing
    assert answers == [400, 400], answers
    # oversized: 513, from its first lines
    peer.send(_request("OPTIONS", peer.port, extra="X-Pad: " + "a" * 20_000 + "\r\n"), port)
    assert _status(await peer.reply()) == 513
    # still serving
    peer.send(_request("OPTIONS", peer.port), port)
    assert _status(await peer.reply()) == 200
    assert server.sip is not None
    sip: SipTransport = server.sip.transport
    assert sip.stats.bad == 3 and sip.stats.dropped >= 3, sip.stats


async def test_unknown_dialogs_get_481_and_unknown_methods_405(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0)
    port = server.settings.sip_port
    peer = await _peer()
    peer.send(_request("BYE", peer.port, to_tag="nosuchdialog"), port)
    assert _status(await peer.reply()) == 481
    peer.send(_request("CANCEL", peer.port), port)
    assert _status(await peer.reply()) == 481
    peer.send(_request("SUBSCRIBE", peer.port), port)
    assert _status(await peer.reply()) == 405


async def test_an_invite_with_no_codec_we_speak_gets_488(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0)
    peer = await _peer()
    sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 7000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n"
    peer.send(
        _request("INVITE", peer.port, body=sdp, extra="Content-Type: application/sdp\r\n"),
        server.settings.sip_port,
    )
    codes = [_status(await peer.reply()), _status(await peer.reply())]
    assert codes == [100, 488], codes
    assert server.manager.active_calls == 0


async def test_invites_past_capacity_get_503_and_the_server_stays_up(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0, max_calls=0)
    peer = await _peer()
    sdp = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n"
    )
    for _ in range(50):
        peer.send(
            _request("INVITE", peer.port, body=sdp, extra="Content-Type: application/sdp\r\n"),
            server.settings.sip_port,
        )
    codes = [_status(await peer.reply()) for _ in range(50)]
    assert set(codes) == {503}, codes
    peer.send(_request("OPTIONS", peer.port), server.settings.sip_port)
    assert _status(await peer.reply()) == 200
