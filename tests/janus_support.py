"""The pytest side of the Janus lab (presence/bench/janus_lab.py: a real Janus 1.1.2 VideoRoom in
a network namespace of its own, and aiortc "humans" that meet in it): ``need`` when this machine
cannot run it, and the fixtures. Not a test module: test modules import ``janus_fixture`` (the
fixture ``janus``), ``humans_fixture`` (``humans``), ``JanusServer`` and ``JanusHuman``.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from sip_support import need_binary

from presence.bench.janus_lab import (  # noqa: F401 - re-exported for the test modules
    OPEN_ROOM,
    PIN,
    PIN_ROOM,
    RATE,
    JanusHuman,
    JanusServer,
    Recording,
    Subscription,
    VoiceTrack,
    check_host,
    read_wav,
    remove_stale_namespaces,
)


def need_janus() -> None:
    try:
        check_host()
    except RuntimeError as exc:
        need(False, str(exc))


def start_janus(workdir: Path, **kwargs: Any) -> JanusServer:
    """A started server; ``need`` fails (CI) or skips when this machine cannot run one."""
    need_janus()
    remove_stale_namespaces()
    server = JanusServer(workdir, **kwargs)
    try:
        server.setup_network()
    except RuntimeError as exc:
        server.close()
        need(False, f"cannot create a network namespace for Janus: {exc}")
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="module", name="janus")
def janus_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JanusServer]:
    """One Janus for a test module (tests that stop or kill Janus start their own)."""
    server = start_janus(tmp_path_factory.mktemp("janus"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(name="humans")
async def humans_fixture(janus: JanusServer) -> AsyncIterator[Callable[..., Awaitable[JanusHuman]]]:
    """``await humans("alice", room=..., pin=..., video=...)``: a JanusHuman in the module's
    Janus; all of them leave at the end of the test."""
    joined: list[JanusHuman] = []

    async def join(display: str, room: int = OPEN_ROOM, **kwargs: Any) -> JanusHuman:
        human = await JanusHuman.join(janus, display, room, **kwargs)
        joined.append(human)
        return human

    yield join
    for human in joined:
        await human.leave()


def speech_wav(text: str, path: Path) -> Path:
    """Spoken text as espeak-ng writes it (22.05 kHz mono s16); ``say`` resamples it."""
    done = subprocess.run([need_binary("espeak-ng"), "-w", str(path), text], capture_output=True, timeout=30)
    assert done.returncode == 0, f"espeak-ng failed: {done.stderr.decode(errors='replace')}"
    return path
