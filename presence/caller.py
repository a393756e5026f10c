"""An aiortc caller: sends audio in real time, records what it hears on the monotonic clock.

Used by ``presence call``, the tests and the benchmarks. It speaks either WHIP (a URL whose path
contains ``/whip``) or the JSON offer endpoint of a Presence server (any other URL), and it
opens the ``events`` data channel so it sees the bot's events on the same clock (one machine:
CLOCK_MONOTONIC is shared by every process).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.clock import now
from presence.media.audio import FrameResampler, resample
from presence.media.paced import FRAME_OUT, PacedAudioTrack
from presence.seams import OUT_SAMPLE_RATE
from presence.signaling.rtc import new_peer_connection, set_audio_prefetch

log = logging.getLogger(__name__)

FRAME = FRAME_OUT


class CallError(RuntimeError):
    pass


class PlayerTrack(PacedAudioTrack):
    """Plays queued clips in real time (silence in between); remembers when each clip started."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[tuple[np.ndarray, asyncio.Future[float]]] = deque()
        self._current: np.ndarray | None = None
        self._current_future: asyncio.Future[float] | None = None
        self._offset = 0

    def play(self, audio48: np.ndarray) -> asyncio.Future[float]:
        """Queue a clip; the future resolves to the bot-clock time its first sample is sent."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queue.append((audio48.astype(np.float32, copy=False), future))
        return future

    def stop_playing(self) -> None:
        self._queue.clear()
        self._current = None

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self._queue)

    def next_samples(self) -> np.ndarray:
        out = np.zeros(FRAME, dtype=np.float32)
        filled = 0
        while filled < FRAME:
            if self._current is None:
                if not self._queue:
                    break
                self._current, future = self._queue.popleft()
                self._offset = 0
                if not future.done():
                    future.set_result(self.frame_time + filled / OUT_SAMPLE_RATE)
            part = self._current[self._offset : self._offset + FRAME - filled]
            out[filled : filled + part.size] = part
            filled += part.size
            self._offset += part.size
            if self._offset >= self._current.size:
                self._current = None
        return out


class Recorder:
    """Writes received audio where it arrived on the clock: gaps stay gaps, no drift."""

    def __init__(self, rate: int = 16_000, keep_audio: bool = True) -> None:
        self.rate = rate
        self.keep_audio = keep_audio  # off for long calls that only need the voiced times
        self.t0 = now()
        self._chunks: list[tuple[int, np.ndarray]] = []
        self._cursor = 0
        self._resample = FrameResampler(rate)
        self.frames = 0
        self.last_voiced_at: float | None = None  # arrival time of the last frame with sound
        self.first_voiced_at: float | None = None
        self.voiced: list[float] = []  # arrival time of every frame with sound, in order
        self._task: asyncio.Task[None] | None = None

    def attach(self, track: MediaStreamTrack) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                t = now()
                self.frames += 1
                if self.keep_audio:
                    audio = self._resample(frame)
                    start = int((t - self.t0) * self.rate) - audio.size
                    if start > self._cursor + int(0.06 * self.rate):
                        self._cursor = start  # a real gap in arrival
                    self._chunks.append((self._cursor, audio))
                    self._cursor += audio.size
                    level = float(np.abs(audio).max(initial=0.0))
                else:  # only the voiced times: no resampling
                    level = float(np.abs(frame.to_ndarray().astype(np.float32)).max(initial=0.0)) / 32768
                if level > 0.01:
                    self.voiced.append(t)
                    self.last_voiced_at = t
                    if self.first_voiced_at is None:
                        self.first_voiced_at = t

    def first_voiced_after(self, t: float) -> float | None:
        i = bisect.bisect_right(self.voiced, t)
        return self.voiced[i] if i < len(self.voiced) else None

    def stopped_after(self, t: float, gap: float = 0.25) -> float | None:
        """Arrival of the last sound after ``t`` before the first silence of ``gap`` s."""
        i = bisect.bisect_right(self.voiced, t)
        if i >= len(self.voiced):
            return None
        for a, b in itertools.pairwise(self.voiced[i:]):
            if b - a > gap:
                return a
        return self.voiced[-1]

    def audio(self, until: float | None = None) -> np.ndarray:
        length = self._cursor if until is None else max(self._cursor, int((until - self.t0) * self.rate))
        out = np.zeros(length, dtype=np.float32)
        for pos, chunk in self._chunks:
            out[pos : pos + chunk.size] = chunk[: max(0, length - pos)]
        return out

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class EventInbox:
    """The bot's events as a caller receives them on the ``events`` data channel, stamped
    with their arrival (``received``), and waits for a named one. Shared by the aiortc caller
    and the FDB bench's Chromium page."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []
        self._waiters: list[tuple[str, asyncio.Future[dict[str, object]]]] = []

    def receive(self, message: object) -> None:
        """One data-channel message; anything but a JSON object is ignored."""
        if not isinstance(message, str):
            return
        try:
            event = json.loads(message)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        event["received"] = now()
        self.events.append(event)
        for name, fut in list(self._waiters):
            if event.get("name") == name and not fut.done():
                fut.set_result(event)

    async def wait(self, name: str, after: float = float("-inf"), timeout: float = 15.0) -> dict[str, object]:
        """The first event ``name`` with ``t >= after``, already here or within ``timeout`` s."""
        for event in self.events:
            if event.get("name") == name and float(event.get("t", 0.0)) >= after:  # type: ignore[arg-type]
                return event
        deadline = now() + timeout
        while True:
            fut: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
            self._waiters.append((name, fut))
            try:
                event = await asyncio.wait_for(fut, max(0.0, deadline - now()))
            except TimeoutError:
                # what did happen is what a failing test or bench needs to say
                raise TimeoutError(
                    f"no {name} within {timeout:.0f} s; since then: {self.since(after)}"
                ) from None
            finally:
                self._waiters = [(n, f) for n, f in self._waiters if f is not fut]
            if float(event.get("t", 0.0)) >= after:  # type: ignore[arg-type]
                return event

    def since(self, after: float, limit: int = 60) -> str:
        """The events at or after ``after``, short: seconds since it, name, and any text."""
        seen = []
        for event in self.events:
            t = float(event.get("t", 0.0))  # type: ignore[arg-type]
            if t >= after:
                text = event.get("text") or event.get("state") or event.get("kind") or ""
                seen.append(
                    f"{t - after if after > float('-inf') else t:.2f} {event.get('name')}"
                    + (f" {text!r}" if text else "")
                )
        return ", ".join(seen[-limit:]) or "nothing"


