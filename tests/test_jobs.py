"""The durable job layer against a real Redis (127.0.0.1:6379, or PRESENCE_TEST_REDIS_URL).

Each test uses its own key prefix. Without Redis the tests skip, except under CI=true where a
missing Redis is a failure. The restart test runs a private redis-server on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import need
from jobs_support import (
    REDIS_URL,
    ROOT,
    delete_keys,
    free_port,
    redis_problem,
    spawn_worker,
    start_redis,
    until,
)

from presence.bot.jobs import (
    LOST_ERROR,
    Backoff,
    JobBroker,
    JobError,
    JobRequest,
    JobResult,
    JobStatus,
    TransientJobError,
    Worker,
)
from presence.bot.jobs.code import REFUSED, SandboxLimits, default_python, run_python
from presence.bot.jobs.kinds import load_handlers, options_from_settings
from presence.bot.jobs.redisio import Keys
from presence.bot.jobs.worker import default_consumer_name

KINDS = ["noop", "echo", "sleep", "fail"]


@pytest.fixture(scope="module")
def redis_url() -> str:
    problem = redis_problem(REDIS_URL)
    need(not problem, f"the job tests need a running Redis; {REDIS_URL} is unreachable: {problem}")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    value = f"test-jobs-{uuid.uuid4().hex[:10]}"
    yield value
    delete_keys(redis_url, value)


@pytest.fixture
async def broker(redis_url: str, prefix: str) -> AsyncIterator[JobBroker]:
    b = JobBroker(redis_url, prefix=prefix, kinds=[*KINDS, "code"], max_args_bytes=4096)
    yield b
    await b.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


class Collector:
    """Drains broker.results(call_id) in the background so tests can wait for counts."""

    def __init__(self, broker: JobBroker, call_id: str) -> None:
        self.items: list[JobResult] = []
        self._task = asyncio.create_task(self._run(broker, call_id))

    async def _run(self, broker: JobBroker, call_id: str) -> None:
        async for result in broker.results(call_id, block_ms=200):
            self.items.append(result)

    async def wait(self, n: int, timeout: float = 10.0) -> list[JobResult]:
        end = time.monotonic() + timeout
        while len(self.items) < n:
            if self._task.done():
                self._task.result()
                raise AssertionError(f"results() ended after {len(self.items)} of {n}")
            if time.monotonic() > end:
                raise AssertionError(f"only {len(self.items)} of {n} results: {self.items}")
            await asyncio.sleep(0.02)
        return list(self.items)

    def by_id(self) -> dict[str, JobResult]:
        return {r.job_id: r for r in self.items}

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def running_worker(
    redis_url: str, prefix: str, kinds: list[str] = KINDS, **kw: Any
) -> AsyncIterator[Worker]:
    kw.setdefault("idle_reclaim_ms", 2_000)
    handlers = load_handlers(kinds, test_kinds=True)
    worker = Worker(redis_url, kinds, handlers, kw.pop("name", "w1"), prefix=prefix, **kw)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.started.wait(), 10)
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)


# ---------------------------------------------------------------------- types (no Redis)
def test_request_roundtrip_and_validation() -> None:
    req = JobRequest.new("call-1", "echo", {"x": [1, 2]}, timeout_s=5, urgent=True)
    assert JobRequest.from_json(req.to_json()) == req
    with pytest.raises(JobError, match="not JSON"):
        JobRequest.from_json("{nope")
    with pytest.raises(JobError, match="expected a JSON object"):
        JobRequest.from_json("[1, 2]")
    with pytest.raises(JobError, match="missing args, deadline"):
        JobRequest.from_json(json.dumps({"job_id": "a", "call_id": "b", "kind": "echo"}))
    with pytest.raises(JobError, match="unknown kind 'teleport'"):
        JobRequest.from_json(JobRequest.new("c", "teleport").to_json())
    with pytest.raises(JobError, match=r"args too large: \d+ bytes > limit 100"):
        JobRequest.new("c", "echo", {"blob": "x" * 200}).validate(max_args_bytes=100)
    with pytest.raises(JobError, match="call_id must be"):
        JobRequest.new("bad call id!", "echo").validate()
    with pytest.raises(JobError, match="deadline must be a finite number"):
        JobRequest.from_json(json.dumps({**json.loads(req.to_json()), "deadline": "soon"}))
    res = JobResult.failure(req, "cancelled: test")
    assert JobResult.from_json(res.to_json()) == res
    assert res.status is JobStatus.CANCELLED
    # statuses by exact tag: "deadline ..." is no dead letter, "cancelled" alone no cancellation
    for error, status in {
        "dead: worker died (after 3 attempts)": JobStatus.DEAD,
        "deadline passed before the job started": JobStatus.FAILED,
        "deadline: the handler ran past the job's deadline": JobStatus.FAILED,
        "deadletter: x": JobStatus.FAILED,
        "cancelledx: y": JobStatus.FAILED,
    }.items():
        assert JobResult.failure(req, error).status is status, error
    with pytest.raises(JobError, match="ok must be a bool"):
        JobResult.from_json(json.dumps({"job_id": "a", "call_id": "b", "kind": "k", "ok": "yes"}))


# ---------------------------------------------------------------------- broker + worker
async def test_submit_to_result_exactly_once(
    broker: JobBroker, redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    await broker.open_call("call-a")
    results = Collector(broker, "call-a")
    async with running_worker(redis_url, prefix) as worker:
        ids = [await broker.submit(JobRequest.new("call-a", "echo", {"n": i})) for i in range(3)] + [
            await broker.submit(JobRequest.new("call-a", "noop"))
        ]
        got = await results.wait(4)
        await asyncio.sleep(0.3)  # nothing more may arrive
        assert sorted(r.job_id for r in results.items) == sorted(ids)
        assert {r.value.get("n") for r in got if r.kind == "echo"} == {0, 1, 2}  # type: ignore[union-attr]
        assert all(r.ok and r.worker == "w1" for r in got)
        assert await broker.status(ids[0]) is JobStatus.DONE
        assert raw.xlen(Keys(prefix).results("call-a")) == 4
        assert await broker.queue_depth("echo") == 0
        assert broker.pending == {}
        assert worker.stats.done == 4
        # the same request delivered again (e.g. a retried XADD) is acked without a new result
        raw.xadd(
            Keys(prefix).jobs("echo"), {"job": JobRequest.new("call-a", "echo", job_id=ids[0]).to_json()}
        )
        await until(lambda: worker.stats.redelivered_finished == 1, what="redelivery ack")
        assert raw.xlen(Keys(prefix).results("call-a")) == 4
    await results.stop()


async def test_duplicate_result_is_yielded_once(broker: JobBroker, prefix: str, raw: redis.Redis) -> None:
    await broker.open_call("call-d")
    req = JobRequest.new("call-d", "noop")
    await broker.submit(req)
    result = JobResult(req.job_id, "call-d", "noop", True, {"v": 1}, None, 1.0, 2.0, "w")
    stream = Keys(prefix).results("call-d")
    raw.xadd(stream, {"result": result.to_json()})
    raw.xadd(stream, {"result": result.to_json()})  # delivered twice
    raw.xadd(stream, {"result": "not json"})  # and a broken entry, skipped with a log
    results = Collector(broker, "call-d")
    await results.wait(1)
    await asyncio.sleep(0.5)
    assert results.items == [result]
    assert broker.stats["duplicates"] == 1
    assert broker.stats["malformed_results"] == 1
    assert broker.pending == {}
    await results.stop()


async def test_killed_worker_job_is_reclaimed(
    broker: JobBroker, redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    await broker.open_call("call-k")
    a = spawn_worker(redis_url, prefix, "A", "sleep", "--idle-reclaim-ms", "600")
    b: subprocess.Popen[str] | None = None
    results = Collector(broker, "call-k")
    try:
        job_id = await broker.submit(JobRequest.new("call-k", "sleep", {"seconds": 1.0}, timeout_s=30))
        await until(lambda: raw.hget(Keys(prefix).job(job_id), "worker") == "A", what="A running the job")
        a.send_signal(signal.SIGKILL)  # dies mid-job: the entry stays pending for A
        a.wait(5)
        b = spawn_worker(redis_url, prefix, "B", "sleep", "--idle-reclaim-ms", "600")
        got = await results.wait(1, timeout=20)
        await asyncio.sleep(1.0)  # A is gone for good: no second result may follow
        assert len(results.items) == 1
        assert got[0].job_id == job_id and got[0].ok and got[0].worker == "B"
        assert raw.xlen(Keys(prefix).results("call-k")) == 1
        assert raw.hget(Keys(prefix).job(job_id), "deliveries") == "2"
        b.send_signal(signal.SIGTERM)  # graceful: exits 0
        assert b.wait(10) == 0
        assert "reclaimed" in (b.stderr.read() if b.stderr else "")
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        await results.stop()


async def test_stalled_worker_does_not_answer_twice(
    broker: JobBroker, redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    """A worker frozen past idle_reclaim_ms loses the job to another and stays quiet on waking."""
    await broker.open_call("call-st")
    a = spawn_worker(redis_url, prefix, "A", "sleep", "--idle-reclaim-ms", "600")
    results = Collector(broker, "call-st")
    job_key = Keys(prefix).job("stalled-1")
    try:
        await broker.submit(JobRequest("stalled-1", "call-st", "sleep", {"seconds": 1.0}, time.time() + 30))
        await until(lambda: raw.hget(job_key, "worker") == "A", what="A running the job")
        a.send_signal(signal.SIGSTOP)  # a long GC pause, a swapped-out VM...
        async with running_worker(redis_url, prefix, ["sleep"], name="B", idle_reclaim_ms=600) as b:
            await until(lambda: raw.hget(job_key, "worker") == "B", what="B reclaiming the job")
            a.send_signal(signal.SIGCONT)  # A wakes up still "running" its copy
            got = await results.wait(1)
            await asyncio.sleep(0.6)
            assert [r.worker for r in results.items] == ["B"] and got[0].ok
            assert raw.xlen(Keys(prefix).results("call-st")) == 1
            assert b.stats.reclaimed == 1
        a.send_signal(signal.SIGTERM)
        assert a.wait(10) == 0
        stderr = a.stderr.read() if a.stderr else ""
        assert "another worker took it over" in stderr or "was reclaimed by B" in stderr, stderr
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
            a.wait()
        await results.stop()


async def test_bad_entries_are_rejected_or_dead_lettered(
    broker: JobBroker, redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    await broker.open_call("call-m")
    with pytest.raises(JobError, match="unknown kind 'teleport'"):
        await broker.submit(JobRequest.new("call-m", "teleport"))
    with pytest.raises(JobError, match="args too large"):
        await broker.submit(JobRequest.new("call-m", "echo", {"blob": "x" * 5000}))
    keys = Keys(prefix)
    good = json.loads(JobRequest.new("call-m", "echo").to_json())
    bad_entries = [
        {"job": "{this is not json"},
        {"job": json.dumps({"job_id": "j1", "kind": "echo"})},
        {"job": json.dumps({**good, "job_id": "j2", "kind": "teleport"})},
        {"job": json.dumps({**good, "job_id": "j3", "args": {"blob": "x" * 70_000}})},
        {"job": json.dumps({**good, "job_id": "j4", "kind": "noop"})},  # on the echo stream
        {"payload": "no job field"},
    ]
    results = Collector(broker, "call-m")
    async with running_worker(redis_url, prefix) as worker:
        for fields in bad_entries:
            raw.xadd(keys.jobs("echo"), fields)
        await until(lambda: worker.stats.malformed == len(bad_entries), what="dead letters")
        letters = await broker.dead_letters(10)
        errors = " | ".join(d.error for d in letters)
        for needle in (
            "not JSON",
            "missing",
            "unknown kind 'teleport'",
            "args too large",
            "does not belong",
            "no 'job' field",
        ):
            assert needle in errors
        assert {d.job_id for d in letters} >= {"j2", "j3", "j4"}
        # the worker is alive and serves the next job
        job_id = await broker.submit(JobRequest.new("call-m", "echo", {"ok": 1}))
        got = await results.wait(1)
        assert got[0].job_id == job_id and got[0].ok
    await results.stop()


async def test_results_for_ended_or_unknown_calls_are_dropped(
    broker: JobBroker, redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    keys = Keys(prefix)
    async with running_worker(redis_url, prefix) as worker:
        # never opened: the job is not even run
        unknown = await broker.submit(JobRequest.new("call-unknown", "echo"))
        await until(lambda: worker.stats.dropped_jobs == 1, what="dropped job")
        assert await broker.status(unknown) is JobStatus.CANCELLED
        # ended while the job ran: the result is dropped, logged and counted
        await broker.open_call("call-e")
        job_id = await broker.submit(JobRequest.new("call-e", "sleep", {"seconds": 0.4}))
        await until(lambda: raw.hget(keys.job(job_id), "status") == "running", what="running")
        raw.srem(keys.live, "call-e")
        await until(lambda: worker.stats.dropped_results == 1, what="dropped result")
        assert raw.xlen(keys.results("call-e")) == 0
        assert raw.hget(keys.stats, "dropped_results") == "1"
        assert raw.hget(keys.job(job_id), "dropped") == "1"


async def test_deadlines(broker: JobBroker, redis_url: str, prefix: str) -> None:
    await broker.open_call("call-t")
    results = Collector(broker, "call-t")
    async with running_worker(redis_url, prefix) as worker:
        expired = JobRequest("late-1", "call-t", "echo", {}, time.time() - 1.0)
        await broker.submit(expired)
        too_long = await broker.submit(JobRequest.new("call-t", "sleep", {"seconds": 5}, timeout_s=0.5))
        got = {r.job_id: r for r in await results.wait(2, timeout=5)}
        assert not got["late-1"].ok and got["late-1"].error == "deadline passed before the job started"
        assert not got[too_long].ok and got[too_long].error.startswith("deadline:")  # type: ignore[union-attr]
        for job_id in ("late-1", too_long):  # failed, not dead: "deadline" does not start with "dead:"
            assert got[job_id].status is JobStatus.FAILED and await broker.status(job_id) is JobStatus.FAILED
        assert got[too_long].finished_at - got[too_long].started_at < 1.5
        assert worker.stats.deadline == 1
    await results.stop()


async def test_cancel(broker: JobBroker, redis_url: str, prefix: str) -> None:
    await broker.open_call("call-c")
    results = Collector(broker, "call-c")
    # queued (no worker yet): cancelled at once, the worker later just acknowledges it
    queued = await broker.submit(JobRequest.new("call-c", "echo"))
    assert await broker.cancel(queued, "user changed topic") is True
    got = await results.wait(1)
    assert got[0].error == "cancelled: user changed topic" and got[0].status is JobStatus.CANCELLED
    assert await broker.status(queued) is JobStatus.CANCELLED
    async with running_worker(redis_url, prefix) as worker:
        running = await broker.submit(JobRequest.new("call-c", "sleep", {"seconds": 10}))
        await until(lambda: _eq(broker.status(running), JobStatus.RUNNING), what="running")
        t0 = time.monotonic()
        assert await broker.cancel(running, "barge-in") is True
        got = await results.wait(2)
        assert got[1].job_id == running and got[1].error == "cancelled: barge-in"
        assert time.monotonic() - t0 < 1.0  # noticed within the poll interval
        assert await broker.cancel(running) is False  # finished: nothing to cancel
        assert await broker.cancel("no-such-job") is False
        assert worker.stats.cancelled == 1
        # ending the call cancels its jobs and ends the results() iterator
        last = await broker.submit(JobRequest.new("call-c", "sleep", {"seconds": 10}))
        assert await broker.cancel_call("call-c") == 1
        await asyncio.wait_for(results._task, 3)
        # stopped by the cancel key, or never started because the call is no longer live
        await until(lambda: _eq(broker.status(last), JobStatus.CANCELLED), what="last cancelled")
        await until(lambda: worker.stats.cancelled + worker.stats.dropped_jobs == 2, what="stop")
    assert len(results.items) == 2


async def _eq(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def test_max_attempts_dead_letter(
    broker: JobBroker, redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    await broker.open_call("call-x")
    results = Collector(broker, "call-x")
    async with running_worker(redis_url, prefix, max_attempts=3) as worker:
        flaky = await broker.submit(
            JobRequest.new("call-x", "fail", {"transient": True, "message": "backend 503"})
        )
        plain = await broker.submit(JobRequest.new("call-x", "fail", {"message": "bad input"}))
        # a job whose earlier deliveries all died with their workers (counter already at 3)
        crashed = JobRequest.new("call-x", "echo")
        raw.hset(Keys(prefix).job(crashed.job_id), mapping={"status": "running", "deliveries": 3})
        raw.xadd(Keys(prefix).jobs("echo"), {"job": crashed.to_json()})
        got = {r.job_id: r for r in await results.wait(3)}
        assert got[flaky].error == "dead: TransientJobError: backend 503 (after 3 attempts)"
        assert got[plain].error == "RuntimeError: bad input"  # not transient: no retry
        assert (
            got[crashed.job_id].error
            == "dead: worker died or stalled on each of 3 deliveries (after 3 attempts)"
        )
        assert worker.stats.retried == 2 and worker.stats.dead == 2
        letters = {d.job_id: d for d in await broker.dead_letters()}
        assert letters[flaky].error == got[flaky].error
        assert json.loads(letters[flaky].payload)["args"]["message"] == "backend 503"
        assert crashed.job_id in letters
        assert await broker.status(flaky) is JobStatus.DEAD
    await results.stop()


# ---------------------------------------------------------------------- Redis restart
@pytest.mark.parametrize("on_lost", ["resubmit", "fail"])
async def test_redis_restart_loses_nothing(on_lost: str) -> None:
    need(
        bool(shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/bin")),
        "the redis-server binary (apt-get install redis-server)",
    )
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    prefix = f"test-jobs-{uuid.uuid4().hex[:10]}"  # a private server: nothing to clean up
    server = start_redis(port)
    fast = Backoff(initial_s=0.02, max_s=0.2, give_up_s=20)
    broker = JobBroker(url, prefix=prefix, kinds=KINDS, on_lost=on_lost, backoff=fast)  # type: ignore[arg-type]
    try:
        await broker.open_call("call-r")
        results = Collector(broker, "call-r")
        async with running_worker(url, prefix, concurrency=1) as worker:
            running = await broker.submit(JobRequest.new("call-r", "sleep", {"seconds": 0.6}))
            await until(lambda: _eq(broker.status(running), JobStatus.RUNNING), what="running")
            queued = [await broker.submit(JobRequest.new("call-r", "echo", {"i": i})) for i in range(2)]
            doomed = await broker.submit(JobRequest.new("call-r", "echo", timeout_s=0.3))
            server.kill()  # SIGKILL: no goodbye, nothing on disk
            server.wait()
            await asyncio.sleep(0.4)  # past the doomed job's deadline
            server = start_redis(port)
            got = await results.wait(4, timeout=20)
            await asyncio.sleep(0.8)
            assert len(results.items) == 4, results.items  # each job exactly once
            by_id = results.by_id()
            assert set(by_id) == {running, doomed, *queued}
            assert by_id[doomed].error == LOST_ERROR
            for job_id in queued:
                if on_lost == "resubmit":
                    assert by_id[job_id].ok, by_id[job_id]
                else:
                    assert by_id[job_id].error == LOST_ERROR
            assert by_id[running].ok or by_id[running].error == LOST_ERROR
            assert broker.pending == {}
            assert broker._rc.restarts >= 1
            assert worker._rc.restarts >= 1
            # both sides keep working on the new server
            after = await broker.submit(JobRequest.new("call-r", "echo"))
            got = await results.wait(5)
            assert got[-1].job_id == after and got[-1].ok
        await results.stop()
    finally:
        await broker.close()
        server.kill()
        server.wait()


async def test_broker_gives_up_clearly_when_redis_stays_down() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    broker = JobBroker(url, prefix="test-jobs-down", backoff=Backoff(0.01, 0.05, 0.3))
    with pytest.raises(ConnectionError, match="unreachable for"):
        await broker.submit(JobRequest.new("call-z", "noop"))
    assert broker.pending == {}
    await broker.close()


# ---------------------------------------------------------------------- code sandbox
PG_SOCKETS = ("/run/postgresql/.s.PGSQL.5432", "/var/run/postgresql/.s.PGSQL.5432")
ESCAPES = {
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 6379), timeout=2)\nprint('CONNECTED')",
    "child_network": (  # a child process is not bound by anything Python-level in the parent
        "import subprocess, sys\n"
        "src = \"import socket; socket.create_connection(('127.0.0.1', 6379), timeout=2); print('CONNECTED')\"\n"
        "r = subprocess.run([sys.executable or 'python3', '-c', src], capture_output=True, text=True)\n"
        "print(r.stdout, r.stderr.strip().splitlines()[-1:])\nraise SystemExit(r.returncode)\n"
    ),
    "postgres": (  # a read-only mount does not stop connect() on a Unix socket; PostgreSQL trusts local users
        "import socket\n"
        f"for path in {PG_SOCKETS!r}:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n        s.connect(path)\n        print('CONNECTED', path)\n"
        "    except OSError as e:\n        print('refused', path, e)\n"
    ),
    "secrets": (
        "import os\nprint('ENV', sorted(os.environ))\n"
        "for pid in (os.getppid(), 1):\n"
        "    for name in ('environ', 'cmdline'):\n"
        "        try:\n            print(open(f'/proc/{pid}/{name}').read())\n"
        "        except OSError as e:\n            print('denied', e)\n"
    ),
    "write": "import os, sys\nfor p in sys.stdin.read().split():\n    try:\n        open(p, 'w').write('x')\n"
    "        print('WROTE', p)\n    except OSError as e:\n        print('blocked', e)\n"
    "    os.system(f'echo hi > {p} && echo WROTE-SHELL {p}')\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "infinite_loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(60)\nprint('WOKE')",
    "alloc_10gb": "x = bytearray(10 * 1024**3)\nprint('ALLOCATED')",
    "output_100mb": "import sys\nchunk = 'x' * 1_000_000\nfor _ in range(100):\n    sys.stdout.write(chunk)",
}
# Two jobs at once: the second looks for the first one's file wherever it might show.
OTHER_JOB_WRITER = "import os, sys, time\nopen('secret.txt', 'w').write(sys.stdin.read())\ntime.sleep(1.5)"
OTHER_JOB_READER = (
    "import glob, time\ntime.sleep(0.5)\n"
    "for p in glob.glob('/tmp/*/*') + glob.glob('/proc/*/cwd/*') + glob.glob('/proc/*/root/tmp/*/*'):\n"
    "    try:\n        print(p, open(p).read())\n    except OSError as e:\n        print('denied', p, e)\n"
)
SANDBOX_LIMITS = SandboxLimits(timeout_s=1.5, cpu_s=2)


def _escape_args(targets: list[str]) -> dict[str, dict[str, str]]:
    return {n: {"code": c, "stdin": " ".join(targets) if n == "write" else ""} for n, c in ESCAPES.items()}


def _check_escapes(v: dict[str, Any], mode: str, targets: list[str], secret: str | None, root: bool) -> None:
    """Every escape attempt of ESCAPES (results by name) failed inside the ``mode`` sandbox."""
    assert {x["sandbox"] for x in v.values()} == {mode}
    assert all("unprivileged-uid" in x["isolation"] for x in v.values()) == root  # a fresh uid per run
    for name in ("network", "child_network", "postgres"):
        assert "CONNECTED" not in v[name]["stdout"], (name, v[name])
    assert "Connection refused" in v["network"]["error"] or "unreachable" in v["network"]["error"]
    assert v["child_network"]["exit_code"] == 1, v["child_network"]
    assert v["postgres"]["stdout"].count("refused") == 2, v["postgres"]
    env_out = v["secrets"]["stdout"] + v["secrets"]["stderr"]
    assert "pytest" not in env_out and (secret is None or secret not in env_out)  # nor the worker's cmdline
    # empty but for the LC_CTYPE that Python's C-locale coercion (PEP 538) sets itself
    assert "ENV []" in env_out or "ENV ['LC_CTYPE']" in env_out
    assert "WROTE" not in v["write"]["stdout"], v["write"]
    assert v["write"]["stdout"].count("blocked") == len(targets)
    assert not any(map(os.path.exists, targets))
    assert v["fork_bomb"]["exit_code"] != 0 or v["fork_bomb"]["timed_out"]
    for name in ("infinite_loop", "sleep"):
        assert v[name]["timed_out"] is True and "timed out after 1.5 s" in v[name]["error"], v[name]
    assert "WOKE" not in v["sleep"]["stdout"]
    assert "MemoryError" in v["alloc_10gb"]["error"] and "ALLOCATED" not in v["alloc_10gb"]["stdout"]
    assert v["output_100mb"]["truncated"] is True
    assert len(v["output_100mb"]["stdout"]) < 70_000
    assert "output truncated" in v["output_100mb"]["stdout"]


def _check_other_job(writer: dict[str, Any], reader: dict[str, Any], token: str) -> None:
    assert writer["exit_code"] == 0 and writer["error"] is None, writer  # it wrote, and lived on
    assert token not in reader["stdout"] + reader["stderr"], reader


def _live_pids(uids: range) -> list[int]:
    """Live processes whose real uid is in ``uids``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                status = Path(f"/proc/{entry}/status").read_text()
                uid = int(status.split("Uid:")[1].split()[0])
                zombie = status.split("State:")[1].split()[0] == "Z"  # dead, awaiting init's reap
                if uid in uids and not zombie:
                    found.append(int(entry))
    return found


