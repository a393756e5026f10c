"""Background jobs woven into a live call: real Redis, real worker, real sandbox, real WebRTC."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import SR_OUT, BotServer, need

from presence.bot.jobs.redis_server import PrivateRedis, find_redis_server
from presence.caller import Caller
from presence.events import Ev
from presence.seams import SAMPLE_RATE

pytestmark = pytest.mark.slow


async def _heard_391(caller: Caller, backends: Any, since: float) -> None:
    """The caller heard 17 x 23 answered (whisper on what it received from ``since`` on).

    Off the loop: the server and the caller share it, and a blocked loop piles up the call's
    packets (the next question, said right after, came out as "a the" in CI)."""
    heard = caller.recorder.audio()[int((since - caller.recorder.t0) * SAMPLE_RATE) :]
    text = (await asyncio.to_thread(backends.transcriber.transcribe, heard)).text.lower()
    assert "391" in text or "three hundred ninety" in text.replace("-", " "), text


async def test_search_and_code_results_are_spoken_without_a_silent_gap(bot_factory, speech, backends) -> None:  # type: ignore[no-untyped-def]
    question = speech("Please look up the opening hours, and calculate seventeen times twenty three.")
    server: BotServer = await bot_factory(jobs="auto")
    caller = Caller(url=server.url)
    await caller.connect()
    try:
        await asyncio.sleep(0.5)
        sent = await caller.say(question, SR_OUT)
        session = next(iter(server.manager.sessions.values()))
        # Two jobs are dispatched, acknowledged in speech, and both results are injected once.
        injected = []
        for _ in range(2):
            try:
                event = await caller.wait_event(
                    Ev.JOB_RESULT_INJECTED, after=max([sent, *injected]) + 1e-6, timeout=60
                )
            except TimeoutError:
                seen = [
                    (round(float(e["t"]) - sent, 2), e["name"])
                    for e in caller.events
                    if e.get("name") != "caption"
                ]  # type: ignore[arg-type]
                bot_side = [
                    (e.name, e.data.get("text"))
                    for e in session.events.history
                    if e.name in ("caption", "asr_final", "end_of_turn_decided")
                ][:40]
                pytest.fail(f"result {len(injected) + 1} never injected; caller saw: {seen}; bot: {bot_side}")
            injected.append(float(event["t"]))  # type: ignore[arg-type]
        await caller.wait_event(Ev.BOT_SPEECH_END, after=max(injected), timeout=30)
        await asyncio.sleep(0.5)
        kinds = sorted(str(e.data["kind"]) for e in session.events.named(Ev.JOB_RESULT_INJECTED))
        assert kinds == ["code", "search"]
        # The caller heard it: the acknowledgement, then the results, with no silence over 1 s
        # from the moment the jobs were dispatched (a backchannel during the question is earlier).
        dispatched = await caller.wait_event(Ev.JOB_DISPATCHED, after=sent, timeout=1)
        first = caller.recorder.first_voiced_after(float(dispatched["t"]))  # type: ignore[arg-type]
        assert first is not None
        voiced = [t for t in caller.recorder.voiced if t >= first]
        longest = max((b - a for a, b in itertools.pairwise(voiced)), default=0.0)
        assert longest < 1.0, f"a silent gap of {longest:.2f} s while the jobs ran"
        await _heard_391(caller, backends, first)
        # Results entered the context; the page got the job feed.
        assert [m for m in session.engine.history if m.role == "tool"]
        statuses = {str(e.get("status")) for e in caller.events if e.get("name") == Ev.JOB}
        assert "done" in statuses, statuses
    finally:
        await caller.hangup()


async def test_work_that_only_whispers_text_asks_for_is_dispatched_late(
    bot_factory, speech, backends
) -> None:  # type: ignore[no-untyped-def]
    """pocketsphinx garbled a request ("sky scout to leave" for "please calculate"), so the turn
    routed no job and got an ordinary reply; whisper's final pass of the same audio (real
    whisper, this call's engine) asks for the work, so it is dispatched then and its result
    spoken. A final pass of an older turn, or of a turn whose job of that kind already went,
    dispatches nothing; one whose streaming text routed another kind (a search) still does."""
    from presence.media.audio import resample

    server: BotServer = await bot_factory(jobs="auto")
    caller = Caller(url=server.url)
    await caller.connect()
    try:
        await asyncio.sleep(0.5)
        sent = await caller.say(speech("Hello there."), SR_OUT)
        await caller.wait_event(Ev.BOT_SPEECH_END, after=sent, timeout=30)
        engine = next(iter(server.manager.sessions.values())).engine
        reply = engine._live
        assert reply is not None and engine.turns >= 1
        audio = resample(speech("Please calculate seventeen times twenty three."), SR_OUT, SAMPLE_RATE)
        await engine._final_pass(
            reply, audio, None, engine.turns - 2, (frozenset(), "", False)
        )  # an older turn
        code = frozenset({"code"})
        await engine._final_pass(
            reply, audio, None, engine.turns - 1, (code, "", False)
        )  # its job already went
        assert not engine.events.named(Ev.JOB_DISPATCHED)
        late = engine.events.history[-1].t
        await engine._final_pass(reply, audio, None, engine.turns - 1, (frozenset({"search"}), "", False))
        await caller.wait_event(Ev.JOB_DISPATCHED, after=late, timeout=5)
        injected = await caller.wait_event(Ev.JOB_RESULT_INJECTED, after=late, timeout=60)
        t = float(injected["t"])  # type: ignore[arg-type]
        await caller.wait_event(Ev.BOT_SPEECH_END, after=t, timeout=30)
        await _heard_391(caller, backends, t)
    finally:
        await caller.hangup()


async def test_calls_go_on_when_jobs_are_off_or_redis_is_unreachable(bot_factory, speech) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(jobs="off")
    caller = Caller(url=server.url)
    await caller.connect()
    try:
        sent = await caller.say(speech("Please look up the opening hours."), SR_OUT)
        await caller.wait_event(Ev.BOT_SPEECH_START, after=sent, timeout=30)
        assert not [e for e in caller.events if e.get("name") == Ev.JOB_DISPATCHED]
    finally:
        await caller.hangup()


async def test_think_jobs_run_on_the_bots_own_responder() -> None:
    from presence.bot.backends.responder import RuleResponder
    from presence.bot.jobs.think import chat_local, responder_think_fn

    result = await chat_local(
        responder_think_fn(RuleResponder()), [{"role": "user", "content": "what is two plus two"}], 50
    )
    assert "4" in result["text"] and result["model"] == "responder:rules"


class CrashableRedis:
    """A redis-server of the test's own that it can kill (SIGKILL) and start again on the same
    port, as a crash and a restart by a supervisor would."""

    def __init__(self, binary: str, server: PrivateRedis) -> None:
        self.binary = binary
        self.server = server

    async def crash_and_restart(self, down_s: float) -> None:
        self.server.proc.kill()  # nothing on disk: every stream entry is gone
        await self.server.stop()
        await asyncio.sleep(down_s)
        self.server = await PrivateRedis.start(self.binary, port=self.server.port)


@pytest.fixture
async def private_redis() -> AsyncIterator[CrashableRedis]:
    """Outlives the bot (set up first), whose shutdown still talks to it."""
    binary = find_redis_server(None)
    need(binary is not None, "redis-server (apt-get install redis-server)")
    assert binary is not None
    redis = CrashableRedis(binary, await PrivateRedis.start(binary))
    yield redis
    await redis.server.stop()


async def test_a_redis_restart_mid_call_loses_no_job_and_the_call_goes_on(  # type: ignore[no-untyped-def]
    private_redis, bot_factory, speech, backends
) -> None:
    url = private_redis.server.url
    server: BotServer = await bot_factory(jobs="auto", redis_url=url)
    assert server.manager.jobs is not None and server.manager.jobs.url == url
    caller = Caller(url=server.url)
    await caller.connect()
    try:
        await asyncio.sleep(0.5)
        sent = await caller.say(speech("Please calculate seventeen times twenty three."), SR_OUT)
        await caller.wait_event(Ev.JOB_DISPATCHED, after=sent, timeout=30)
        await private_redis.crash_and_restart(down_s=1.0)  # with the job in flight
        injected = await caller.wait_event(Ev.JOB_RESULT_INJECTED, after=sent, timeout=60)
        t = float(injected["t"])  # type: ignore[arg-type]
        await caller.wait_event(Ev.BOT_SPEECH_END, after=t, timeout=30)
        session = next(iter(server.manager.sessions.values()))
        results = session.events.named(Ev.JOB_RESULT_INJECTED)
        assert [(e.data["kind"], e.data["ok"]) for e in results] == [("code", True)], results
        await _heard_391(caller, backends, t)
        # The call goes on, jobs included, on the new server.
        again = await caller.say(speech("Please calculate seventeen times twenty three."), SR_OUT)
        await caller.wait_event(Ev.JOB_DISPATCHED, after=again, timeout=30)
        second = await caller.wait_event(Ev.JOB_RESULT_INJECTED, after=again, timeout=60)
        assert second["ok"] is True and len(session.events.named(Ev.JOB_RESULT_INJECTED)) == 2
    finally:
        await caller.hangup()
