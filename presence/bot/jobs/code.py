"""The ``code`` job kind: run untrusted Python in a sandboxed subprocess.

The child is ``python3 -I -S -X utf8 -c BOOT``, started with an EMPTY environment in its own
session (process group). BOOT, a fresh single-threaded process, sets the sandbox up before the
job's code runs (this is the "preexec" stage; doing it in ``preexec_fn`` would run Python
between fork and exec of a threaded asyncio process, which is unsafe):

1. ``unshare(CLONE_NEWNET | CLONE_NEWNS)`` via libc (Python 3.11 has no ``os.unshare``): a new,
   empty network namespace (no interface is up, so every connect fails), and a private mount
   namespace in which every mount is remounted read-only, a size-capped tmpfs is mounted on
   the job's temp directory (the only writable place) and a fresh ``/proc`` with
   ``hidepid=invisible`` hides every process but the job's own (other processes' command lines
   may carry secrets). Reported as ``sandbox: "netns"``.
2. When namespaces are not permitted, an audit hook blocks socket creation and writes outside
   the temp directory at the Python level. Reported as ``sandbox: "audit"``; it is best effort
   (ctypes is blocked too, but native code could still bypass it).
3. When started as root, it drops to a fresh unprivileged uid/gid (random, unused, unique per
   run) with no supplementary groups and ``PR_SET_NO_NEW_PRIVS``: root would ignore
   RLIMIT_NPROC and file permissions; a unique uid makes the process limit per-run and lets
   cleanup kill every process of the run, even ones that called setsid().
4. rlimits: CPU, address space (512 MB), file size (10 MB), processes (16), open files (64),
   no core dumps.

The parent enforces a wall-clock timeout (SIGKILL to the process group and to every process of
the run's uid), caps captured output (64 KB per stream; the process is stopped once it writes
more), and deletes the temp directory. What is NOT contained: the code can read world-readable
files (e.g. the project's sources, /etc), and use CPU and memory within its limits; it sees the
stdlib only (``-S``: no site-packages). Without root (no uid drop) RLIMIT_NPROC counts all of
the user's processes, and in audit mode writes are blocked only at the Python level.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from presence.bot.jobs.types import JobError

SandboxMode = Literal["auto", "netns", "audit"]


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 512 * 1024 * 1024
    file_bytes: int = 10 * 1024 * 1024
    disk_bytes: int = 32 * 1024 * 1024  # size of the tmpfs working directory (netns mode)
    nproc: int = 16
    nofile: int = 64
    output_bytes: int = 64 * 1024  # per stream


MAX_CODE_BYTES = 256 * 1024

# Runs inside the child, first as the starting user (root here), then as the sandbox uid.
# Kept self-contained: it sees only its argv (a JSON config) and the stdlib.
_BOOT = r"""
import json, os, sys
_cfg = json.loads(sys.argv.pop(1))
_status_fd = _cfg["status_fd"]
_notes = []
_net = _fs = False
_work = _cfg["workdir"]
_limits = _cfg["limits"]