def _sandbox_pids() -> list[int]:
    """Live processes of a sandbox uid (2,000,000-2,999,999): there must be none left."""
    return _live_pids(range(2_000_000, 3_000_000))


@pytest.mark.parametrize("mode", ["bwrap", "netns"])
async def test_sandbox_escapes_are_contained(
    mode: str, broker: JobBroker, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if mode == "netns" and os.geteuid() != 0:
        # Not root: the netns sandbox can't be built, and code is refused rather than run.
        with pytest.raises(JobError, match="refused: the netns sandbox asked for is not available"):
            await run_python("import os; os.system('id')", mode="netns")
        return
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("PRESENCE_TEST_SECRET", secret)  # the worker (this process) has it
    targets = [f"/tmp/OUTSIDE-{uuid.uuid4().hex}", str(ROOT / f"escape-{uuid.uuid4().hex}")]
    await broker.open_call("call-s")
    results = Collector(broker, "call-s")
    options = {"code_limits": SANDBOX_LIMITS, "code_sandbox": mode}
    async with running_worker(redis_url, prefix, ["code", "noop"], concurrency=3, options=options) as worker:
        ids = {}
        for name, args in _escape_args(targets).items():
            ids[await broker.submit(JobRequest.new("call-s", "code", args))] = name
        out = {ids[r.job_id]: r for r in await results.wait(len(ESCAPES), timeout=40)}
        assert all(r.ok for r in out.values()), out  # each ran and came back with an error report
        _check_escapes({name: r.value for name, r in out.items()}, mode, targets, secret, os.geteuid() == 0)
        assert _sandbox_pids() == []
        assert not glob.glob("/tmp/presence-code-*")
        # the worker is still alive
        job_id = await broker.submit(JobRequest.new("call-s", "noop"))
        got = await results.wait(len(ESCAPES) + 1)
        assert got[-1].job_id == job_id and got[-1].ok
        assert worker.stats.failed == 0
    await results.stop()
    token = f"t0ken-{uuid.uuid4().hex}"
    limits = replace(SANDBOX_LIMITS, timeout_s=5)
    writer, reader = await asyncio.gather(
        run_python(OTHER_JOB_WRITER, stdin=token, limits=limits, mode=mode),  # type: ignore[arg-type]
        run_python(OTHER_JOB_READER, limits=limits, mode=mode),  # type: ignore[arg-type]
    )
    _check_other_job(writer, reader, token)
    ok = await run_python(
        "import sys\nopen('a.txt', 'w').write(sys.stdin.read())\nprint(open('a.txt').read())",
        stdin="hi",
        mode=mode,  # type: ignore[arg-type]
    )
    assert ok["exit_code"] == 0 and ok["stdout"] == "hi\n" and ok["error"] is None
    assert ok["sandbox"] == mode and _sandbox_pids() == []


# Runs as uid 65534 from a world-readable copy of code.py (the project and ~/.pyenv are not
# readable to it): reads {"mode", "jobs", "pair", "token"} on stdin, prints the results as JSON.
_AS_NOBODY = r"""
import asyncio, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from presence.bot.jobs.code import REFUSED, SandboxLimits, default_python, run_python, sandbox_status
from presence.bot.jobs.types import JobError
req = json.load(sys.stdin)

async def one(code, stdin="", timeout_s=1.5):
    try:
        return await run_python(code, stdin=stdin, mode=req["mode"], limits=SandboxLimits(timeout_s=timeout_s, cpu_s=2))
    except JobError as exc:
        return {"job_error": str(exc)}

async def main():
    names = list(req["jobs"])
    runs = [one(a["code"], a["stdin"]) for a in req["jobs"].values()]
    runs += [one(code, stdin, 5) for code, stdin in req["pair"]]
    out = await asyncio.gather(*runs)
    print(json.dumps({"uid": os.getuid(), "status": sandbox_status(req["mode"]),
                      "jobs": dict(zip(names, out)), "pair": out[len(names):]}))
asyncio.run(main())
"""


async def _run_as_nobody(request: dict[str, Any], path: str = "/usr/bin:/bin") -> dict[str, Any]:
    """Run the sandbox as uid 65534 (a non-root worker; or as this user when it is not root)
    from a world-readable copy of code.py."""
    jobs = Path(tempfile.mkdtemp(prefix="presence-as-nobody-"))  # pytest's tmp_path is root-only
    try:
        for package in ("presence", "presence/bot", "presence/bot/jobs"):
            (jobs / package).mkdir(parents=True, exist_ok=True)
            (jobs / package / "__init__.py").write_text("")
        for name in ("code.py", "types.py"):
            shutil.copy(ROOT / "presence/bot/jobs" / name, jobs / "presence/bot/jobs" / name)
        (jobs / "runner.py").write_text(_AS_NOBODY)
        for p in (jobs, *jobs.rglob("*")):
            p.chmod(0o755 if p.is_dir() else 0o644)
        before = set(_live_pids(range(65534, 65535)))
        # as root: switch to uid 65534; a non-root test process already is an unprivileged worker
        who: dict[str, Any] = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
        proc = await asyncio.create_subprocess_exec(
            *(default_python(), str(jobs / "runner.py")),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": path},
            cwd="/",
            **who,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(json.dumps(request).encode()), 90)
    finally:
        shutil.rmtree(jobs, ignore_errors=True)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    await until(lambda: set(_live_pids(range(65534, 65535))) <= before, 5, "no process of uid 65534 left")
    return json.loads(stdout)


async def test_sandbox_bwrap_unprivileged_escapes_are_contained() -> None:
    targets = [f"/tmp/OUTSIDE-{uuid.uuid4().hex}", str(ROOT / f"escape-{uuid.uuid4().hex}")]
    token = f"t0ken-{uuid.uuid4().hex}"
    request = {
        "mode": "bwrap",
        "jobs": _escape_args(targets),
        "pair": [[OTHER_JOB_WRITER, token], [OTHER_JOB_READER, ""]],
    }
    got = await _run_as_nobody(request)
    assert got["uid"] == (65534 if os.geteuid() == 0 else os.geteuid()) != 0, got
    assert got["status"].startswith("code jobs run in the bwrap sandbox"), got
    _check_escapes(got["jobs"], "bwrap", targets, None, root=False)
    _check_other_job(*got["pair"], token)


async def test_sandbox_unavailable_mode_is_refused() -> None:
    with pytest.raises(JobError, match="unknown sandbox mode 'audit'"):
        await run_python("print(1)", mode="audit")  # type: ignore[arg-type]
    if os.geteuid() != 0:
        with pytest.raises(JobError, match="refused: the netns sandbox asked for is not available"):
            await run_python("print(1)", mode="netns")
        return
    # as a non-root worker: netns can't work; without bwrap on PATH nothing can, so auto refuses
    req = {"jobs": {"print": {"code": "print(1)", "stdin": ""}}, "pair": []}
    netns = await _run_as_nobody({**req, "mode": "netns"})
    assert "the netns sandbox asked for is not available" in netns["jobs"]["print"]["job_error"]
    assert netns["status"] == netns["jobs"]["print"]["job_error"]
    none = await _run_as_nobody({**req, "mode": "auto"}, path="/nonexistent")
    assert none["jobs"]["print"]["job_error"].startswith(REFUSED), none
    assert none["status"].startswith("code jobs are refused: no real isolation available")
    bwrap = await _run_as_nobody({**req, "mode": "bwrap"}, path="/nonexistent")
    assert "bwrap is not on PATH" in bwrap["jobs"]["print"]["job_error"]


# ---------------------------------------------------------------------- search
class _Ctx:
    def __init__(self, **options: Any) -> None:
        self.options = options

    def remaining(self) -> float:
        return 30.0


async def test_search_bm25(tmp_path: Path) -> None:
    from presence.bot.jobs import search

    (tmp_path / "hours.md").write_text("# Opening hours\n\nThe shop opens at nine and closes at six.\n")
    (tmp_path / "returns.txt").write_text("Returns are accepted within thirty days with a receipt.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "parking.html").write_text("<p>Free <b>parking</b> behind the shop.</p>")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    ctx = _Ctx(docs_dir=str(tmp_path))
    out = await search.handle({"query": "when does the shop close", "k": 2}, ctx)
    assert out["mode"] == ("hybrid" if search.embeddings_available() else "bm25")
    assert out["hits"][0]["path"] == "hours.md"
    out = await search.handle({"query": "parking", "mode": "bm25"}, ctx)
    assert [h["path"] for h in out["hits"]] == [os.path.join("sub", "parking.html")]
    # the index follows changes of the folder
    (tmp_path / "returns.txt").write_text("Refunds and parking permits are handled at the desk.")
    out = await search.handle({"query": "refunds", "mode": "bm25"}, ctx)
    assert out["hits"][0]["path"] == "returns.txt"
    with pytest.raises(JobError, match="no docs_dir"):
        await search.handle({"query": "x"}, _Ctx())
    with pytest.raises(JobError, match="non-empty string"):
        await search.handle({"query": ""}, ctx)
    if not search.embeddings_available():
        with pytest.raises(JobError, match="needs sentence_transformers"):
            await search.handle({"query": "x", "mode": "hybrid"}, ctx)
    bm = search.BM25([["a", "b"], ["b", "c", "c"], ["d"]])
    assert bm.top(["c"], 3)[0][0] == 1 and bm.top(["zzz"], 3) == []


# ---------------------------------------------------------------------- think + web search
@contextlib.asynccontextmanager
async def fake_http(routes: dict[str, Any]) -> AsyncIterator[str]:
    from aiohttp import web

    app = web.Application()
    for path, handler in routes.items():
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_think_openai_compatible_and_local() -> None:
    from aiohttp import web

    from presence.bot.jobs import think

    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        if body["messages"][-1]["content"] == "fail":
            return web.Response(status=503, text="overloaded")
        if body["messages"][-1]["content"] == "bad":
            return web.Response(status=400, text="bad request")
        if not body["stream"]:
            return web.json_response(
                {"model": "m", "choices": [{"message": {"content": "forty-two"}, "finish_reason": "stop"}]}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("for", "ty-", "two"):
            finish = "stop" if piece == "two" else None  # as every real server ends a reply
            chunk = {"model": "m", "choices": [{"delta": {"content": piece}, "finish_reason": finish}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with fake_http({"/v1/chat/completions": chat}) as base:
        ctx = _Ctx(think_url=f"{base}/v1", think_model="m", think_api_key="k")
        out = await think.handle({"prompt": "meaning?", "system": "be brief", "stream": False}, ctx)
        assert out["text"] == "forty-two" and out["source"] == "http" and out["finish_reason"] == "stop"
        assert seen[0]["messages"][0] == {"role": "system", "content": "be brief"}
        out = await think.handle({"prompt": "meaning?"}, ctx)  # streaming is the default
        assert out["text"] == "forty-two"
        with pytest.raises(TransientJobError, match="answered HTTP 503: overloaded"):
            await think.handle({"prompt": "fail"}, ctx)
        with pytest.raises(JobError, match="answered HTTP 400: bad request"):
            await think.handle({"prompt": "bad"}, ctx)
    with pytest.raises(TransientJobError, match="cannot talk to"):
        await think.handle({"prompt": "x"}, _Ctx(think_url=f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(JobError, match="no model configured"):
        await think.handle({"prompt": "x"}, _Ctx())
    with pytest.raises(JobError, match=r"args\.prompt"):
        await think.handle({}, _Ctx())

    def local_sync(messages: list[dict[str, str]], max_tokens: int) -> str:
        return f"sync:{messages[-1]['content']}:{max_tokens}"

    async def local_stream(messages: list[dict[str, str]], max_tokens: int) -> AsyncIterator[str]:
        for piece in ("a", "b"):
            yield piece

    assert (await think.handle({"prompt": "q", "max_tokens": 7}, _Ctx(think_fn=local_sync)))[
        "text"
    ] == "sync:q:7"
    assert (await think.handle({"prompt": "q"}, _Ctx(think_fn=local_stream)))["text"] == "ab"


async def test_web_search_client() -> None:
    from aiohttp import web

    from presence.bot.jobs.search import WebSearch

    async def search(request: web.Request) -> web.Response:
        body = await request.json()
        items = [{"title": f"t{i}", "url": f"https://e/{i}", "snippet": body["query"]} for i in range(5)]
        return web.json_response({"results": items})

    async with fake_http({"/search": search}) as base:
        hits = await WebSearch(f"{base}/search").search("cats", k=2)
        assert hits == [{"title": f"t{i}", "url": f"https://e/{i}", "snippet": "cats"} for i in range(2)]


async def test_run_worker_entry_point(broker: JobBroker, redis_url: str, prefix: str) -> None:
    code = (
        "import asyncio\nfrom presence.config import Settings\nfrom presence.bot.jobs import run_worker\n"
        f"asyncio.run(run_worker(Settings(redis_url={redis_url!r}), ['echo'], prefix={prefix!r}))"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT)
    try:
        await broker.open_call("call-rw")
        results = Collector(broker, "call-rw")
        job_id = await broker.submit(JobRequest.new("call-rw", "echo", {"hi": 1}))
        got = await results.wait(1, timeout=20)
        assert got[0].job_id == job_id and got[0].value == {"hi": 1}
        await results.stop()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_test_kinds_only_when_enabled_and_unique_worker_names() -> None:
    for kind in ("sleep", "fail"):
        with pytest.raises(ValueError, match="for tests only"):
            load_handlers(["noop", kind])
        with pytest.raises(JobError, match="unknown kind"):  # a stock broker does not queue them
            JobRequest.new("c", kind).validate()
    assert set(load_handlers(KINDS, test_kinds=True)) == set(KINDS)
    # two containers are both PID 1 of the same host name: their workers still differ
    names = {default_consumer_name() for _ in range(20)}
    assert len(names) == 20 and all(n.startswith(f"{socket.gethostname()}-{os.getpid()}-") for n in names)


def test_options_from_settings() -> None:
    from presence.config import Settings

    options = options_from_settings(Settings(llm_url="http://x/v1", llm_api_key="k"))
    assert options == {"think_url": "http://x/v1", "think_api_key": "k"}
