"""The call-side job bridge against a real Redis (127.0.0.1:6379, or PRESENCE_TEST_REDIS_URL).

Each test uses its own key prefix. Without Redis (or the redis-server binary, for the tests that
start private servers) the tests skip, except under CI=true where that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from conftest import need
from jobs_support import REDIS_URL, delete_keys, redis_problem, spawn_worker, start_redis, until

from presence.bot.backends.responder import arithmetic
from presence.bot.jobs import LOST_ERROR, Backoff, JobBroker, JobRequest, JobResult, JobStatus, Worker
from presence.bot.jobs.bridge import JobBridge
from presence.bot.jobs.call_jobs import CallJobs
from presence.bot.jobs.kinds import load_handlers
from presence.bot.jobs.redis_server import JobsUnavailable, PrivateRedis, find_redis_server, free_port
from presence.bot.jobs.redisio import Keys
from presence.bot.jobs.router import RuleToolRouter, find_math, is_cancel_request
from presence.bot.jobs.speech import acknowledgement, speakable
from presence.bot.numbers import parse_number, parse_words, say_number
from presence.config import Settings
from presence.signaling.metrics import Metrics


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


@pytest.fixture(scope="module")
def redis_url() -> str:
    problem = redis_problem(REDIS_URL)
    need(problem is None, f"Redis at {REDIS_URL} is unreachable: {problem}")
    return REDIS_URL


@pytest.fixture
def redis_bin() -> str:
    binary = find_redis_server()
    need(binary is not None, "the redis-server binary is not installed")
    assert binary is not None
    return binary


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"test-bridge-{uuid.uuid4().hex[:10]}"
    yield value
    if redis_problem(REDIS_URL) is None:
        delete_keys(REDIS_URL, value)


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def bridges() -> AsyncIterator[list[JobBridge]]:
    """Bridges a test started; all are closed after it, even when it fails."""
    started: list[JobBridge] = []
    yield started
    for bridge in started:
        await bridge.close()


def settings(**overrides: Any) -> Settings:
    return Settings.from_env({}, **overrides)


class Inbox:
    """deliver() for a call: records every delivered result."""

    def __init__(self) -> None:
        self.items: list[JobResult] = []
        self.changes: list[dict[str, str]] = []

    def __call__(self, result: JobResult) -> None:
        self.items.append(result)

    async def wait(self, n: int, timeout: float = 15.0) -> list[JobResult]:
        await until(lambda: len(self.items) >= n, timeout, f"{n} deliveries (have {self.items})")
        return list(self.items)

    def by_id(self) -> dict[str, JobResult]:
        return {r.job_id: r for r in self.items}


async def open_call(bridge: JobBridge, call_id: str = "call-1") -> tuple[CallJobs, Inbox]:
    inbox = Inbox()
    calls = await bridge.open_call(call_id, inbox)
    calls.on_change(inbox.changes.append)
    return calls, inbox


def _code(routes: list[tuple[str, dict[str, Any], bool]]) -> list[str]:
    return [args["code"].split("print(", 1)[1][:-1] for kind, args, _ in routes if kind == "code"]


# ---------------------------------------------------------------------- routing (no Redis)
def test_route_cases() -> None:
    r = RuleToolRouter()
    search = r.route("Can you look up the opening hours?")
    assert search == [("search", {"query": "the opening hours", "k": 3}, True)]
    assert r.route("what do the docs say about barge-in")[0][1]["query"] == "barge-in"
    assert r.route("search the docs for pricing")[0][1]["query"] == "pricing"
    # math in words and in digits, with and without a verb
    assert _code(r.route("what's seventeen times twenty three")) == ["17 * 23"]
    assert _code(r.route("calculate 17 times 23")) == ["17 * 23"]
    assert _code(r.route("17 * 23")) == ["17 * 23"]
    assert _code(r.route("What is the square root of 2?")) == ["math.sqrt(2)"]
    assert _code(r.route("compute one hundred and five divided by five")) == ["105 / 5"]
    assert _code(r.route("what is 15 percent of 80")) == ["15/100*80"]
    assert _code(r.route("two to the power of ten")) == ["2 ** 10"]
    assert _code(r.route("what's 1,000 minus 1")) == ["1000 - 1"]
    assert _code(r.route("what is the factorial of two hundred")) == ["math.factorial(200)"]
    assert _code(r.route("run this code print(6 * 7)")) == ["(6 * 7)"]
    # both at once
    both = r.route("look up the opening hours and calculate 17 times 23")
    assert [k for k, _, _ in both] == ["search", "code"]
    assert both[0][1]["query"] == "the opening hours" and _code(both) == ["17 * 23"]
    assert [k for k, _, _ in r.route("Look up pricing. Then work out 29 times 12.")] == ["search", "code"]
    assert r.route("Look up pricing. Then work out 29 times 12.")[0][1]["query"] == "pricing"
    # a misheard connective ("they" for "and") still splits at the code verb
    misheard = r.route("please look up the opening hours they calculate seventeen times twenty three")
    assert [k for k, _, _ in misheard] == ["search", "code"] and _code(misheard) == ["17 * 23"]
    # a code verb with nothing to compute stays inside the search
    assert r.route("look up how to calculate risk") == [
        ("search", {"query": "how to calculate risk", "k": 3}, True)
    ]
    # think
    think = r.route("think about whether we should open an office in Lisbon")
    assert think[0][0] == "think" and think[0][2] is False
    assert think[0][1]["prompt"] == "Think about whether we should open an office in Lisbon."
    assert r.route("explain in depth how barge-in works")[0][0] == "think"
    assert r.route("what's your deep view on remote work")[0][1]["prompt"].endswith("remote work?")
    # nothing to do
    for text in (
        "hello, how are you",
        "I have two kids and three dogs",
        "which one is cheaper",
        "I find it hard to sleep",
        "explain how it works",  # a plain explain is the live responder's
        "calculate the risk",
        "",
    ):
        assert r.route(text) == [], text
    # never mind
    for text in (
        "never mind",
        "Oh, never mind, thanks.",
        "forget it",
        "cancel that please",
        "stop searching",
    ):
        assert is_cancel_request(text) and r.route(text) == [], text
    assert not is_cancel_request("never mind the docs, what's 17 times 23")
    assert _code(r.route("never mind the docs, what's 17 times 23")) == ["17 * 23"]
    # only checked arithmetic reaches the sandbox
    assert find_math("import os plus 2") == []


def test_acknowledgement_and_speakable() -> None:
    def req(kind: str) -> JobRequest:
        return JobRequest.new("c", kind, {})

    assert acknowledgement([]) == ""
    assert acknowledgement([req("search")]) == "Let me look that up."
    assert acknowledgement([req("search"), req("code")]) == "Let me look that up and work that out for you."
    assert acknowledgement([req("think")]) != acknowledgement([req("code")])

    def ok(kind: str, value: dict[str, Any]) -> JobResult:
        return JobResult("j", "c", kind, True, value)

    assert speakable(ok("code", {"stdout": "391\n", "exit_code": 0, "error": None})) == "That comes to 391."
    assert speakable(ok("code", {"stdout": "5.0\n", "error": None})) == "That comes to 5."
    assert speakable(ok("code", {"stdout": "1.4142135623730951\n"})) == "That comes to about 1.414."
    assert speakable(ok("code", {"stdout": "-4\n"})) == "That comes to minus 4."
    # factorial of two hundred: 375 exact digits, never "infinity"
    huge = speakable(ok("code", {"stdout": f"{math.factorial(200)}\n"}))
    assert huge == "That comes to about 7.887 times ten to the power of 374, a number with 375 digits."
    assert "division by zero" in speakable(
        ok("code", {"stdout": "", "error": "exit code 1: ZeroDivisionError: division by zero"})
    )
    hit = {
        "path": "opening-hours.md",
        "text": "# Opening hours\nWe are open Monday to Friday. Support answers from 9 am to 6 pm on weekdays, "
        "and the bot is always on.\nClosed on Sundays.",
    }
    text = speakable(ok("search", {"query": "when is support open", "hits": [hit]}))
    assert text.startswith("According to opening hours: ") and "9 am to 6 pm" in text and "#" not in text
    assert len(text.split()) <= 30
    assert "couldn't find anything about llamas" in speakable(ok("search", {"query": "llamas", "hits": []}))
    think = speakable(ok("think", {"text": "First point. Second point! Third point? Fourth."}))
    assert think == "First point. Second point!"
    failed = JobResult.failure(
        JobRequest.new("c", "search", {}), "JobError: search: docs_dir '/x' is not a directory"
    )
    assert speakable(failed) == "I couldn't finish the search: docs_dir '/x' is not a directory."
    late = JobResult.failure(JobRequest.new("c", "code", {}), "timeout: no result within 5 s of the deadline")
    assert speakable(late) == "I couldn't finish the calculation: it took too long."
    expired = JobResult.failure(JobRequest.new("c", "code", {}), "deadline passed before the job started")
    assert expired.status is JobStatus.FAILED  # not a dead letter: "deadline" is not "dead"
    assert speakable(expired) == "I couldn't finish the calculation: it took too long."
    dead = JobResult.failure(JobRequest.new("c", "code", {}), "dead: TransientJobError: x (after 3 attempts)")
    assert dead.status is JobStatus.DEAD and speakable(dead).endswith(": it kept failing.")


def test_spoken_numbers_both_ways() -> None:
    """One parser of number words (the router and the rule responder) and one reader."""
    assert parse_number("twenty-three") == 23 and parse_number("a hundred and five") == 105
    assert parse_number("three thousand two hundred") == 3200 and parse_number("-2.5") == -2.5
    for text in ("ten five", "five five", "nan", "inf", "what", ""):
        assert parse_number(text) is None, text
    assert parse_words("two point five times three".split()) == ("2.5", 3)
    assert parse_words("times three".split()) is None
    said = {
        "391": "391",
        "5.0": "5",
        "-4": "minus 4",
        "0.30000000000000004": "about 0.3",
        "1.4142135623730951": "about 1.414",
        "123456.789": "about 123456.79",
        "1e-20": "ten to the power of minus 20",
        "1e+300": "ten to the power of 300, a number with 301 digits",
        "-12345678901234567890": "about minus 1.235 times ten to the power of 19, a number with 20 digits",
        "inf": "infinity",
    }
    for printed, words in said.items():
        assert say_number(printed) == words, printed
    assert say_number(7 / 2) == "3.5" and say_number(-4.0) == "minus 4"
    with pytest.raises(ValueError):
        say_number("hello")
    # the rule responder reads and says numbers through the same module
    assert arithmetic("what is twenty three times four") == "23 times 4 is 92."
    assert arithmetic("what is 10 divided by 3") == "10 divided by 3 is about 3.333."
    assert arithmetic("what is 12 minus 20") == "12 minus 20 is minus 8."


# ---------------------------------------------------------------------- choosing a Redis
async def test_off_gives_no_bridge() -> None:
    assert await JobBridge.start(settings(jobs="off")) is None


async def test_redis_mode_with_dead_url_says_how_to_fix() -> None:
    with pytest.raises(JobsUnavailable) as info:
        await JobBridge.start(settings(jobs="redis", redis_url=dead_url()))
    message = str(info.value)
    for hint in ("no Redis answered", "redis-server", "PRESENCE_REDIS_URL", "PRESENCE_JOBS=off"):
        assert hint in message


async def test_auto_without_redis_or_binary_runs_calls_without_jobs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="presence.bot.jobs.bridge")
    bridge = await JobBridge.start(
        settings(jobs="auto", redis_url=dead_url()),
        probe_url=dead_url(),
        redis_server="/nonexistent/redis-server",
    )
    assert bridge is None
    assert "no redis-server binary was found" in caplog.text and "WITHOUT background jobs" in caplog.text


async def test_auto_uses_local_redis_and_an_in_process_worker(
    redis_url: str, prefix: str, bridges: list[JobBridge], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="presence.bot.jobs.bridge")
    metrics = Metrics.create()
    bridge = await JobBridge.start(settings(jobs="auto"), metrics, probe_url=redis_url, prefix=prefix)
    assert bridge is not None
    bridges.append(bridge)
    assert bridge.mode == "redis" and bridge.url == redis_url and bridge.redis_server is None
    assert bridge.worker is not None and bridge.worker.keys.prefix == prefix
    assert f"jobs: using Redis at {redis_url}" in caplog.text

    calls, inbox = await open_call(bridge)
    requests = calls.route("Look up the opening hours and calculate seventeen times twenty three")
    assert [r.kind for r in requests] == ["search", "code"]
    assert acknowledgement(requests) == "Let me look that up and work that out for you."
    ids = await calls.dispatch(requests)
    assert ids == [r.job_id for r in requests]
    got = await inbox.wait(2)
    await asyncio.sleep(0.5)  # nothing more may come
    assert sorted(r.job_id for r in inbox.items) == sorted(ids)  # exactly once each
    by_kind = {r.kind: r for r in got}
    assert all(r.ok for r in got), got
    search_text = speakable(by_kind["search"])
    assert "9 am to 6 pm" in search_text and "opening hours" in search_text, search_text
    assert speakable(by_kind["code"]) == "That comes to 391."
    # the page's table, and its change feed
    table = {j["kind"]: j for j in calls.jobs()}
    assert table["search"]["status"] == "done" and table["code"]["summary"] == "That comes to 391."
    statuses = [(c["kind"], c["status"]) for c in inbox.changes]
    assert (
        ("search", "queued") in statuses and ("search", "done") in statuses and ("code", "done") in statuses
    )
    # metrics
    await bridge.sample()
    assert bridge.queue_depth == {"search": 0, "code": 0, "think": 0}
    assert metrics.registry.get_sample_value("presence_job_latency_seconds_count") == 2
    assert metrics.registry.get_sample_value("presence_job_queue_depth", {"kind": "search"}) == 0
    await calls.close()
    assert bridge.describe()["calls"] == 0


async def test_auto_with_nothing_answering_starts_a_private_redis(
    redis_bin: str, bridges: list[JobBridge], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="presence.bot.jobs.bridge")
    bridge = await JobBridge.start(settings(jobs="auto", redis_url=dead_url()), probe_url=dead_url())
    assert bridge is not None
    bridges.append(bridge)
    assert bridge.mode == "private" and bridge.redis_server is not None and bridge.worker is not None
    port = bridge.redis_server.port
    assert f"started a private redis-server on 127.0.0.1:{port} and an in-process worker" in caplog.text
    calls, inbox = await open_call(bridge)
    await calls.dispatch(calls.route("what's 17 times 23"))
    (result,) = await inbox.wait(1)
    assert speakable(result) == "That comes to 391."
    proc = bridge.redis_server.proc
    await bridge.close()
    assert proc.poll() is not None  # the private server is gone with the bridge
    assert redis_problem(f"redis://127.0.0.1:{port}/0") is not None


async def test_redis_password_never_reaches_logs_or_output(
    redis_bin: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="presence")
    secret = f"pw{uuid.uuid4().hex}"
    port = free_port()
    server = start_redis(port, password=secret)
    url, dead = f"redis://:{secret}@127.0.0.1:{port}/0", f"redis://u:{secret}@127.0.0.1:{free_port()}/0"
    try:
        # a worker process: its ready line and its start-up log
        proc = spawn_worker(url, "test-pw", "P", "noop", "--log-level", "info")
        proc.terminate()
        out, err = proc.communicate(timeout=15)
        assert "worker P: serving noop on redis://:***@127.0.0.1" in err, err
        # an in-process worker against a Redis that does not answer: its start and its retries
        worker = Worker(dead, ["noop"], load_handlers(["noop"]), prefix="test-pw")
        task = asyncio.create_task(worker.run())
        await until(lambda: "unreachable during" in caplog.text, what="the worker's first retry")
        task.cancel()  # it would wait for that Redis forever
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # a broker that gives up, and the bridge that refuses it
        broker = JobBroker(dead, prefix="test-pw", backoff=Backoff(0.01, 0.05, 0.3))
        with pytest.raises(ConnectionError) as gave_up:
            await broker.submit(JobRequest.new("call-pw", "noop"))
        await broker.close()
        with pytest.raises(JobsUnavailable) as refused:
            await JobBridge.start(settings(jobs="redis", redis_url=dead))
        # auto mode: the configured URL does not answer; the private Redis of the test does not either
        assert (
            await JobBridge.start(settings(jobs="auto", redis_url=dead), probe_url=dead, redis_server="/no")
            is None
        )
    finally:
        server.kill()
        server.wait()
    shown = [caplog.text, out, err, str(gave_up.value), str(refused.value)]
    assert all(secret not in text for text in shown), shown
    assert "serving noop on redis://u:***@127.0.0.1" in caplog.text and "redis://u:***@" in str(refused.value)


# ---------------------------------------------------------------------- delivery rules
async def test_duplicate_and_foreign_results_are_delivered_once(
    redis_url: str, prefix: str, raw: redis.Redis, bridges: list[JobBridge]
) -> None:
    # jobs=redis: no worker, so the test plays the worker and writes results itself
    bridge = await JobBridge.start(settings(jobs="redis", redis_url=redis_url), prefix=prefix)
    assert bridge is not None and bridge.worker is None
    bridges.append(bridge)
    calls, inbox = await open_call(bridge, "call-dup")
    (job_id,) = await calls.dispatch([JobRequest.new("call-dup", "echo", {"x": 1})])
    result = JobResult(job_id, "call-dup", "echo", True, {"x": 1}, finished_at=time.time(), worker="fake")
    stream = Keys(prefix).results("call-dup")
    raw.xadd(stream, {"result": result.to_json()})
    raw.xadd(stream, {"result": result.to_json()})  # the stream delivers it twice
    foreign = JobResult("someone-else", "call-dup", "echo", True, {}, worker="fake")
    raw.xadd(stream, {"result": foreign.to_json()})  # not dispatched by this call
    await inbox.wait(1)
    await asyncio.sleep(0.5)
    calls._on_result(result)  # and once more, straight in: the call's own guard
    assert [r.job_id for r in inbox.items] == [job_id]
    assert bridge.broker.stats["duplicates"] >= 1 and calls.stats["duplicates"] == 1
    assert calls.stats["foreign"] == 1


async def test_no_delivery_after_close_or_cancel(
    redis_url: str, prefix: str, raw: redis.Redis, bridges: list[JobBridge]
) -> None:
    bridge = await JobBridge.start(
        settings(jobs="auto"),
        probe_url=redis_url,
        prefix=prefix,
        worker_kinds=("search", "code", "think", "sleep"),
        worker_options={"test_kinds": True},
    )
    assert bridge is not None
    bridges.append(bridge)
    # "never mind" while a job runs: cancelled, never delivered
    calls, inbox = await open_call(bridge, "call-nm")
    (job_id,) = await calls.dispatch([JobRequest.new("call-nm", "sleep", {"seconds": 5})])
    await until(lambda: calls.jobs()[0]["status"] == "running", what="running (polled)")
    assert is_cancel_request("never mind") and await calls.cancel_all("caller said never mind") == 1
    assert calls.jobs()[0]["status"] == "cancelled" and calls.unfinished() == 0
    await until(
        lambda: raw.hget(Keys(prefix).job(job_id), "status") == "cancelled", what="cancelled in Redis"
    )
    await asyncio.sleep(0.5)
    assert inbox.items == []
    assert [c["status"] for c in inbox.changes] == ["queued", "running", "cancelled"]

    # a call that ended: its late results go nowhere
    calls2, inbox2 = await open_call(bridge, "call-end")
    (job2,) = await calls2.dispatch([JobRequest.new("call-end", "sleep", {"seconds": 5})])
    await calls2.close()
    late = JobResult(job2, "call-end", "sleep", True, {"slept": 5.0}, worker="fake")
    raw.xadd(Keys(prefix).results("call-end"), {"result": late.to_json()})
    await asyncio.sleep(0.5)
    assert inbox2.items == []
    assert calls2.jobs()[0]["status"] == "cancelled"
    assert not raw.sismember(Keys(prefix).live, "call-end")
    assert await calls2.dispatch([JobRequest.new("call-end", "sleep", {})]) == []


async def test_retries_and_dead_letters_reach_metrics(
    redis_url: str, prefix: str, bridges: list[JobBridge]
) -> None:
    metrics = Metrics.create()
    bridge = await JobBridge.start(
        settings(jobs="auto"),
        metrics,
        probe_url=redis_url,
        prefix=prefix,
        worker_kinds=("search", "code", "think", "fail"),
        worker_options={"max_attempts": 3, "test_kinds": True},
    )
    assert bridge is not None
    bridges.append(bridge)
    calls, inbox = await open_call(bridge)
    await calls.dispatch([JobRequest.new("call-1", "fail", {"transient": True, "message": "backend hiccup"})])
    (result,) = await inbox.wait(1)
    assert (
        result.status is JobStatus.DEAD
        and speakable(result) == "I couldn't finish that job: it kept failing."
    )
    assert calls.jobs()[0]["status"] == "failed"
    await bridge.sample()
    assert metrics.registry.get_sample_value("presence_job_retries_total") == 2
    assert metrics.registry.get_sample_value("presence_job_dead_letters_total") == 1


# ---------------------------------------------------------------------- failures
async def test_redis_restart_mid_call_loses_no_job(redis_bin: str, bridges: list[JobBridge]) -> None:
    port = free_port()
    server = await PrivateRedis.start(redis_bin, port=port)
    try:
        bridge = await JobBridge.start(
            settings(jobs="auto", redis_url=server.url),
            prefix="test-bridge-restart",
            worker_kinds=("search", "code", "think", "sleep", "echo"),
            worker_options={"concurrency": 1, "test_kinds": True},  # the echo jobs wait behind the sleep
            backoff=Backoff(initial_s=0.02, max_s=0.2, give_up_s=20),
        )
        assert bridge is not None and bridge.mode == "redis"
        bridges.append(bridge)
        calls, inbox = await open_call(bridge, "call-r")
        ids = await calls.dispatch(
            [
                JobRequest.new("call-r", "sleep", {"seconds": 0.6}),
                *(JobRequest.new("call-r", "echo", {"i": i}) for i in range(2)),
            ]
        )
        await until(lambda: calls.jobs()[0]["status"] == "running", what="the sleep job running")
        server.proc.kill()  # SIGKILL: nothing on disk, every queued entry is gone
        server.proc.wait()
        # dispatched while Redis is down: the submit waits for it rather than failing
        during = asyncio.create_task(calls.dispatch([JobRequest.new("call-r", "echo", {"i": "during"})]))
        await asyncio.sleep(0.3)
        await server.stop()
        server = await PrivateRedis.start(redis_bin, port=port)
        ids += await during
        got = await inbox.wait(4, timeout=30)
        await asyncio.sleep(1.0)
        assert len(inbox.items) == 4 and sorted(r.job_id for r in got) == sorted(ids)  # each exactly once
        for r in got:
            assert r.ok or r.error == LOST_ERROR or (r.error or "").startswith("timeout"), r
        assert sum(r.ok for r in got if r.kind == "echo") == 3  # resubmitted after the restart
        # and the call goes on on the new server
        (after,) = await calls.dispatch([JobRequest.new("call-r", "echo", {"i": "after"})])
        await inbox.wait(5)
        assert inbox.items[-1].job_id == after and inbox.items[-1].ok
        await bridge.close()  # while its Redis is still there
    finally:
        await server.stop()


async def test_redis_gone_for_good_fails_fast_and_audibly(redis_bin: str, bridges: list[JobBridge]) -> None:
    server = await PrivateRedis.start(redis_bin)
    try:
        bridge = await JobBridge.start(
            settings(jobs="redis", redis_url=server.url),
            prefix="test-bridge-gone",
            backoff=Backoff(initial_s=0.02, max_s=0.2, give_up_s=1.0),
        )
        assert bridge is not None
        bridges.append(bridge)
        calls, inbox = await open_call(bridge, "call-g")
        server.proc.kill()
        server.proc.wait()
        # a job asked for now is answered with a failure the caller hears, not with silence
        assert await calls.dispatch(calls.route("what's 17 times 23")) == []
        (result,) = await inbox.wait(1, timeout=5)
        assert speakable(result) == "I couldn't finish the calculation: the job queue is not reachable."
        assert calls.jobs()[0]["status"] == "failed"
        # a new call does not wait out the retry budget before it is answered
        started = time.monotonic()
        with pytest.raises(JobsUnavailable, match=r"did not answer|unreachable"):
            await bridge.open_call("call-g2", Inbox())
        assert time.monotonic() - started < 4.0
        await bridge.close()
    finally:
        await server.stop()


async def test_sigkilled_worker_job_completes_elsewhere_once(
    redis_url: str, prefix: str, raw: redis.Redis, bridges: list[JobBridge]
) -> None:
    bridge = await JobBridge.start(
        settings(jobs="redis", redis_url=redis_url), prefix=prefix, worker_kinds=("sleep",)
    )
    assert bridge is not None
    bridges.append(bridge)
    calls, inbox = await open_call(bridge, "call-k")
    a = spawn_worker(redis_url, prefix, "A", "sleep", "--idle-reclaim-ms", "600")
    b: subprocess.Popen[str] | None = None
    try:
        (job_id,) = await calls.dispatch([JobRequest.new("call-k", "sleep", {"seconds": 1.0})])
        await until(lambda: raw.hget(Keys(prefix).job(job_id), "worker") == "A", what="A running the job")
        a.send_signal(signal.SIGKILL)
        a.wait(5)
        b = spawn_worker(redis_url, prefix, "B", "sleep", "--idle-reclaim-ms", "600")
        (result,) = await inbox.wait(1, timeout=20)
        await asyncio.sleep(1.0)
        assert len(inbox.items) == 1 and result.job_id == job_id and result.ok and result.worker == "B"
        assert calls.jobs()[0]["status"] == "done"
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.stdout.close()  # type: ignore[union-attr]
                    proc.stderr.close()  # type: ignore[union-attr]


# ---------------------------------------------------------------------- overhead
async def test_dispatch_to_delivery_overhead(redis_url: str, prefix: str, bridges: list[JobBridge]) -> None:
    """No-op jobs one at a time through the in-process worker: the bridge's own overhead."""
    bridge = await JobBridge.start(
        settings(jobs="auto"),
        probe_url=redis_url,
        prefix=prefix,
        worker_kinds=("search", "code", "think", "noop"),
    )
    assert bridge is not None
    bridges.append(bridge)
    calls, inbox = await open_call(bridge)
    n = 200
    for i in range(n):
        await calls.dispatch([JobRequest.new("call-1", "noop")])
        await inbox.wait(i + 1)
    samples = sorted(list(bridge.latencies)[-n:])
    p50 = statistics.median(samples) * 1000
    p95 = samples[int(0.95 * (n - 1))] * 1000
    print(f"\njob bridge dispatch->delivery, no-op, n={n}: p50 {p50:.2f} ms, p95 {p95:.2f} ms")
    assert p95 < 250, (p50, p95)
