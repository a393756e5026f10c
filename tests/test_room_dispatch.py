"""Room requests dispatched over bot nodes through Redis Streams (presence.signaling.room_dispatch)
and the operator API that asks for them (presence.signaling.rooms_api), against a real Redis
(127.0.0.1:6379, or PRESENCE_TEST_REDIS_URL) under a key prefix of each test's own.

``FakeSfu`` below is a TEST HARNESS standing in for an SFU connector: its rooms are asyncio
futures, so joining, failing, ending and leaving are the test's to decide. Several dispatchers in
one process play the nodes; "killing" one cancels its task, which writes nothing to Redis, as
SIGKILL would. The real Janus connector and a killed bot process are tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from conftest import BotServer, need
from jobs_support import REDIS_URL, delete_keys, free_port, redis_problem, until

from presence.bot.jobs.redisio import Backoff
from presence.config import Settings
from presence.signaling import rooms, rooms_api, tokens
from presence.signaling.room_dispatch import RoomDispatcher, RoomsUnavailable
from presence.signaling.rooms import RoomJoinError, RoomRequest

SECRET = "test-secret-do-not-use-" + "0123456789abcdef" * 3


# ---------------------------------------------------------------------- test harness
class FakePresence:
    """The bot in one FakeSfu room: ``closed`` resolves with why it left."""

    def __init__(self, sfu: FakeSfu, request: RoomRequest, node: str) -> None:
        self.sfu, self.request, self.node = sfu, request, node
        self.call_id = f"call-{uuid.uuid4().hex[:8]}"
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def close(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
            self.sfu.present[self.request.url].remove(self)

    async def wait_closed(self) -> str:
        return await asyncio.shield(self.closed)

    async def leave(self) -> None:
        self.sfu.left[self.request.url] += 1
        self.close("left")


class FakeSfu:
    """TEST HARNESS: rooms by URL; ``fail[url]`` lists the errors the next joins raise."""

    def __init__(self) -> None:
        self.present: defaultdict[str, list[FakePresence]] = defaultdict(list)
        self.fail: defaultdict[str, list[RoomJoinError]] = defaultdict(list)
        self.joins: Counter[str] = Counter()
        self.left: Counter[str] = Counter()
        self.join_s = 0.01  # how long a join takes

    def joiner(self, node: str) -> Callable[[RoomRequest], Awaitable[FakePresence]]:
        async def join(request: RoomRequest) -> FakePresence:
            self.joins[request.url] += 1
            await asyncio.sleep(self.join_s)
            if self.fail[request.url]:
                raise self.fail[request.url].pop(0)
            presence = FakePresence(self, request, node)
            self.present[request.url].append(presence)
            return presence

        return join

    def end(self, url: str, reason: str = "ended") -> None:
        for presence in list(self.present[url]):
            presence.close(reason)

    def nodes_in(self, url: str) -> list[str]:
        return [p.node for p in self.present[url]]


@pytest.fixture(scope="module")
def redis_url() -> str:
    problem = redis_problem(REDIS_URL)
    need(not problem, f"the room dispatch tests need a running Redis; {REDIS_URL} is unreachable: {problem}")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    value = f"test-rooms-{uuid.uuid4().hex[:10]}"
    yield value
    delete_keys(redis_url, value)
    assert not list(redis.Redis.from_url(redis_url).scan_iter(f"{value}:*")), "keys left behind"


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def sfu() -> FakeSfu:
    return FakeSfu()


class Nodes:
    """Dispatchers ("nodes") on the test's prefix, each running in a task of its own."""

    def __init__(self, redis_url: str, prefix: str, sfu: FakeSfu) -> None:
        self.redis_url, self.prefix, self.sfu = redis_url, prefix, sfu
        self.tasks: dict[RoomDispatcher, asyncio.Task[None]] = {}

    async def __call__(self, name: str, backoff: Backoff | None = None, **options: Any) -> RoomDispatcher:
        """A node; ``options`` are room settings without ``rooms_`` (and ``redis_url``)."""
        options = {"capacity": 1, "lease_s": 2.0, "prefix": self.prefix, "node_id": name, **options}
        url = options.pop("redis_url", self.redis_url)
        settings = Settings.from_env({}, redis_url=url, **{f"rooms_{k}": v for k, v in options.items()})
        node = RoomDispatcher(settings, {"test": self.sfu.joiner(name)}, backoff)
        node.retry_initial_s = 0.05
        self.tasks[node] = asyncio.create_task(node.run())
        return node

    async def kill(self, node: RoomDispatcher) -> None:
        """Stop a node as SIGKILL would: its task is cancelled; nothing is acked or refreshed."""
        self.tasks[node].cancel()
        await asyncio.gather(self.tasks[node], return_exceptions=True)

    async def close_all(self) -> None:
        for node, task in self.tasks.items():
            await node.close()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)


