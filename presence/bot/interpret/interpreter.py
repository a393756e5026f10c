"""A live interpreter in a room: each speaker's words in every other language present, while
they are still talking, on one interpretation channel per language.

Per speaker, ``SpeakerStream`` says when to read the window again; each reading runs in the
interpreter's executor (one pass in flight per speaker) and feeds one ``StablePrefix`` per
*track*: ``text`` (a transcript in the speaker's language, then a ``Translator`` per target)
and, with ``interpret_speech_translate``, for a speaker of another language with English
listeners, ``en`` (whisper's translate task gives English from the speech itself).
Committed segments queue per (speaker, target) and are translated, synthesised and played on
the target's channel in order. The speaker talking is expected: no barge-in applies to a
channel. An interpreter that falls behind drops stale segments (``interpretation_segment``
with ``dropped``) rather than queue audio without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from presence.bot.interpret.kit import LanguageKit
from presence.bot.interpret.stable import Segmenter, StablePrefix, Word, collapse_repeats
from presence.bot.interpret.stream import Pass, SpeakerStream
from presence.clock import now
from presence.config import Settings
from presence.events import Ev, EventLog
from presence.media.audio import resample
from presence.media.speech import SpeechTrack, Utterance
from presence.seams import OUT_SAMPLE_RATE

log = logging.getLogger(__name__)

_STOP = re.compile(r"\b(stop|pause|quit|end)\w*\s+(the\s+)?(interpret|translat)", re.I)
_START = re.compile(r"\b(start|resume|continue|go on)\w*\s+(the\s+)?(interpret|translat)", re.I)
QUEUE_SEGMENTS = 8  # per speaker and target: more waiting than this and the oldest goes
PROMPT_CHARS = 120
CUT_GUESS_S = 0.5  # words ending this close to a window's cut are not committed mid-utterance  # committed text handed to whisper as the words before a trimmed window


@dataclass(slots=True)
class Segment:
    speaker: str
    source: str
    target: str
    words: list[Word]
    translated: bool  # the words are in the target language already (speech translation)
    committed_at: float = field(default_factory=now)

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words).strip()


@dataclass
class _Track:
    task: str  # "transcribe" | "translate"
    stable: StablePrefix = field(default_factory=StablePrefix)
    segmenter: Segmenter = field(default_factory=Segmenter)


class Channel:
    """One language's interpretation: a speech track that nobody barges in on."""

    def __init__(self, language: str, events: EventLog) -> None:
        self.language = language
        self.events = events
        self.track = SpeechTrack(self._emit)
        self.segments: dict[int, dict[str, object]] = {}  # utterance id -> its event data
        self.track.on_utterance_end(lambda utt: self.segments.pop(utt.id, None))

    def _emit(self, name: str, t: float | None = None, **data: object) -> None:
        # The channel's own speech events would read as the bot speaking: only captions go out.
        if name == Ev.CAPTION:
            self.events.emit(
                Ev.CAPTION, t, who="interpreter", language=self.language, text=data.get("text"), final=True
            )

    def backlog_s(self) -> float:
        track = self.track
        waiting = [track.current] if track.current is not None else []
        left = sum(max(0, u.total - u.sent) for u in [*waiting, *track.queue])
        return left / OUT_SAMPLE_RATE

    def shed(self, keep_s: float) -> list[dict[str, object]]:
        """Drop queued (not playing) utterances, oldest first, until ``keep_s`` is left."""
        dropped = []
        queue = self.track.queue
        while queue and self.backlog_s() > keep_s:
            utt = queue.popleft()
            dropped.append(self.segments.pop(utt.id, {}))
        return dropped


