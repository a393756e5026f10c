"""The ``code`` job kind: run untrusted Python in a sandboxed subprocess.

The child is ``python3 -I -S -X utf8 -c BOOT`` (a system interpreter; stdlib only, no
site-packages) with an EMPTY environment, in its own session (process group); its settings and
source come through an inherited memfd, not argv. It runs in one of two sandboxes. Both give it
its own network namespace (every connect to the host or beyond fails; abstract Unix sockets are
out of reach too) and mount namespace, in which the file system is read-only, empty read-only
tmpfs hide ``/run`` and ``/var/run`` (host Unix sockets: PostgreSQL's, Redis's...) and ``/tmp``
(other jobs, other sockets), and the work directory (the cwd, ``/tmp/job``) is a size-capped
tmpfs, the only writable place, gone with the namespace:

``bwrap`` (bubblewrap, preferred) -- ``bwrap --unshare-all --disable-userns --ro-bind / / ...``:
   also a fresh ``/dev`` (read-only) and ``/proc`` in its own pid namespace (no other process is
   visible), no nested user namespaces. Works as root and unprivileged (a user namespace).
``netns`` (root only) -- BOOT calls ``unshare(CLONE_NEWNET | CLONE_NEWNS)`` itself, remounts
   every mount read-only (a writable mount that stays writable is an error, never a silent
   downgrade) and mounts a procfs with ``hidepid=invisible`` (others' command lines may hold
   secrets).

When the worker runs as root the job never does: bwrap is started as (netns: BOOT drops to) a
fresh unused uid/gid, unique per run, with no supplementary groups and ``PR_SET_NO_NEW_PRIVS``,
so RLIMIT_NPROC is per run and cleanup can kill every process of the run, even ones that called
setsid(). BOOT then sets rlimits: CPU, address space (512 MB), file size (10 MB), processes (16),
open files (64), no core dumps. The parent enforces a wall-clock timeout (SIGKILL to the process
group and every process of the run's uid; bwrap's ``--die-with-parent`` ends its pid namespace)
and caps captured output (64 KB per stream; the process is stopped once it writes more).

``auto`` takes bwrap when ``bwrap`` is on PATH and a probe run works, else netns when its probe
works (probes are cached per process), else every code job is refused with a JobError: there is
no best-effort fallback. An explicit mode that can't work is refused the same way.
:func:`sandbox_status` says which applies; the worker logs it at start-up.

What is NOT contained: the code can read world-readable files (the project's sources, /etc), and
in bwrap mode under a non-root worker whatever that user can read; it can connect to Unix
sockets its uid may open outside /run, /var/run and /tmp; it uses CPU and memory within its
limits; there is no seccomp filter, so a kernel bug reachable by syscalls is not contained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from presence.bot.jobs.types import JobError

SandboxMode = Literal["auto", "bwrap", "netns"]
MODES = ("bwrap", "netns")  # auto's order of preference
WORKDIR = "/tmp/job"  # inside the sandbox; a tmpfs of its own
REFUSED = (
    "code jobs are refused: no real isolation available "
    "(install bubblewrap, or run the worker as root with namespaces permitted)"
)


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 512 * 1024 * 1024
    file_bytes: int = 10 * 1024 * 1024
    disk_bytes: int = 32 * 1024 * 1024  # size of the tmpfs working directory
    nproc: int = 16
    nofile: int = 64
    output_bytes: int = 64 * 1024  # per stream


MAX_CODE_BYTES = 256 * 1024

# Runs inside the child (netns: first as root, then as the sandbox uid). Self-contained: it
# sees only the stdlib and its settings, read from the memfd named by argv[1].
_BOOT = r"""
import json, os, sys
with open(int(sys.argv.pop(1)), "rb") as _f:
    _cfg = json.loads(_f.read())
_status_fd = _cfg["status_fd"]
_notes = []
_work = _cfg["workdir"]
_limits = _cfg["limits"]