@pytest.fixture
async def nodes(redis_url: str, prefix: str, sfu: FakeSfu) -> AsyncIterator[Nodes]:
    made = Nodes(redis_url, prefix, sfu)
    yield made
    await made.close_all()


def request(url: str = "") -> RoomRequest:
    return RoomRequest(uuid.uuid4().hex, url or f"test://sfu/{uuid.uuid4().hex[:6]}")


async def state_of(node: RoomDispatcher, request_id: str) -> dict[str, Any]:
    status = await node.status(request_id)
    assert status is not None, f"no status for {request_id}"
    return status


async def reaches(via: RoomDispatcher, request_id: str, timeout: float = 10.0, **want: Any) -> dict[str, Any]:
    """Wait until the request's status has the ``want`` fields; the states seen on the way."""
    seen: list[str] = []

    async def check() -> bool:
        status = await state_of(via, request_id)
        if not seen or seen[-1] != status["state"]:
            seen.append(status["state"])
        return all(status.get(k) == v for k, v in want.items())

    try:
        await until(check, timeout, what=f"{request_id} to reach {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; states seen {seen}; now {await via.status(request_id)}") from None
    return {**(await state_of(via, request_id)), "seen": seen}


# ---------------------------------------------------------------------- no Redis
def test_request_fields_roundtrip_and_junk() -> None:
    req = RoomRequest("abc123", "janus://10.77.0.1:8088/1234", pin="42", display="Bot")
    assert RoomRequest.from_fields(req.to_fields()) == req
    assert RoomRequest.from_fields({"id": b"x", "url": b"janus://h/1"}) == RoomRequest("x", "janus://h/1")
    for junk in ({}, {"id": "x"}, {"id": "a b", "url": "janus://h/1"}, {"id": "x", "url": "h/1"},
                 {"id": "x", "url": "janus://"}, {"id": "x", "url": 5}, {"id": "x", "url": "x://h", "pin": "p" * 999},
                 [("id", "x")]):  # fmt: skip
        with pytest.raises(ValueError):
            RoomRequest.from_fields(junk)  # type: ignore[arg-type]
    error = RoomJoinError("wrong_pin", "the room's pin is not 42", retry=False)
    assert (error.code, error.retry, str(error)) == (
        "wrong_pin",
        False,
        "wrong_pin: the room's pin is not 42",
    )


# ---------------------------------------------------------------------- dispatch
async def test_two_nodes_share_rooms_and_a_freed_slot_takes_the_next(
    nodes: Nodes, sfu: FakeSfu, raw: redis.Redis, prefix: str
) -> None:
    a, b = await nodes("A"), await nodes("B")
    first, second, third = request(), request(), request()
    await a.submit(first)
    await b.submit(second)
    one = await reaches(a, first.id, state="joined")
    two = await reaches(a, second.id, state="joined")
    assert {one["node"], two["node"]} == {"A", "B"}, (one, two)
    assert one["call_id"] == sfu.present[first.url][0].call_id and one["failovers"] == 0
    await a.submit(third)
    await asyncio.sleep(1.5)  # both nodes are full: it waits
    assert (await state_of(b, third.id))["state"] == "queued" and sfu.joins[third.url] == 0
    sfu.end(first.url)  # the meeting ends: that node's slot is free
    ended = await reaches(b, first.id, state="left")
    assert ended["reason"] == "ended" and ended["error"] == ""
    assert (await reaches(b, third.id, state="joined"))["node"] == one["node"]
    assert raw.xlen(f"{prefix}:rooms") == 2  # the finished entry is acked and deleted
    assert raw.xpending(f"{prefix}:rooms", f"{prefix}:nodes")["pending"] == 2
    assert 0 < raw.ttl(f"{prefix}:room:{first.id}") <= RoomDispatcher.finished_ttl_s
    assert raw.ttl(f"{prefix}:room:{third.id}") == -1  # held rooms never expire