class Interpreter:
    def __init__(
        self,
        settings: Settings,
        kit: LanguageKit,
        events: EventLog,
        on_channel: Callable[[Channel], None],
        executor: ThreadPoolExecutor,
    ) -> None:
        self.settings = settings
        self.kit = kit
        self.events = events
        self.on_channel = on_channel
        self.executor = executor
        self.simultaneous = settings.interpret_policy == "simultaneous"
        self.active = True
        self.languages: dict[str, str] = {}  # participant -> language
        self.streams: dict[str, SpeakerStream] = {}
        self.tracks: dict[str, dict[str, _Track]] = {}
        self.channels: dict[str, Channel] = {}
        self._queues: dict[tuple[str, str], asyncio.Queue[Segment]] = {}
        self._workers: dict[tuple[str, str], asyncio.Task[None]] = {}  # one per queue
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ participants
    def join(self, participant: str, language: str) -> None:
        self.languages[participant] = language
        self.streams[participant] = SpeakerStream(
            participant, language, simultaneous=self.simultaneous, vad_threshold=self.settings.vad_threshold
        )
        self.tracks[participant] = {}
        if language not in self.channels:
            channel = self.channels[language] = Channel(language, self.events)
            self.on_channel(channel)

    def leave(self, participant: str) -> None:
        self.languages.pop(participant, None)
        self.streams.pop(participant, None)
        self.tracks.pop(participant, None)
        for key in [k for k in self._queues if k[0] == participant]:
            self._queues.pop(key)
            self._workers.pop(key).cancel()
        # channels stay: a listener of that language may still be in the room

    def targets(self, speaker: str) -> set[str]:
        source = self.languages.get(speaker)
        return {lang for p, lang in self.languages.items() if p != speaker and lang != source}

    # ------------------------------------------------------------------ the floor
    def command(self, speaker: str, text: str) -> str | None:
        """What the bot says to "stop interpreting" / "start interpreting" (None: not that)."""
        if _STOP.search(text):
            self.active = False
            for channel in self.channels.values():
                channel.track.flush()
                channel.segments.clear()
            return "Okay, I stopped interpreting."
        if _START.search(text):
            self.active = True
            return "Okay, interpreting again."
        return None

    def on_voice(self, participant: str, prob: float, t: float, piece: np.ndarray) -> None:
        stream = self.streams.get(participant)
        if stream is None:
            return
        due = stream.step(piece, prob, t)
        if due is not None:
            if self.active and self.targets(participant):
                self._spawn(self._read(stream, due))
            else:
                stream.done()

    # ------------------------------------------------------------------ reading
    def _needed(self, speaker: str, source: str) -> dict[str, _Track]:
        targets = self.targets(speaker)
        tracks = self.tracks.setdefault(speaker, {})
        speech_en = self.settings.interpret_speech_translate and source != "en" and "en" in targets
        if speech_en and "en" not in tracks:
            tracks["en"] = _Track("translate")
        if targets - ({"en"} if speech_en else set()) and "text" not in tracks:
            tracks["text"] = _Track("transcribe")
        return tracks

    async def _read(self, stream: SpeakerStream, due: Pass) -> None:
        speaker, source = stream.participant, stream.language
        trim: float | None = due.end if due.boundary else None
        began = now()
        try:
            tracks = self._needed(speaker, source)
            loop = asyncio.get_running_loop()
            for name, track in list(tracks.items()):
                # No prompt with the words before: whisper echoed a committed clause back at the
                # start of the next window ("...meeting and office. We have a very important").
                # kit.asr may load the model (seconds, the first time): never on the loop.
                result = await loop.run_in_executor(
                    self.executor,
                    lambda t=track: self.kit.asr(source).transcribe(due.audio, task=t.task, streaming=True),
                )
                words = collapse_repeats([Word(w, due.start + a, due.start + b) for w, a, b in result.words])
                log.debug(
                    "interpreter: %s %s %.2f s read %.2f s after it: %s",
                    speaker,
                    name,
                    due.audio.size / 16000,
                    now() - due.end,
                    result.text,
                )
                if due.boundary:
                    committed = track.stable.flush(words)
                else:
                    committed = track.stable.step(words, horizon=due.end - CUT_GUESS_S)
                for seg_words in track.segmenter.step(committed, boundary=due.boundary):
                    self._queue(speaker, source, name, seg_words)
            if not due.boundary and due.audio.size > 10 * 16_000:
                ends = [t.stable.committed_end for t in tracks.values() if t.stable.committed]
                trim = min(ends) if ends else None
        except Exception:
            log.exception("interpreter: reading %s failed", speaker)
        finally:
            stream.done(trim, now() - began)

    def _queue(self, speaker: str, source: str, track: str, words: list[Word]) -> None:
        targets = self.targets(speaker)
        speech_en = "en" in self.tracks.get(speaker, {})
        served = {"en"} if track == "en" else targets - ({"en"} if speech_en else set())
        for target in sorted(served & targets):
            segment = Segment(speaker, source, target, words, translated=track == "en")
            key = (speaker, target)
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = asyncio.Queue(QUEUE_SEGMENTS)
                self._workers[key] = self._spawn(self._work(key, queue))
            if queue.full():
                self._report(queue.get_nowait(), "", dropped="behind")
            queue.put_nowait(segment)

    # ------------------------------------------------------------------ speaking
    async def _work(self, key: tuple[str, str], queue: asyncio.Queue[Segment]) -> None:
        speaker, target = key
        while True:  # until its speaker leaves (cancelled) or the call ends
            segment = await queue.get()
            try:
                await self._speak(segment)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("interpreter: %s -> %s failed", speaker, target)
                self._report(segment, "", dropped="failed")

    async def _speak(self, segment: Segment) -> None:
        loop = asyncio.get_running_loop()
        text = segment.text
        if not segment.translated:
            pair = (segment.source, segment.target)
            text = await loop.run_in_executor(None, lambda: self.kit.translator(*pair).translate(text))
        text = text.strip()
        if not self.active:
            return self._report(segment, text, dropped="paused")
        if not text:
            return
        max_lag = self.settings.interpret_max_lag_s
        if now() - segment.committed_at > max_lag:
            return self._report(segment, text, dropped="stale")
        tts = await loop.run_in_executor(None, self.kit.tts, segment.target)
        chunks = await loop.run_in_executor(None, lambda: list(tts.synthesize(text)))
        audio = resample(np.concatenate(chunks), tts.sample_rate, OUT_SAMPLE_RATE) if chunks else None
        if audio is None or not audio.size or not self.active:
            return
        channel = self.channels.get(segment.target)
        if channel is None:
            return
        for gone in channel.shed(max_lag / 2 if channel.backlog_s() > max_lag else float("inf")):
            self.events.emit(Ev.INTERPRETATION_SEGMENT, **{**gone, "dropped": "behind"})
        utt = Utterance()
        utt.add(text, audio)
        utt.finish()
        channel.segments[utt.id] = self._report(segment, text)
        channel.track.play(utt)

    def _report(self, segment: Segment, text: str, dropped: str = "") -> dict[str, object]:
        data: dict[str, object] = {
            "speaker": segment.speaker,
            "source_language": segment.source,
            "target_language": segment.target,
            "source_text": "" if segment.translated else segment.text,
            "text": text or (segment.text if segment.translated else ""),
            "source_start": round(segment.words[0].start, 3),
            "source_end": round(segment.words[-1].end, 3),
            "committed_at": round(segment.committed_at, 3),
            "speech_translated": segment.translated,
        }
        self.events.emit(Ev.INTERPRETATION_SEGMENT, **data, dropped=dropped or False)
        return data

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        self._queues.clear()
        self._workers.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for channel in self.channels.values():
            channel.track.stop()
