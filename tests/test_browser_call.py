"""Headless Debian Chromium joins the real bot through the call page (fake mic and camera)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from browser import launch_chromium, make_y4m, require_chromium
from conftest import BotServer

from presence.events import Ev
from presence.media.audio import write_wav
from presence.seams import OUT_SAMPLE_RATE

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CONNECTED = "window.presence.pc && window.presence.pc.connectionState === 'connected'"


async def test_browser_call_audio_both_ways_captions_and_video(tmp_path: Path, bot_factory, speech) -> None:  # type: ignore[no-untyped-def]
    require_chromium()
    # Chromium loops the fake microphone file: silence while the greeting plays (the file starts
    # before the call connects; a question over the greeting would cut it), a question, then
    # enough silence to answer it.
    question = speech("What is your name?")
    mic = np.concatenate(
        [np.zeros(OUT_SAMPLE_RATE * 3, np.float32), question, np.zeros(OUT_SAMPLE_RATE * 8, np.float32)]
    )
    wav = tmp_path / "mic.wav"
    write_wav(str(wav), mic, OUT_SAMPLE_RATE)
    y4m = make_y4m(tmp_path / "camera.y4m", 2.0)
    server: BotServer = await bot_factory(greeting="Hello.", video_fps=2.0)
    chromium = await launch_chromium(tmp_path, wav=wav, y4m=y4m)
    try:
        page = await chromium.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(server.url + "/")
        await page.wait_for_function("window.presence && window.presence.config !== null")
        await page.select_option("#mode", "video")
        await page.fill("#name", "chromium")
        await page.click("#join")
        await page.wait_for_function(CONNECTED, timeout=20_000)
        assert len(server.manager.sessions) == 1
        session = next(iter(server.manager.sessions.values()))

        # Caller -> bot: the bot's VAD hears the fake microphone, and video frames arrive.
        await session.events.wait_for(Ev.CALLER_SPEECH_START, timeout=20)
        frame = await session.events.wait_for(Ev.VIDEO_FRAME, timeout=20)
        assert frame.data["participant"] == "chromium"
        assert 0 < int(frame.data["width"]) <= server.settings.video_max_width  # type: ignore[call-overload]
        # Bot -> caller: the page's analyser hears the bot, and both sides get captions.
        await page.wait_for_function("window.presence.remoteLevel() > 0.01", timeout=20_000)
        await page.wait_for_function(
            "window.presence.captions.some(c => c.who === 'caller')"
            " && window.presence.captions.some(c => c.who === 'bot')",
            timeout=30_000,
        )
        await page.wait_for_function("Object.keys(window.presence.latencies).length > 0", timeout=30_000)
        shown = await page.evaluate("window.presence.captions")
        assert any("hello" in c["text"].lower() for c in shown if c["who"] == "bot")
        await page.screenshot(path=str(tmp_path / "call.png"), full_page=True)
        await page.click("#hangup")
        for _ in range(100):
            if not server.manager.sessions:
                break
            await asyncio.sleep(0.05)
        assert not server.manager.sessions
        assert errors == []
    finally:
        await chromium.close()
