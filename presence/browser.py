"""Headless Debian Chromium as a real WebRTC caller, driven through pip ``playwright``.

Chromium comes from the distribution (``apt-get install chromium``; the binary is
``/usr/lib/chromium/chromium``, ``PRESENCE_CHROMIUM`` overrides it); never run
``playwright install``: it downloads its own browsers, which fails without internet. Used by
the FDB bench's ``chromium`` transport and by the browser tests.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page, Playwright

CHROMIUM = Path(os.environ.get("PRESENCE_CHROMIUM", "/usr/lib/chromium/chromium"))

# Flags measured to work here (docs in shared notes): fake devices without a permission
# prompt, autoplay without a gesture, and ICE over loopback with real IPs (without
# --allow-loopback-in-peer-connection Chrome never connects on 127.0.0.1).
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


class ChromiumUnavailable(RuntimeError):
    """Chromium or the playwright package is missing."""


def chromium_problem() -> str | None:
    """Why Chromium cannot be driven here (with what to install), or None when it can."""
    if not CHROMIUM.is_file():
        return (
            f"chromium not found at {CHROMIUM}: apt-get install chromium "
            "(or point PRESENCE_CHROMIUM at a Chromium binary)"
        )
    if importlib.util.find_spec("playwright") is None:
        return (
            "the playwright pip package is not installed: pip install playwright (not `playwright install`)"
        )
    return None


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
    profile: Path | None = None  # a temporary profile this object owns and removes on close

    async def new_page(self) -> Page:
        return await self.context.new_page()

    async def close(self) -> None:
        try:
            await self.context.close()
        finally:
            await self.playwright.stop()
            if self.profile is not None:
                await _remove(self.profile)


async def _remove(profile: Path) -> None:
    # Chromium's helpers may still write into the profile for a moment after it exits.
    for _ in range(3):
        await asyncio.to_thread(shutil.rmtree, profile, True)
        if not profile.exists():
            return
        await asyncio.sleep(0.2)


async def launch_chromium(
    profile_dir: Path | None = None, *, wav: Path | None = None, y4m: Path | None = None
) -> Chromium:
    """Start headless Chromium with a fresh profile under ``profile_dir`` (a temporary
    directory, removed on close, when None).

    ``wav`` / ``y4m`` become the fake microphone and camera (looped by Chromium); without
    them Chromium's built-in beeps and test pattern are used. Raises
    :class:`ChromiumUnavailable` when the browser or playwright is missing.
    """
    problem = chromium_problem()
    if problem is not None:
        raise ChromiumUnavailable(problem)
    from playwright.async_api import async_playwright

    owned: Path | None = None
    if profile_dir is None:
        owned = profile = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="presence-chromium-"))
    else:
        profile = Path(profile_dir) / "chromium-profile"
        await asyncio.to_thread(profile.mkdir, parents=True, exist_ok=True)
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
        if owned is not None:
            await _remove(owned)
        raise
    return Chromium(playwright=pw, context=context, profile=owned)


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
