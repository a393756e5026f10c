"""Helpers shared by the job-layer tests (test_jobs.py, test_job_bridge.py); not a test module."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from presence.bot.jobs.redis_server import free_port

REDIS_URL = os.environ.get("PRESENCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "REDIS_URL",
    "ROOT",
    "delete_keys",
    "free_port",
    "redis_problem",
    "spawn_worker",
    "start_redis",
    "until",
]


def redis_problem(url: str) -> str | None:
    """Why the Redis at ``url`` does not answer a PING, or None when it does."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except redis.RedisError as exc:
        return str(exc)
    return None


def delete_keys(url: str, prefix: str) -> None:
    """Delete every key under ``{prefix}:`` (a test's own key prefix)."""
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def spawn_worker(redis_url: str, prefix: str, name: str, kinds: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "presence.cli", "worker", "--redis-url", redis_url, "--test-kinds"),
            *("--prefix", prefix, "--kinds", kinds, "--consumer", name, *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until "presence worker <name>: ready" (or EOF on a crash)
    if not line.startswith(f"presence worker {name}: ready"):
        proc.kill()
        raise AssertionError(
            f"worker {name} did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def start_redis(port: int, password: str = "") -> subprocess.Popen[bytes]:
    """A private redis-server on ``port`` (nothing on disk), once it answers."""
    binary = shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/bin") or "redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + (["--requirepass", password] if password else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 10
    while redis_problem(
        f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    ):
        if time.monotonic() > end or proc.poll() is not None:
            proc.kill()
            raise AssertionError("private redis-server did not start")
        time.sleep(0.02)
    return proc
