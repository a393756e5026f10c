"""Helpers for tests that drive the Debian Chromium as a real caller (not a test module).

Chromium comes from the distribution (``/usr/lib/chromium/chromium``) and is driven through
pip ``playwright``; never run ``playwright install`` (downloads fail here). Without the
browser a test skips, except under ``CI=true`` where a missing browser is a failure.
"""

from __future__ import annotations

import importlib.util
import math
import os
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page, Playwright

CHROMIUM = Path(os.environ.get("PRESENCE_CHROMIUM", "/usr/lib/chromium/chromium"))

# Flags measured to work here (see shared/notes/webrtc-testing.md): fake devices without a
# permission prompt, autoplay without a gesture, and ICE over loopback with real IPs.
BASE_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]


def require_chromium() -> Path:
    """The Chromium binary; skips the calling test when absent, fails instead under CI=true."""
    problem = None
    if not CHROMIUM.is_file():
        problem = f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    elif importlib.util.find_spec("playwright") is None:
        problem = "the playwright pip package is not installed"
    if problem is not None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return CHROMIUM


def chromium_args(*, wav: Path | None = None, y4m: Path | None = None) -> list[str]:
    args = list(BASE_ARGS)
    if wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={wav}")
    if y4m is not None:
        args.append(f"--use-file-for-fake-video-capture={y4m}")
    return args


@dataclass
class Chromium:
    """A running headless Chromium with one persistent context (close it when done)."""

    playwright: Playwright
    context: BrowserContext

    async def new_page(self) -> Page:
        return await self.context.new_page()

    async def close(self) -> None:
        try:
            await self.context.close()
        finally:
            await self.playwright.stop()


async def launch_chromium(tmp_path: Path, *, wav: Path | None = None, y4m: Path | None = None) -> Chromium:
    """Start headless Debian Chromium with a fresh profile under ``tmp_path``.

    ``wav`` / ``y4m`` become the fake microphone and camera (looped by Chromium); without
    them Chromium's built-in beeps and test pattern are used.
    """
    require_chromium()
    from playwright.async_api import async_playwright

    profile = Path(tmp_path) / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    pw = await async_playwright().start()
    try:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=chromium_args(wav=wav, y4m=y4m),
            permissions=["microphone", "camera"],
            viewport={"width": 1280, "height": 800},
        )
    except BaseException:
        await pw.stop()
        raise
    return Chromium(playwright=pw, context=context)


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
