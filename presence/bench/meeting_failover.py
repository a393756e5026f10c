"""``presence bench meeting --failover``: a meeting handed from a killed node to another.

Two ``presence serve`` processes with the room queue on (``rooms``, one Redis, a key prefix of
this run's own) and the Janus joiner; ``POST /api/rooms/join`` to one of them; once the bot is in
the room (and answered a question there), the node that holds the room is killed with SIGKILL.
Measured from the kill: the room's status showing the other node, the bot's new feed in Janus,
and the bot's voice heard again: a human asks it a question as soon as its new feed shows, again
every few seconds until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from typing import Any

import aiohttp

from presence.bench.janus_lab import OPEN_ROOM, JanusHuman, JanusServer
from presence.bench.latency import ServerProcess, _env, process_tree
from presence.clock import now

NODES = ("node-a", "node-b")
ASK_EVERY_S = 8.0
GIVE_UP_S = 120.0


class _Node(ServerProcess):
    """A ``presence serve`` child whose start-up output is kept: why it did not start."""

    async def start(self, marker: str, timeout: float = 180.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert self.proc.stdout is not None
        deadline = now() + timeout
        while now() < deadline:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode(errors="replace")
            if not line:  # the end of its output: it exited
                break
            self.tail.append(line.rstrip())
            if marker in line:
                self.url = line.split(marker, 1)[1].strip().split("/?")[0].rstrip("/")
                asyncio.get_running_loop().create_task(self._drain())
                return
        raise RuntimeError("presence serve did not start; it said:\n" + "\n".join(list(self.tail)[-12:]))


async def _listen(janus: JanusServer, bot: str, feed: int, people: list[JanusHuman]) -> JanusHuman:
    ear = await JanusHuman.join(janus, f"ear-{feed}", publish=False, rx_prefetch_packets=2)
    people.append(ear)
    await ear.subscribe(bot, feed=feed)
    return ear


async def _status(http: aiohttp.ClientSession, url: str, room: str) -> dict[str, Any]:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with http.get(f"{url}/api/rooms/{room}") as resp:
            return dict(await resp.json(content_type=None)) if resp.status == 200 else {}
    return {}


def _bot_feeds(human: JanusHuman, bot: str) -> set[int]:
    return {feed for feed, name in human.publishers.items() if name == bot}


async def _answered(human: JanusHuman, ear: JanusHuman, clip: Any, bot: str, timeout: float) -> float | None:
    """Ask; the voice-to-voice time when ``ear`` hears the bot within ``timeout``."""
    done = await human.say(clip.pcm)
    speech_end = done - (clip.duration - clip.voiced_end)
    rec = ear.subscriptions[bot].recording
    deadline = now() + timeout
    while now() < deadline:
        if (first := rec.first_voiced_after(speech_end)) is not None:
            return first - speech_end
        await asyncio.sleep(0.05)
    return None


async def run_failover(
    janus: JanusServer, clips: dict[str, Any], questions: list[str], lease_s: float, bot: str = "Presence"
) -> dict[str, Any]:
    from presence.bot.jobs.redisio import DEFAULT_REDIS_URL

    prefix = f"pbench{os.getpid()}"
    redis_url = os.environ.get("PRESENCE_REDIS_URL") or DEFAULT_REDIS_URL
    setpriv = shutil.which("setpriv")
    launch = [
        *([setpriv, "--pdeathsig", "KILL"] if setpriv else []),
        sys.executable,
        "-m",
        "presence",
        "serve",
    ]
    nodes: dict[str, _Node] = {}
    people: list[JanusHuman] = []
    out: dict[str, Any] = {"lease_s": lease_s}
    print(f"  failover: starting {', '.join(NODES)} (presence serve, rooms on)", file=sys.stderr)
    try:
        for name in NODES:
            env = _env(
                port=0,
                sip_port=-1,
                greeting="",
                jobs="off",
                notes_dir="",
                log_level="warning",
                rooms=1,
                rooms_prefix=prefix,
                rooms_node_id=name,
                rooms_lease_s=lease_s,
                redis_url=redis_url,
                ice_host_addresses=janus.host_address,
            )
            nodes[name] = _Node(launch, env)
        await asyncio.gather(*(n.start("Presence is listening on") for n in nodes.values()))
        erin = await JanusHuman.join(janus, "erin", rx_prefetch_packets=2)
        people.append(erin)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            url = janus.url(OPEN_ROOM)
            async with http.post(f"{nodes[NODES[0]].url}/api/rooms/join", json={"url": url}) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 202:
                    raise RuntimeError(f"POST /api/rooms/join: HTTP {resp.status}: {body}")
            room = str(body["id"])
            began = now()
            status: dict[str, Any] = {}
            while status.get("status") != "joined" and now() - began < 60:
                await asyncio.sleep(0.2)
                status = await _status(http, nodes[NODES[0]].url, room)
            if status.get("status") != "joined":
                raise RuntimeError(f"the room was not joined in 60 s: {status}")
            out["join_s"], holder = round(now() - began, 2), str(status.get("node"))
            await erin.wait_for(lambda: bool(_bot_feeds(erin, bot)), 20.0, "the bot's feed")
            old = _bot_feeds(erin, bot)
            ear = await _listen(janus, bot, min(old), people)
            await asyncio.sleep(1.0)
            first_answer = await _answered(erin, ear, clips[questions[0]], bot, 25.0)
            out["answer_before_kill_ms"] = round(first_answer * 1000) if first_answer is not None else "none"
            await asyncio.sleep(3.0)  # the answer ends
            # -- the kill
            victim = nodes[holder]
            assert victim.proc is not None
            doomed = process_tree(victim.proc.pid)
            killed = now()
            victim.proc.send_signal(signal.SIGKILL)
            await victim.proc.wait()
            for pid in doomed[1:]:  # its helper processes, if any outlived it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            survivor = next(n for name, n in nodes.items() if name != holder)
            out["killed"] = holder
            print(f"  failover: killed {holder}, which held the room", file=sys.stderr)
            marks: dict[str, float] = {}
            asks: list[tuple[asyncio.Task[float], Any]] = []  # (say, clip) of each question
            joining: asyncio.Task[JanusHuman] | None = None
            last_ask, listener = 0.0, None
            while now() - killed < GIVE_UP_S and "voice_back_s" not in marks:
                await asyncio.sleep(0.05)
                if "status_new_node_s" not in marks:
                    st = await _status(http, survivor.url, room)
                    if st.get("status") == "joined" and st.get("node") != holder:
                        marks["status_new_node_s"], out["failovers"] = now() - killed, st.get("failovers")
                new = _bot_feeds(erin, bot) - old
                if new and joining is None:  # the bot's tile is back: someone asks it something
                    marks["new_feed_in_janus_s"] = now() - killed
                    joining = asyncio.create_task(_listen(janus, bot, max(new), people))
                if listener is None and joining is not None and joining.done():
                    listener = joining.result()
                if listener is not None and now() - last_ask > ASK_EVERY_S:
                    last_ask, clip = now(), clips[questions[(len(asks) + 1) % len(questions)]]
                    asks.append((asyncio.create_task(erin.say(clip.pcm)), clip))
                rec = listener.subscriptions[bot].recording if listener else None
                if rec is not None and (t := rec.first_voiced_after(killed)) is not None:
                    marks["voice_back_s"] = t - killed
                    ends = [task.result() - (c.duration - c.voiced_end) for task, c in asks if task.done()]
                    if ends and max(ends) < t:
                        marks["question_end_to_voice_s"] = t - max(ends)
            for task, _ in asks:
                await task
            out |= {k: round(v, 2) for k, v in marks.items()}
            out["questions_asked_after_kill"] = len(asks)
            for mark in ("status_new_node_s", "new_feed_in_janus_s", "voice_back_s"):
                out.setdefault(mark, f"not within {GIVE_UP_S:.0f} s")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.delete(f"{survivor.url}/api/rooms/{room}"):
                    pass
            await asyncio.sleep(1.0)
        return out
    finally:
        for person in people:
            with contextlib.suppress(Exception):
                await person.leave()
        for node in nodes.values():
            with contextlib.suppress(Exception):
                await node.stop()
        with contextlib.suppress(Exception):
            import redis

            r = redis.Redis.from_url(redis_url)
            for key in r.scan_iter(f"{prefix}:*"):
                r.delete(key)
            r.close()
