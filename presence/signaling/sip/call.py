"""One SIP call as a ``PeerLink``: its dialog and its RTP endpoint.

The session reads the caller's audio from the RTP endpoint's track and hands it the bot's
voice; keys pressed (RFC 4733) go to ``on_dtmf``. A BYE from the caller ends the link;
when the call ends on our side (the bot hangs up, the caller went silent, the server stops),
``close`` sends the BYE. A held call (the caller's re-INVITE with ``sendonly``/``inactive`` or
address 0.0.0.0) sends no RTP, so it counts as heard while held; the call-length limit bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiortc.mediastreams import MediaStreamTrack
from sipmessage import Address, Request, Response

from presence.clock import now
from presence.media.rtp import RtpEndpoint
from presence.seams import CallEvent
from presence.signaling.sip.dialog import Dialog, reply
from presence.signaling.sip.sdp import MediaOffer, SdpError, build_sdp, parse_sdp

if TYPE_CHECKING:
    from presence.signaling.sip.ua import SipUserAgent

log = logging.getLogger(__name__)

_ANSWER_DIRECTION = {"sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
BYE_TIMEOUT_S = 8.0  # a peer that never answers our BYE is gone anyway
TRANSFER_WAIT_S = 20.0  # the person's phone rings this long before our leg ends anyway


class SipCall:
    transport = "sip"

    def __init__(self, ua: SipUserAgent, dialog: Dialog, rtp: RtpEndpoint, offer: MediaOffer) -> None:
        self.ua = ua
        self.dialog = dialog
        self.rtp = rtp
        self.offer = offer
        self.call_id = ""
        self.peer_id = ""
        self.on_dtmf: Callable[[str, float], None] | None = None
        self.ended = False
        self.created = now()
        self._sdp_version = 0
        self._transfer: asyncio.Future[int] | None = None
        rtp.on_dtmf = self._dtmf

    @property
    def audio(self) -> MediaStreamTrack:
        return self.rtp.track

    @property
    def held(self) -> bool:
        return self.offer.held

    def play(self, track: MediaStreamTrack) -> None:
        self.rtp.start_sending(track)

    def last_heard(self) -> float:
        if self.held:
            return now()
        return max(self.rtp.last_packet_at, self.created)

    def on_event(self, event: CallEvent) -> None:
        pass  # a phone shows nothing; what it needs (BYE, the audio) goes its own way

    def _dtmf(self, digit: str, t: float) -> None:
        if self.on_dtmf is not None:
            self.on_dtmf(digit, t)

    def answer_direction(self) -> str:
        return _ANSWER_DIRECTION.get(self.offer.direction, "sendrecv")

    def reinvite(self, request: Request) -> Response:
        """A re-INVITE: the caller holds, resumes or moves its media (RFC 3264 8)."""
        try:
            offer = parse_sdp(request.body.decode("utf8", "replace"))
        except SdpError as exc:
            log.info("SIP: call %s re-INVITE refused: %s", self.call_id, exc)
            return reply(request, 488, "Not Acceptable Here")
        was_held = self.held
        self.offer = offer
        # held: the caller does not want our audio (the endpoint sends to 0.0.0.0 = nowhere)
        self.rtp.set_remote("0.0.0.0" if offer.held else offer.address, offer.port)
        if self.held != was_held:
            log.info("SIP: call %s %s", self.call_id, "on hold" if self.held else "resumed")
        self._sdp_version += 1
        body = build_sdp(
            self.ua.local[0],
            self.rtp.port or 0,
            [self.rtp.codec],
            self.rtp.dtmf_payload_type,
            self.answer_direction(),
            version=self._sdp_version,
            dtmf_clock_rate=self.offer.dtmf_clock_rate,
        ).encode()
        ok = reply(request, 200, "OK", body=body)
        ok.headers.set("Content-Type", "application/sdp")
        ok.contact = [Address(uri=self.dialog.contact)]
        return ok

    async def transfer(self, target: str) -> bool:
        """A blind transfer (RFC 3515): REFER the caller to ``target``. The far end dials it
        and reports in NOTIFYs (a sipfrag status line); once it says the new call is answered
        (or after ``TRANSFER_WAIT_S`` with no word) our leg ends with a BYE."""
        refer = self.dialog.request("REFER", self.ua.local)
        refer.headers.set("Refer-To", f"<{target}>")
        refer.headers.set("Referred-By", f"<{self.dialog.local.uri}>")
        self._transfer = asyncio.get_running_loop().create_future()
        response = await self.ua.request(refer, self.dialog.next_hop(), 8.0)
        if response is None or response.code >= 300:
            log.info(
                "SIP: call %s: REFER to %s refused: %s", self.call_id, target, response and response.code
            )
            return False
        with contextlib.suppress(TimeoutError):
            status = await asyncio.wait_for(self._transfer, TRANSFER_WAIT_S)
            if status >= 300:
                log.info("SIP: call %s: the transfer to %s failed (%d)", self.call_id, target, status)
                return False
        log.info("SIP: call %s transferred to %s", self.call_id, target)
        await self.hang_up()
        return True

    def on_notify(self, notify: Request) -> None:
        """A NOTIFY of our REFER's progress: its body is the new call's status line."""
        match = re.match(rb"SIP/2\.0 (\d{3})", notify.body or b"")
        if match and self._transfer is not None and not self._transfer.done():
            code = int(match.group(1))
            if code >= 200:
                self._transfer.set_result(code)

    async def remote_hung_up(self) -> None:
        """The caller's BYE (already answered): the session lets the participant go."""
        self.ended = True
        self.ua.forget(self)
        if not await self.ua.host.hangup(self.peer_id):
            await self.rtp.close()

    async def hang_up(self) -> None:
        """The bot ends the call: the session lets the participant go and ``close`` says BYE."""
        if not await self.ua.host.hangup(self.peer_id):
            await self.close()

    async def close(self) -> None:
        if not self.ended:
            self.ended = True
            self.ua.forget(self)
            bye = self.dialog.request("BYE", self.ua.local)
            self.ua.spawn_request(bye, self.dialog.next_hop(), BYE_TIMEOUT_S)
        await self.rtp.close()
