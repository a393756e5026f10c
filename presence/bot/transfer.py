"""Handing a caller over to a person: a blind transfer when they ask for one, or press 0.

The session watches the call's events: a caller turn that asks for a person ("can I talk to a
human", "an agent please") or the key ``0`` starts a transfer to ``transfer_to`` when it is
set and the caller's transport can be transferred (SIP REFER). The bot says so first, so the
caller knows why the voice changes; a refused transfer is said too, and the call goes on.
"""

from __future__ import annotations

import re

_PERSON = re.compile(
    r"\b(?:human|real person|person|live agent|agent|operator|representative|someone real|somebody real)\b"
)
_ASKING = re.compile(r"\b(?:talk|speak|transfer|connect|put me through|get me|give me|want|need|can i)\b")

SAY_TRANSFER = "Let me put you through to a person now."
SAY_FAILED = "Sorry, I could not reach a person. I am still here."


def wants_a_person(text: str) -> bool:
    """A caller's words that ask for a human rather than for the bot."""
    plain = text.lower()
    return bool(_PERSON.search(plain) and _ASKING.search(plain))
