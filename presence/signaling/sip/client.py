"""The user agent's own requests: REGISTER with a registrar, and calls it places (dial-out).

``Registration`` keeps the bot registered: REGISTER, a digest answer to the 401, and again
before the binding expires (at 80 % of what the registrar granted); failures are logged and
retried with back-off. ``dial`` places a call: INVITE with our SDP offer, a digest answer to a
401/407, progress reported as it comes ("trying", "ringing", "answered" or "failed"), the ACK,
and the answered call joins the host like an answered one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sipmessage import URI, Address, Parameters, Request, Response

from presence.clock import now
from presence.media.rtp import RtpEndpoint
from presence.signaling.sip.call import SipCall
from presence.signaling.sip.dialog import Dialog, new_request, new_tag, target_addr
from presence.signaling.sip.digest import answer_challenge
from presence.signaling.sip.sdp import SUPPORTED, SdpError, build_sdp, choose, parse_sdp

if TYPE_CHECKING:
    from presence.signaling.sip.ua import SipUserAgent

log = logging.getLogger(__name__)

DTMF_PT = 101


class DialFailed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


@dataclass
class DialProgress:
    """A dial-out's state, for the API and the CLI: each step with its time."""

    target: str
    status: str = "dialing"  # dialing | trying | ringing | answered | failed
    call_id: str = ""
    peer_id: str = ""
    reason: str = ""
    steps: list[tuple[float, str]] = field(default_factory=list)

    def step(self, status: str, reason: str = "") -> None:
        self.status, self.reason = status, reason or self.reason
        self.steps.append((now(), status if not reason else f"{status}: {reason}"))


def _request(
    ua: SipUserAgent, method: str, uri: URI, to: Address, local: Address, call_id: str, seq: int
) -> Request:
    return new_request(method, uri, ua.local, local, to, call_id, seq, ua.contact)


async def _with_auth(
    ua: SipUserAgent,
    build: Callable[[int], Request],
    addr: tuple[str, int],
    *,
    username: str,
    password: str,
    timeout: float,
    on_provisional: Callable[[Response], None] | None = None,
) -> tuple[Request, Response | None]:
    """Send a request; answer one 401/407 digest challenge; (the last request, its response)."""
    seq = 1
    request = build(seq)
    response = await ua.request(request, addr, timeout, on_provisional)
    if response is not None and response.code in (401, 407) and password:
        if request.method == "INVITE":
            ua.send_ack(request, response, addr)  # a non-2xx final is acknowledged in its transaction
        challenge = response.www_authenticate if response.code == 401 else response.proxy_authenticate
        if challenge is None:
            return request, response
        seq += 1
        request = build(seq)
        creds = answer_challenge(
            challenge, method=request.method, uri=str(request.uri), username=username, password=password
        )
        if response.code == 401:
            request.authorization = creds
        else:
            request.proxy_authorization = creds
        response = await ua.request(request, addr, timeout, on_provisional)
    return request, response


class Registration:
    """Keeps ``sip_user`` registered at ``sip_registrar`` (a SIP URI such as sip:pbx.example:5060)."""

    def __init__(self, ua: SipUserAgent) -> None:
        self.ua = ua
        s = ua.settings
        self.registrar = URI.parse(s.sip_registrar)
        self.aor = Address(uri=URI(scheme="sip", user=s.sip_username or s.sip_user, host=self.registrar.host))
        self.call_id = secrets.token_hex(10)
        self.registered = asyncio.Event()
        self.expires_at = 0.0
        self.cseq = 0
        self.count = 0  # successful REGISTERs (the first and each renewal)
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sip-register")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def register_once(self) -> int:
        """One REGISTER (with its digest answer): the seconds granted; raises DialFailed."""
        s = self.ua.settings
        expires = s.sip_register_expires_s
        for _ in range(2):  # a second time when the registrar wants a longer interval (423)
            response = await self._register(expires)
            if response.code == 423 and response.min_expires:
                expires = response.min_expires
                continue
            break
        if response.code != 200:
            raise DialFailed(response.code, response.phrase)
        granted = response.expires or expires
        for contact in response.contact:
            if contact.uri.host == self.ua.contact.host and contact.uri.port == self.ua.contact.port:
                granted = int(contact.parameters.get("expires") or granted)
        return max(granted, 10)

    async def _register(self, expires: int) -> Response:
        s = self.ua.settings
        local = Address(uri=self.aor.uri, parameters=Parameters(tag=new_tag()))
        registrar = URI(scheme="sip", host=self.registrar.host, port=self.registrar.port)

        def build(_: int) -> Request:
            self.cseq += 1  # one Call-ID for every renewal, its CSeq going up (RFC 3261 10.2.4)
            request = _request(self.ua, "REGISTER", registrar, self.aor, local, self.call_id, self.cseq)
            request.expires = expires
            return request

        addr = target_addr(self.registrar, ("127.0.0.1", 5060))
        user = s.sip_username or s.sip_user
        _, response = await _with_auth(
            self.ua, build, addr, username=user, password=s.sip_password, timeout=16.0
        )
        if response is None:
            raise DialFailed(408, "the registrar did not answer")
        return response

    async def _run(self) -> None:
        backoff = 2.0
        while True:
            try:
                granted = await self.register_once()
                self.expires_at = now() + granted
                self.count += 1
                self.last_error = ""
                self.registered.set()
                backoff = 2.0
                log.info("SIP: registered at %s for %d s", self.registrar, granted)
                await asyncio.sleep(granted * 0.8)
            except DialFailed as exc:
                self.last_error = str(exc)
                self.registered.clear()
                log.warning(
                    "SIP: registering at %s failed: %s; again in %.0f s", self.registrar, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 300.0)


