"""Making one reply: streaming text -> speakable pieces -> streaming TTS -> an Utterance.

A reply is prepared speculatively while the caller may still continue; the engine only hands
the utterance to the speech track when the policy takes the turn, and cancels it otherwise.
The first piece is cut short (a clause, or the first phrase of a long sentence) so that the first
audio comes early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence

import numpy as np

from presence.aio import iterate_in_thread, run_blocking
from presence.clock import now
from presence.events import Ev, EventLog
from presence.media.audio import resample
from presence.media.speech import Utterance
from presence.seams import OUT_SAMPLE_RATE, TTS, ChatMessage, Responder, Transcriber

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"[.!?;:](?=\s)|\n")
_CLAUSE_END = re.compile(r"[,—–](?=\s)")
# Where a long first sentence may be cut without a comma: before a conjunction that opens a
# clause ("I think it would help | if you learned French."); not before prepositions or "that"
# ("let me check that | for you" sounds broken). The lookahead waits for the word to end.
_PHRASE_START = re.compile(
    r"\s(?=(?:and|but|because|which|if|when|while|where|after|before|until|unless)\s)",
    re.IGNORECASE,
)
PHRASE_MIN_WORDS = 5  # shorter first sentences stay whole: cutting them only costs prosody


def pop_speakable(buffer: str, first: bool) -> tuple[list[str], str]:
    """Split streamed text into pieces ready for TTS and the unfinished rest.

    A sentence end always cuts. For the first piece, because the caller is waiting for the
    first audio, a clause of at least three words also cuts, and so does the start of a phrase
    ("if", "because", "and"...) after at least ``PHRASE_MIN_WORDS`` words.
    """
    pieces: list[str] = []
    while True:
        match = _SENTENCE_END.search(buffer)
        if (first and not pieces) and match is None:
            # the first comma after three words ("Well, as it happens," not "Well,")
            clauses = (m for m in _CLAUSE_END.finditer(buffer) if len(buffer[: m.end()].split()) >= 3)
            phrases = (
                m
                for m in _PHRASE_START.finditer(buffer)
                if len(buffer[: m.start()].split()) >= PHRASE_MIN_WORDS
            )
            match = next(clauses, None) or next(phrases, None)
        if match is None:
            return pieces, buffer
        piece = buffer[: match.end()].strip()
        buffer = buffer[match.end() :]
        if piece.strip(".!?;:,—– "):
            pieces.append(piece)


async def synthesize(tts: TTS, text: str) -> np.ndarray:
    """Whole-piece TTS at 48 kHz, off the event loop."""
    chunks = [chunk async for chunk in iterate_in_thread(lambda: tts.synthesize(text))]
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return await run_blocking(resample, audio, tts.sample_rate, OUT_SAMPLE_RATE)


class ReplyTask:
    """Fills ``utterance`` from the responder and TTS in the background."""

    def __init__(
        self,
        responder: Responder,
        tts: TTS,
        messages: Sequence[ChatMessage],
        events: EventLog,
        *,
        fixed_text: str | None = None,
    ) -> None:
        self.responder = responder
        self.tts = tts
        self.messages = list(messages)
        self.events = events
        self.fixed_text = fixed_text
        self.utterance = Utterance()
        self.created = now()
        self.first_audio_at: float | None = None
        self.error: str | None = None
        self._task = asyncio.create_task(self._run(), name=f"reply-{self.utterance.id}")

    @property
    def done(self) -> bool:
        return self._task.done()

    async def _run(self) -> None:
        try:
            if self.fixed_text is not None:
                # Piece by piece, like a streamed reply: the first clause is ready soonest.
                pieces, rest = pop_speakable(self.fixed_text + " ", first=True)
                for piece in [*pieces, rest.strip()]:
                    if piece:
                        await self._speak(piece)
                return
            buffer = ""
            first_token = True
            async for delta in self.responder.stream(self.messages):
                if first_token and delta.strip():
                    first_token = False
                    self.events.emit(Ev.RESPONDER_FIRST_TOKEN, utterance=self.utterance.id)
                buffer += delta
                pieces, buffer = pop_speakable(buffer, first=not self.utterance.segments)
                for piece in pieces:
                    await self._speak(piece)
            if buffer.strip():
                await self._speak(buffer.strip())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed backend must not kill the call: say nothing more
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("reply %s failed", self.utterance.id)
        finally:
            self.utterance.finish()

    async def _speak(self, text: str) -> None:
        audio = await synthesize(self.tts, text)
        if audio.size == 0:
            return
        if self.first_audio_at is None:
            self.first_audio_at = now()
            self.events.emit(Ev.TTS_FIRST_AUDIO, utterance=self.utterance.id)
        self.utterance.add(text, audio)

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.utterance.finish()


# What whisper says over near-silence or noise (its training data's subtitles): never the words.
WHISPER_HALLUCINATIONS = frozenset(
    {
        "thank you",
        "thanks for watching",
        "thank you for watching",
        "we'll see you guys in the next one",
        "see you in the next one",
        "see you next time",
        "bye",
        "you",
        "subtitles by the amara org community",
    }
)
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def plain_words(text: str) -> str:
    """Text compared for "is this the same": case, punctuation and spacing ignored."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


async def final_pass(transcriber: Transcriber, reply: ReplyTask, audio: np.ndarray) -> str:
    """The accurate text of a caller turn, once its reply's first audio exists ("" when whisper
    only made up one of its subtitles)."""
    # Whisper costs ~0.5 s of CPU: let the reply's first audio go first.
    for _ in range(50):
        if reply.first_audio_at is not None or reply.done:
            break
        await asyncio.sleep(0.05)
    return await transcribe(transcriber, audio)


async def transcribe(transcriber: Transcriber, audio: np.ndarray) -> str:
    """Whisper's text of ``audio``, off the loop ("" when it only made up one of its subtitles)."""
    text = (await run_blocking(transcriber.transcribe, audio)).text.strip()
    return "" if plain_words(text) in WHISPER_HALLUCINATIONS else text