@dataclass
class Caller:
    """One caller's peer connection. ``events`` holds the bot's events as they arrive."""

    url: str
    token: str = ""
    room: str | None = None
    name: str = "caller"
    language: str | None = None  # an interpreter room: the language this caller speaks and hears
    original: bool = True  # with an interpreter: also hear the speaker's own voice, ducked
    rx_prefetch_packets: int = 2  # ~40 ms, what Chromium's jitter buffer showed on loopback
    video: MediaStreamTrack | None = None
    inbox: EventInbox = field(default_factory=EventInbox)
    pc: RTCPeerConnection | None = None
    resource: str | None = None
    resource_token: str | None = None  # from the answer: what a Presence server wants to hang up
    call_id: str | None = None
    player: PlayerTrack = field(default_factory=PlayerTrack)
    recorder: Recorder = field(default_factory=Recorder)
    _session: aiohttp.ClientSession | None = None

    async def connect(self, timeout: float = 20.0) -> None:
        pc = self.pc = new_peer_connection([], ["127.0.0.1"] if _is_loopback(self.url) else [])
        pc.addTrack(self.player)
        if self.video is not None:
            pc.addTrack(self.video)
        channel = pc.createDataChannel("events")

        channel.on("message", self.inbox.receive)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.recorder.attach(track)

        await pc.setLocalDescription(await pc.createOffer())
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        answer_sdp = await self._exchange(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "audio":
                set_audio_prefetch(transceiver.receiver, self.rx_prefetch_packets)
        deadline = now() + timeout
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed") or now() > deadline:
                raise CallError(f"could not connect (state {pc.connectionState})")
            await asyncio.sleep(0.02)

    async def _exchange(self, offer: str) -> str:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if "/whip" in urlsplit(self.url).path:
            headers["Content-Type"] = "application/sdp"
            async with self._session.post(self.url, data=offer, headers=headers) as resp:
                body = await resp.text()
                if resp.status != 201:
                    raise CallError(f"WHIP offer refused: HTTP {resp.status}: {body}")
                location = resp.headers.get("Location", "")
                self.resource = str(resp.url.join(aiohttp.client.URL(location))) if location else None
                self.resource_token = resp.headers.get("X-Presence-Resource-Token")
                self.call_id = resp.headers.get("X-Presence-Call")
                return body
        payload: dict[str, object] = {"sdp": offer, "type": "offer", "name": self.name}
        if self.token:
            payload["token"] = self.token
        if self.room:
            payload["room"] = self.room
        if self.language:
            payload["language"] = self.language
        if not self.original:
            payload["original"] = False
        async with self._session.post(self.url.rstrip("/") + "/api/offer", json=payload) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise CallError(f"offer refused: HTTP {resp.status}: {data}")
        base = self.url.rstrip("/")
        self.resource = base + str(data["resource"]).replace("/whip/resource/", "/api/calls/")
        token = data.get("resource_token")
        self.resource_token = str(token) if token else None
        self.call_id = str(data["call_id"])
        return str(data["sdp"])

    def say(self, audio: np.ndarray, rate: int) -> asyncio.Future[float]:
        """Start sending a clip now (after what is queued); resolves to its first-sample time."""
        return self.player.play(resample(audio, rate, OUT_SAMPLE_RATE))

    @property
    def events(self) -> list[dict[str, object]]:
        """The bot's events so far, in arrival order."""
        return self.inbox.events

    async def wait_event(
        self, name: str, after: float = float("-inf"), timeout: float = 15.0
    ) -> dict[str, object]:
        return await self.inbox.wait(name, after, timeout)

    async def hangup(self) -> None:
        if self._session is not None and self.resource:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                # other WHIP servers (no resource token) expect the offer's own bearer token
                token = self.resource_token or self.token
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with self._session.delete(self.resource, headers=headers):
                    pass
        await self.close()

    async def close(self) -> None:
        await self.recorder.stop()
        if self.pc is not None:
            await self.pc.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