async def dial(ua: SipUserAgent, target: str, progress: DialProgress, *, room: str | None = None) -> SipCall:
    """Call ``target`` (a SIP URI); the answered call joins the host. Raises DialFailed."""
    s = ua.settings
    uri = URI.parse(target)
    offered = [SUPPORTED[name.lower()] for name in s.sip_codecs]
    rtp = RtpEndpoint(offered[0], DTMF_PT)
    try:
        port = await rtp.open(ua.local[0], ua.rtp_ports)
        offer = build_sdp(ua.local[0], port, offered, DTMF_PT).encode()
        call_id = secrets.token_hex(12)
        local = Address(
            uri=URI(scheme="sip", user=s.sip_username or s.sip_user, host=ua.local[0], port=ua.local[1]),
            parameters=Parameters(tag=new_tag()),
        )
        proxy = URI.parse(s.sip_outbound_proxy) if s.sip_outbound_proxy else None
        addr = target_addr(proxy or uri, (uri.host, uri.port or 5060))

        def build(seq: int) -> Request:
            request = _request(ua, "INVITE", uri, Address(uri=uri), local, call_id, seq)
            request.body = offer
            request.headers.set("Content-Type", "application/sdp")
            return request

        def on_provisional(response: Response) -> None:
            status = "ringing" if response.code in (180, 183) else "trying"
            if status != progress.status:
                progress.step(status)

        progress.step("trying")
        invite, response = await _with_auth(
            ua,
            build,
            addr,
            username=s.sip_username or s.sip_user,
            password=s.sip_password,
            timeout=s.sip_dial_timeout_s,
            on_provisional=on_provisional,
        )
        if response is None:
            await ua.cancel(invite, addr)
            raise DialFailed(408, f"no answer in {s.sip_dial_timeout_s:.0f} s")
        if response.code >= 300:
            ua.send_ack(invite, response, addr)
            raise DialFailed(response.code, response.phrase)
        dialog = Dialog.as_uac(invite, response, ua.contact, addr)
        ua.send_ack_2xx(dialog, response, addr)
        try:
            answer = parse_sdp(response.body.decode("utf8", "replace"))
            codec = choose(answer, s.sip_codecs)
        except SdpError as exc:
            ua.spawn_request(dialog.request("BYE", ua.local), dialog.next_hop(), 8.0)
            raise DialFailed(488, f"the answer's SDP: {exc}") from None
        rtp.set_codec(codec, answer.dtmf_payload_type)
        rtp.set_remote(answer.address, answer.port)
        call = SipCall(ua, dialog, rtp, answer)
        ua.calls[(dialog.call_id, dialog.local_tag)] = call
        try:
            call.call_id, call.peer_id = await ua.host.join(call, participant=uri.user or "callee", room=room)
        except Exception as exc:  # answered, but the bot cannot take the call: hang up
            await call.close()
            raise DialFailed(503, f"the bot could not take the call: {exc}") from None
        progress.call_id, progress.peer_id = call.call_id, call.peer_id
        progress.step("answered")
        log.info("SIP: dialled %s: call %s, %s", target, call.call_id, codec.name)
        return call
    except BaseException as exc:
        if not isinstance(exc, DialFailed | asyncio.CancelledError):
            log.exception("SIP: dialling %s failed", target)
        await rtp.close()
        raise
