"""Event names shared by the bot log, the page's data channel, benchmarks and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable

from presence.clock import now
from presence.seams import CallEvent

log = logging.getLogger(__name__)


class Ev(enum.StrEnum):
    CALLER_SPEECH_START = "caller_speech_start"
    CALLER_SPEECH_END = "caller_speech_end"
    END_OF_TURN_DECIDED = "end_of_turn_decided"
    TURN_DETECTOR = "turn_detector"  # {"probability", "silence_ms", "ms"}: an end-of-turn answer
    TEXT_TURN_DETECTOR = "text_turn_detector"  # {"probability", "ms"}: the words' end-of-turn answer
    NOT_ADDRESSED = "not_addressed"  # {"text", "reason"}: a caller turn that was not for the bot
    ASR_FINAL = "asr_final"  # the streaming ASR's final text of a caller utterance is known
    RESPONDER_FIRST_TOKEN = "responder_first_token"
    TTS_FIRST_AUDIO = "tts_first_audio"
    BOT_FIRST_PACKET_SENT = "bot_first_packet_sent"
    BARGE_IN_DETECTED = "barge_in_detected"
    PLAYBACK_FLUSHED = "playback_flushed"
    PLAYBACK_HELD = "playback_held"
    PLAYBACK_RESUMED = "playback_resumed"
    BACKCHANNEL_EMITTED = "backchannel_emitted"
    JOB_DISPATCHED = "job_dispatched"
    JOB_RESULT_INJECTED = "job_result_injected"
    BOT_SPEECH_START = "bot_speech_start"
    BOT_SPEECH_END = "bot_speech_end"
    TRANSFER = "transfer"  # {"participant", "target", "ok"}: handed over to a person (SIP REFER)
    # {"speaker", "source_language", "target_language", "source_text", "text", "source_start",
    # "source_end", "committed_at", "dropped"}: a piece of interpretation queued, or dropped and why
    INTERPRETATION_SEGMENT = "interpretation_segment"
    DTMF = "dtmf"  # {"digit", "participant"}: a key the caller pressed (RFC 4733, a provider's event)
    # page-facing, not timing marks
    STATE = "state"  # listening | thinking | speaking
    CAPTION = "caption"  # {"who": "caller"|"bot", "text", "final"}
    LATENCY = "latency"  # {"name", "ms"}
    PARTICIPANT_JOINED = "participant_joined"
    PARTICIPANT_LEFT = "participant_left"
    VIDEO_FRAME = "video_frame"  # {"participant", "width", "height"}
    JOB = "job"  # {"job_id", "kind", "status", "summary", "title"}: the page's job feed


Listener = Callable[[CallEvent], None]


class EventLog:
    """Per-call event log: keeps a bounded history and fans events out to listeners.

    Listeners must not block; a failing listener is logged and kept out of the others' way.
    """

    # ~10 minutes of a busy call (1-2 events a second): the turn-latency marks, tests and
    # benchmarks read recent events, and an hour-long call must not keep every caption it sent
    def __init__(self, call_id: str, keep: int = 1_000) -> None:
        self.call_id = call_id
        self.history: deque[CallEvent] = deque(maxlen=keep)
        self._listeners: list[Listener] = []

    def emit(self, name: str, t: float | None = None, **data: object) -> CallEvent:
        event = CallEvent(name=str(name), t=now() if t is None else t, call_id=self.call_id, data=data)
        self.history.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break the call
                log.exception("event listener failed for %s", event.name)
        return event

    def listen(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def first(self, name: str, after: float = float("-inf")) -> CallEvent | None:
        return next((e for e in self.history if e.name == name and e.t >= after), None)

    def named(self, name: str) -> list[CallEvent]:
        return [e for e in self.history if e.name == name]

    async def wait_for(self, name: str, after: float = float("-inf"), timeout: float = 10.0) -> CallEvent:
        """Wait until an event ``name`` at or after ``after`` appears (tests and benchmarks)."""
        found = self.first(name, after)
        if found is not None:
            return found
        fut: asyncio.Future[CallEvent] = asyncio.get_running_loop().create_future()

        def on_event(event: CallEvent) -> None:
            if event.name == name and event.t >= after and not fut.done():
                fut.set_result(event)

        remove = self.listen(on_event)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            remove()
