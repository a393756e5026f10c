"""``POST /api/dial``: the bot places a phone call; ``GET /api/dial/{id}`` follows it.

Placing calls costs money and can be abused (toll fraud), so with a token secret set only a
token whose role is ``operator`` may dial; in dev mode (loopback only, no secret) anyone who
reaches the port may. The POST answers at once (202) with the dial's id; its progress
("trying", "ringing", "answered" with the call id, or "failed" with the SIP reason) is read
from the GET, which ``presence dial`` polls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from typing import Any

from aiohttp import web
from sipmessage import URI

from presence.signaling.errors import ApiError
from presence.signaling.sip.client import DialFailed, DialProgress

log = logging.getLogger(__name__)

OPERATOR_ROLE = "operator"
KEEP_DIALS = 256  # finished dials kept for their GET
DIALS_KEY = web.AppKey("dials", OrderedDict)
_tasks: set[asyncio.Task[None]] = set()


def _progress_json(dial_id: str, p: DialProgress) -> dict[str, Any]:
    return {
        "dial_id": dial_id,
        "to": p.target,
        "status": p.status,
        "reason": p.reason,
        "call_id": p.call_id or None,
        "peer_id": p.peer_id or None,
        "steps": [{"t": round(t, 3), "status": s} for t, s in p.steps],
    }


async def api_dial(request: web.Request) -> web.Response:
    from presence.signaling import app as api  # the shared request checks live with the app

    api._rate_limit(request)
    data = await api._read_json_object(request)
    claims = api._authorize(request, api._bearer(request) or data.get("token"))
    if claims is not None and claims.role != OPERATOR_ROLE:
        raise ApiError(403, "not_operator", f"dialling out needs a token with role {OPERATOR_ROLE!r}")
    target = data.get("to")
    if not isinstance(target, str) or len(target) > 256:
        raise ApiError(400, "bad_request", "to must be a SIP URI such as sip:alice@192.0.2.10:5060")
    try:
        uri = URI.parse(target)
    except ValueError:
        raise ApiError(400, "bad_request", f"not a SIP URI: {target!r}") from None
    if uri.scheme not in ("sip", "sips") or not uri.host:
        raise ApiError(400, "bad_request", f"not a SIP URI: {target!r}")
    room = api._pick_room(claims, data.get("room"))
    sip = request.app.get(api.SIP_KEY)
    if sip is None:
        raise ApiError(503, "sip_off", "SIP is off on this server: start it with --sip-port (5060)")
    dials: OrderedDict[str, DialProgress] = request.app[DIALS_KEY]
    dial_id = secrets.token_hex(8)
    progress = dials[dial_id] = DialProgress(target)
    while len(dials) > KEEP_DIALS:
        dials.popitem(last=False)

    async def run() -> None:
        try:
            await sip.dial(target, progress, room=room)  # type: ignore[attr-defined]
        except DialFailed as exc:
            progress.step("failed", str(exc))
        except Exception as exc:
            log.exception("dial %s to %s failed", dial_id, target)
            progress.step("failed", f"internal error: {type(exc).__name__}")

    task = asyncio.get_running_loop().create_task(run(), name=f"dial-{dial_id}")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return web.json_response(
        {**_progress_json(dial_id, progress), "progress": f"/api/dial/{dial_id}"}, status=202
    )


async def api_dial_status(request: web.Request) -> web.Response:
    progress = request.app[DIALS_KEY].get(request.match_info["dial_id"])
    if progress is None:
        raise ApiError(404, "unknown_dial", "no such dial (ids are kept for the last 256 dials)")
    return web.json_response(_progress_json(request.match_info["dial_id"], progress))


def add_routes(app: web.Application) -> None:
    app[DIALS_KEY] = OrderedDict()
    app.router.add_post("/api/dial", api_dial, name="api_dial")
    app.router.add_get("/api/dial/{dial_id}", api_dial_status, name="api_dial_status")
