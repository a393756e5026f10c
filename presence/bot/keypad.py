"""Keys the caller presses (RFC 4733 DTMF from a phone, a provider stream's ``dtmf``).

Each key is a ``dtmf`` event at once and a ``dtmf:D`` entry in the next micro-turn's events
(the policy's input). Keys pressed together ("1", "2", "#") are one turn: it ends with ``#``
or after ``KEY_GAP_S`` without another key, and then the bot answers it like a spoken turn:
"(pressed 1 2 # on the keypad)" goes into the conversation. A key while the bot talks stops
it, the way callers expect a phone menu to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from presence.bot.reply import ReplyTask
from presence.events import Ev, EventLog
from presence.seams import Action, ChatMessage, Floor, MicroTurn

if TYPE_CHECKING:
    from presence.bot.backends.factory import Backends
    from presence.bot.context import Conversation
    from presence.media.microturn import MicroTurnAssembler
    from presence.media.speech import SpeechTrack

KEY_GAP_S = 1.5  # phone menus wait about this long for the next digit
KEYS = frozenset("0123456789*#ABCD")


class Keypad:
    """Mixed into ``Engine``; the attributes below are the engine's."""

    events: EventLog
    assembler: MicroTurnAssembler
    track: SpeechTrack
    conversation: Conversation
    backends: Backends
    _keys: list[str]
    _keys_timer: asyncio.TimerHandle | None
    _user_id: int | None
    keys_taken: Callable[[str], bool] | None  # the session's: keys that mean something to it (0: a person)

    def _apply(self, action: Action, turn: MicroTurn | None) -> None:
        raise NotImplementedError

    def _commit(self, reply: ReplyTask) -> None:
        raise NotImplementedError

    def _context(self, *extra: ChatMessage) -> list[ChatMessage]:
        raise NotImplementedError

    def on_dtmf(self, participant: str, digit: str, t: float) -> None:
        if digit not in KEYS:
            return
        self.events.emit(Ev.DTMF, t, digit=digit, participant=participant)
        self.assembler.add_event(f"dtmf:{digit}")
        self._keys.append(digit)
        self._cancel_keys_timer()
        if digit == "#":
            self._keys_done()
        else:
            self._keys_timer = asyncio.get_running_loop().call_later(KEY_GAP_S, self._keys_done)

    def _cancel_keys_timer(self) -> None:
        if self._keys_timer is not None:
            self._keys_timer.cancel()
            self._keys_timer = None

    def _keys_done(self) -> None:
        self._keys_timer = None
        keys, self._keys = self._keys, []
        if not keys or (self.keys_taken is not None and self.keys_taken("".join(keys))):
            return
        if self.track.speaking:
            self._apply(Action(Floor.YIELD, reason="keypad"), None)
        text = f"(pressed {' '.join(keys)} on the keypad)"
        self._user_id = self.conversation.append(ChatMessage("user", text))
        self.events.emit(Ev.CAPTION, who="caller", text=text, final=True)
        self._commit(ReplyTask(self.backends.responder, self.backends.tts, self._context(), self.events))
