"""A phone for benchmarks and tests: calls a SIP address with Presence's own user agent.

``SipCaller`` has the ``Caller``'s interface (``connect``, ``say``, ``recorder``, ``hangup``),
so a benchmark runs the same trials over WebRTC and over SIP with one codec each (PCMU for a
plain phone line, G722 for a wideband one). Its user agent answers nothing: it only dials.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import numpy as np

from presence.caller import PlayerTrack, Recorder
from presence.config import Settings
from presence.media.audio import resample
from presence.seams import OUT_SAMPLE_RATE
from presence.signaling.contract import CallRejected, PeerLink
from presence.signaling.sip.call import SipCall
from presence.signaling.sip.ua import SipUserAgent


class _Handset:
    """The caller side's call host: holds the one call it placed, takes none."""

    def __init__(self) -> None:
        self.link: PeerLink | None = None

    @property
    def active_calls(self) -> int:
        return 1  # with max_calls=1: every INVITE to this phone is 503

    async def join(self, link: PeerLink, *, participant: str, room: str | None) -> tuple[str, str]:
        if self.link is not None:
            raise CallRejected(409, "busy", "this phone has a call")
        self.link = link
        return "phone", "handset"

    async def hangup(self, peer_id: str) -> bool:
        if self.link is None:
            return False
        link, self.link = self.link, None
        await link.close()
        return True


@dataclass
class SipCaller:
    target: str  # sip:presence@127.0.0.1:5060
    codec: str = "PCMU"  # PCMU | PCMA | G722 | opus
    host: str = "127.0.0.1"
    player: PlayerTrack = field(default_factory=PlayerTrack)
    recorder: Recorder = field(default_factory=Recorder)
    call: SipCall | None = None
    _ua: SipUserAgent | None = None
    _handset: _Handset = field(default_factory=_Handset)

    async def connect(self, timeout: float = 20.0) -> None:
        settings = Settings.from_env(
            {}, host=self.host, sip_port=0, sip_user="phone", sip_codecs=[self.codec], max_calls=1,
            sip_dial_timeout_s=timeout,
        )  # fmt: skip
        self._ua = SipUserAgent(settings, self._handset)
        await self._ua.start()
        self.call = await self._ua.dial(self.target)
        self.recorder.attach(self.call.audio)
        self.call.play(self.player)

    def say(self, audio: np.ndarray, rate: int) -> asyncio.Future[float]:
        """Start sending a clip now (after what is queued); resolves to its first-sample time."""
        return self.player.play(resample(audio, rate, OUT_SAMPLE_RATE))

    async def hangup(self) -> None:
        await self.recorder.stop()
        if self.call is not None:
            await self.call.close()  # BYE
            await asyncio.sleep(0.05)  # its first transmission is out; the agent closes next
        if self._ua is not None:
            with contextlib.suppress(Exception):
                await self._ua.close()
        self.player.stop()