async def test_a_full_backlog_refuses_and_drains(nodes: Nodes, sfu: FakeSfu) -> None:
    front = await nodes("front", capacity=0, max_backlog=2)  # takes no rooms, queues requests
    waiting = [request(), request()]
    for req in waiting:
        await front.submit(req)
    with pytest.raises(RoomsUnavailable) as refused:
        await front.submit(request())
    assert refused.value.code == "backlog_full" and refused.value.retry_after_s >= 1
    assert "rooms_max_backlog 2" in refused.value.message
    with pytest.raises(ValueError, match=r"no joiner for janus:// URLs \(this server joins test://\)"):
        await front.submit(request("janus://10.77.0.1:8088/1234"))
    with pytest.raises(ValueError, match="exists already"):
        await front.submit(waiting[0])
    await nodes("worker", capacity=2)
    for req in waiting:
        await reaches(front, req.id, state="joined", node="worker")
    await front.submit(request())  # taken rooms no longer count


async def test_join_errors_fail_or_retry(nodes: Nodes, sfu: FakeSfu, raw: redis.Redis, prefix: str) -> None:
    node = await nodes("A", capacity=3)
    node.join_tries = 3
    wrong, flaky, down = request(), request(), request()
    sfu.fail[wrong.url] = [RoomJoinError("wrong_pin", "pin 1234 is not this room's", retry=False)]
    sfu.fail[flaky.url] = [RoomJoinError("unreachable", "no answer", retry=True)] * 2
    sfu.fail[down.url] = [RoomJoinError("session_lost", "janus restarted", retry=True)] * 3
    for req in (wrong, flaky, down):
        await node.submit(req)
    failed = await reaches(node, wrong.id, state="failed")
    assert failed["error"] == "wrong_pin: pin 1234 is not this room's" and failed["attempts"] == 1
    assert sfu.joins[wrong.url] == 1
    joined = await reaches(node, flaky.id, state="joined")
    assert joined["attempts"] == 3 and joined["error"] == "" and sfu.joins[flaky.url] == 3
    assert joined["seen"][-2:] == ["joining", "joined"], joined["seen"]
    gave_up = await reaches(node, down.id, state="failed")
    assert gave_up["error"].startswith("session_lost") and gave_up["attempts"] == 3
    assert raw.xlen(f"{prefix}:rooms") == 1  # only the joined room's entry is left


async def test_a_killed_node_s_room_is_taken_over(nodes: Nodes, sfu: FakeSfu) -> None:
    lease_s = 6.0  # the default rooms_lease_s
    a = await nodes("A", lease_s=lease_s)
    req = request()
    await a.submit(req)
    await reaches(a, req.id, state="joined", node="A")
    b = await nodes("B", lease_s=lease_s)
    await asyncio.sleep(1.0)  # B is idle, polling for work
    sfu.join_s = 0.3  # long enough to see "rejoining"
    await nodes.kill(a)
    killed = time.monotonic()
    status = await reaches(b, req.id, timeout=lease_s + 5, state="joined", node="B")
    took = time.monotonic() - killed
    print(f"\nfailover: node B rejoined {took:.2f} s after node A was killed (lease_s {lease_s:g})")
    assert "rejoining" in status["seen"] and status["failovers"] == 1, status
    assert lease_s * 2 / 3 - 0.5 <= took <= lease_s + 2.0, took
    assert sorted(sfu.nodes_in(req.url)) == ["A", "B"]  # A's bot was killed, not told to leave
    assert sfu.left[req.url] == 0


@pytest.mark.parametrize("handover", [True, False])
async def test_a_clean_shutdown_hands_rooms_over(
    nodes: Nodes, sfu: FakeSfu, raw: redis.Redis, prefix: str, handover: bool
) -> None:
    a = await nodes("A", lease_s=6.0, handover=handover)
    req = request()
    await a.submit(req)
    await reaches(a, req.id, state="joined", node="A")
    b = await nodes("B", lease_s=6.0)
    sfu.join_s = 0.3
    started = time.monotonic()
    await a.close()
    assert sfu.left[req.url] == 1 and sfu.nodes_in(req.url) == []  # A's bot left the room
    if handover:
        status = await reaches(b, req.id, timeout=5, state="joined", node="B")
        took = time.monotonic() - started
        print(f"\nhandover: node B rejoined {took:.2f} s after node A began a clean shutdown")
        assert took < 3.0 and status["failovers"] == 1 and "rejoining" in status["seen"], (took, status)
    else:
        status = await state_of(b, req.id)
        assert status["state"] == "left" and status["reason"] == "A stopped", status
        await asyncio.sleep(2.0)
        assert sfu.joins[req.url] == 1 and raw.xlen(f"{prefix}:rooms") == 0


