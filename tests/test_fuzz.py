"""Junk at every HTTP endpoint while a call goes on: each answer is a JSON error below 500, and
the call keeps ticking.

Hypothesis drives plain HTTP requests from a process of its own (the server and the call run on
this test's event loop, which must stay free to answer them, GIL included).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing
import string
from concurrent.futures import ProcessPoolExecutor
from urllib.parse import urlsplit

import pytest
from conftest import SR_OUT, BotServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from presence.caller import Caller
from presence.events import Ev

pytestmark = pytest.mark.slow

PATHS = [
    "/whip",
    "/whip/room-1",
    "/whip/resource/0123456789abcdef",
    "/whip/resource/..%2f..%2fetc",
    "/api/offer",
    "/api/calls/0123456789abcdef",
    "/api/calls/%00",
    "/api/config",
    "/static/..%2fapp.py",
    "/nowhere",
]
METHODS = ["GET", "POST", "DELETE", "PATCH", "OPTIONS", "PUT"]
CONTENT_TYPES = ["application/sdp", "application/json", "text/plain", "", "application/sdp; charset=utf-8"]
_HEADER_TEXT = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=300)
SDP_LIKE = st.builds(
    lambda lines: "v=0\r\n" + "\r\n".join(lines) + "\r\n",
    st.lists(
        st.sampled_from(
            [
                "o=- 1 1 IN IP4 127.0.0.1",
                "s=-",
                "t=0 0",
                "m=audio 9 UDP/TLS/RTP/SAVPF 111",
                "m=video 0 RTP/AVP 96",
                "m=audio x RTP/AVP zz",
                "a=ice-ufrag:x",
                "a=ice-pwd:" + "y" * 30,
                "a=fingerprint:sha-256 00:11",
                "a=rtpmap:111 opus/48000/2",
                "c=IN IP4 999.1.1.1",
                "a=" + "z" * 5000,
            ]
        ),
        max_size=12,
    ),
)
BODIES = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=2000).map(str.encode),
    SDP_LIKE.map(str.encode),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=50),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    ).map(lambda v: json.dumps({"sdp": v, "type": "offer", "room": v, "token": v}).encode()),
)


def _request(url: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


_URL: list[str] = []
_SEEN: dict[int, int] = {}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    method=st.sampled_from(METHODS),
    path=st.sampled_from(PATHS),
    body=BODIES,
    content_type=st.sampled_from(CONTENT_TYPES),
    auth=st.one_of(st.just(""), _HEADER_TEXT.map(lambda t: "Bearer " + t)),
    extra=st.dictionaries(
        st.sampled_from(["X-Junk", "Accept", "User-Agent", "Range"]), _HEADER_TEXT, max_size=3
    ),
)
def fuzz(method: str, path: str, body: bytes, content_type: str, auth: str, extra: dict[str, str]) -> None:
    headers = dict(extra)
    if content_type:
        headers["Content-Type"] = content_type
    if auth:
        headers["Authorization"] = auth
    status, raw = _request(_URL[0], method, path, body, headers)
    _SEEN[status] = _SEEN.get(status, 0) + 1
    assert status < 500, (method, path, status, raw[:300])
    if status >= 400:
        error = json.loads(raw)["error"]  # every error is JSON with a stable code
        assert error["code"] and error["message"], raw[:300]


def run_fuzz(url: str) -> dict[int, int]:
    """In a process of its own: Hypothesis's work must not hold the call's GIL."""
    _URL.append(url)
    fuzz()
    return _SEEN


async def test_junk_requests_get_json_errors_while_a_call_goes_on(bot: BotServer, speech) -> None:  # type: ignore[no-untyped-def]
    caller = Caller(url=bot.url)
    await caller.connect()
    session = next(iter(bot.manager.sessions.values()))
    peer = next(iter(session.peers.values()))
    for _ in range(200):  # connected, with the events channel open, before the junk starts
        if peer.link.pc.connectionState == "connected" and any(
            c.readyState == "open" for c in peer.link.channels
        ):
            break
        await asyncio.sleep(0.1)
    assert peer.link.pc.connectionState == "connected", peer.link.pc.connectionState

    ticks = session.engine.assembler.index
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        seen = await asyncio.get_running_loop().run_in_executor(pool, run_fuzz, bot.url)
    # Requests that are not valid HTTP (huge or control-character headers): refused by the
    # HTTP layer before any handler, with a 4xx status, never a crash.
    for name, value in (
        ("X-Big", "a" * 20_000),
        ("X-Ctl", "\x01\x02"),
        ("Content-Type", "application/sdp;\x7f"),
    ):
        status, _ = await asyncio.to_thread(_request, bot.url, "POST", "/whip", b"v=0", {name: value})
        assert 400 <= status < 500
    print("statuses seen", dict(sorted(seen.items())))
    assert len(seen) >= 3  # the junk reached several kinds of refusal, not one early exit
    try:
        # The call went on throughout: its clock ticked and it still hears the caller.
        assert session.engine.assembler.index > ticks
        assert bot.manager.sessions.get(session.call_id) is session
        sent_at = await caller.say(speech("Are you still there?"), SR_OUT)
        try:
            await caller.wait_event(Ev.CALLER_SPEECH_START, after=sent_at, timeout=20)
        except TimeoutError:
            evs = [(e.name, round(e.t - sent_at, 2)) for e in list(session.events.history)[-25:]]
            print("DEBUG server", evs, peer.audio is not None)
            raise
    finally:
        await caller.hangup()
