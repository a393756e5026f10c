"""``POST /api/rooms/join``: a bot joins a meeting on an SFU; ``GET /api/rooms/{id}`` follows it
(queued, joining, joined, rejoining, failed or left), ``DELETE /api/rooms/{id}`` makes it leave.

Like dialling out, for operators: with a token secret set only a token with role ``operator``
(401 without a valid token, 403 with another role); in dev mode anyone who reaches the port. The
POST queues the request in Redis and answers 202 at once; a node with a free slot joins (see
``room_dispatch.py``). With ``rooms`` off every route answers 503 ``rooms_off``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import uuid
from typing import Any

from aiohttp import web

from presence.signaling import rooms
from presence.signaling.errors import ApiError
from presence.signaling.room_dispatch import REDIS_ERRORS, RoomDispatcher, RoomsUnavailable
from presence.signaling.rooms import MAX_DISPLAY_CHARS, MAX_PIN_CHARS, MAX_URL_CHARS, RoomRequest

log = logging.getLogger(__name__)

OPERATOR_ROLE = "operator"
ROOMS_KEY = web.AppKey("rooms", RoomDispatcher)
URL_EXAMPLE = "janus://10.77.0.1:8088/1234"
FINISHED = ("failed", "left")
CONNECTORS = ("presence.signaling.janus.room",)  # imported with rooms on: they register their joiners


def _dispatcher(request: web.Request, token: object = None) -> RoomDispatcher:
    """The app's dispatcher once the caller may use it (401/403), else 503 when rooms are off."""
    from presence.signaling import app as api  # the shared request checks live with the app

    claims = api._authorize(request, api._bearer(request) or token)  # type: ignore[arg-type]
    if claims is not None and claims.role != OPERATOR_ROLE:
        raise ApiError(403, "not_operator", f"joining rooms needs a token with role {OPERATOR_ROLE!r}")
    dispatcher = request.app.get(ROOMS_KEY)
    if dispatcher is None:
        raise ApiError(503, "rooms_off", "rooms are off here: enable them with PRESENCE_ROOMS=1 (--rooms)")
    return dispatcher


def _unavailable(exc: BaseException) -> ApiError:
    if not isinstance(exc, RoomsUnavailable):
        exc = RoomsUnavailable("redis_unavailable", f"the room queue's Redis is unreachable: {exc}", 5)
    return ApiError(503, exc.code, exc.message, headers={"Retry-After": str(exc.retry_after_s)})


def _string(data: dict[str, Any], name: str, limit: int) -> str:
    value = data.get(name) or ""
    if not isinstance(value, str) or len(value) > limit:
        raise ApiError(400, "bad_request", f"{name} must be a string of at most {limit} characters")
    return value


async def api_room_join(request: web.Request) -> web.Response:
    from presence.signaling import app as api

    api._rate_limit(request)
    data = await api._read_json_object(request, '{"url": "' + URL_EXAMPLE + '"}')
    dispatcher = _dispatcher(request, data.get("token"))
    url = _string(data, "url", MAX_URL_CHARS).strip()
    if not url:
        raise ApiError(400, "bad_request", f"url is required: the room to join, such as {URL_EXAMPLE}")
    # printable characters only: the name shows on other people's screens and in logs
    display = "".join(c for c in _string(data, "display", 256) if c.isprintable()).strip()[:MAX_DISPLAY_CHARS]
    room = RoomRequest(uuid.uuid4().hex, url, _string(data, "pin", MAX_PIN_CHARS), display)
    try:
        await dispatcher.submit(room)
    except ValueError as exc:
        raise ApiError(400, "bad_url", str(exc)) from None
    except (RoomsUnavailable, *REDIS_ERRORS) as exc:
        raise _unavailable(exc) from None
    return web.json_response(
        {"id": room.id, "status": "queued", "progress": f"/api/rooms/{room.id}"}, status=202
    )


async def api_room(request: web.Request) -> web.Response:
    """GET: the request's status; DELETE: ask its bot to leave (202; 200 when it is over)."""
    dispatcher, room_id = _dispatcher(request), request.match_info["room_id"]
    try:
        if request.method == "DELETE":
            state = await dispatcher.leave(room_id)
            status = None if state is None else {"status": state, "leave_requested": state not in FINISHED}
        else:
            status = await dispatcher.status(room_id)
            status = status and {"status": status.pop("state", ""), **status}
    except REDIS_ERRORS as exc:
        raise _unavailable(exc) from None
    if status is None:
        raise ApiError(404, "unknown_room_request", "no such room request (finished ones are kept an hour)")
    accepted = request.method == "DELETE" and status["leave_requested"]
    return web.json_response({"id": room_id, **status}, status=202 if accepted else 200)


def add_routes(app: web.Application) -> None:
    """The routes; with ``rooms`` on, also the node's dispatcher, run from start-up to shutdown."""
    from presence.signaling.app import HOST_KEY, SETTINGS_KEY

    app.router.add_post("/api/rooms/join", api_room_join, name="api_room_join")
    room = app.router.add_resource("/api/rooms/{room_id}", name="api_room")
    room.add_route("GET", api_room)
    room.add_route("DELETE", api_room)
    settings = app[SETTINGS_KEY]
    if not settings.rooms:
        return
    for module in CONNECTORS:
        try:
            importlib.import_module(module)
        except Exception:
            log.exception("rooms: cannot import the room connector %s", module)
    joiners = {}
    for scheme, factory in rooms.JOINERS.items():
        try:
            joiners[scheme] = factory(settings, app[HOST_KEY])
        except Exception:
            log.exception("rooms: the joiner for %s:// URLs failed to start; such URLs are refused", scheme)
    if not joiners:
        log.warning("rooms: on, but no room joiner is registered: every join request is refused")
    dispatcher = app[ROOMS_KEY] = RoomDispatcher(settings, joiners)
    tasks: list[asyncio.Task[None]] = []

    async def start(app: web.Application) -> None:  # the node takes rooms from start-up to shutdown
        tasks.append(asyncio.create_task(dispatcher.run(), name="rooms"))
        log.info("rooms: node %s joins up to %d rooms (%s)", dispatcher.node, dispatcher.capacity,
                 ", ".join(f"{s}://" for s in joiners) or "no joiners")  # fmt: skip

    async def stop(app: web.Application) -> None:
        await dispatcher.close()  # before the host closes: its rooms are left while it still runs
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
