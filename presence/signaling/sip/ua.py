"""The SIP user agent: answers INVITEs, keeps their dialogs, ends calls from either side.

One UDP socket (``SipTransport``) carries every message. An INVITE with an SDP we can meet
(``sdp.choose``) opens an RTP endpoint, joins the call host as a ``SipCall`` link and is
answered ``200 OK``, retransmitted until the ACK (RFC 3261 13.3.1.4). In a dialog: BYE ends the
call, a re-INVITE moves or holds the media, CANCEL stops a call still ringing (487); outside
one: OPTIONS is answered, an unknown dialog gets 481, a full house 503 with Retry-After.

Transactions are kept as small as UDP needs: a retransmitted request gets the response already
sent (keyed by its Via branch); our own requests are retransmitted at T1, doubling to T2, until
a response or 64*T1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sipmessage import URI, Address, CSeq, Request, Response

from presence.config import Settings
from presence.media.rtp import RtpEndpoint
from presence.signaling.contract import CallRejected, PeerLink
from presence.signaling.recent import Recent
from presence.signaling.sip.call import SipCall
from presence.signaling.sip.client import DialProgress, Registration, dial
from presence.signaling.sip.dialog import ALLOW, Addr, Dialog, new_tag, reply
from presence.signaling.sip.sdp import SdpError, build_sdp, choose, parse_sdp
from presence.signaling.sip.transport import SipTransport

log = logging.getLogger(__name__)

T1, T2 = 0.5, 4.0
_SEEN_S = 32.0  # how long a server transaction's response is kept for retransmitted requests


class SipCallHost(Protocol):
    """What the user agent needs from the bot: ``presence.bot.calls.CallManager``."""

    @property
    def active_calls(self) -> int: ...

    async def join(self, link: PeerLink, *, participant: str, room: str | None) -> tuple[str, str]:
        """Add a connected link to a call (a new one when ``room`` is None): (call id, peer id)."""
        ...

    async def hangup(self, peer_id: str) -> bool: ...


@dataclass
class _Pending:
    """An INVITE we are answering: until its final response, CANCEL can stop it."""

    invite: Request
    addr: Addr
    tag: str
    task: asyncio.Task[None] | None = None
    rtp: RtpEndpoint | None = None


@dataclass
class _Client:
    """One of our requests waiting for its final response."""

    future: asyncio.Future[Response]
    on_provisional: Callable[[Response], None] | None = None
    provisional: bool = False  # an INVITE stops retransmitting once the far end is working on it


@dataclass
class _Answered:
    call: SipCall
    ok: Response
    acked: asyncio.Event = field(default_factory=asyncio.Event)


class SipUserAgent:
    def __init__(self, settings: Settings, host: SipCallHost) -> None:
        self.settings = settings
        self.host = host
        self.transport = SipTransport(self._on_message, settings.sip_max_message_bytes)
        self.local: Addr = ("", 0)
        self.calls: dict[tuple[str, str], SipCall] = {}  # (Call-ID, our tag) -> call
        self._pending: dict[tuple[str, str], _Pending] = {}  # (Call-ID, INVITE branch) -> ringing
        self._answered: dict[tuple[str, str], _Answered] = {}  # awaiting ACK
        self._responses: Recent[tuple[str, str], Response] = Recent(_SEEN_S, 4096)
        self._clients: dict[str, _Client] = {}  # our requests, by Via branch
        self._acks: Recent[tuple[str, str], tuple[Request, Addr]] = Recent(_SEEN_S, 1024)  # 2xx re-ACKs
        self.registration: Registration | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        lo, _, hi = settings.sip_rtp_ports.partition("-")
        self.rtp_ports = (int(lo), int(hi or lo))

    async def start(self) -> Addr:
        host = self.settings.sip_host or self.settings.host
        self.local = await self.transport.open(host, max(0, self.settings.sip_port))
        if self.settings.sip_port == 0:
            self.settings.sip_port = self.local[1]
        log.info("SIP: listening on udp %s:%d", *self.local)
        if self.settings.sip_registrar:
            self.registration = Registration(self)
            self.registration.start()
        return self.local

    async def dial(
        self, target: str, progress: DialProgress | None = None, room: str | None = None
    ) -> SipCall:
        """Place a call (see ``client.dial``); raises DialFailed."""
        return await dial(self, target, progress or DialProgress(target), room=room)

    @property
    def contact(self) -> URI:
        return URI(scheme="sip", user=self.settings.sip_user, host=self.local[0], port=self.local[1])

    async def close(self) -> None:
        if self.registration is not None:
            await self.registration.stop()
        for call in list(self.calls.values()):
            await call.close()
        for pending in list(self._pending.values()):
            if pending.task is not None:
                pending.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.transport.close()

    def spawn_request(self, request: Request, addr: Addr, timeout: float) -> None:
        """Send a request whose answer nobody waits for (our BYE)."""
        self._spawn(self.request(request, addr, timeout), f"sip-{request.method.lower()}")

    def _spawn(self, coro, name: str) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ dispatch
    def _on_message(self, message: Request | Response, addr: Addr) -> None:
        if isinstance(message, Response):
            self._on_response(message, addr)
            return
        request = message
        if request.method == "ACK":
            self._on_ack(request)
            return
        key = (request.call_id, request.via[0].parameters.get("branch") or "")
        seen = self._responses.get(key)
        if seen is not None and request.method != "CANCEL":  # a retransmission: say it again
            self.transport.send(seen, addr)
            return
        if request.method == "CANCEL":
            self._on_cancel(request, addr)
        elif request.method == "INVITE" and "tag" not in request.to_address.parameters:
            self._on_invite(request, addr, key)
        elif request.method == "OPTIONS" and "tag" not in request.to_address.parameters:
            ok = reply(request, 200, "OK", to_tag=new_tag())
            ok.headers.set("Allow", ALLOW)
            ok.headers.set("Accept", "application/sdp")
            self._respond(key, ok, addr)
        elif "tag" in request.to_address.parameters:
            self._in_dialog(request, addr, key)
        else:
            no = reply(request, 405, "Method Not Allowed", to_tag=new_tag())
            no.headers.set("Allow", ALLOW)
            self._respond(key, no, addr)

    def _on_response(self, response: Response, addr: Addr) -> None:
        client = self._clients.get(response.via[0].parameters.get("branch") or "")
        if client is None or client.future.done():
            # a retransmitted 2xx to our INVITE: its ACK was lost (RFC 3261 13.2.2.4)
            ack = self._acks.get((response.call_id, response.to_address.parameters.get("tag") or ""))
            if ack is not None and 200 <= response.code < 300 and response.cseq.method == "INVITE":
                self.transport.send(*ack)
            return
        if response.code >= 200:
            client.future.set_result(response)
        else:
            client.provisional = True
            if client.on_provisional is not None:
                client.on_provisional(response)

    def _respond(self, key: tuple[str, str], response: Response, addr: Addr) -> None:
        if response.code >= 200:
            self._responses.put(key, response)
        self.transport.send(response, addr)

    # ------------------------------------------------------------------ INVITE
    def _on_invite(self, invite: Request, addr: Addr, key: tuple[str, str]) -> None:
        if key in self._pending:
            return  # still working on it; the 100 Trying went out already
        busy = self.host.active_calls + len(self._pending) >= self.settings.max_calls
        if busy:
            no = reply(invite, 503, "Service Unavailable", to_tag=new_tag())
            no.headers.set("Retry-After", "30")
            self._respond(key, no, addr)
            log.info(
                "SIP: INVITE from %s:%d refused: all %d call slots taken", *addr, self.settings.max_calls
            )
            return
        self.transport.send(reply(invite, 100, "Trying"), addr)
        pending = _Pending(invite, addr, new_tag())
        self._pending[key] = pending
        pending.task = asyncio.get_running_loop().create_task(self._answer(pending, key), name="sip-answer")

    async def _answer(self, p: _Pending, key: tuple[str, str]) -> None:
        invite, addr = p.invite, p.addr
        call: SipCall | None = None
        try:
            try:
                offer = parse_sdp(invite.body.decode("utf8", "replace"))
                codec = choose(offer, self.settings.sip_codecs)
            except SdpError as exc:
                self._respond(key, reply(invite, 488, "Not Acceptable Here", to_tag=p.tag), addr)
                log.info("SIP: INVITE from %s:%d refused (488): %s", *addr, exc)
                return
            if self.settings.sip_answer_after_ms > 0:  # ring first: the caller hears ringback
                self.transport.send(reply(invite, 180, "Ringing", to_tag=p.tag), addr)
                await asyncio.sleep(self.settings.sip_answer_after_ms / 1000)
            rtp = p.rtp = RtpEndpoint(codec, offer.dtmf_payload_type, on_dtmf=None)
            port = await rtp.open(self.local[0], self.rtp_ports)
            rtp.set_remote(offer.address, offer.port)
            dialog = Dialog.as_uas(invite, p.tag, self.contact, addr)
            call = SipCall(self, dialog, rtp, offer)
            participant = invite.from_address.name or invite.from_address.uri.user or "caller"
            call.call_id, call.peer_id = await self.host.join(call, participant=participant, room=None)
            answer = build_sdp(
                self.local[0],
                port,
                [codec],
                offer.dtmf_payload_type,
                call.answer_direction(),
                dtmf_clock_rate=offer.dtmf_clock_rate,
            )
            ok = reply(invite, 200, "OK", to_tag=p.tag, body=answer.encode())
            ok.headers.set("Content-Type", "application/sdp")
            ok.headers.set("Allow", ALLOW)
            ok.contact = [Address(uri=self.contact)]
            ok.record_route = invite.record_route
            self.calls[(dialog.call_id, dialog.local_tag)] = call
            answered = self._answered[(dialog.call_id, dialog.local_tag)] = _Answered(call, ok)
            self._respond(key, ok, addr)
            log.info("SIP: call %s from %s (%s:%d), %s", call.call_id, participant, *addr, codec.name)
            self._spawn(self._until_acked(answered, addr), "sip-2xx")
        except asyncio.CancelledError:  # CANCEL while ringing, or shutting down
            if call is None and p.rtp is not None:
                await p.rtp.close()
            raise
        except CallRejected as exc:
            code, phrase = (486, "Busy Here") if exc.status in (409, 503) else (500, "Server Internal Error")
            self._respond(key, reply(invite, code, phrase, to_tag=p.tag), addr)
            if p.rtp is not None:
                await p.rtp.close()
        except Exception:
            log.exception("SIP: answering %s failed", invite.call_id)
            self._respond(key, reply(invite, 500, "Server Internal Error", to_tag=p.tag), addr)
            if call is not None:
                await call.close()
            elif p.rtp is not None:
                await p.rtp.close()
        finally:
            self._pending.pop(key, None)

    async def _until_acked(self, answered: _Answered, addr: Addr) -> None:
        """Retransmit the 2xx until the ACK; a caller that never ACKs is hung up (13.3.1.4)."""
        for step in _backoff(64 * T1):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.acked.wait(), step)
                return
            self.transport.send(answered.ok, addr)
        log.info("SIP: call %s never acknowledged our 200 OK; hanging up", answered.call.call_id)
        await answered.call.hang_up()

    def _on_ack(self, ack: Request) -> None:
        tag = ack.to_address.parameters.get("tag") or ""
        answered = self._answered.pop((ack.call_id, tag), None)
        if answered is not None:
            answered.acked.set()

    def _on_cancel(self, cancel: Request, addr: Addr) -> None:
        key = (cancel.call_id, cancel.via[0].parameters.get("branch") or "")
        pending = self._pending.get(key)
        if pending is None:
            self._respond(key, reply(cancel, 481, "Call/Transaction Does Not Exist", to_tag=new_tag()), addr)
            return
        self.transport.send(reply(cancel, 200, "OK", to_tag=pending.tag), addr)
        if pending.task is not None:
            pending.task.cancel()
        self._pending.pop(key, None)
        self._respond(key, reply(pending.invite, 487, "Request Terminated", to_tag=pending.tag), pending.addr)
        log.info("SIP: %s cancelled by the caller before the answer", cancel.call_id)

    # ------------------------------------------------------------------ in a dialog
    def _in_dialog(self, request: Request, addr: Addr, key: tuple[str, str]) -> None:
        tag = request.to_address.parameters.get("tag") or ""
        call = self.calls.get((request.call_id, tag))
        if call is None:
            self._respond(key, reply(request, 481, "Call/Transaction Does Not Exist"), addr)
            return
        if request.cseq.sequence <= call.dialog.remote_cseq and request.method != "ACK":
            self._respond(key, reply(request, 500, "Server Internal Error"), addr)  # 12.2.2: out of order
            return
        call.dialog.remote_cseq = request.cseq.sequence
        if request.method == "BYE":
            self._respond(key, reply(request, 200, "OK"), addr)
            self._spawn(call.remote_hung_up(), "sip-bye")
        elif request.method == "INVITE":
            self._respond(key, call.reinvite(request), addr)
        elif request.method in ("OPTIONS", "NOTIFY"):
            self._respond(key, reply(request, 200, "OK"), addr)
            if request.method == "NOTIFY":
                call.on_notify(request)
        else:
            no = reply(request, 405, "Method Not Allowed")
            no.headers.set("Allow", ALLOW)
            self._respond(key, no, addr)

    def forget(self, call: SipCall) -> None:
        self.calls.pop((call.dialog.call_id, call.dialog.local_tag), None)
        self._answered.pop((call.dialog.call_id, call.dialog.local_tag), None)

    # ------------------------------------------------------------------ our requests
    async def request(
        self,
        request: Request,
        addr: Addr,
        timeout: float = 64 * T1,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> Response | None:
        """Send a request and retransmit it until a final response (None: none came in
        ``timeout``). An INVITE is not resent once a provisional response came."""
        branch = request.via[0].parameters.get("branch") or ""
        client = _Client(asyncio.get_running_loop().create_future(), on_provisional)
        self._clients[branch] = client
        try:
            for step in _backoff(timeout):
                if not client.provisional:
                    self.transport.send(request, addr)
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(client.future), step)
            return None
        finally:
            self._clients.pop(branch, None)

    def send_ack(self, invite: Request, response: Response, addr: Addr) -> None:
        """ACK a non-2xx final response: part of the INVITE's transaction (17.1.1.3)."""
        self.transport.send(_in_transaction(invite, "ACK", response), addr)

    def send_ack_2xx(self, dialog: Dialog, ok: Response, addr: Addr) -> None:
        """ACK a 2xx: a request of its own in the dialog, resent if the 2xx comes again."""
        ack = dialog.request("ACK", self.local)
        ack.cseq = CSeq(sequence=ok.cseq.sequence, method="ACK")
        hop = dialog.next_hop()
        self._acks.put((dialog.call_id, dialog.remote_tag), (ack, hop))
        self.transport.send(ack, hop)

    async def cancel(self, invite: Request, addr: Addr) -> None:
        """CANCEL an INVITE that rings too long (9.1): same Via branch, Call-ID, From, To."""
        self.transport.send(_in_transaction(invite, "CANCEL"), addr)


def _backoff(timeout: float) -> Iterator[float]:
    """The waits between retransmissions over UDP (RFC 3261 17.1.1.2): T1, doubling up to
    T2, until ``timeout`` in all."""
    interval, waited = T1, 0.0
    while waited < timeout:
        step = min(interval, timeout - waited)
        yield step
        waited += step
        interval = min(interval * 2, T2)


def _in_transaction(invite: Request, method: str, response: Response | None = None) -> Request:
    """An ACK or CANCEL of our INVITE: its Via (branch), Call-ID, From and CSeq number; the To
    of the final response when there is one (it carries the far end's tag)."""
    request = Request(method, invite.uri)
    request.via = invite.via[:1]
    request.headers.set("Max-Forwards", "70")
    request.from_address = invite.from_address
    request.to_address = response.to_address if response is not None else invite.to_address
    request.headers.set("Call-ID", invite.call_id)
    request.cseq = CSeq(sequence=invite.cseq.sequence, method=method)
    if invite.route:
        request.route = invite.route
    return request