async def test_leave_works_across_nodes_and_before_the_join(
    nodes: Nodes, sfu: FakeSfu, raw: redis.Redis, prefix: str
) -> None:
    a, front = await nodes("A", lease_s=1.5), await nodes("front", capacity=0)
    held, later = request(), request()
    await front.submit(held)
    await reaches(front, held.id, state="joined", node="A")
    asked = time.monotonic()
    assert await front.leave(held.id) == "joined"
    status = await reaches(front, held.id, state="left")
    assert status["reason"] == "left" and sfu.left[held.url] == 1 and time.monotonic() - asked < 1.5
    assert await front.leave(held.id) == "left"  # finished: nothing more to do
    assert await front.leave("no-such-request") is None and await front.status("no-such-request") is None
    assert await front.leave("../junk") is None
    await a.close()
    await front.submit(later)
    assert await front.leave(later.id) == "queued"
    await nodes("B")
    status = await reaches(front, later.id, state="left")
    assert sfu.joins[later.url] == 0 and status["leave_requested"]
    assert raw.xlen(f"{prefix}:rooms") == 0


async def test_a_stalled_holder_that_was_taken_over_lets_go(
    nodes: Nodes, sfu: FakeSfu, raw: redis.Redis, prefix: str
) -> None:
    a = await nodes("A", lease_s=1.5)
    req = request()
    await a.submit(req)
    await reaches(a, req.id, state="joined", node="A")
    entry = raw.hget(f"{prefix}:room:{req.id}", "entry")
    # As if A had stalled past its lease and node C had claimed the room meanwhile
    raw.xclaim(f"{prefix}:rooms", f"{prefix}:nodes", "C", 0, [entry], justid=True)
    raw.hset(f"{prefix}:room:{req.id}", mapping={"node": "C", "state": "rejoining"})
    await until(lambda: sfu.left[req.url] == 1, 3, what="A leaving the room it lost")
    await asyncio.sleep(1.0)
    status = await state_of(a, req.id)
    assert (status["node"], status["state"]) == ("C", "rejoining"), status  # A wrote nothing more
    assert raw.xpending_range(f"{prefix}:rooms", f"{prefix}:nodes", "-", "+", 5)[0]["consumer"] == "C"
    assert a._held == {}


async def test_junk_in_the_stream_is_dropped(
    nodes: Nodes, sfu: FakeSfu, raw: redis.Redis, prefix: str
) -> None:
    a = await nodes("A")
    req = request()
    await a.submit(req)  # creates the group
    await reaches(a, req.id, state="joined")
    sfu.end(req.url)
    await reaches(a, req.id, state="left")
    raw.xadd(f"{prefix}:rooms", {"url": "test://x", "id": "not an id!"})
    good = request()
    await a.submit(good)
    await reaches(a, good.id, state="joined")
    await until(lambda: raw.xlen(f"{prefix}:rooms") == 1, 3, what="the junk entry to be dropped")


async def test_redis_unreachable(nodes: Nodes, sfu: FakeSfu) -> None:
    node = await nodes(
        "lonely", redis_url=f"redis://127.0.0.1:{free_port()}/0", backoff=Backoff(0.01, 0.1, 0.5)
    )
    started = time.monotonic()
    with pytest.raises(RoomsUnavailable) as refused:
        await node.submit(request())
    assert refused.value.code == "redis_unavailable" and "unreachable" in refused.value.message
    assert time.monotonic() - started < 3.0
    await asyncio.sleep(2.0)
    run = next(t for t in asyncio.all_tasks() if t.get_name() == "rooms-take-lonely")
    assert not run.done(), "the take loop died"


