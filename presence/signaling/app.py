"""The HTTP side of Presence: the call page, WHIP and JSON offer/answer, health and metrics.

``/api/offer`` also answers Pipecat's SmallWebRTC clients unchanged: their offer's ``pc_id``,
``restart_pc`` and ``request_data`` (renegotiation, restart and our name/room/token), and their
``PATCH`` of trickled ICE candidates.

Everything a client sends is checked here (offer rate, size, content type, token and room,
SDP shape) before any of it reaches aiortc, and every error leaves as
``{"error": {"code", "message"}}`` with a stable code, so the page, WHIP clients and tests can
all react to it. Only the caller who placed a call can hang it up: the offer's answer carries a
resource token that the ``DELETE`` must present.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from presence.bot.backends.languages import LANGUAGES
from presence.config import Settings
from presence.signaling import dial_api, provider_ws, rooms_api, tokens
from presence.signaling.contract import CallHost, CallRejected
from presence.signaling.errors import HTTP_ERROR_CODES, ApiError, error_response
from presence.signaling.join_options import pick_join_options
from presence.signaling.limits import RateLimiter
from presence.signaling.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from presence.signaling.metrics import Metrics
from presence.signaling.offer_checks import MAX_TRICKLED_CANDIDATES, parse_candidate, validate_offer_sdp
from presence.web import STATIC_DIR

log = logging.getLogger(__name__)

SETTINGS_KEY = web.AppKey("settings", Settings)
HOST_KEY: web.AppKey[CallHost] = web.AppKey("host")
METRICS_KEY = web.AppKey("metrics", Metrics)
LIMITER_KEY = web.AppKey("offer_limiter", RateLimiter)
RESOURCES_KEY = web.AppKey("resource_tokens", tokens.ResourceTokens)
SIP_KEY = web.AppKey("sip", object)  # the SIP user agent, when sip_port >= 0

# Route names whose errors count as rejected offers in presence_offers_rejected_total.
OFFER_ROUTES = frozenset({"whip_offer", "whip_offer_room", "api_offer"})
ROOM_RE = tokens.ROOM_RE
PEER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_NAME_CHARS = 64
# The WHIP answer's header carrying the resource token: DELETE needs it as a Bearer token.
RESOURCE_TOKEN_HEADER = "X-Presence-Resource-Token"
# Pipecat's SmallWebRTC: the offer's free-form data (the JS client spells it "requestData"), and
# the keys of it that stand in for ours when the body does not give them at the top level.
REQUEST_DATA_KEYS = ("request_data", "requestData")
REQUEST_DATA_FIELDS = ("name", "room", "token", "language", "original")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---------------------------------------------------------------------------- middleware


def _route_label(request: web.Request) -> str:
    # the route template, never the raw path, keeps label cardinality bounded
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _route_name(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.name if resource is not None else None


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> ApiError:
    settings = request.app[SETTINGS_KEY]
    code = HTTP_ERROR_CODES.get(exc.status, f"http_{exc.status}")
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    if exc.status == 404:
        message = f"nothing at {request.path[:200]}"
    elif exc.status == 405:
        message = f"method {request.method} is not allowed here"
    elif exc.status == 413:
        message = f"body exceeds the limit of {settings.max_body_bytes} bytes"
    else:
        message = exc.reason or code
    return ApiError(exc.status, code, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every failure into the JSON error shape and counts every answer."""
    metrics = request.app[METRICS_KEY]
    error: ApiError | None = None
    try:
        response = await handler(request)
    except ApiError as exc:
        error = exc
    except CallRejected as exc:
        status = exc.status if 400 <= exc.status <= 599 else 500
        error = ApiError(status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            metrics.http_requests.labels(_route_label(request), str(exc.status)).inc()
            raise
        error = _from_http_exception(request, exc)
    except Exception:
        # the server keeps running; the traceback goes to the log, not to the client
        log.exception("unhandled error in %s %s", request.method, request.path)
        error = ApiError(500, "internal", "internal server error")
    if error is not None:
        if error.status >= 500:
            log.warning("%s %s -> %d %s", request.method, request.path, error.status, error.code)
        else:
            log.info("%s %s -> %d %s", request.method, request.path, error.status, error.code)
        if _route_name(request) in OFFER_ROUTES and request.method == "POST":
            metrics.offers_rejected.labels(error.code).inc()
        response = error_response(error.status, error.code, error.message, error.headers)
    metrics.http_requests.labels(_route_label(request), str(response.status)).inc()
    return response


# ---------------------------------------------------------------------------- validation


def _check_length(request: web.Request) -> None:
    # refuse from the header before reading a byte; client_max_size guards chunked bodies
    limit = request.app[SETTINGS_KEY].max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")


def _require_type(request: web.Request, expected: str) -> None:
    if request.content_type != expected:
        got = request.headers.get("Content-Type", "none")[:100]
        raise ApiError(415, "unsupported_media_type", f"expected Content-Type {expected}, got {got}")


async def _read_json_object(request: web.Request, example: str = "") -> dict[str, Any]:
    """The body as a JSON object (415, 413, 400 otherwise); ``example`` shows one in the 400."""
    _check_length(request)
    _require_type(request, "application/json")
    body = await _read_body(request)
    try:
        data: Any = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(
            400, "bad_request", f"expected a JSON object{' such as ' + example if example else ''}"
        )
    return data


async def _read_body(request: web.Request) -> bytes:
    body = await request.read()  # raises 413 past client_max_size (chunked uploads)
    limit = request.app[SETTINGS_KEY].max_body_bytes
    if len(body) > limit:
        raise ApiError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
    return body


def _decode_sdp(body: bytes) -> str:
    if not body:
        raise ApiError(400, "malformed_sdp", "the body is empty; send an SDP offer")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_sdp", "the SDP offer is not UTF-8") from None
    return validate_offer_sdp(text)


def _authorize(request: web.Request, token: str | None) -> tokens.TokenClaims | None:
    """The token's claims when a secret is set (401 otherwise); ``None`` in dev mode."""
    secret = request.app[SETTINGS_KEY].token_secret
    if not secret:
        return None
    try:
        return tokens.verify(secret, token)
    except tokens.TokenError as exc:
        raise ApiError(
            401,
            exc.code,
            exc.message,
            headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.code}"'},
        ) from None


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _join_token(request: web.Request, given: object) -> str | None:
    """The JSON API's join token: from the body, else ``Authorization: Bearer``, else ``?token=``
    (a SmallWebRTC client sends its configured headers and URL with the offer and the PATCH)."""
    token = given or _bearer(request) or request.query.get("token")
    if token is not None and not isinstance(token, str):
        raise ApiError(400, "bad_request", "token must be a string")
    return token