def _netns():
    import ctypes, re
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    def mount(target, fstype, flags, data, what):
        enc = lambda s: s.encode() if s else None
        if libc.mount(enc(fstype), target.encode(), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
    if libc.unshare(0x40000000 | 0x00020000) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET|CLONE_NEWNS): {os.strerror(err)}")
    RDONLY, NOSUID, NODEV, NOEXEC = 1, 2, 4, 8
    REMOUNT, BIND, REC, PRIVATE = 32, 4096, 16384, 1 << 18
    HIDDEN = NOSUID | NODEV | NOEXEC
    # private first: nothing done below may propagate to the host's mounts
    mount("/", None, REC | PRIVATE, None, "make / private")
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        opts = parts[5].split(",")
        keep = sum(flag for name, flag in (("nosuid", NOSUID), ("nodev", NODEV), ("noexec", NOEXEC)) if name in opts)
        try:
            mount(point, None, REMOUNT | BIND | RDONLY | keep, None, f"read-only remount of {point}")
        except OSError:
            if "ro" not in opts and not point.startswith("/proc"):  # /proc is replaced below
                raise
    for path in ("/run", "/var/run"):
        if os.path.isdir(path) and not os.path.islink(path):
            mount(path, "tmpfs", HIDDEN | RDONLY, "size=4k,nr_inodes=8,mode=0755", f"tmpfs on {path}")
    mount("/tmp", "tmpfs", HIDDEN, "size=16k,nr_inodes=8,mode=0755", "tmpfs on /tmp")
    os.mkdir(_work, 0o700)
    uid = _cfg["uid"]
    owner = f",uid={uid},gid={uid}" if uid else ""
    data = f"size={_limits['disk_bytes']},nr_inodes=4096,mode=0700{owner}"
    mount(_work, "tmpfs", NOSUID | NODEV, data, "tmpfs on the work dir")
    mount("/tmp", None, REMOUNT | BIND | RDONLY | HIDDEN, None, "read-only /tmp")
    # a private procfs that shows only the job's own processes (separate instance: kernel >= 5.8)
    try:
        mount("/proc", "proc", HIDDEN, "hidepid=invisible", "procfs")
        _notes.append("proc-hidepid")
    except OSError as exc:
        _notes.append(f"private /proc failed: {exc}")
    if uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

def _setup():
    if _cfg["mode"] == "netns":
        _netns()
    import ctypes, resource
    if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
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
    os.environ.pop("PWD", None)  # bwrap sets it; the job's environment stays empty

try:
    _setup()
except BaseException as exc:
    os.write(_status_fd, json.dumps({"error": f"sandbox setup failed: {exc}"}).encode())
    os._exit(125)
os.write(_status_fd, json.dumps({"ready": True, "notes": _notes, "uid": os.getuid()}).encode())
os.close(_status_fd)

_code = _cfg.pop("code")
del _cfg, _setup, _netns
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


def _bwrap_args(bwrap: str, disk_bytes: int) -> list[str]:
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
    args += ["--new-session", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in ("/run", "/var/run"):  # hide host Unix sockets: a read-only bind can't stop connect()
        if os.path.isdir(path) and not os.path.islink(path):
            args += ["--tmpfs", path, "--remount-ro", path]
    args += ["--tmpfs", "/tmp", "--size", str(disk_bytes), "--perms", "0700", "--tmpfs", WORKDIR]
    return [*args, "--remount-ro", "/tmp", "--remount-ro", "/dev", "--chdir", WORKDIR, "--"]


def _spec(
    mode: str, code: str, limits: SandboxLimits, python: str, uid: int
) -> tuple[list[str], dict[str, Any], int, int, int]:
    """argv and spawn options for one run; also the memfd and status pipe the caller closes."""
    status_r, status_w = os.pipe()
    cfg_fd = os.memfd_create("presence-code-config")
    config = {"status_fd": status_w, "workdir": WORKDIR, "uid": uid, "mode": mode}
    config.update(limits=asdict(limits), code=code)
    os.write(cfg_fd, json.dumps(config).encode())  # a memfd write is never short
    os.lseek(cfg_fd, 0, os.SEEK_SET)
    argv = [python, "-I", "-S", "-X", "utf8", "-c", _BOOT, str(cfg_fd)]
    kwargs: dict[str, Any] = {
        "env": {},  # nothing inherited: no secrets, no PYTHON* knobs
        "cwd": "/",
        "start_new_session": True,
        "pass_fds": (status_w, cfg_fd),
    }
    if mode == "bwrap":
        argv = _bwrap_args(shutil.which("bwrap") or "bwrap", limits.disk_bytes) + argv
        if uid:  # ids switched in C between fork and exec: bwrap never runs as root
            kwargs.update(user=uid, group=uid, extra_groups=[])
    return argv, kwargs, cfg_fd, status_r, status_w


_probed: dict[str, str | None] = {}


def _probe(mode: str) -> str | None:
    """None when ``mode`` works here (a real run of a trivial job), else why not. Cached."""
    if mode in _probed:
        return _probed[mode]
    why: str | None = None
    if mode == "bwrap" and not shutil.which("bwrap"):
        why = "bwrap is not on PATH (install bubblewrap)"
    elif mode == "netns" and os.geteuid() != 0:
        why = "the netns sandbox needs a worker running as root"
    else:
        uid = _fresh_uid() if os.geteuid() == 0 else 0
        argv, kwargs, *fds = _spec(mode, "print('ok')", SandboxLimits(), default_python(), uid)
        try:
            proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=20, **kwargs)
            status = _read_status(fds[1])
            if proc.stdout != b"ok\n" or not status.get("ready"):
                lines = (status.get("error") or proc.stderr.decode(errors="replace")).strip().splitlines()
                why = f"probe run failed (exit code {proc.returncode}): {lines[-1] if lines else ''}"
        except (OSError, subprocess.SubprocessError) as exc:
            why = f"probe run failed: {exc}"
        finally:
            for fd in fds:
                os.close(fd)
            if uid:
                _kill_all(0, uid)
    _probed[mode] = why
    return why


