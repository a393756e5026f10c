"""Dispatching "join this room" requests over bot nodes: one Redis Stream, one consumer group.

``{prefix}:rooms`` is the stream, ``{prefix}:nodes`` its group, a consumer per node. An entry stays
pending with its node while the bot joins or is in the room (re-claimed every ``lease_s / 3``, the
heartbeat) and is acked and deleted when the room is done; a node with a free slot claims entries
idle for ``lease_s`` (SIGKILL, a hang) and rejoins. Every write checks the writer still holds the
entry: a node that stalled and was taken over leaves and never takes the room back. ``close()``
leaves this node's rooms and, with ``handover``, leaves their entries pending but idle, so another
node rejoins them within a second. Cancelling ``run()`` writes nothing, as SIGKILL would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis import exceptions as rexc

from presence.bot.jobs.redisio import DEFAULT_REDIS_URL, RETRYABLE, Backoff, Reconnecting, is_nogroup
from presence.bot.jobs.worker import default_consumer_name
from presence.signaling.rooms import ID_RE, RoomJoiner, RoomJoinError, RoomPresence, RoomRequest

if TYPE_CHECKING:
    from presence.config import Settings

log = logging.getLogger(__name__)

REDIS_ERRORS = (rexc.RedisError, *RETRYABLE)
NUMBERS: dict[str, Any] = {"failovers": int, "attempts": int, "submitted_at": float, "updated_at": float}
HANDOVER_IDLE_MS = 10**9  # the idle time a handed-over entry gets: past any lease, and recognisable
# Refuse past the backlog (the group's lag), else queue the entry and its status hash.
_SUBMIT = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
local lag, last, found = false, '0-0', false
for _, g in ipairs(ok and groups or {}) do
  local m = {}; for i = 1, #g, 2 do m[g[i]] = g[i + 1] end
  if m['name'] == ARGV[1] then found, lag, last = true, m['lag'], m['last-delivered-id'] end
end
if not found then redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM'); lag = redis.call('XLEN', KEYS[1]) end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, 0} end
if not lag then lag = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[2]) end
if lag >= tonumber(ARGV[2]) then return {0, lag} end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4, 3 + tonumber(ARGV[3])))
redis.call('HSET', KEYS[2], 'entry', id, unpack(ARGV, 4 + tonumber(ARGV[3])))
return {1, id}
"""
# As the entry's holder: -1 another node holds it, -2 Redis lost it, 1 asked to leave, else 0. ARGV:
# group node entry mode(keep|ack|claim) ttl failover idle_ms k v; a heartbeat never undoes a handover
_UPDATE = """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p['err'] or (#p == 0 and redis.call('EXISTS', KEYS[2]) == 0) then return -2 end
if #p == 0 or p[1][2] ~= ARGV[2] then return -1 end
if ARGV[4] == 'ack' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]); redis.call('XDEL', KEYS[1], ARGV[3])
elseif ARGV[4] == 'claim' and (ARGV[7] ~= '0' or redis.call('HGET', KEYS[2], 'node') ~= '') then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[7], 'JUSTID')  -- 0: heartbeat
end
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[2], 'failovers', 1) end
if #ARGV >= 8 then redis.call('HSET', KEYS[2], unpack(ARGV, 8)) end
if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
return redis.call('HGET', KEYS[2], 'leave') and 1 or 0
"""


