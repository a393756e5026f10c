"""Finding a Redis for background jobs: PING one, find the ``redis-server`` binary, or start a
private, throwaway one (used by :class:`~presence.bot.jobs.bridge.JobBridge` in auto mode)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from presence.config import redact


class JobsUnavailable(RuntimeError):
    """``jobs=redis`` and no Redis answered (or a private one could not be started)."""


async def ping_redis(url: str, timeout_s: float = 0.5) -> str | None:
    """None when a Redis answers PING at ``url`` within ``timeout_s``, else why not."""
    client = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        await asyncio.wait_for(client.ping(), timeout_s * 2)
    except Exception as exc:  # refused, timeout, auth, not Redis at all: all mean "not usable"
        return f"{type(exc).__name__}: {redact(str(exc))}" if str(exc) else type(exc).__name__
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return None


def find_redis_server(explicit: str | None = None) -> str | None:
    """The redis-server binary: ``explicit`` if executable, else on PATH or in /usr(/local)/bin."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    return next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A throwaway ``redis-server`` on 127.0.0.1: nothing on disk, gone with its owner.

    Under Linux it is started through ``setpriv --pdeathsig TERM`` when available, so it does not
    outlive a server that is killed without running :meth:`stop`.
    """

    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: str) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    async def start(
        cls, binary: str, *, port: int | None = None, attempts: int = 3, ready_timeout_s: float = 5.0
    ) -> PrivateRedis:
        workdir = tempfile.mkdtemp(prefix="presence-redis-")
        problem = ""
        for _ in range(attempts if port is None else 1):
            chosen = port or free_port()
            argv = [
                binary,
                *("--port", str(chosen), "--bind", "127.0.0.1", "--protected-mode", "yes"),
                *("--save", "", "--appendonly", "no", "--dir", workdir, "--daemonize", "no"),
                *("--loglevel", "warning", "--logfile", os.path.join(workdir, "redis.log")),
            ]
            setpriv = shutil.which("setpriv")
            if setpriv:
                argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
            proc = _spawn(argv, os.path.join(workdir, "stderr.log"))
            server = cls(proc, chosen, workdir)
            end = time.monotonic() + ready_timeout_s
            while time.monotonic() < end and proc.poll() is None:
                if await ping_redis(server.url, 0.2) is None:
                    return server
                await asyncio.sleep(0.02)
            problem = server._log_tail()
            await server.stop(remove_dir=False)
            if "in use" not in problem:  # a port race is worth another try; anything else is not
                break
        shutil.rmtree(workdir, ignore_errors=True)
        raise JobsUnavailable(
            f"could not start {binary}: {problem.strip()[-300:] or 'it did not answer PING'}"
        )

    def _log_tail(self) -> str:
        out = []
        for name in ("stderr.log", "redis.log"):
            with contextlib.suppress(OSError):
                out.append(Path(self.workdir, name).read_text(errors="replace")[-500:])
        return "\n".join(o for o in out if o.strip())

    async def stop(self, *, remove_dir: bool = True) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            end = time.monotonic() + 3.0
            while self.proc.poll() is None and time.monotonic() < end:
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        if remove_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _spawn(argv: list[str], stderr_path: str) -> subprocess.Popen[bytes]:
    # Own session: a Ctrl-C in the terminal must not stop Redis before the worker is done.
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
