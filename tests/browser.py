"""Helpers for tests that drive the Debian Chromium as a real caller (not a test module).

Chromium comes from the distribution (``/usr/lib/chromium/chromium``) and is driven through
pip ``playwright``; never run ``playwright install`` (downloads fail here). The launch code
(binary, flags, profile) is ``presence.browser``. Without the browser a test skips, except
under ``CI=true`` where a missing browser is a failure.
"""

from __future__ import annotations

import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from conftest import need

from presence import browser as _browser
from presence.browser import BASE_ARGS, CHROMIUM, Chromium, chromium_args, make_y4m

__all__ = [
    "BASE_ARGS",
    "CHROMIUM",
    "Chromium",
    "chromium",
    "chromium_args",
    "launch_chromium",
    "make_wav",
    "make_y4m",
    "require_chromium",
]


def require_chromium() -> Path:
    """The Chromium binary; skips the calling test when absent, fails instead under CI=true."""
    problem = _browser.chromium_problem()
    need(problem is None, problem or "")
    return CHROMIUM


async def launch_chromium(tmp_path: Path, *, wav: Path | None = None, y4m: Path | None = None) -> Chromium:
    """``presence.browser.launch_chromium`` with the profile under ``tmp_path``; skips (or
    fails under CI=true) when Chromium is missing."""
    require_chromium()
    return await _browser.launch_chromium(tmp_path, wav=wav, y4m=y4m)


@pytest.fixture
async def chromium(tmp_path: Path) -> AsyncIterator[Chromium]:
    """A Chromium with the default fake devices (import this fixture into a test module)."""
    browser = await launch_chromium(tmp_path)
    try:
        yield browser
    finally:
        await browser.close()


def make_wav(
    path: Path, seconds: float, *, freq: float = 330.0, rate: int = 48_000, level: float = 0.2
) -> Path:
    """Write a mono 16-bit tone (``freq=0`` for silence) for the fake microphone."""
    path = Path(path)
    t = np.arange(round(seconds * rate)) / rate
    pcm = (level * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path
