"""Shared fixtures: real backends (offline models), a real server with the real bot, speech."""

from __future__ import annotations

import asyncio
import difflib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aioice.ice
import numpy as np
import pytest

from presence.bot.backends.factory import Backends, build_backends, warm_up
from presence.bot.calls import CallManager
from presence.bot.session import CallSession
from presence.config import Settings
from presence.seams import OUT_SAMPLE_RATE

if TYPE_CHECKING:
    from presence.signaling.sip.ua import SipUserAgent

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def need(ok: bool, why: str) -> None:
    """Skip on a developer machine that lacks something; under CI=true, fail loudly instead."""
    if not ok:
        if CI:
            pytest.fail(f"required under CI: {why}")
        pytest.skip(why)


@pytest.fixture(autouse=True)
def _restore_aioice() -> object:
    # Servers and callers restrict ICE host candidates process-wide; put it back after a test.
    original = aioice.ice.get_host_addresses
    yield
    aioice.ice.get_host_addresses = original


def test_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "port": 0,
        "greeting": "",
        "peer_timeout_s": 5.0,
        "jobs": "off",
        "notes_dir": "",
    }
    base.update(overrides)
    return Settings.from_env({}, **base)


@pytest.fixture(scope="session")
def backends() -> Backends:
    # Warm up once, as `presence serve` does: first loads in a call would stall its clock.
    built = build_backends(test_settings())
    asyncio.run(warm_up(built))
    return built


@pytest.fixture(scope="session")
def speech(backends: Backends) -> Callable[[str], np.ndarray]:
    """Piper speech at 48 kHz for a text (cached): the caller's voice in call tests."""
    from presence.media.audio import resample

    cache: dict[str, np.ndarray] = {}

    def make(text: str) -> np.ndarray:
        if text not in cache:
            tts = backends.tts
            audio = np.concatenate(list(tts.synthesize(text)))
            cache[text] = resample(audio, tts.sample_rate, OUT_SAMPLE_RATE)
        return cache[text]

    return make


@dataclass
class BotServer:
    settings: Settings
    manager: CallManager
    url: str
    sip: SipUserAgent | None = None  # with sip_port >= 0


@pytest.fixture
async def bot_factory(backends: Backends) -> AsyncIterator[Callable[..., object]]:
    """Start real servers (signaling + bot) with given settings; all are cleaned up after."""
    from presence.signaling.app import SIP_KEY, run_server

    runners = []

    async def start(**overrides: object) -> BotServer:
        settings = test_settings(**overrides)
        jobs = None
        if settings.jobs != "off":
            from presence.bot.jobs.bridge import JobBridge

            # A prefix of its own: no other test's streams or workers interfere.
            jobs = await JobBridge.start(settings, prefix=f"presence-test-{uuid.uuid4().hex[:8]}")
            need(jobs is not None, "background jobs need Redis (127.0.0.1:6379 or redis-server)")
        manager = CallManager(settings, backends, jobs=jobs)
        runner = await run_server(settings, manager)
        runners.append(runner)
        return BotServer(settings, manager, settings.base_url, runner.app.get(SIP_KEY))  # type: ignore[arg-type]

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def bot(bot_factory: Callable[..., object]) -> BotServer:
    return await bot_factory()  # type: ignore[misc, no-any-return]


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio)))) if audio.size else 0.0


SR_OUT = OUT_SAMPLE_RATE


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def heard_as(transcript: str, said: str, at_least: float = 0.75) -> bool:
    """The offline ASR of a recording matches what the bot said (whisper tiny.en mishears a
    word now and then, e.g. "Presence" as "presets", so this compares whole strings)."""
    return difflib.SequenceMatcher(None, _words(transcript), _words(said)).ratio() >= at_least


def bot_heard(session: CallSession) -> list[tuple[str, object]]:
    """What the bot made of the callers (captions and turns it set aside), for failure messages."""
    return [(e.name, e.data) for e in session.events.history if e.name in ("caption", "not_addressed")]


def check_joined_once(join: Callable[[], object], model: Path, joined_s: float) -> None:
    """A model joined from package parts (``join`` writes ``model``): a second call compares
    sizes and copies nothing; a copy cut short (a killed joiner, a full disk) is made again."""
    size, mtime = model.stat().st_size, model.stat().st_mtime_ns
    assert not list(model.parent.glob(".*.tmp"))
    started = time.perf_counter()
    join()
    assert time.perf_counter() - started < min(0.05, joined_s)  # sizes compared, nothing copied
    assert model.stat().st_mtime_ns == mtime
    with model.open("r+b") as handle:
        handle.truncate(size // 2)
    join()
    assert model.stat().st_size == size
