"""Whisper's second look at a caller turn the streaming ASR's words already decided.

A turn the bot answered gets the final pass once the reply's first audio exists: the accurate
caption, and work (or a recap) the streaming text garbled, dispatched late. A turn left
unanswered in a room of several people whose first words sound like the bot's name ("present
precipice it's what time is it" for "Presence, what time is it?") is transcribed again at
once: if whisper's words name the bot, it is answered late rather than not at all.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from presence.aio import run_blocking
from presence.bot.reply import ReplyTask, final_pass, transcribe
from presence.clock import now
from presence.events import Ev, EventLog
from presence.seams import ChatMessage

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable, Coroutine

    from presence.bot.addressee import AddresseeInput, AddresseeTracker
    from presence.bot.backends.factory import Backends
    from presence.bot.caller_state import CallerState
    from presence.bot.context import Conversation
    from presence.bot.results import CallResults

log = logging.getLogger(__name__)


class SecondPass:
    """Mixed into ``Engine``; the attributes below are the engine's."""

    call_id: str
    events: EventLog
    backends: Backends
    conversation: Conversation
    caller: CallerState
    addressee: AddresseeTracker
    results: CallResults
    turns: int
    answer_from_call: Callable[[str, str], str | None] | None
    _turn_audio: deque[np.ndarray]

    def _commit(self, reply: ReplyTask) -> None:
        raise NotImplementedError

    def _fixed_reply(self, text: str) -> ReplyTask:
        raise NotImplementedError

    def _answer(self, text: str, speakers: list[str], audio: np.ndarray) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Coroutine[object, object, object], name: str) -> None:
        raise NotImplementedError

    async def _final_pass(
        self,
        reply: ReplyTask,
        audio: np.ndarray,
        user_id: int | None,
        turn: int,
        asked: tuple[frozenset[str], str, bool],
    ) -> None:
        """``asked``: the job kinds the streaming text routed, its speaker, and whether the call
        itself answered it."""
        assert self.backends.transcriber is not None
        routed, speaker, answered = asked
        text = await final_pass(self.backends.transcriber, reply, audio)
        if text and user_id is not None and self.conversation.replace(user_id, ChatMessage("user", text)):
            self.events.emit(
                Ev.CAPTION, who="caller", text=text, final=True, turn=turn, pass_="final", speaker=speaker
            )
        # pocketsphinx garbles a request now and then ("sky scout to leave" for "please calculate"):
        # work whisper's text asks for is dispatched late, its acknowledgement cutting that reply
        # (and work of another kind than the streaming text's: "look up X and calculate Y")
        if text and turn == self.turns - 1 and self.caller.utt_start is None:
            spoken = self.results.route(text, skip=routed)
            if spoken is None and not answered and self.answer_from_call is not None:
                spoken = self.answer_from_call(speaker, text)  # "what did I miss" heard as "mess"
            if spoken is not None:
                self._commit(self._fixed_reply(spoken))

    def _look_again(self, judged: AddresseeInput, speakers: list[str], audio: np.ndarray) -> None:
        if self.backends.transcriber is not None and audio.size:
            self._spawn(self._named_after_all(judged, speakers, audio), "addressee-second-look")

    async def _named_after_all(self, judged: AddresseeInput, speakers: list[str], audio: np.ndarray) -> None:
        assert self.backends.transcriber is not None
        turn = self.turns
        try:
            text = await transcribe(self.backends.transcriber, audio)
        except Exception:
            log.exception("call %s: the second look at an unaddressed turn failed", self.call_id)
            return
        if not text or self.turns != turn or self.caller.utt_start is not None:
            return  # the call moved on: an answer now would be to the wrong moment
        verdict = self.addressee.step(dataclasses.replace(judged, text=text, now=now()))
        if verdict.addressed:
            log.info("call %s: %r was for the bot after all (whisper: %r)", self.call_id, judged.text, text)
            self._answer(text, speakers, audio)

    async def _transcribe_turn(self) -> str:
        """The whole turn's text, when the streaming ASR cannot give it."""
        if self.backends.transcriber is None or not self._turn_audio:
            return ""
        audio = np.concatenate(self._turn_audio)
        try:
            return (await run_blocking(self.backends.transcriber.transcribe, audio)).text.strip()
        except Exception:
            log.exception("call %s: transcriber failed", self.call_id)
            return ""