class RoomsUnavailable(Exception):
    """submit() refused: ``backlog_full`` or ``redis_unavailable`` (HTTP 503 with Retry-After)."""

    def __init__(self, code: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s


@dataclass(eq=False, slots=True)
class _Held:
    request: RoomRequest
    entry: str
    why: str = ""  # what woke it: leave, lost (another node holds it now) or shutdown
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False  # Redis lost the entry: the room stays, without heartbeats
    task: asyncio.Task[None] | None = None

    def signal(self, why: str) -> None:
        self.why = why if self.why in ("", "leave") else self.why
        self.wake.set()


class RoomDispatcher:
    """One node: ``submit``/``status``/``leave`` from anywhere; ``run`` takes and holds rooms."""

    join_tries, retry_initial_s, retry_max_s, join_timeout_s = 5, 0.5, 10.0, 30.0
    finished_ttl_s = 3600  # how long the status of a finished request stays readable

    def __init__(self, settings: Settings, joiners: Mapping[str, RoomJoiner], backoff: Backoff | None = None):
        s = settings
        self.joiners, self.node = dict(joiners), s.rooms_node_id or default_consumer_name()
        self.capacity, self.lease_s, self.max_backlog = s.rooms_capacity, s.rooms_lease_s, s.rooms_max_backlog
        self.prefix, self.handover = s.rooms_prefix, s.rooms_handover
        self.stream, self.group = f"{self.prefix}:rooms", f"{self.prefix}:nodes"
        backoff = backoff or Backoff(initial_s=0.05, max_s=0.5, give_up_s=2.0)  # loops retry on their own
        self._rc = Reconnecting(s.redis_url or DEFAULT_REDIS_URL, name=f"rooms {self.node}", backoff=backoff)
        self._scripts = [self._rc.redis.register_script(s) for s in (_SUBMIT, _UPDATE)]
        self._held: dict[str, _Held] = {}
        self._freed, self._closed, self._closing = asyncio.Event(), asyncio.Event(), False
        self._loops: list[asyncio.Task[None]] = []

    def key(self, request_id: str) -> str:
        return f"{self.prefix}:room:{request_id}"

    async def submit(self, request: RoomRequest) -> str:
        """Queue ``request``; ValueError for a bad one, RoomsUnavailable when it cannot be queued."""
        scheme = RoomRequest.from_fields(request.to_fields()).scheme
        if scheme not in self.joiners:
            known = ", ".join(f"{s}://" for s in sorted(self.joiners)) or "none are registered"
            raise ValueError(f"no joiner for {scheme}:// URLs (this server joins {known})")
        fields, now = request.to_fields(), repr(time.time())
        status = {"id": request.id, "url": request.url, "display": request.display, "state": "queued"}
        status |= {"submitted_at": now, "updated_at": now, "failovers": "0", "attempts": "0"}
        args = [self.group, self.max_backlog, 2 * len(fields), *_flat(fields), *_flat(status)]
        try:
            code, value = await self._run(0, "submit", [self.stream, self.key(request.id)], args)
        except REDIS_ERRORS as exc:
            why = f"Redis at {self._rc.shown_url} is unreachable: {exc}"
            raise RoomsUnavailable("redis_unavailable", why, 5) from None
        if code == -1:
            raise ValueError(f"a room request with id {request.id} exists already")
        if code == 0:
            why = f"{value} room requests wait for a bot already (rooms_max_backlog {self.max_backlog})"
            raise RoomsUnavailable("backlog_full", why + "; try again later", max(1, round(self.lease_s)))
        return request.id

    async def status(self, request_id: str) -> dict[str, Any] | None:
        """The request's status hash (numbers parsed), None when unknown or expired."""
        key = self.key(request_id)
        raw = ID_RE.match(request_id) and await self._rc.call("status", lambda r: r.hgetall(key))
        if not raw:
            return None
        out = {k: NUMBERS.get(k, str)(v) for k, v in raw.items() if k not in ("leave", "entry")}
        return out | {"leave_requested": "leave" in raw}

    async def leave(self, request_id: str) -> str | None:
        """Ask whichever node holds the room to leave it; its state then, None when unknown."""
        key = self.key(request_id)
        state = ID_RE.match(request_id) and await self._rc.call("leave", lambda r: r.hget(key, "state"))
        if state and state not in ("failed", "left"):  # no TTL while active: the hash cannot vanish
            await self._rc.call("leave", lambda r: r.hset(key, "leave", "1"))
            if request_id in self._held:
                self._held[request_id].signal("leave")
        return state or None

    async def run(self) -> None:
        """Take, join, hold and hand over rooms until :meth:`close` (or until cancelled)."""
        self._loops.append(asyncio.create_task(self._beat_loop(), name=f"rooms-beat-{self.node}"))
        if self.capacity > 0 and self.joiners and not self._closing:
            self._loops.append(asyncio.create_task(self._take_loop(), name=f"rooms-take-{self.node}"))
        try:
            await self._closed.wait()
        finally:  # closed, or cancelled as if killed: nothing more is written
            await _cancel(*self._loops, *(h.task for h in self._held.values() if h.task))

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop taking rooms, leave the held ones (handing them over unless ``handover`` is off)."""
        if self._closing:
            return
        self._closing = True
        await _cancel(*self._loops[1:])  # the take loop; heartbeats go on while rooms are left
        for held in self._held.values():
            held.signal("shutdown")
        if tasks := [h.task for h in self._held.values() if h.task]:
            await asyncio.wait(tasks, timeout=grace_s)
        self._closed.set()
        await _cancel(*self._loops, *tasks)
        await self._rc.close()

    async def _run(self, script: int, what: str, keys: list[str], args: list[Any]) -> Any:
        return await self._rc.call(what, lambda r: self._scripts[script](keys=keys, args=args, client=r))

    async def _take_loop(self) -> None:
        next_claim, delay, stream, group = 0.0, 0.25, self.stream, self.group
        # Ends on _closing too: on Python 3.11 asyncio.wait_for can swallow a cancellation that
        # lands as its wait completes (a slot freed while the node closes), and a loop that
        # lived on made close() wait for it forever.
        while not self._closing:
            try:
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + min(1.0, self.lease_s / 3)
                    await self._claim()
                free, wait_s = self.capacity - len(self._held), max(0.01, next_claim - time.monotonic())
                self._freed.clear()
                if free <= 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._freed.wait(), wait_s)
                    continue
                reply = await self._rc.call("xreadgroup", lambda r, n=free, ms=int(wait_s * 1000): r.xreadgroup(
                    group, self.node, {stream: ">"}, count=n, block=ms))  # fmt: skip
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        await self._take(entry_id, fields, None)
                delay = 0.25
            except Exception as exc:  # Redis away (Reconnecting logs that once) or an odd reply
                if is_nogroup(exc):  # no request yet (or Redis restarted empty): make the group
                    with contextlib.suppress(*REDIS_ERRORS):  # BUSYGROUP: another node made it
                        await self._rc.call("group", lambda r: r.xgroup_create(stream, group, "0", True))
                elif not isinstance(exc, RETRYABLE):
                    log.warning("rooms: node %s: %s: %s; retrying", self.node, type(exc).__name__, exc)
                await asyncio.sleep(delay := min(delay * 2, 5.0))

    async def _claim(self) -> None:
        """Take over rooms whose holder stopped refreshing them ``lease_s`` ago, as slots allow."""
        lease_ms = int(self.lease_s * 1000)
        stale = await self._rc.call("xpending", lambda r: r.xpending_range(
            self.stream, self.group, "-", "+", 100, idle=lease_ms))  # fmt: skip
        for item in stale:  # this node's own are refreshed; if one is not, _take skips it
            if self.capacity <= len(self._held) or self._closing:
                return
            got = await self._rc.call("xclaim", lambda r, e=item["message_id"]: r.xclaim(
                self.stream, self.group, self.node, lease_ms, [e]))  # fmt: skip
            idle_ms = item["time_since_delivered"]
            how = "handed over" if idle_ms >= HANDOVER_IDLE_MS else f"last refresh {idle_ms / 1000:.1f} s ago"
            for entry_id, fields in got:
                log.warning("rooms: node %s takes over room %s from %s (%s)",
                            self.node, entry_id, item["consumer"], how)  # fmt: skip
                await self._take(entry_id, fields or {}, item["consumer"])

    async def _take(self, entry_id: str, fields: dict[str, str], old: str | None) -> None:
        try:
            request = RoomRequest.from_fields(fields)
        except ValueError as exc:
            log.warning("rooms: dropping malformed room request %s: %s", entry_id, exc)
            await self._rc.call("drop", lambda r: r.xack(self.stream, self.group, entry_id))
            await self._rc.call("drop", lambda r: r.xdel(self.stream, entry_id))
            return
        if request.id not in self._held:
            held = self._held[request.id] = _Held(request, entry_id)
            held.task = asyncio.create_task(self._serve(held, old), name=f"room-{request.id}")

    async def _serve(self, held: _Held, old: str | None) -> None:
        try:
            presence = await self._join(held, old)
            why = presence and await self._unless_woken(held, presence.wait_closed(), None)
            if why is None:  # woken, or never joined
                await self._wrap_up(held, presence)
            else:  # the room ended ("ended", "left") or was lost for good ("lost: ...")
                lost = why.startswith("lost")
                await self._write(held, "failed" if lost else "left", reason=why, error=why if lost else "")
        except Exception as exc:  # a bug: the request fails, the node goes on
            log.exception("rooms: request %s (%s) failed", held.request.id, held.request.url)
            await self._write(held, "failed", error=f"internal: {type(exc).__name__}: {exc}")
        finally:
            self._held.pop(held.request.id, None)
            self._freed.set()

    async def _join(self, held: _Held, old: str | None) -> RoomPresence | None:
        """Join, retrying what is worth it; None when it failed (and says so) or was woken."""
        if held.request.scheme not in self.joiners:  # nodes must all register the same joiners
            await self._write(held, "failed", error=f"unsupported: node {self.node} has no joiner for it")
            return None
        state, delay = "rejoining" if old is not None else "joining", self.retry_initial_s
        asked = await self._write(held, state, failover=old is not None, node=self.node, error="")
        if asked:
            held.signal("lost" if asked < 0 else "leave")
        for attempt in range(1, self.join_tries + 1):
            if held.why:
                break
            try:
                joining = self.joiners[held.request.scheme](held.request)
                presence = await self._unless_woken(held, joining, self.join_timeout_s)
            except RoomJoinError as exc:
                error = exc
            except (TimeoutError, ConnectionError, OSError) as exc:
                error = RoomJoinError("unreachable", str(exc) or type(exc).__name__, retry=True)
            else:
                kv = {"call_id": getattr(presence, "call_id", ""), "error": "", "attempts": attempt}
                if presence is not None and await self._write(held, "joined", **kv) < 0:
                    held.signal("lost")  # another node holds the room now: it is left at once
                return presence
            text = f"{error.code}: {error.message}"
            if not error.retry or attempt == self.join_tries:
                await self._write(held, "failed", error=text, attempts=attempt)
                break
            log.info("rooms: joining %s failed (%s); retrying in %.1f s", held.request.url, text, delay)
            await self._write(held, state, error=text, attempts=attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.wake.wait(), delay)
            delay = min(delay * 2, self.retry_max_s)
        return None

    async def _unless_woken(self, held: _Held, work: Awaitable[Any], wait_s: float | None) -> Any:
        """``work``'s result, or None when the room was woken first and ``work`` was cancelled (what
        it returned or raised anyway counts: a bot that joined just then is there, and is left)."""
        task = asyncio.ensure_future(asyncio.wait_for(work, wait_s))
        woken = asyncio.ensure_future(held.wake.wait())
        try:
            await asyncio.wait({task, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this room's task is cancelled
            await _cancel(woken, task)  # a done task stays as it is
        return None if task.cancelled() else task.result()

    async def _wrap_up(self, held: _Held, presence: RoomPresence | None) -> None:
        """Leave the room, then as woken: left, handed over, or (lost) nothing more."""
        if presence is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(presence.leave(), 10)
        if held.why == "lost":
            log.warning("rooms: another node holds room %s now; %s left it", held.request.id, self.node)
        elif held.why == "leave" or (held.why == "shutdown" and not self.handover):
            await self._write(held, "left", reason="left" if held.why == "leave" else f"{self.node} stopped")
        elif held.why == "shutdown":  # idle as if long dead: the next claim round of any node takes it
            await self._write(held, "rejoining", "claim", idle_ms=HANDOVER_IDLE_MS, node="", error="handover")

    async def _write(self, held: _Held, state: str, mode: str = "", idle_ms: int = 0, **kv: Any) -> int:
        """Status write (state "": a heartbeat) as the entry's holder, acked when final: -1 when another
        node holds it, 1 when leaving was asked for. Retried while Redis is away when it matters."""
        final, failover, delay = state in ("failed", "left"), kv.pop("failover", False), 0.25
        mode, ttl = mode or ("ack" if final else "keep"), self.finished_ttl_s if final else 0
        pairs = _flat({"state": state, "updated_at": repr(time.time()), **kv}) if state else []
        args = [self.group, self.node, held.entry, mode, ttl, int(failover), idle_ms, *pairs]
        while not held.gone:
            try:
                code = int(await self._run(1, "status", [self.stream, self.key(held.request.id)], args))
            except REDIS_ERRORS:
                if self._closing or not (final or failover or state == "joined"):
                    return 0
                await asyncio.sleep(delay := min(delay * 2, 5.0))
                continue
            if code != -2:
                return code
            held.gone = True  # the loop ends: nothing more is written, no more heartbeats
            log.warning("rooms: Redis lost room %s (restarted empty?); it stays", held.request.id)
        return 0

    async def _beat_loop(self) -> None:
        while not self._closed.is_set():
            await asyncio.sleep(self.lease_s / 3)
            for held in list(self._held.values()):  # away: tried once each; the rooms stay
                code = await self._write(held, "", "claim")
                if code in (-1, 1):
                    held.signal("lost" if code < 0 else "leave")


def _flat(mapping: Mapping[str, Any]) -> list[str]:
    return [str(x) for kv in mapping.items() for x in kv]


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
