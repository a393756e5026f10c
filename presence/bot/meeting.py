"""A meeting's live transcript with speaker names: "what did I miss?" and the notes at the end.

Fed from the call's events (a caller turn for the bot, side talk between the humans, the bot's
own words), bounded, on the bot clock. The recap is extractive: the last things each speaker
said since the asker last spoke (or joined), no model, so it is immediate and never invents
anything. The notes are that transcript, plus a summary written by a background ``think`` job
(the existing Redis jobs) when one is available.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from presence.bot.jobs.types import JobRequest
from presence.events import Ev
from presence.seams import CallEvent

if TYPE_CHECKING:
    from presence.bot.engine import Engine

log = logging.getLogger(__name__)

# the streaming ASR often hears "miss" as "mess" or "mist"
MISSED = re.compile(
    r"\b(what (?:did|have) i (?:just )?(?:miss(?:ed)?|mess|mist|mis)|catch me up|fill me in|bring me up to (?:speed|date)|"
    r"what (?:was|were) (?:they|we|you all|you guys) (?:talking|saying)|recap)\b",
    re.IGNORECASE,
)
RECAP_LINES = 4  # spoken: the newest few, a recap is not a reading of the minutes
RECAP_WORDS = 18  # per line


@dataclass(frozen=True, slots=True)
class Line:
    t: float  # bot clock
    speaker: str
    text: str
    to_bot: bool  # addressed to the bot (or the bot's own words)


def _clip(text: str, words: int) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + ("..." if len(parts) > words else "")


class MeetingLog:
    def __init__(self, bot_name: str, keep: int = 2_000) -> None:
        self.bot_name = bot_name
        self.lines: deque[Line] = deque(maxlen=keep)
        self.joined: dict[str, float] = {}  # participant -> when they (last) joined
        self.started_wall = time.time()

    def on_event(self, event: CallEvent) -> None:
        d = event.data
        if event.name == Ev.CAPTION and d.get("final"):
            if d.get("who") == "bot":
                self._add(event.t, self.bot_name, str(d.get("text", "")), True)
            elif d.get("pass_") == "final":  # whisper's text of a line kept already replaces it
                self._rewrite(str(d.get("speaker") or "someone"), str(d.get("text", "")))
            else:
                self._add(event.t, str(d.get("speaker") or "someone"), str(d.get("text", "")), True)
        elif event.name == Ev.NOT_ADDRESSED:
            self._add(event.t, str(d.get("speaker") or "someone"), str(d.get("text", "")), False)
        elif event.name == Ev.PARTICIPANT_JOINED:
            self.joined.setdefault(str(d.get("participant", "")), event.t)

    def _add(self, t: float, speaker: str, text: str, to_bot: bool) -> None:
        if text.strip():
            self.lines.append(Line(t, speaker, " ".join(text.split()), to_bot))

    def _rewrite(self, speaker: str, text: str) -> None:
        for i in range(len(self.lines) - 1, max(-1, len(self.lines) - 20), -1):
            line = self.lines[i]
            if line.speaker == speaker and line.to_bot:
                if text.strip():
                    self.lines[i] = Line(line.t, speaker, " ".join(text.split()), True)
                return

    def recap(self, asker: str, words: str) -> str | None:
        """What to say to "what did I miss?" (None: not that question)."""
        if not MISSED.search(words):
            return None
        own = [line.t for line in self.lines if line.speaker == asker and line.text != words]
        since = max([*own[-1:], self.joined.get(asker, float("-inf"))])
        missed = [
            line for line in self.lines if line.t > since and line.speaker not in (asker, self.bot_name)
        ]
        if not missed:
            return "Nothing much: nobody has said anything since you last spoke."
        said = "; ".join(
            f"{line.speaker} said {_clip(line.text, RECAP_WORDS)}" for line in missed[-RECAP_LINES:]
        )
        more = len(missed) - RECAP_LINES
        head = f"There were {len(missed)} remarks; the latest: " if more > 0 else ""
        return f"{head}{said}."

    def transcript(self) -> str:
        start = self.lines[0].t if self.lines else 0.0
        out = []
        for line in self.lines:
            m, s = divmod(int(line.t - start), 60)
            out.append(f"[{m:02d}:{s:02d}] {line.speaker}: {line.text}")
        return "\n".join(out)

    def notes(self, summary: str = "") -> str:
        """The meeting notes in Markdown: who spoke, the summary when there is one, the transcript."""
        speakers = sorted({line.speaker for line in self.lines} | set(self.joined))
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.started_wall))
        parts = [f"# Meeting notes ({stamp})", "", f"Participants: {', '.join(speakers) or 'none heard'}", ""]
        if summary:
            parts += ["## Summary", "", summary.strip(), ""]
        parts += ["## Transcript", "", self.transcript() or "(nothing was said)", ""]
        return "\n".join(parts)

    def notes_prompt(self) -> dict[str, str]:
        """The ``think`` job's arguments for the summary (the newest part, if it is long)."""
        text = self.transcript()[-6_000:]
        return {
            "system": "You write short meeting notes: decisions, action items with owners, open questions.",
            "prompt": f"Transcript of a meeting:\n{text}\n\nWrite the notes.",
        }

    async def summarised(self, engine: Engine, call_id: str, timeout: float) -> str:
        """The notes, their summary from a background ``think`` job (up to ``timeout`` s);
        without one the notes are the transcript alone."""
        jobs, summary = engine.jobs, ""
        if jobs is not None and self.lines and timeout > 0:
            request = JobRequest.new(call_id, "think", self.notes_prompt(), timeout_s=timeout)
            waiting = asyncio.get_running_loop().create_future()
            engine.results.collect[request.job_id] = waiting
            try:
                if await jobs.dispatch([request]):
                    result = await asyncio.wait_for(waiting, timeout)
                    if result.ok and isinstance(result.value, dict):
                        summary = str(result.value.get("text", ""))
            except TimeoutError:
                log.warning("call %s: no notes summary within %.0f s", call_id, timeout)
            finally:
                engine.results.collect.pop(request.job_id, None)
        return self.notes(summary)
