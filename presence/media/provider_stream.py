"""The audio of a provider's media websocket (Twilio Media Streams, Telnyx media streaming):
base64 8 kHz mu-law inside JSON messages, both ways, coded with aiortc's G.711 codecs.

Inbound, ``MulawInbound.push`` decodes one ``media`` payload onto an ``RtpAudioTrack`` (the
track SIP calls use), each frame placed by the provider's ``timestamp`` (milliseconds since the
stream began) or, without one, by its ``chunk`` number: ``AudioReader`` reads it like an RTP
track and sees a missing chunk as a jump of ``pts``. A chunk that comes after a later one
(Telnyx does not promise order) is dropped: holding chunks back to reorder them would delay
every turn for a rare event.

Outbound, ``mulaw_payloads`` pulls the bot's self-paced 48 kHz track and yields 20 ms payloads
(160 bytes, base64), so the provider's playback buffer stays a network trip deep.
``Playback`` counts what was sent and what the provider's returned marks say has been played.
"""

from __future__ import annotations

import base64
import binascii
import fractions
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiortc.codecs.g711 import PcmuDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamTrack

from presence.aio import log_this_drop
from presence.media.rtp import MAX_TS_JUMP_S, RtpAudioTrack, encoded
from presence.signaling.sip.sdp import PCMU

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000  # what both providers stream: mu-law, 8 kHz, mono
CHUNK_SAMPLES = 160  # 20 ms: what we send per media message (mu-law: one byte a sample)
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
MAX_PENDING_MARKS = 1000  # marks awaited at most (a client that never returns them costs no more)
MAX_BACK_S = 2.0  # a timestamp further back than this is a restarted clock, not a late chunk


class PayloadError(ValueError):
    """A media payload that is not base64."""


def decode_payload(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError("the media payload is not base64") from None


class MulawInbound:
    """The caller's audio: base64 mu-law payloads in, decoded frames on ``track``."""

    def __init__(self) -> None:
        self.track = RtpAudioTrack()
        self.chunks = 0
        self.late = 0  # chunks that came after a later one, dropped
        self.gaps = 0  # chunks missing before one that came (each shows as a pts jump)
        self._decoder = PcmuDecoder()
        self._origin: int | None = None  # the provider's position (samples) at our pts 0
        self._next_pts = 0  # pts just past the last frame queued

    def push(self, payload: str, timestamp_ms: int | None = None, chunk: int | None = None) -> None:
        """One ``media`` payload; raises ``PayloadError`` when it is not base64."""
        data = decode_payload(payload)
        if not data:
            return
        pts = self._place(timestamp_ms, chunk, len(data))
        if pts is None:
            self.late += 1
            if log_this_drop(self.late):
                log.info("provider media: %d late chunks dropped", self.late)
            return
        self.chunks += 1
        for frame in self._decoder.decode(JitterFrame(data=data, timestamp=pts & 0xFFFFFFFF)):
            frame.pts = pts
            frame.time_base = TIME_BASE
            pts += frame.samples
            self.track.put(frame)
        self._next_pts = pts

    def _place(self, timestamp_ms: int | None, chunk: int | None, samples: int) -> int | None:
        """The chunk's pts: where the provider says it belongs; None when it came too late."""
        if timestamp_ms is not None:
            at = timestamp_ms * SAMPLE_RATE // 1000
        elif chunk is not None:
            at = chunk * samples  # chunks of one size: what both providers send
        else:
            return self._next_pts
        if self._origin is None:
            self._origin = at - self._next_pts
        pts = at - self._origin
        ahead = pts - self._next_pts
        if abs(ahead) <= samples // 2:  # millisecond rounding of the timestamp: contiguous
            return self._next_pts
        if ahead < 0 and -ahead <= MAX_BACK_S * SAMPLE_RATE:
            return None
        if ahead < 0 or ahead > MAX_TS_JUMP_S * SAMPLE_RATE:
            # The provider's clock restarted or leapt: carry on from here.
            self._origin = at - self._next_pts
            return self._next_pts
        self.gaps += 1
        return pts

    def close(self) -> None:
        self.track.stop()


async def mulaw_payloads(track: MediaStreamTrack) -> AsyncIterator[str]:
    """The bot's voice as base64 mu-law payloads of 20 ms (160 bytes), paced by ``track``
    (20 ms frames at 48 kHz); ends when the track does."""
    async for payload in encoded(track, PCMU):
        yield base64.b64encode(payload).decode("ascii")


@dataclass
class Playback:
    """The caller's playback position, from the marks the provider sends back.

    A provider plays what we send from a buffer and returns each mark once the audio queued
    before it has played; a ``clear`` empties the buffer and returns the pending marks at once.
    So ``acked`` (the last mark returned) is how far the buffer has drained, and ``played``
    is that minus what clears threw away unplayed. What a clear skipped is counted from the
    marks back when it was sent, so audio played while the clear travelled counts as skipped:
    ``played`` errs low by a network trip, never high. Positions are 8 kHz samples.
    """

    sent: int = 0  # samples sent
    acked: int = 0  # the position of the last mark returned
    skipped: int = 0  # samples clears threw away before they played
    unknown_marks: int = 0  # marks returned that we never sent (or already had back)
    _pending: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_MARKS))
    _skips: deque[tuple[int, int]] = field(default_factory=deque)  # spans cleared, not all acked
    _skipped_acked: int = 0  # samples of the spans wholly acked since
    _cleared_to: int = 0  # the position of the last clear

    def chunk_sent(self, samples: int = CHUNK_SAMPLES) -> None:
        self.sent += samples

    def mark(self) -> str:
        """The name of a mark to send now: the position it stands at."""
        self._pending.append(self.sent)
        return str(self.sent)

    def returned(self, name: object) -> bool:
        """A mark came back; False (and ignored) when it is none of ours."""
        try:
            position = int(str(name))
        except ValueError:
            position = -1
        if position not in self._pending:
            self.unknown_marks += 1
            return False
        while self._pending and self._pending[0] <= position:
            self._pending.popleft()
        self.acked = max(self.acked, position)
        while self._skips and self._skips[0][1] <= self.acked:
            start, end = self._skips.popleft()
            self._skipped_acked += end - start
        return True

    def cleared(self) -> None:
        """A clear was sent: what is queued beyond the last returned mark will not play."""
        # Beyond an earlier clear too: a second one before the first's marks are back must
        # not count the same samples twice.
        start = max(self.acked, self._cleared_to)
        if self.sent > start:
            self._skips.append((start, self.sent))
            self.skipped += self.sent - start
        self._cleared_to = self.sent

    @property
    def played(self) -> int:
        """Samples played: the position acked, less the cleared spans below it."""
        partly = sum(max(0, min(self.acked, end) - start) for start, end in self._skips)
        return self.acked - self._skipped_acked - partly

    @property
    def lag_s(self) -> float:
        """Audio sent that the provider has not yet confirmed played (or cleared)."""
        return (self.sent - self.acked) / SAMPLE_RATE