def private_redis(port: int, workdir: str, *, persist: bool) -> subprocess.Popen[bytes]:
    """A redis-server of the test's own on ``port``; with ``persist`` it keeps its data in an
    append-only file in ``workdir`` across a restart (SIGTERM)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    need(os.access(binary, os.X_OK), "the Redis outage test runs a redis-server of its own")
    aof = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir, *aof],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 10
    while redis_problem(f"redis://127.0.0.1:{port}/0"):
        assert time.monotonic() < end and proc.poll() is None, "the private redis-server did not start"
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


async def test_joined_rooms_stay_while_redis_is_away_or_restarts_empty(
    nodes: Nodes, sfu: FakeSfu, tmp_path: Path
) -> None:
    port, quick = free_port(), Backoff(0.02, 0.1, 0.5)
    url = f"redis://127.0.0.1:{port}/0"
    server = private_redis(port, str(tmp_path), persist=True)
    try:
        a = await nodes("A", lease_s=6.0, redis_url=url, backoff=quick)
        req = request()
        await a.submit(req)
        await reaches(a, req.id, state="joined", node="A")
        b = await nodes("B", lease_s=6.0, redis_url=url, backoff=quick)
        stop(server)  # Redis away for 4 s: a heartbeat or two fail
        with pytest.raises(RoomsUnavailable):
            await a.submit(request())
        await asyncio.sleep(3.5)
        assert sfu.nodes_in(req.url) == ["A"] and sfu.left[req.url] == 0  # the bot stayed
        server = private_redis(port, str(tmp_path), persist=True)  # back, with its data
        await asyncio.sleep(6.0)  # a lease: A's heartbeats resumed in time, B took nothing
        status = await reaches(a, req.id, state="joined", node="A", failovers=0)
        assert sfu.joins[req.url] == 1 and b._held == {}, status
        stop(server)
        for name in os.listdir(tmp_path):  # Redis comes back empty
            shutil.rmtree(tmp_path / name) if (tmp_path / name).is_dir() else os.unlink(tmp_path / name)
        server = private_redis(port, str(tmp_path), persist=False)
        later = request()
        await until(lambda: a._held[req.id].gone, 10, what="A to notice that Redis lost its room")
        assert sfu.nodes_in(req.url) == ["A"]  # still in the room, without failover
        await b.submit(later)  # a new request is served again: by B, A is full
        await reaches(b, later.id, state="joined", node="B")
    finally:
        stop(server)


# ---------------------------------------------------------------------- HTTP API
@pytest.fixture
async def server(
    prefix: str,
    sfu: FakeSfu,
    bot_factory: Callable[..., Awaitable[BotServer]],
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Awaitable[BotServer]]:
    monkeypatch.setattr(rooms, "JOINERS", {"test": lambda settings, host: sfu.joiner("http")})
    monkeypatch.setattr(rooms_api, "CONNECTORS", ())

    async def start(**overrides: Any) -> BotServer:
        options = {"rooms": True, "rooms_prefix": prefix, "rooms_node_id": "http", **overrides}
        return await bot_factory(**options)

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def answer(resp: aiohttp.ClientResponse, status: int, code: str | None = None) -> dict[str, Any]:
    body = await resp.text()
    assert resp.status == status, (resp.status, body)
    data = json.loads(body)
    if code is not None:
        assert data["error"]["code"] == code and data["error"]["message"], body
    return data  # type: ignore[no-any-return]


async def test_http_join_follow_and_leave(
    server: Callable[..., Awaitable[BotServer]], http: aiohttp.ClientSession, sfu: FakeSfu
) -> None:
    bot = await server(max_body_bytes=2048)
    api = bot.url + "/api/rooms"
    async with http.post(
        api + "/join", json={"url": "test://sfu/1", "pin": "7", "display": "Bot\x07 One"}
    ) as resp:
        queued = await answer(resp, 202)
    assert queued["status"] == "queued" and queued["progress"] == f"/api/rooms/{queued['id']}"

    async def status() -> dict[str, Any]:
        async with http.get(f"{api}/{queued['id']}") as resp:
            return await answer(resp, 200)

    await until(_eq(status, "status", "joined"), 10, what="the room to be joined")
    joined = await status()
    assert joined["node"] == "http" and joined["call_id"] == sfu.present["test://sfu/1"][0].call_id
    assert sfu.present["test://sfu/1"][0].request.display == "Bot One"
    assert sfu.present["test://sfu/1"][0].request.pin == "7" and "pin" not in joined
    async with http.delete(f"{api}/{queued['id']}") as resp:
        assert (await answer(resp, 202))["leave_requested"] is True
    await until(_eq(status, "status", "left"), 10, what="the room to be left")
    async with http.delete(f"{api}/{queued['id']}") as resp:
        assert (await answer(resp, 200))["status"] == "left"
    for method, path, kwargs, status_code, code in [
        ("GET", f"{api}/{uuid.uuid4().hex}", {}, 404, "unknown_room_request"),
        ("DELETE", f"{api}/{uuid.uuid4().hex}", {}, 404, "unknown_room_request"),
        ("POST", api + "/join", {"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ("POST", api + "/join", {"json": ["test://sfu/1"]}, 400, "bad_request"),
        ("POST", api + "/join", {"json": {"pin": "1"}}, 400, "bad_request"),
        ("POST", api + "/join", {"json": {"url": 7}}, 400, "bad_request"),
        ("POST", api + "/join", {"json": {"url": "test://sfu/1", "pin": ["1"]}}, 400, "bad_request"),
        ("POST", api + "/join", {"json": {"url": "sip:alice@example.org"}}, 400, "bad_url"),
        ("POST", api + "/join", {"json": {"url": "nosuch://10.77.0.1:8088/1"}}, 400, "bad_url"),
        ("POST", api + "/join", {"data": "url=test://x"}, 415, "unsupported_media_type"),
        ("POST", api + "/join", {"json": {"url": "test://sfu/" + "x" * 3000}}, 413, "body_too_large"),
    ]:  # fmt: skip
        async with http.request(method, path, **kwargs) as resp:
            error = await answer(resp, status_code, code)
            if code == "bad_url":  # says what is wrong
                assert "scheme://host/room" in error["error"]["message"] or (
                    "no joiner for nosuch:// URLs (this server joins test://)" in error["error"]["message"]
                ), error


def _eq(
    fetch: Callable[[], Awaitable[dict[str, Any]]], key: str, value: Any
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await fetch()).get(key) == value

    return check


async def test_http_refusals(
    server: Callable[..., Awaitable[BotServer]],
    http: aiohttp.ClientSession,
    bot_factory: Callable[..., Awaitable[BotServer]],
) -> None:
    off = await bot_factory()
    async with http.post(off.url + "/api/rooms/join", json={"url": "test://sfu/1"}) as resp:
        assert "PRESENCE_ROOMS" in (await answer(resp, 503, "rooms_off"))["error"]["message"]
    full = await server(rooms_capacity=0, rooms_max_backlog=1)
    async with http.post(full.url + "/api/rooms/join", json={"url": "test://sfu/1"}) as resp:
        await answer(resp, 202)
    async with http.post(full.url + "/api/rooms/join", json={"url": "test://sfu/2"}) as resp:
        await answer(resp, 503, "backlog_full")
        assert int(resp.headers["Retry-After"]) >= 1
    away = await server(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with http.post(away.url + "/api/rooms/join", json={"url": "test://sfu/1"}) as resp:
        await answer(resp, 503, "redis_unavailable")
        assert resp.headers["Retry-After"] == "5"
    async with http.get(away.url + "/api/rooms/" + uuid.uuid4().hex) as resp:
        await answer(resp, 503, "redis_unavailable")


async def test_http_needs_an_operator_token(
    server: Callable[..., Awaitable[BotServer]], http: aiohttp.ClientSession
) -> None:
    bot = await server(token_secret=SECRET)
    api = bot.url + "/api/rooms"
    caller = tokens.mint(SECRET, room=None, sub="someone", ttl_s=60)
    operator = tokens.mint(SECRET, room=None, sub="ops", ttl_s=60, role="operator")
    body = {"url": "test://sfu/1"}
    async with http.post(api + "/join", json=body) as resp:
        await answer(resp, 401, "missing_token")
    async with http.post(api + "/join", json={**body, "token": "junk"}) as resp:
        await answer(resp, 401, "malformed_token")
    async with http.post(api + "/join", json=body, headers={"Authorization": f"Bearer {caller}"}) as resp:
        await answer(resp, 403, "not_operator")
    async with http.get(f"{api}/{uuid.uuid4().hex}") as resp:
        await answer(resp, 401, "missing_token")
    async with http.delete(
        f"{api}/{uuid.uuid4().hex}", headers={"Authorization": f"Bearer {caller}"}
    ) as resp:
        await answer(resp, 403, "not_operator")
    async with http.post(api + "/join", json={**body, "token": operator}) as resp:
        room_id = (await answer(resp, 202))["id"]
    async with http.get(f"{api}/{room_id}", headers={"Authorization": f"Bearer {operator}"}) as resp:
        assert (await answer(resp, 200))["id"] == room_id