def resolve_mode(mode: str = "auto") -> str:
    """The sandbox a run in ``mode`` gets: "bwrap" or "netns"; JobError when none can work."""
    if mode == "auto":
        reasons = {}
        for m in MODES:  # netns is probed only when bwrap fails
            reasons[m] = _probe(m)
            if reasons[m] is None:
                return m
        raise JobError(f"{REFUSED}; " + "; ".join(f"{m}: {why}" for m, why in reasons.items()))
    if mode not in MODES:
        raise JobError(f"code: unknown sandbox mode {mode!r} (auto, {', '.join(MODES)})")
    why = _probe(mode)
    if why:
        raise JobError(f"code jobs are refused: the {mode} sandbox asked for is not available: {why}")
    return mode


def sandbox_status(mode: str = "auto") -> str:
    """One line for the logs: which sandbox code jobs get here, or why they are refused."""
    try:
        chosen = resolve_mode(mode)
    except JobError as exc:
        return str(exc)
    who = "a fresh uid per run" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    return f"code jobs run in the {chosen} sandbox (as {who}, no network, read-only file system)"


def _fresh_uid() -> int:
    for _ in range(20):
        uid = random.randrange(2_000_000, 3_000_000)
        if not _pids_of_uid(uid):
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
    if pgid > 0:
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
    if result["timed_out"]:
        return f"timed out after {timeout_s:g} s; the process group was killed"
    if result.get("setup_error"):
        return str(result["setup_error"])
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
    """Run ``code`` sandboxed; returns stdout, stderr, exit_code, timed_out, truncated, sandbox,
    isolation, duration_s, error. Raises JobError when no sandbox is available (see module doc)."""
    limits = limits or SandboxLimits()
    if not isinstance(code, str):
        raise JobError("code: 'code' must be a string")
    if len(code.encode()) > MAX_CODE_BYTES:
        raise JobError(f"code: source larger than {MAX_CODE_BYTES} bytes")
    chosen = await asyncio.to_thread(resolve_mode, mode)
    uid = _fresh_uid() if os.geteuid() == 0 else 0
    argv, kwargs, cfg_fd, status_r, status_w = _spec(chosen, code, limits, python or default_python(), uid)
    started = time.monotonic()
    timed_out = False
    overflow = asyncio.Event()
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            **kwargs,
        )
        for fd in (status_w, cfg_fd):
            os.close(fd)
        status_w = cfg_fd = -1
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
        for fd in (status_r, status_w, cfg_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    truncated = out_total > limits.output_bytes or err_total > limits.output_bytes
    result: dict[str, Any] = {
        "stdout": _text(stdout, out_total, limits.output_bytes),
        "stderr": _text(stderr, err_total, limits.output_bytes),
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "truncated": truncated,
        "sandbox": chosen,
        "isolation": _isolation(chosen, status, uid),
        "duration_s": round(time.monotonic() - started, 3),
    }
    if "error" in status:
        result["setup_error"] = status["error"]
    elif not status.get("ready"):  # bwrap (or the interpreter) failed before BOOT reported
        tail = (result["stderr"].strip().splitlines() or ["no output"])[-1][:300]
        result["setup_error"] = f"sandbox setup failed (exit code {proc.returncode}): {tail}"
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


def _isolation(mode: str, status: dict[str, Any], uid: int) -> list[str]:
    applied = ["empty-env", "rlimits", "wall-timeout", "tmpfs-cwd", "no-network", "read-only-fs"]
    applied += ["hidden-run-tmp", "pid-namespace"] if mode == "bwrap" else ["hidden-run-tmp"]
    applied += ["unprivileged-uid"] if uid and status.get("uid") == uid else []
    return applied + list(status.get("notes", []))


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


__all__ = ["SandboxLimits", "default_python", "handle", "resolve_mode", "run_python", "sandbox_status"]
