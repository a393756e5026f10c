"""presence.signaling.janus.api against a real Janus 1.1.2 VideoRoom in a network namespace
(tests/janus_support.py), with aiortc humans publishing and subscribing through it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import rms
from janus_support import (  # noqa: F401 - the fixtures janus and humans
    OPEN_ROOM,
    PIN,
    PIN_ROOM,
    RATE,
    JanusHuman,
    JanusServer,
    humans_fixture,
    janus_fixture,
    read_wav,
    speech_wav,
    start_janus,
)

from presence.signaling.janus.api import (
    EVENT_QUEUE_SIZE,
    LOST,
    JanusError,
    JanusSession,
    JanusSessionLost,
    JanusUnreachable,
    parse_janus_url,
)

Humans = Callable[..., Awaitable[JanusHuman]]
Sessions = Callable[..., Awaitable[JanusSession]]


# --- meeting URLs (no server) ---


@pytest.mark.parametrize(
    ("url", "http_base", "room", "pin", "display"),
    [
        ("janus://10.0.0.5:8088/1234", "http://10.0.0.5:8088/janus", 1234, None, None),
        ("janus://sfu.example.org/77", "http://sfu.example.org:8088/janus", 77, None, None),
        ("janus+http://h:9000/5/", "http://h:9000/janus", 5, None, None),
        ("janus+https://h/5", "https://h:8089/janus", 5, None, None),
        ("JANUS://h:1/9?pin=secret&display=Presence%20Bot", "http://h:1/janus", 9, "secret", "Presence Bot"),
        ("janus://h:8088/9?base_path=/sfu/api/", "http://h:8088/sfu/api", 9, None, None),
        ("janus://[::1]:8088/9?pin=", "http://[::1]:8088/janus", 9, None, None),
    ],
)
def test_parse_janus_url(url: str, http_base: str, room: int, pin: str | None, display: str | None) -> None:
    target = parse_janus_url(url)
    assert (target.http_base, target.room, target.pin, target.display) == (http_base, room, pin, display)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("janus://h:8088", "no room"),
        ("janus://h:8088/", "no room"),
        ("janus://h:8088/abc", "positive integer"),
        ("janus://h:8088/0", "positive integer"),
        ("janus://h:8088/-3", "positive integer"),
        ("janus://h:8088/12/34", "positive integer"),
        ("janus://h:8088/1.5", "positive integer"),
        ("janus://h:99999/1234", "bad port"),
        ("janus://h:port/1234", "bad port"),
        ("janus://h:0/1234", "bad port"),
        ("janus:///1234", "no host"),
        ("http://h:8088/1234", "not a Janus room URL"),
        ("h:8088/1234", "not a Janus room URL"),
        ("", "not a Janus room URL"),
        ("janus://h/1234?pine=secret", "unknown parameter"),
    ],
)
def test_parse_janus_url_rejects(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_janus_url(url)


# --- the API against the real server ---


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speech_wav(
        "Hello everyone, this is Alice speaking in the meeting room.",
        tmp_path_factory.mktemp("speech") / "alice.wav",
    )


async def test_session_and_synchronous_requests(janus: JanusServer) -> None:
    session = await JanusSession.create(janus.base_url)
    try:
        assert session.id > 0 and not session.lost.is_set()
        handle = await session.attach("janus.plugin.videoroom")
        assert await handle.request({"request": "exists", "room": OPEN_ROOM}) == {
            "videoroom": "success",
            "room": OPEN_ROOM,
            "exists": True,
        }
        assert (await handle.request({"request": "exists", "room": 999}))["exists"] is False
        rooms = {room["room"]: room for room in (await handle.request({"request": "list"}))["list"]}
        assert set(rooms) == {OPEN_ROOM, PIN_ROOM}
        assert rooms[PIN_ROOM]["pin_required"] and not rooms[OPEN_ROOM]["pin_required"]
        assert (rooms[OPEN_ROOM]["max_publishers"], rooms[PIN_ROOM]["max_publishers"]) == (8, 2)
        # a plugin error in a synchronous reply ("success" carrying error_code)
        with pytest.raises(JanusError) as err:
            await handle.request({"request": "listparticipants", "room": 999})
        assert (err.value.code, err.value.reason) == (426, "No such room (999)")
        with pytest.raises(JanusError) as err:
            await handle.request({"request": "no-such-request"})
        assert err.value.code == 423
        # a Janus-level error
        with pytest.raises(JanusError) as err:
            await session.attach("janus.plugin.nope")
        assert err.value.code == 460 and not isinstance(err.value, JanusSessionLost)
        await handle.detach()
        await handle.detach()  # idempotent
        with pytest.raises(JanusError) as err:
            await handle.request({"request": "exists", "room": OPEN_ROOM})
        assert err.value.code == 459  # no such handle
    finally:
        await session.destroy()
        await session.destroy()  # idempotent
    assert session.closed and not session.lost.is_set()
    with pytest.raises(JanusSessionLost):
        await session.attach()


async def test_join_errors_wrong_pin_no_room(janus: JanusServer) -> None:
    session = await JanusSession.create(janus.base_url)
    try:
        handle = await session.attach()
        join = {"request": "join", "ptype": "publisher", "display": "mallory"}
        for extra, code in [
            ({"room": PIN_ROOM, "pin": "wrong"}, 433),
            ({"room": PIN_ROOM}, 429),  # missing mandatory element (pin)
            ({"room": 999}, 426),
            ({"room": "1234"}, 430),  # Janus wants an integer
        ]:
            with pytest.raises(JanusError) as err:
                await handle.message({**join, **extra})
            assert err.value.code == code, (extra, err.value)
        joined, jsep = await handle.message({**join, "room": PIN_ROOM, "pin": PIN})
        assert joined["videoroom"] == "joined" and joined["room"] == PIN_ROOM and jsep is None
        assert isinstance(joined["id"], int) and joined["publishers"] == []
    finally:
        await session.destroy()


async def test_room_full(humans: Humans) -> None:
    await humans("p1", PIN_ROOM, pin=PIN)
    await humans("p2", PIN_ROOM, pin=PIN)
    with pytest.raises(JanusError) as err:
        await humans("p3", PIN_ROOM, pin=PIN)
    assert err.value.code == 432, err.value
    assert "Maximum number of publishers (2)" in err.value.reason


def _active_s(pcm: np.ndarray, rate: int, threshold: float = 300.0) -> float:
    """Seconds of 20 ms windows louder than ``threshold`` (int16 RMS)."""
    size = rate // 50
    windows = pcm[: len(pcm) // size * size].astype(np.float64).reshape(-1, size)
    return float(np.sum(np.sqrt(np.mean(windows**2, axis=1)) > threshold)) / 50


async def test_publish_and_subscribe_audio(humans: Humans, speech_file: Path) -> None:
    bob = await humans("bob")
    alice = await humans("alice", video=True)
    # bob was in the room first: Janus tells him about alice with an event
    await bob.wait_for(lambda: bob.feed_of("alice") == alice.feed_id, 5, "alice announced to bob")
    announced = [
        e
        for label, e in bob.events
        if label == "publisher" and "publishers" in e.get("plugindata", {}).get("data", {})
    ]
    assert announced, list(bob.events)
    # carol comes later: both are in her join reply's list
    carol = await humans("carol", publish=False)
    assert {alice.feed_id: "alice", bob.feed_id: "bob"}.items() <= carol.publishers.items()
    assert carol.feed_of("carol") is None  # not publishing

    sub = await bob.subscribe("alice")
    # alice sends silence until she speaks: the stream is up and quiet
    await bob.wait_for(lambda: len(bob.heard("alice")) >= RATE // 2, 5, "half a second of alice's silence")
    quiet = bob.heard("alice")
    assert rms(quiet.astype(np.float64)) < 30, rms(quiet.astype(np.float64))
    before = len(quiet)
    sent, sent_rate = read_wav(speech_file)
    began = time.monotonic()
    await alice.say(speech_file)
    took = time.monotonic() - began
    assert abs(took - len(sent) / sent_rate) < 0.5, took  # played in real time
    await asyncio.sleep(0.5)  # the last packets through Janus and the jitter buffer
    heard = bob.heard("alice")[before:]
    assert rms(heard.astype(np.float64)) > 500, rms(heard.astype(np.float64))
    spoke, got = _active_s(sent, sent_rate), _active_s(heard, RATE)
    assert spoke > 1.0 and 0.8 * spoke <= got <= 1.2 * spoke + 0.1, (spoke, got)
    assert sub.recording.video_frames > 10, sub.recording.video_frames  # alice's small video came too
    print(f"\ntimings: bob {bob.timings}, alice {alice.timings}")

    await alice.leave()
    await bob.wait_for(lambda: bob.feed_of("alice") is None, 5, "alice gone from bob's list")
    gone = {
        e["plugindata"]["data"].get(k)
        for _, e in bob.events
        if "plugindata" in e
        for k in ("leaving", "unpublished")
    }
    assert alice.feed_id in gone


async def test_unreachable_quickly(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/janus"
    began = time.monotonic()
    with pytest.raises(JanusUnreachable) as err:
        await JanusSession.create(url)
    assert time.monotonic() - began < 1.0
    assert url in str(err.value)

    with socket.socket() as s:  # listens, never answers: the request's timeout ends it
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}/janus"
        began = time.monotonic()
        with pytest.raises(JanusUnreachable) as err:
            await JanusSession.create(url, timeout=0.5)
        assert 0.4 < time.monotonic() - began < 2.0
        assert url in str(err.value) and "Timeout" in str(err.value)


async def test_handle_queue_is_bounded(janus: JanusServer) -> None:
    session = await JanusSession.create(janus.base_url)
    try:
        handle = await session.attach()
        for n in range(EVENT_QUEUE_SIZE + 44):
            handle._deliver({"janus": "event", "n": n})
        assert handle.events.qsize() == EVENT_QUEUE_SIZE and handle.dropped == 44
        assert handle.events.get_nowait()["n"] == 44  # the oldest went
    finally:
        await session.destroy()


@pytest.fixture
async def sessions() -> AsyncIterator[Callable[..., Awaitable[JanusSession]]]:
    """``await sessions(base_url, **kwargs)``: JanusSession.create, destroyed after the test."""
    made: list[JanusSession] = []

    async def create(base_url: str, **kwargs: float) -> JanusSession:
        made.append(session := await JanusSession.create(base_url, **kwargs))
        return session

    yield create
    for session in made:
        await session.destroy()


async def _next_lost(handle_events: asyncio.Queue[dict[str, object]]) -> dict[str, object]:
    while (event := await asyncio.wait_for(handle_events.get(), 1))["janus"] != LOST:
        pass
    return event


async def test_session_lost_when_janus_is_killed(tmp_path: Path, sessions: Sessions) -> None:
    server = start_janus(tmp_path)
    try:
        session = await sessions(server.base_url)
        handle = await session.attach()
        await handle.message({"request": "join", "ptype": "publisher", "room": OPEN_ROOM, "display": "x"})
        server.kill()
        began = time.monotonic()
        await asyncio.wait_for(session.lost.wait(), 10)
        lost_after = time.monotonic() - began
        # not at the first refused poll (a blip), but soon after session.unreachable_s
        assert session.unreachable_s - 0.5 <= lost_after <= session.unreachable_s + 2, lost_after
        assert (
            session.lost_reason
            and "unreachable" in session.lost_reason
            and server.base_url in session.lost_reason
        )
        assert (await _next_lost(handle.events))["reason"] == session.lost_reason
        with pytest.raises(JanusSessionLost):
            await handle.request({"request": "exists", "room": OPEN_ROOM})
        began = time.monotonic()
        await session.destroy()  # the server is gone: nothing to say goodbye to
        assert time.monotonic() - began < 0.5
    finally:
        server.close()
    # nothing of it is left behind
    assert server.leftovers() == []


async def test_session_lost_when_janus_restarts(tmp_path: Path, sessions: Sessions) -> None:
    server = start_janus(tmp_path)
    try:
        session = await sessions(server.base_url)
        handle = await session.attach()
        server.stop()
        server.start()
        await asyncio.wait_for(session.lost.wait(), 3)  # the new Janus does not know the session
        assert session.lost_reason and "no longer knows" in session.lost_reason
        assert (await _next_lost(handle.events))["janus"] == LOST
        await session.destroy()
        fresh = await sessions(server.base_url)  # the restarted server works
        assert (await (await fresh.attach()).request({"request": "exists", "room": OPEN_ROOM}))["exists"]
    finally:
        server.close()


async def test_keepalive_holds_session_timeout_ends(tmp_path: Path, sessions: Sessions) -> None:
    server = start_janus(tmp_path, session_timeout=3)
    try:
        quiet = await sessions(server.base_url, keepalive_s=60)
        alive = await sessions(server.base_url, keepalive_s=1)
        began = time.monotonic()
        await asyncio.wait_for(quiet.lost.wait(), 10)  # a long poll alone does not keep a session
        assert quiet.lost_reason and "timed out" in quiet.lost_reason
        await asyncio.sleep(max(0.0, 6 - (time.monotonic() - began)))
        assert not alive.lost.is_set()
        assert (await (await alive.attach()).request({"request": "exists", "room": OPEN_ROOM}))["exists"]
    finally:
        server.close()


async def test_session_destroyed_behind_our_back(janus: JanusServer) -> None:
    session = await JanusSession.create(janus.base_url)
    try:
        handle = await session.attach()
        async with (
            aiohttp.ClientSession() as http,
            http.post(session.url, json={"janus": "destroy", "transaction": "x"}) as resp,
        ):
            assert (await resp.json(content_type=None))["janus"] == "success"
        with pytest.raises(JanusSessionLost) as err:  # 458 no such session, or the poll's 404 first
            await handle.request({"request": "exists", "room": OPEN_ROOM})
        assert err.value.code in (458, None)
        await asyncio.wait_for(session.lost.wait(), 3)
        assert (await _next_lost(handle.events))["janus"] == LOST
    finally:
        await session.destroy()
