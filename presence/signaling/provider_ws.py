"""Phone numbers at Twilio or Telnyx: the routes their media websockets come in by.

Twilio: a call to the number fetches ``POST /twilio/voice``, whose ``X-Twilio-Signature`` is
checked with the account's auth token against ``public_url`` + path; the answer is TwiML that
connects the call's media to ``/twilio/stream`` with a one-time token as a stream parameter,
which the websocket's ``start`` must present (it lives ``provider_stream_token_ttl_s``).
Telnyx: the call's stream (``streaming_start`` or TeXML ``<Stream>``) points at
``/telnyx/stream?token=JOIN-TOKEN``, a join token of role ``provider`` checked before the
upgrade. In dev mode (no token_secret) neither needs a token. Each websocket is then one
participant: a ``ProviderLink`` (``provider_link.py``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

from aiohttp import WSCloseCode, web
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, VoiceResponse

from presence.config import Settings
from presence.signaling.errors import ApiError
from presence.signaling.provider_link import TELNYX, TWILIO, Admit, Dialect, Grant, ProviderLink, Refusal
from presence.signaling.recent import Recent

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 * 1024  # a 20 ms media message is ~300 bytes; a bigger frame is junk
CLOSE_TIMEOUT_S = 2.0  # how long a close waits for the provider's close frame
MAX_TICKETS = 1024  # one-time stream tokens kept; the oldest go first
PROVIDER_ROLE = "provider"
SIGNATURE_HEADER = "X-Twilio-Signature"
TELNYX_TOKEN_HEADER = "x-telnyx-streaming-auth-token"  # Telnyx's stream_auth_token, sent as a header


class StreamTickets:
    """One-time tokens the Twilio webhook hands its stream: each is good for one ``start``,
    within ``ttl_s``; at most ``MAX_TICKETS`` are kept (a flood of webhooks costs no memory)."""

    def __init__(self, ttl_s: float) -> None:
        self._tickets: Recent[str, Grant] = Recent(ttl_s, MAX_TICKETS)

    def issue(self, grant: Grant) -> str:
        token = secrets.token_urlsafe(24)
        self._tickets.put(token, grant)
        return token

    def take(self, token: str) -> Grant | None:
        return self._tickets.pop(token)


TICKETS_KEY = web.AppKey("provider_stream_tickets", StreamTickets)


def stream_url(settings: Settings, path: str) -> str:
    """The websocket URL of ``path`` at the server's public address (https -> wss)."""
    base = settings.base_url
    return "ws" + base[4:] + path if base.startswith("http") else base + path


def _check_twilio_signature(request: web.Request, settings: Settings, form: Mapping[str, Any]) -> None:
    if not settings.twilio_auth_token:
        if settings.token_secret:
            raise ApiError(503, "twilio_not_configured", "set twilio_auth_token to take calls from Twilio")
        log.warning("twilio: webhook taken unvalidated: no twilio_auth_token (dev mode: no token_secret)")
        return
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        raise ApiError(403, "missing_signature", f"the webhook lacks its {SIGNATURE_HEADER} header")
    # Twilio signs the URL it requested: the public one, not what a proxy forwarded to us.
    url = settings.base_url + request.path_qs
    if not RequestValidator(settings.twilio_auth_token).validate(url, form, signature):
        raise ApiError(
            403, "bad_signature", f"{SIGNATURE_HEADER} does not match (is public_url {settings.base_url}?)"
        )


async def twilio_voice(request: web.Request) -> web.Response:
    """Twilio's voice webhook: TwiML that streams the call to ``/twilio/stream``."""
    from presence.signaling import app as api

    api._check_length(request)
    api._require_type(request, "application/x-www-form-urlencoded")
    settings = request.app[api.SETTINGS_KEY]
    form = await request.post()
    _check_twilio_signature(request, settings, form)
    room = api._pick_room(None, request.query.get("room"))  # part of the signed URL
    caller = form.get("From")
    caller = caller if isinstance(caller, str) and caller else None
    token = request.app[TICKETS_KEY].issue(Grant(caller, room))
    stream = (connect := Connect()).stream(url=stream_url(settings, "/twilio/stream"))
    stream.parameter(name="token", value=token)
    if caller:
        stream.parameter(name="from", value=caller)
    twiml = VoiceResponse()
    twiml.append(connect)
    log.info("twilio: call %s from %s: streaming it here", str(form.get("CallSid"))[:64], caller)
    return web.Response(text=str(twiml), content_type="text/xml")


async def _serve(request: web.Request, dialect: Dialect, admit: Admit) -> web.WebSocketResponse:
    from presence.signaling.app import HOST_KEY

    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, timeout=CLOSE_TIMEOUT_S)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "not_websocket", "this URL takes the provider's media websocket")
    await ws.prepare(request)
    await ProviderLink(ws, dialect, request.app[HOST_KEY]).serve(admit)
    return ws


async def twilio_stream(request: web.Request) -> web.WebSocketResponse:
    from presence.signaling.app import SETTINGS_KEY

    dev = not request.app[SETTINGS_KEY].token_secret
    tickets = request.app[TICKETS_KEY]

    def admit(start: Mapping[str, Any], custom: Mapping[str, str]) -> Grant:
        token = custom.get("token")
        grant = tickets.take(token) if token else None
        if grant is not None:
            return grant
        if token is None and dev:
            log.info("twilio stream: no stream token, taken in dev mode (no token_secret)")
            return Grant(None, None)
        raise Refusal(WSCloseCode.POLICY_VIOLATION, "the stream token is missing, unknown, used or expired")

    return await _serve(request, TWILIO, admit)


async def telnyx_stream(request: web.Request) -> web.WebSocketResponse:
    from presence.signaling import app as api

    token = request.query.get("token") or request.headers.get(TELNYX_TOKEN_HEADER) or api._bearer(request)
    claims = api._authorize(request, token)  # refused before the upgrade: 401 JSON
    if claims is not None and claims.role != PROVIDER_ROLE:
        raise ApiError(403, "not_provider", f"a provider's stream needs a token with role {PROVIDER_ROLE!r}")
    grant = Grant(
        claims.name if claims is not None else None, api._pick_room(claims, request.query.get("room"))
    )
    return await _serve(request, TELNYX, lambda start, custom: grant)


def add_routes(app: web.Application) -> None:
    from presence.signaling.app import SETTINGS_KEY

    app[TICKETS_KEY] = StreamTickets(app[SETTINGS_KEY].provider_stream_token_ttl_s)
    app.router.add_post("/twilio/voice", twilio_voice, name="twilio_voice")
    app.router.add_get("/twilio/stream", twilio_stream, name="twilio_stream")
    app.router.add_get("/telnyx/stream", telnyx_stream, name="telnyx_stream")
