"""Benchmark of the job layer against a real Redis, with workers as real subprocesses.

``presence bench jobs --n 300`` (or ``await bench(redis_url, n)``) prints:

* dispatch-to-result overhead of a no-op job (p50/p95, one at a time, one worker),
* throughput (jobs/s) of ``n`` no-op jobs submitted at once, with 1 and with 4 workers,
* time to recover the job of a SIGKILLed worker (idle_reclaim_ms=1000): kill -> another worker
  starts it, and kill -> its result (the job itself takes 0.3 s).

Keys use a unique prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from presence.bot.jobs.broker import JobBroker
from presence.bot.jobs.redisio import DEFAULT_REDIS_URL
from presence.bot.jobs.types import BUILTIN_KINDS, TEST_KINDS, JobRequest, JobResult, JobStatus
from presence.config import redact

ROOT = Path(__file__).resolve().parents[3]
RECLAIM_MS = 1_000


def _spawn(redis_url: str, prefix: str, name: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "presence.cli", "worker", "--redis-url", redis_url, "--prefix", prefix),
            *("--kinds", "noop,sleep", "--test-kinds", "--consumer", name),
            *("--idle-reclaim-ms", str(RECLAIM_MS), "--log-level", "warning"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    return proc


async def _ready(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if ": ready" not in line:
            raise RuntimeError(f"worker did not start: {line!r}")


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Results:
    """Drains one call's results and wakes waiters per job id."""

    def __init__(self, broker: JobBroker, call_id: str) -> None:
        self.arrived: dict[str, tuple[float, JobResult]] = {}
        self._event = asyncio.Event()
        self._task = asyncio.create_task(self._run(broker, call_id))

    async def _run(self, broker: JobBroker, call_id: str) -> None:
        async for result in broker.results(call_id, block_ms=1_000):
            self.arrived[result.job_id] = (time.perf_counter(), result)
            self._event.set()

    async def wait(self, job_ids: set[str], timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not job_ids <= self.arrived.keys():
            if time.monotonic() > end:
                raise TimeoutError(f"{len(job_ids - self.arrived.keys())} results missing")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), 1.0)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _throughput(broker: JobBroker, results: _Results, call_id: str, n: int) -> float:
    start = time.perf_counter()
    ids = set(
        await asyncio.gather(
            *(broker.submit(JobRequest.new(call_id, "noop", timeout_s=120)) for _ in range(n))
        )
    )
    await results.wait(ids, timeout=120)
    return n / (time.perf_counter() - start)


async def bench(redis_url: str = DEFAULT_REDIS_URL, n: int = 300) -> dict[str, Any]:
    """Run the benchmark, print a summary and return the numbers."""
    prefix = f"bench-jobs-{uuid.uuid4().hex[:8]}"
    call_id = "bench-call"
    broker = JobBroker(redis_url, prefix=prefix, kinds=BUILTIN_KINDS | TEST_KINDS)
    procs: list[subprocess.Popen[str]] = []
    out: dict[str, Any] = {"n": n}
    try:
        await broker.open_call(call_id)
        results = _Results(broker, call_id)
        procs.append(_spawn(redis_url, prefix, "w0"))
        await _ready(procs)

        # warm-up, then one job at a time: submit() start -> result yielded
        for _ in range(10):
            job = await broker.submit(JobRequest.new(call_id, "noop"))
            await results.wait({job})
        latencies = []
        for _ in range(n):
            t0 = time.perf_counter()
            job = await broker.submit(JobRequest.new(call_id, "noop"))
            await results.wait({job})
            latencies.append((results.arrived[job][0] - t0) * 1000)
        out["overhead_ms_p50"] = round(statistics.median(latencies), 2)
        out["overhead_ms_p95"] = round(_pct(latencies, 0.95), 2)

        out["jobs_per_s_1_worker"] = round(await _throughput(broker, results, call_id, n), 1)
        more = [_spawn(redis_url, prefix, f"w{i}") for i in range(1, 4)]
        procs.extend(more)
        await _ready(more)
        out["jobs_per_s_4_workers"] = round(await _throughput(broker, results, call_id, n), 1)

        # recovery: only the victim may take the job, so the rescuers are paused meanwhile
        _stop(procs)
        procs.clear()
        victim, rescuer = _spawn(redis_url, prefix, "victim"), _spawn(redis_url, prefix, "rescuer")
        procs += [victim, rescuer]
        await _ready(procs)
        rescuer.send_signal(signal.SIGSTOP)
        job = await broker.submit(JobRequest.new(call_id, "sleep", {"seconds": 0.3}, timeout_s=60))
        while (await broker.info(job)).get("worker") != "victim":
            await asyncio.sleep(0.005)
        rescuer.send_signal(signal.SIGCONT)
        victim.send_signal(signal.SIGKILL)
        t_kill = time.perf_counter()
        while True:
            info = await broker.info(job)
            if info.get("worker") == "rescuer" and info.get("status") == JobStatus.RUNNING:
                break
            await asyncio.sleep(0.005)
        t_started = time.perf_counter()
        await results.wait({job})
        arrived, result = results.arrived[job]
        assert result.ok and result.worker == "rescuer", result
        out["recover_kill_to_restart_ms"] = round((t_started - t_kill) * 1000, 1)
        out["recover_kill_to_result_ms"] = round((arrived - t_kill) * 1000, 1)
        out["idle_reclaim_ms"] = RECLAIM_MS
        await results.close()
    finally:
        _stop(procs)
        with contextlib.suppress(Exception):
            keys = [k async for k in broker._rc.redis.scan_iter(f"{prefix}:*", count=1000)]
            if keys:
                await broker._rc.redis.delete(*keys)
        await broker.close()

    print(f"job layer benchmark ({redact(redis_url)}, n={n}, workers are subprocesses)")
    print(
        f"  dispatch->result overhead, no-op: p50 {out['overhead_ms_p50']} ms, p95 {out['overhead_ms_p95']} ms"
    )
    print(
        f"  throughput, no-op: {out['jobs_per_s_1_worker']} jobs/s (1 worker), {out['jobs_per_s_4_workers']} jobs/s (4 workers)"
    )
    print(
        f"  killed worker (idle_reclaim_ms={RECLAIM_MS}): job restarted {out['recover_kill_to_restart_ms']} ms"
        f" after SIGKILL, result {out['recover_kill_to_result_ms']} ms after (job takes 300 ms)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="presence bench jobs", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--n", type=int, default=300)
    args = p.parse_args(argv)
    asyncio.run(bench(args.redis_url, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