def _setup():
    global _net, _fs
    if _cfg["want"] != "audit":
        try:
            import ctypes, re
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
            def check(rc, what):
                if rc != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"{what}: {os.strerror(err)}")
            check(libc.unshare(0x40000000 | 0x00020000), "unshare(CLONE_NEWNET|CLONE_NEWNS)")
            _net = True
            MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
            MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
            # private first: nothing done below may propagate to the host's mounts
            check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
            failed = []
            with open("/proc/self/mountinfo") as f:
                lines = f.read().splitlines()
            for line in lines:
                parts = line.split()
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
                opts = parts[5].split(",")
                flags = MS_REMOUNT | MS_BIND | MS_RDONLY
                flags |= (MS_NOSUID if "nosuid" in opts else 0) | (MS_NODEV if "nodev" in opts else 0)
                flags |= MS_NOEXEC if "noexec" in opts else 0
                if libc.mount(None, point.encode(), None, flags, None) != 0:
                    failed.append(f"{point}: {os.strerror(ctypes.get_errno())}")
            # a private procfs that shows only the job's own processes: others' command lines
            # (which may hold secrets) stay out of sight (separate instance: kernel >= 5.8)
            proc_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
            if libc.mount(b"proc", b"/proc", b"proc", proc_flags, b"hidepid=invisible") == 0:
                _notes.append("proc-hidepid")
            else:
                _notes.append(f"private /proc failed: {os.strerror(ctypes.get_errno())}")
            uid = _cfg["uid"]
            owner = f",uid={uid},gid={uid}" if uid else ""
            data = f"size={_limits['disk_bytes']},nr_inodes=4096,mode=0700{owner}".encode()
            check(libc.mount(b"tmpfs", _work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, data), "tmpfs on workdir")
            if failed:
                _notes.append("read-only remount failed for " + "; ".join(failed[:5]))
            _fs = not any(f.startswith("/: ") for f in failed)
        except OSError as exc:
            if _cfg["want"] == "netns":
                raise
            _notes.append(f"namespaces unavailable ({exc}); using audit hooks")
    uid = _cfg["uid"]
    if uid and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except Exception as exc:
        _notes.append(f"no_new_privs failed: {exc}")
    import resource
    cpu = _limits["cpu_s"]
    for res, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (_limits["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (_limits["file_bytes"],) * 2),
        (resource.RLIMIT_NPROC, (_limits["nproc"],) * 2),
        (resource.RLIMIT_NOFILE, (_limits["nofile"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(res, value)
    os.chdir(_work)

try:
    _setup()
except BaseException as exc:
    os.write(_status_fd, json.dumps({"error": f"sandbox setup failed: {exc}"}).encode())
    os._exit(125)
os.write(_status_fd, json.dumps({"net": _net, "fs": _fs, "notes": _notes, "uid": os.getuid()}).encode())
os.close(_status_fd)

if not (_net and _fs):
    def _hook(event, args, _net=_net, _fs=_fs, _root=os.path.realpath(_work) + os.sep):
        import os as _os
        if not _net and event.startswith("socket.") and event != "socket.gethostname":
            raise PermissionError(f"sandbox: network access is blocked ({event})")
        if event.startswith("ctypes."):
            raise PermissionError(f"sandbox: ctypes is blocked ({event})")
        if _fs:
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND)
            )
            paths = [path] if writing else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.utime", "os.truncate"):
            paths = [args[0]]
        elif event in ("os.rename", "os.symlink", "os.link"):
            paths = [args[0], args[1]]
        else:
            return
        for p in paths:
            if isinstance(p, int):
                continue
            p = _os.fsdecode(p)
            if not _os.path.realpath(p).startswith(_root):
                raise PermissionError(f"sandbox: writing outside the working directory is blocked ({p})")
    sys.addaudithook(_hook)

_code = _cfg.pop("code")
del _cfg, _setup
sys.argv = ["main.py"]
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(_code, "main.py", "exec"), _globals)
except SystemExit:
    raise
except BaseException:
    import traceback
    _t, _v, _tb = sys.exc_info()
    traceback.print_exception(_t, _v, _tb.tb_next)
    sys.stderr.flush()
    os._exit(1)
"""


def default_python() -> str:
    """A system interpreter: a sandbox uid can't read a per-user install like ~/.pyenv."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def _uid_in_use(uid: int) -> bool:
    return bool(_pids_of_uid(uid))


def _fresh_uid() -> int:
    for _ in range(20):
        uid = random.randrange(2_000_000, 3_000_000)
        if not _uid_in_use(uid):
            return uid
    raise JobError("code: could not find an unused sandbox uid")


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            # zombies are dead already; orphans wait for init to reap them
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                pids.append(int(entry))
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return pids


def _kill_all(pgid: int, uid: int | None) -> None:
    """SIGKILL the process group and, with a sandbox uid, every process that uid owns."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if not uid:
        return
    for _ in range(100):  # a fork bomb refills slots as we kill; SIGKILLed ones can't fork
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


async def _pump(stream: asyncio.StreamReader, cap: int, overflow: asyncio.Event) -> tuple[bytes, int]:
    buf = bytearray()
    total = 0
    while chunk := await stream.read(65536):
        total += len(chunk)
        if len(buf) < cap:
            buf += chunk[: cap - len(buf)]
        if total > cap:
            overflow.set()
    return bytes(buf), total


def _summary(result: dict[str, Any], timeout_s: float, cap: int) -> str | None:
    if result.get("setup_error"):
        return str(result["setup_error"])
    if result["timed_out"]:
        return f"timed out after {timeout_s:g} s; the process group was killed"
    if result["truncated"] and result["exit_code"] != 0:
        return f"output exceeded {cap} bytes; the process was stopped"
    code = result["exit_code"]
    if code == 0:
        return None
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-code).name
            hint = " (CPU time limit)" if name in ("SIGXCPU", "SIGKILL") else ""
            return f"killed by {name}{hint}"
    tail = [line for line in result["stderr"].strip().splitlines() if line.strip()]
    return f"exit code {code}: {tail[-1][:300]}" if tail else f"exit code {code}"


async def run_python(
    code: str,
    *,
    stdin: str = "",
    limits: SandboxLimits | None = None,
    python: str | None = None,
    mode: SandboxMode = "auto",
) -> dict[str, Any]:
    """Run ``code`` sandboxed; returns stdout, stderr, exit_code, timed_out, truncated, sandbox, error."""
    limits = limits or SandboxLimits()
    if not isinstance(code, str):
        raise JobError("code: 'code' must be a string")
    if len(code.encode()) > MAX_CODE_BYTES:
        raise JobError(f"code: source larger than {MAX_CODE_BYTES} bytes")
    uid = _fresh_uid() if os.geteuid() == 0 else 0
    workdir = tempfile.mkdtemp(prefix="presence-code-")
    if uid:
        os.chown(workdir, uid, uid)  # audit mode writes here directly; netns mounts over it
    status_r, status_w = os.pipe()
    config = {
        "status_fd": status_w,
        "workdir": workdir,
        "uid": uid,
        "want": mode,
        "limits": asdict(limits),
        "code": code,
    }
    started = time.monotonic()
    timed_out = False
    overflow = asyncio.Event()
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            python or default_python(),
            "-I",
            "-S",
            "-X",
            "utf8",
            "-c",
            _BOOT,
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={},  # nothing inherited: no secrets, no PYTHON* knobs
            cwd=workdir,
            start_new_session=True,
            pass_fds=(status_w,),
        )
        os.close(status_w)
        status_w = -1
        assert proc.stdin and proc.stdout and proc.stderr
        out_task = asyncio.ensure_future(_pump(proc.stdout, limits.output_bytes, overflow))
        err_task = asyncio.ensure_future(_pump(proc.stderr, limits.output_bytes, overflow))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(stdin.encode())
            await proc.stdin.drain()
        with contextlib.suppress(Exception):
            proc.stdin.close()
        waiter = asyncio.ensure_future(proc.wait())
        flood = asyncio.ensure_future(overflow.wait())
        done, _ = await asyncio.wait(
            {waiter, flood}, timeout=limits.timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        flood.cancel()
        if waiter not in done:
            timed_out = flood not in done
            await asyncio.to_thread(_kill_all, proc.pid, uid)
        await waiter
        # Orphans (background children) would keep the pipes open: end them too.
        await asyncio.to_thread(_kill_all, proc.pid, uid)
        try:
            (stdout, out_total), (stderr, err_total) = await asyncio.wait_for(
                asyncio.gather(out_task, err_task), timeout=2.0
            )
        except TimeoutError:
            out_task.cancel()
            err_task.cancel()
            stdout, stderr, out_total, err_total = b"", b"", 0, 0
        status = _read_status(status_r)
    finally:
        if proc is not None and proc.returncode is None:  # cancelled by the worker
            await asyncio.to_thread(_kill_all, proc.pid, uid)
            with contextlib.suppress(Exception):
                await proc.wait()
        for fd in (status_r, status_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)

    truncated = out_total > limits.output_bytes or err_total > limits.output_bytes
    result: dict[str, Any] = {
        "stdout": _text(stdout, out_total, limits.output_bytes),
        "stderr": _text(stderr, err_total, limits.output_bytes),
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "truncated": truncated,
        "sandbox": "netns" if status.get("net") else "audit",
        "isolation": _isolation(status, uid, mode),
        "duration_s": round(time.monotonic() - started, 3),
    }
    if "error" in status:
        result["setup_error"] = status["error"]
    result["error"] = _summary(result, limits.timeout_s, limits.output_bytes)
    result.pop("setup_error", None)
    return result


def _read_status(fd: int) -> dict[str, Any]:
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 65536):
            data += chunk
    try:
        status = json.loads(data) if data else {}
    except ValueError:
        status = {}
    return status if isinstance(status, dict) else {}


def _isolation(status: dict[str, Any], uid: int, mode: str) -> list[str]:
    applied = ["empty-env", "rlimits", "wall-timeout", "temp-cwd"]
    applied.append("netns" if status.get("net") else "audit-net")
    applied.append("mountns-readonly" if status.get("fs") else "audit-fs")
    if uid and status.get("uid") == uid:
        applied.append("unprivileged-uid")
    applied.extend(status.get("notes", []))
    return applied


def _text(data: bytes, total: int, cap: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if total > cap:
        text += f"\n[... output truncated: {total - cap} more bytes not kept (limit {cap})]"
    return text


async def handle(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Job kind ``code``: args ``code`` (str), optional ``stdin`` (str) and ``timeout_s``."""
    code = args.get("code")
    if not isinstance(code, str) or not code.strip():
        raise JobError("code: args.code must be a non-empty string")
    stdin = args.get("stdin", "")
    if not isinstance(stdin, str):
        raise JobError("code: args.stdin must be a string")
    options = getattr(ctx, "options", {}) or {}
    limits: SandboxLimits = options.get("code_limits") or SandboxLimits()
    timeout = args.get("timeout_s", limits.timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise JobError("code: args.timeout_s must be a positive number")
    timeout = min(float(timeout), limits.timeout_s)
    remaining = ctx.remaining() if hasattr(ctx, "remaining") else timeout
    # leave the worker time to report before the job deadline
    timeout = max(0.1, min(timeout, remaining - 0.25))
    limits = replace(limits, timeout_s=timeout, cpu_s=max(1, min(limits.cpu_s, int(timeout) + 1)))
    return await run_python(
        code,
        stdin=stdin,
        limits=limits,
        python=options.get("code_python"),
        mode=options.get("code_sandbox", "auto"),
    )


__all__ = ["SandboxLimits", "default_python", "handle", "run_python"]
