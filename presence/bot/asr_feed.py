"""Feeding the streaming ASR of one call: in order, off the event loop, with a bounded backlog.

The engine puts the caller's audio in as micro-turns come and asks for the final text of an
utterance (``finish``) when it prepares a reply. When the caller goes on after such a
speculative finish, the utterance is *continued*: the text finished so far is kept as a prefix
and only the new audio is decoded, after the last second of the finished part (an utterance
that starts mid-sentence loses its first word to the language model: "and calculate" became
"they calculate"); the words that second repeats are merged away. A long turn with pauses so
costs linear, not quadratic, ASR time. A failing ASR (its worker process died) never leaves a turn waiting: the finish falls
back to the whole-turn transcriber.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from difflib import SequenceMatcher
from typing import Literal

import numpy as np

from presence.aio import log_this_drop, run_blocking
from presence.media.audio import AudioTail
from presence.seams import StreamingASR

log = logging.getLogger(__name__)

Kind = Literal["start", "audio", "finish", "drop"]
MAX_BACKLOG = 150  # queued items (~30 s of 200 ms micro-turns): past this the ASR has fallen behind
CONTEXT_S = 1.0  # audio of the finished part decoded again when an utterance is continued


def merge_overlap(prefix: str, text: str, window: int = 6) -> str:
    """``prefix`` + ``text`` where ``text`` starts by repeating the end of ``prefix``."""
    head, tail = prefix.split(), text.split()
    if not head:
        return text.strip()
    low_head = [w.lower() for w in head[-window:]]
    low_tail = [w.lower() for w in tail[: window + 2]]
    for k in range(min(len(low_head), len(low_tail)), 0, -1):
        if low_head[-k:] == low_tail[:k]:
            return " ".join(head + tail[k:])
    # The repeat was heard a little differently: cut at the last shared word, so the words
    # already final stay as they were ("book a table" + "like to book it table for two" keeps
    # "a table"; cutting after the longest shared run, "like to book", would rewrite them).
    blocks = SequenceMatcher(None, low_head, low_tail, autojunk=False).get_matching_blocks()[:-1]
    if blocks:
        last = blocks[-1]
        drop = len(low_head) - (last.a + last.size)
        return " ".join(head[: len(head) - drop] + tail[last.b + last.size :])
    return " ".join(head + tail)


class ASRFeed:
    def __init__(
        self,
        call_id: str,
        asr: StreamingASR | None,
        fallback: Callable[[], Awaitable[str]],
        on_partial: Callable[[str], None],
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self.call_id = call_id
        self.asr = asr
        # a backend hosted in a worker process names its own executor (isolated.RemoteStream)
        self._executor: Executor | None = getattr(asr, "executor", None)
        self.fallback = fallback  # the whole-turn transcription, when the ASR cannot answer
        self.on_partial = on_partial
        self.max_backlog = max_backlog
        self.dropped = 0  # audio items dropped because the backlog was full
        self._items: deque[tuple[Kind, object]] = deque()
        self._wake = asyncio.Event()
        self._started = False
        self._damaged = False  # a step of the current utterance failed
        self._prefix = ""  # text of the utterance finished before it was continued
        self._context = AudioTail(CONTEXT_S)  # the last decoded audio of the utterance

    # ------------------------------------------------------------------ the engine's side
    def start(self, preroll: list[np.ndarray]) -> None:
        """A new utterance: forget any prefix, decode from the preroll on."""
        self._put("start", "")
        for chunk in preroll:
            self._put("audio", chunk)

    def resume(self, preroll: list[np.ndarray]) -> None:
        """The caller went on after a finish: keep the finished text, decode only new audio."""
        self._put("start", None)
        for chunk in preroll:
            self._put("audio", chunk)

    def audio(self, chunk: np.ndarray) -> None:
        self._put("audio", chunk)

    def finish(self) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._put("finish", future)
        return future

    def drop(self) -> None:
        """End the utterance and forget its words (a backchannel over the bot)."""
        self._put("drop", None)

    def _put(self, kind: Kind, payload: object) -> None:
        if len(self._items) >= self.max_backlog:
            # Audio gives way; the control items that keep turns answerable never do.
            for i, (k, _) in enumerate(self._items):
                if k == "audio":
                    del self._items[i]
                    self.dropped += 1
                    if log_this_drop(self.dropped):
                        log.warning(
                            "call %s: streaming ASR behind, %d chunks dropped", self.call_id, self.dropped
                        )
                    break
        self._items.append((kind, payload))
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        while True:
            while not self._items:
                self._wake.clear()
                await self._wake.wait()
            kind, payload = self._items.popleft()
            if kind == "audio":  # what piled up goes in one call: one round trip, not one per chunk
                parts = [payload]
                while self._items and self._items[0][0] == "audio":
                    parts.append(self._items.popleft()[1])
                payload = parts[0] if len(parts) == 1 else np.concatenate(parts)  # type: ignore[arg-type]
            try:
                await self._step(kind, payload)
            except Exception:
                log.exception("call %s: streaming ASR %s failed", self.call_id, kind)
                if kind == "finish" and isinstance(payload, asyncio.Future) and not payload.done():
                    payload.set_result(await self.fallback())
                else:
                    # the decoder lost part of this utterance (its worker died, say): its final
                    # comes from the whole-turn transcription instead, so the turn is not lost
                    self._damaged = True

    async def _step(self, kind: Kind, payload: object) -> None:
        asr = self.asr
        if kind == "start":
            context = self._context.chunks()
            self._context.clear()
            if isinstance(payload, str):
                self._prefix, context = payload, []
                self._damaged = False
            self._started = True
            if asr is not None:
                await run_blocking(asr.start, executor=self._executor)
                for chunk in context:
                    await self._step("audio", chunk)
        elif kind == "audio":
            if asr is None or not self._started:
                return
            assert isinstance(payload, np.ndarray)
            self._context.push(payload[-self._context.limit :])  # a batch can be longer than the context
            partial = await run_blocking(asr.accept, payload, executor=self._executor)
            if partial is not None and partial.text:
                self.on_partial(self._join(partial.text))
        elif kind == "drop":
            if self._started and asr is not None:
                await run_blocking(asr.finish, executor=self._executor)
            self._started, self._prefix = False, ""
        elif kind == "finish":
            text = self._prefix
            if self._started:
                self._started = False
                if asr is not None:
                    text = self._join((await run_blocking(asr.finish, executor=self._executor)).text)
                if asr is None or self._damaged:
                    self._damaged = False
                    text = await self.fallback()
            self._prefix = text.strip()
            if isinstance(payload, asyncio.Future) and not payload.done():
                payload.set_result(self._prefix)

    def _join(self, text: str) -> str:
        return merge_overlap(self._prefix, text)
