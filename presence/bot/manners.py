"""Phone manners: a call that goes quiet is checked on, then ended; no call runs for ever.

``CallManners`` is one streaming state, stepped by the session's watchdog about once a second.
After ``idle_prompt_s`` with neither side speaking it asks "Are you still there?"; when that
gets no answer within ``idle_hangup_s`` it says goodbye and ends the call (a phone line left
open costs money and a call slot). Any call ends after ``max_call_s``, with a goodbye.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from presence.config import Settings


class Manner(enum.Enum):
    PROMPT = "prompt"  # ask whether the caller is still there
    GOODBYE = "goodbye"  # say goodbye and hang up (the caller went quiet after the prompt)
    TIME_UP = "time_up"  # the call reached max_call_s


@dataclass(frozen=True, slots=True)
class MannerOptions:
    idle_prompt_s: float = 30.0  # 0: never
    idle_hangup_s: float = 15.0
    max_call_s: float = 3600.0  # 0: no limit
    prompt_text: str = "Are you still there?"
    goodbye_text: str = "I will hang up now. Goodbye."
    time_up_text: str = "We have reached the time limit for this call. Goodbye."

    @classmethod
    def from_settings(cls, s: Settings) -> MannerOptions:
        return cls(idle_prompt_s=s.idle_prompt_s, idle_hangup_s=s.idle_hangup_s, max_call_s=s.max_call_s)


class CallManners:
    def __init__(self, options: MannerOptions, started: float) -> None:
        self.o = options
        self.started = started
        self.last_activity = started
        self.prompted_at: float | None = None
        self.done = False  # a goodbye was decided: nothing more

    def step(self, t: float, *, active_at: float, speaking: bool, idle_checks: bool = True) -> Manner | None:
        """``active_at``: the caller's last speech; ``speaking``: the bot talks now;
        ``idle_checks``: whether silence is checked on (phone calls; a page shows the call)."""
        if self.done:
            return None
        if self.o.max_call_s > 0 and t - self.started >= self.o.max_call_s:
            self.done = True
            return Manner.TIME_UP
        if speaking:
            self.last_activity = t
            return None
        if active_at > self.last_activity:
            self.last_activity = active_at
            self.prompted_at = None  # they answered
        if self.o.idle_prompt_s <= 0 or not idle_checks:
            return None
        if self.prompted_at is None:
            if t - self.last_activity >= self.o.idle_prompt_s:
                self.prompted_at = t
                return Manner.PROMPT
        elif t - max(self.prompted_at, self.last_activity) >= self.o.idle_hangup_s:
            self.done = True
            return Manner.GOODBYE
        return None