def _pick_room(claims: tokens.TokenClaims | None, requested: object) -> str | None:
    """The room to join: dev mode (no claims) takes the request; with a token, its ``room``
    claim decides, and asking for any other room is refused rather than silently overridden."""
    if requested is None or requested == "":
        requested = None
    elif not isinstance(requested, str) or not ROOM_RE.match(requested):
        raise ApiError(400, "bad_request", "room must be 1-64 letters, digits, '_', '-' or '.'")
    if claims is None:
        return requested
    if claims.room is None:
        if requested is not None:
            raise ApiError(
                403, "wrong_room", "this token is bound to no room: it can only start a one-to-one call"
            )
        return None
    if requested is not None and requested != claims.room:
        raise ApiError(403, "wrong_room", f"this token is for room {claims.room!r}, not {requested!r}")
    return claims.room


def _pick_name(requested: object, claims: tokens.TokenClaims | None, default: str) -> str:
    if claims is not None and claims.name:
        requested = claims.name  # a name in the token is the one the others see
    if requested is not None and requested != "":
        if not isinstance(requested, str):
            raise ApiError(400, "bad_request", "name must be a string")
        # printable characters only: the name ends up in logs and on other people's pages
        cleaned = "".join(ch for ch in requested if ch.isprintable()).strip()[:MAX_NAME_CHARS]
        if cleaned:
            return cleaned
    if claims is not None and claims.sub:
        return claims.sub[:MAX_NAME_CHARS]
    return default


