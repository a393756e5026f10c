"""The call page in headless Chromium against the signaling server and the harness host."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aioice.ice
import pytest
from aiohttp import web
from browser import Chromium, launch_chromium, make_wav, make_y4m, require_chromium
from test_signaling import HarnessCallHost

from presence.config import Settings
from presence.signaling.app import run_server

pytestmark = pytest.mark.browser

SCREENSHOT = Path("/tmp/presence-page.png")
CONNECTED = "window.presence.pc && window.presence.pc.connectionState === 'connected'"


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    # the harness's aiortc side must offer 127.0.0.1 (aioice skips it on its own)
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@contextlib.asynccontextmanager
async def serving(host: HarnessCallHost, **overrides: object) -> AsyncIterator[Settings]:
    settings = Settings(port=0, **overrides)  # type: ignore[arg-type]
    runner: web.AppRunner = await run_server(settings, host)
    try:
        yield settings
    finally:
        await runner.cleanup()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    require_chromium()
    wav = make_wav(tmp_path / "caller.wav", 2.0)
    y4m = make_y4m(tmp_path / "camera.y4m", 2.0)
    chromium = await launch_chromium(tmp_path, wav=wav, y4m=y4m)
    try:
        yield chromium
    finally:
        await chromium.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        # polling: the harness's state has no event to wait on
        while not predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


async def test_page_joins_in_phone_mode(browser: Chromium) -> None:
    host = HarnessCallHost(tone=True, greet=True)
    async with serving(host) as settings:
        page = await browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None,
        )

        async with page.expect_response(lambda r: r.url.endswith("/api/config")) as config:
            await page.goto(settings.base_url + "/?room=blue")
        assert (await config.value).status == 200
        await page.wait_for_function("window.presence && window.presence.config !== null")
        assert await page.title() == "Presence call"
        assert await page.input_value("#room") == "blue"
        assert await page.text_content("#badge") == "idle"

        await page.select_option("#mode", "audio")
        await page.fill("#name", "Browser")
        await page.click("#join")
        await page.wait_for_function(CONNECTED, timeout=20_000)
        assert host.joins == [("Browser", "blue")]
        assert await page.is_disabled("#join")

        # the harness's data channel events reach the badge, captions and latency table
        await page.wait_for_function("window.presence.state === 'speaking'", timeout=10_000)
        assert await page.text_content("#badge") == "speaking"
        captions = await page.evaluate("window.presence.captions")
        assert captions == [
            {"who": "caller", "text": "hello there", "final": True},
            {"who": "bot", "text": "Hi, I'm the test harness.", "final": True},
        ]
        assert await page.evaluate("window.presence.latencies") == {
            "voice_to_voice": 412,
            "barge_in_stop": 95,
        }
        assert await page.locator("#latency-body tr").count() == 2
        assert await page.evaluate("window.presence.events.length") >= 8

        # the harness's tone is heard by the page's analyser
        await page.wait_for_function("window.presence.remoteLevel() > 0.01", timeout=10_000)

        await page.screenshot(path=str(SCREENSHOT), full_page=True)

        await page.click("#hangup")
        await wait_until(lambda: not host.peers)
        assert await page.evaluate("window.presence.state") == "ended"
        assert await page.evaluate("window.presence.pc") is None
        assert await page.is_enabled("#join")
        assert problems == []


async def test_page_joins_in_video_mode(browser: Chromium) -> None:
    host = HarnessCallHost()
    async with serving(host, video_fps=1.5, video_max_width=160) as settings:
        page = await browser.new_page()
        await page.goto(settings.base_url + "/")
        await page.wait_for_function("window.presence && window.presence.config !== null")
        await page.select_option("#mode", "video")
        await page.click("#join")
        await page.wait_for_function(CONNECTED, timeout=20_000)
        kinds = await page.evaluate(
            "window.presence.pc.getTransceivers().map(t => [t.receiver.track.kind, t.currentDirection])"
        )
        # the harness sends nothing back here, so audio settles as sendonly too
        assert kinds == [["audio", "sendonly"], ["video", "sendonly"]]
        assert await page.is_visible("#local-video")
        # The camera goes out no larger or faster than the bot samples it (320 px -> 160 px).
        encoding = await page.evaluate(
            "window.presence.pc.getSenders().find(s => s.track && s.track.kind === 'video')"
            ".getParameters().encodings[0]"
        )
        assert encoding["scaleResolutionDownBy"] == 2
        assert encoding["maxFramerate"] == 3
        await page.click("#hangup")
        await wait_until(lambda: not host.peers)


async def test_page_shows_join_errors(browser: Chromium) -> None:
    host = HarnessCallHost()
    async with serving(host, token_secret="page-test-secret") as settings:
        page = await browser.new_page()
        await page.goto(settings.base_url + "/")
        await page.wait_for_function("window.presence && window.presence.config !== null")
        assert await page.is_visible("#notice")  # token required, none in the URL
        await page.select_option("#mode", "audio")
        await page.click("#join")
        await page.wait_for_selector("#error:not([hidden])", timeout=15_000)
        assert await page.text_content("#error-code") == "missing_token"
        assert await page.evaluate("window.presence.state") == "error"
        assert await page.evaluate("window.presence.error.code") == "missing_token"
        assert await page.is_enabled("#join")
        assert host.peers == {}
