"""Helpers for tests that drive the Debian Chromium as a real caller (not a test module).

Chromium comes from the distribution (``/usr/lib/chromium/chromium``) and is driven through
pip ``playwright``; never run ``playwright install`` (downloads fail here). The launch code
(binary, flags, profile) is ``presence.browser``. Without the browser a test skips, except
under ``CI=true`` where a missing browser is a failure.
"""

from __future__ import annotations

import math
import os
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from presence import browser as _browser
from presence.browser import BASE_ARGS, CHROMIUM, Chromium, chromium_args

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
    if problem is not None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
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


def make_y4m(path: Path, seconds: float, w: int = 320, h: int = 240, fps: int = 15) -> Path:
    """Write a moving test pattern as YUV4MPEG2 (4:2:0), the format Chromium's fake camera reads."""
    if w % 2 or h % 2:
        raise ValueError("width and height must be even for 4:2:0")
    path = Path(path)
    frames = max(1, round(seconds * fps))
    yy, xx = np.mgrid[0:h, 0:w]
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode("ascii"))
        for i in range(frames):
            # diagonal stripes sliding right, plus a bright square bouncing across
            luma = 60 + 100 * (((xx + yy // 2 + 4 * i) // 16) % 2)
            side = min(w, h) // 4
            x0 = int((w - side) * (0.5 + 0.5 * math.sin(i / fps * 2.0)))
            y0 = int((h - side) * (0.5 + 0.5 * math.cos(i / fps * 1.3)))
            luma[y0 : y0 + side, x0 : x0 + side] = 235
            u = np.full((h // 2, w // 2), 128 + 50 * math.sin(i / fps), dtype=np.float64)
            v = np.full((h // 2, w // 2), 128 + 50 * math.cos(i / fps), dtype=np.float64)
            f.write(b"FRAME\n")
            for plane in (luma, u, v):
                f.write(np.clip(plane, 0, 255).astype(np.uint8).tobytes())
    return path


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
