"""Stateful backends hosted in a worker process, for libraries that hold the GIL.

pocketsphinx decodes without releasing the GIL: run in a thread, 1 s of audio stalled the
event loop (and with it every call's media) for ~0.9 s. Hosting the decoders in a child
process keeps the loop free. Each stream's object lives in the child, keyed by a stream id;
a proxy forwards method calls and waits on the result in the calling (executor) thread, so
callers keep using the plain synchronous protocol.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import pickle
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")


def _send(pipe: BinaryIO, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(_HEADER.pack(len(data)) + data)
    pipe.flush()


def _receive(pipe: BinaryIO) -> Any:
    header = pipe.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the worker process closed its pipe")
    (size,) = _HEADER.unpack(header)
    return pickle.loads(pipe.read(size))


class WorkerDied(RuntimeError):
    pass


# --- child side: ``python -m presence.bot.backends.isolated module:Class`` ---------------
def _serve(factory_path: str) -> None:
    module, _, name = factory_path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    objects: dict[int, Any] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a chatty library must not corrupt the protocol
    while True:
        try:
            stream, method, args = _receive(stdin)
        except EOFError:
            return
        try:
            if method == "__close__":
                objects.pop(stream, None)
                result: Any = None
            else:
                obj = objects.get(stream)
                if obj is None:
                    obj = objects[stream] = cls()
                result = getattr(obj, method)(*args)
            _send(stdout, ("ok", result))
        except Exception as exc:
            _send(stdout, ("error", f"{type(exc).__name__}: {exc}"))


# --- parent side -----------------------------------------------------------------------
class ProcessHost:
    """One child process serving many streams of one backend class (``module:Class``).

    A plain subprocess (not multiprocessing) so that user scripts need no ``__main__`` guard.
    Calls are serialised by a lock; each waits for its answer without holding the GIL.
    ``executor`` is where async callers should run them: one thread, since the calls take
    turns anyway, and a thread of the shared default executor waiting on the lock is one
    that every other call's work waits for.
    """

    def __init__(self, factory_path: str) -> None:
        self.factory_path = factory_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # A worker killed between two calls is replaced without any call failing, and the new
        # one knows nothing of a stream's state (a decoder mid-utterance): each stream's next
        # call must fail instead, so its caller knows what it lost.
        self._generation = 0  # worker processes started so far
        self._ran_on: dict[int, int] = {}  # stream -> the generation it last ran on
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="presence-host")
        self.open_streams = 0

    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "presence.bot.backends.isolated", self.factory_path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self._generation += 1
        return self._proc

    def call(self, stream: int, method: str, *args: Any) -> Any:
        with self._lock:
            proc = self._process()
            assert proc.stdin is not None and proc.stdout is not None
            if method == "__close__":
                self._ran_on.pop(stream, None)
            else:
                ran_on = self._ran_on.get(stream, self._generation)
                self._ran_on[stream] = self._generation
                if ran_on != self._generation:
                    raise WorkerDied(f"{self.factory_path} worker was replaced: this stream's state is gone")
            try:
                _send(proc.stdin, (stream, method, args))
                status, value = _receive(proc.stdout)
            except (EOFError, BrokenPipeError, OSError) as exc:
                log.error(
                    "%s worker process died (%s); the next call starts a new one", self.factory_path, exc
                )
                self._proc = None
                if method != "__close__":
                    self._ran_on[stream] = self._generation + 1  # told now, not again on the next worker
                raise WorkerDied(f"{self.factory_path} worker died: {exc}") from exc
        if status != "ok":
            raise RuntimeError(f"{self.factory_path}.{method} failed in its worker: {value}")
        return value

    def new_stream(self) -> int:
        return next(self._ids)

    def shutdown(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            self._proc = None


class RemoteStream:
    """A proxy with the backend's methods; every call runs in the host's child process."""

    def __init__(self, host: ProcessHost, methods: tuple[str, ...]) -> None:
        self._host = host
        self._stream = host.new_stream()
        self.executor = host.executor  # run_blocking(..., executor=) for async callers
        host.open_streams += 1
        self._open = True
        for method in methods:
            setattr(self, method, self._forward(method))

    def _forward(self, method: str) -> Any:
        def call(*args: Any) -> Any:
            return self._host.call(self._stream, method, *args)

        call.__name__ = method
        return call

    def close(self) -> None:
        if self._open:
            self._open = False
            self._host.open_streams -= 1
        self._host.call(self._stream, "__close__")


class HostPool:
    """Several worker processes of one backend; a new stream goes to the one with fewest open.

    One process serialises every stream's calls: with ten calls on two busy cores, each round
    trip waited for the scheduler and the queue of turns waiting for their final text grew to
    seconds. Each stream keeps its process for life (its decoder state lives there).
    """

    def __init__(self, factory_path: str, size: int, methods: tuple[str, ...]) -> None:
        self.hosts = [ProcessHost(factory_path) for _ in range(max(1, size))]
        self.methods = methods

    @property
    def factory_path(self) -> str:
        return self.hosts[0].factory_path

    def __call__(self) -> RemoteStream:
        return RemoteStream(min(self.hosts, key=lambda h: h.open_streams), self.methods)

    def shutdown(self) -> None:
        for host in self.hosts:
            host.shutdown()


if __name__ == "__main__":
    _serve(sys.argv[1])