def _rate_limit(request: web.Request) -> None:
    # first thing an offer route does: a flood costs neither parsing nor a token check
    wait = request.app[LIMITER_KEY].take(request.remote or "unknown")
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise ApiError(
            429,
            "rate_limited",
            f"too many offers from this address; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


def _owned_peer_id(request: web.Request) -> str:
    """The resource's peer id once the request proves it is that peer's own hang-up: it must
    carry the resource token the offer's answer gave out (401 without it, 403 when wrong)."""
    presented = _bearer(request)
    if presented is None:
        raise ApiError(
            401,
            "missing_resource_token",
            "hanging up needs the resource token from the offer's answer as 'Authorization: Bearer ...'",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    peer_id = request.match_info["peer_id"]
    if not PEER_ID_RE.match(peer_id) or not request.app[RESOURCES_KEY].check(peer_id, presented):
        raise ApiError(403, "bad_resource_token", "this is not the resource token of that call")
    return peer_id


# ---------------------------------------------------------------------------- handlers


async def index(request: web.Request) -> web.StreamResponse:
    # no-cache: the page must pick up a new app.js after an upgrade
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.StreamResponse:
    # our own lookup instead of add_static: a missing file must raise (and become JSON),
    # whereas aiohttp's static FileResponse only discovers the 404 while sending
    root = STATIC_DIR.resolve()
    path = (root / request.match_info["path"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(404, "not_found", f"no static file {request.match_info['path'][:200]}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "calls": request.app[HOST_KEY].active_calls})


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def api_config(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    return web.json_response(
        {
            "ice_servers": [{"urls": url} for url in settings.ice_servers],
            "token_required": bool(settings.token_secret),
            "micro_turn_ms": settings.micro_turn_ms,
            # what the bot samples of a camera; the page sends no more than that
            "video_fps": settings.video_fps,
            "video_max_width": settings.video_max_width,
            # the page's interpreter selector
            "interpret_languages": [
                {"code": code, "name": LANGUAGES.get(code, code).title()}
                for code in settings.interpret_languages
            ],
        }
    )


async def whip_offer(request: web.Request) -> web.Response:
    _rate_limit(request)
    _check_length(request)
    claims = _authorize(request, _bearer(request) or request.query.get("token"))
    _require_type(request, "application/sdp")
    sdp = _decode_sdp(await _read_body(request))
    room = _pick_room(claims, request.match_info.get("room") or request.query.get("room"))
    name = _pick_name(request.query.get("name"), claims, default="whip")
    options = pick_join_options(
        request.app[SETTINGS_KEY], claims, request.query.get("language"), request.query.get("original")
    )
    answer = await request.app[HOST_KEY].answer(sdp, participant=name, room=room, options=options)
    return web.Response(
        status=201,
        body=answer.sdp.encode("utf-8"),
        content_type="application/sdp",
        headers={
            "Location": f"/whip/resource/{answer.peer_id}",
            RESOURCE_TOKEN_HEADER: request.app[RESOURCES_KEY].issue(answer.peer_id),
            "X-Presence-Call": answer.call_id,
        },
    )


async def whip_options(request: web.Request) -> web.Response:
    # WHIP clients probe with OPTIONS before POSTing
    return web.Response(status=204, headers={"Accept-Post": "application/sdp", "Allow": "OPTIONS, POST"})


async def whip_delete(request: web.Request) -> web.Response:
    if not await request.app[HOST_KEY].hangup(_owned_peer_id(request)):
        raise ApiError(404, "unknown_resource", "no such call resource (or already hung up)")
    return web.Response(status=200)


async def whip_patch(request: web.Request) -> web.Response:
    raise ApiError(
        405,
        "trickle_not_supported",
        "trickle ICE is not supported: send the offer with all candidates gathered",
        headers={"Allow": "DELETE, OPTIONS"},
    )


async def whip_resource_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Allow": "DELETE, OPTIONS"})


async def api_offer(request: web.Request) -> web.Response:
    """The page's offer, and Pipecat SmallWebRTC's: a ``pc_id`` naming a live WebRTC peer
    renegotiates that peer's connection, or with ``restart_pc`` hangs it up and answers the offer
    as a new peer; any other ``pc_id`` (or none) is a new peer. The answer's ``pc_id`` is its peer id."""
    _rate_limit(request)
    data = await _read_json_object(request)
    request_data = next((data[k] for k in REQUEST_DATA_KEYS if data.get(k) is not None), None)
    # SmallWebRTC's request_data may carry our name, room and token; the body's own keys win
    given = {k: request_data.get(k) for k in REQUEST_DATA_FIELDS} if isinstance(request_data, dict) else {}
    given.update({k: data[k] for k in REQUEST_DATA_FIELDS if data.get(k) is not None})
    claims = _authorize(request, _join_token(request, given.get("token")))
    if data.get("type") != "offer":
        raise ApiError(400, "bad_request", 'type must be "offer"')
    sdp = data.get("sdp")
    if not isinstance(sdp, str):
        raise ApiError(400, "bad_request", "sdp must be a string")
    pc_id, restart = data.get("pc_id"), data.get("restart_pc")
    if pc_id is not None and not isinstance(pc_id, str):
        raise ApiError(400, "bad_request", "pc_id must be a string or null")
    if restart is not None and not isinstance(restart, bool):
        raise ApiError(400, "bad_request", "restart_pc must be true, false or null")
    room = _pick_room(claims, given.get("room"))
    name = _pick_name(given.get("name"), claims, default="caller")
    options = pick_join_options(
        request.app[SETTINGS_KEY], claims, given.get("language"), given.get("original")
    )
    sdp = validate_offer_sdp(sdp)
    host = request.app[HOST_KEY]
    answer = None
    if pc_id and host.peer_connection(pc_id) is not None:
        if restart:
            await host.hangup(pc_id)  # the client's old connection; its new one is answered below
        else:
            answer = await host.renegotiate(pc_id, sdp)
    if answer is None:
        answer = await host.answer(sdp, participant=name, room=room, options=options)
    return web.json_response(
        {
            "sdp": answer.sdp,
            "type": answer.type,
            "pc_id": answer.peer_id,
            "call_id": answer.call_id,
            "peer_id": answer.peer_id,
            "resource": f"/whip/resource/{answer.peer_id}",
            "resource_token": request.app[RESOURCES_KEY].issue(answer.peer_id),
        }
    )


async def api_offer_candidates(request: web.Request) -> web.Response:
    """SmallWebRTC's trickle ICE: ``PATCH /api/offer`` with ``{"pc_id", "candidates": [...]}``
    adds the caller's candidates to its peer connection. Not an offer, so not rate limited
    (a client sends several), except that naming no live peer spends an offer's worth: guessing
    pc_ids costs what offers do. With a token secret it needs the join token like the offer."""
    data = await _read_json_object(request)
    _authorize(request, _join_token(request, data.get("token")))
    pc_id, items = data.get("pc_id"), data.get("candidates")
    if not isinstance(pc_id, str) or not pc_id:
        raise ApiError(400, "bad_request", "pc_id must be the pc_id of the offer's answer")
    if not isinstance(items, list):
        raise ApiError(400, "bad_request", "candidates must be a list")
    if len(items) > MAX_TRICKLED_CANDIDATES:
        raise ApiError(400, "bad_request", f"at most {MAX_TRICKLED_CANDIDATES} candidates at a time")
    candidates = [parse_candidate(item) for item in items]
    pc = request.app[HOST_KEY].peer_connection(pc_id)
    if pc is None:
        _rate_limit(request)
        raise ApiError(404, "unknown_peer", "no such peer connection (or it has hung up)")
    for candidate in candidates:
        try:
            await pc.addIceCandidate(candidate)
        except OSError as exc:  # an mDNS name this host cannot resolve: the others still count
            log.info("peer %s: candidate not added: %s", pc_id, exc)
    return web.json_response({"status": "success"})


async def api_hangup(request: web.Request) -> web.Response:
    peer_id = _owned_peer_id(request)
    if not await request.app[HOST_KEY].hangup(peer_id):
        raise ApiError(404, "unknown_resource", "no such call (or already hung up)")
    return web.json_response({"peer_id": peer_id, "hung_up": True})


# ---------------------------------------------------------------------------- app


def create_app(settings: Settings, host: CallHost) -> web.Application:
    """The aiohttp application serving the page, WHIP, the JSON API, health and metrics."""
    # client_max_size makes aiohttp refuse oversized bodies even without Content-Length
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)

    def active_calls() -> float:
        try:
            return float(host.active_calls)
        except Exception:  # a scrape must not fail because the host is mid-shutdown
            return math.nan

    # The bot observes its histograms on its own Metrics: serve those when the host has them.
    host_metrics = getattr(host, "metrics", None)
    metrics = host_metrics if isinstance(host_metrics, Metrics) else Metrics.create(active_calls)
    app[SETTINGS_KEY] = settings
    app[HOST_KEY] = host
    app[METRICS_KEY] = metrics
    app[LIMITER_KEY] = RateLimiter(settings.offer_rate_per_min, settings.offer_burst)
    app[RESOURCES_KEY] = tokens.ResourceTokens()
    if settings.token_secret and tokens.short_secret(settings.token_secret):
        log.warning("token_secret is shorter than 32 bytes: use a long random string")
    # also reachable as app["metrics"] for code that prefers the plain key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app["metrics"] = metrics

    r = app.router
    r.add_get("/", index, name="index")
    r.add_get("/healthz", healthz, name="healthz")
    r.add_get("/metrics", metrics_handler, name="metrics")
    r.add_get("/api/config", api_config, name="api_config")
    offer = r.add_resource("/api/offer", name="api_offer")
    offer.add_route("POST", api_offer)
    offer.add_route("PATCH", api_offer_candidates)  # SmallWebRTC's trickled ICE candidates
    r.add_delete("/api/calls/{peer_id}", api_hangup, name="api_hangup")
    # the resource route first: /whip/{room} must not swallow /whip/resource/...
    resource = r.add_resource("/whip/resource/{peer_id}", name="whip_resource")
    resource.add_route("DELETE", whip_delete)
    resource.add_route("PATCH", whip_patch)
    resource.add_route("OPTIONS", whip_resource_options)
    whip = r.add_resource("/whip", name="whip_offer")
    whip.add_route("POST", whip_offer)
    whip.add_route("OPTIONS", whip_options)
    whip_room = r.add_resource("/whip/{room}", name="whip_offer_room")
    whip_room.add_route("POST", whip_offer)
    whip_room.add_route("OPTIONS", whip_options)
    r.add_get("/static/{path:.+}", static_file, name="static")
    dial_api.add_routes(app)
    rooms_api.add_routes(app)
    provider_ws.add_routes(app)

    async def close_host(app: web.Application) -> None:
        await app[HOST_KEY].close()

    app.on_shutdown.append(close_host)
    return app


def dev_join_url(settings: Settings, *, room: str | None = None, sub: str = "dev") -> str:
    """The page URL to open, with a freshly minted token when a secret is set."""
    params: dict[str, str] = {}
    if settings.token_secret:
        params["token"] = tokens.mint(settings.token_secret, room=room, sub=sub, ttl_s=settings.token_ttl_s)
    if room:
        params["room"] = room
    url = settings.base_url + "/"
    return url + "?" + urlencode(params) if params else url


async def run_server(settings: Settings, host: CallHost) -> web.AppRunner:
    """Start serving; with ``settings.port == 0`` the bound port is written back to settings.

    Stop with ``await runner.cleanup()``, which also closes the host (``on_shutdown``).
    """
    app = create_app(settings, host)
    sip = None
    if settings.sip_port >= 0:
        from presence.signaling.sip.ua import SipUserAgent

        sip = app[SIP_KEY] = SipUserAgent(settings, host)

        async def close_sip(app: web.Application) -> None:
            await sip.close()  # after the host: its calls' BYEs go out on this socket

        app.on_shutdown.append(close_sip)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
        if sip is not None:
            await sip.start()
    except BaseException:
        await runner.cleanup()
        raise
    if settings.port == 0:
        settings.port = int(runner.addresses[0][1])
    log.info("serving on %s", settings.base_url)
    return runner
