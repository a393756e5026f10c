"""What a reply sees of the call: the system prompt, a rolling summary, recent turns verbatim.

The context is bounded by design, and its front changes rarely, so llama.cpp's prompt cache keeps
covering it. A window that slid by one message per turn would change the prompt right after the
examples on every reply, and the whole conversation would be evaluated again each time (a long
call got slower with every minute). Here recent messages accumulate until there are more than
``keep``; then the oldest ``fold`` of them are folded into the summary by a background task
(never the reply path), and until that summary is ready they stay verbatim. Between folds, each
prompt extends the previous one.

The default summarizer is extractive (no model, deterministic): what the caller asked and was
told, and what the caller said about themselves. Any ``Summarizer`` (an LLM job, for instance)
drops in.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from presence.aio import run_blocking
from presence.seams import ChatMessage

log = logging.getLogger(__name__)

# (summary so far, messages to fold in) -> the new summary. Runs in an executor thread.
Summarizer = Callable[[str, Sequence[ChatMessage]], str]

SUMMARY_PREFIX = "Earlier in this call: "
MAX_TOPICS = 6  # what was asked most recently, oldest first dropped
MAX_FACTS = 4  # what the caller said about themselves
_FACT = re.compile(
    r"\b(my name is|my name's|call me|i am|i'm|i live|i work|my (?:\w+ )?(?:is|are)|remember)\b",
    re.IGNORECASE,
)
_FILLERS = re.compile(r"\b(um+|uh+|erm*|ah+|hmm+)\b,?\s*", re.IGNORECASE)


def _clip(text: str, words: int) -> str:
    parts = _FILLERS.sub("", " ".join(text.split())).strip(" .!?,;:").split()
    return " ".join(parts[:words]) + ("..." if len(parts) > words else "")


@dataclass
class _Summary:
    topics: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)


def _parse(summary: str) -> _Summary:
    """The structured items of a summary this module wrote (empty for anything else)."""
    out = _Summary()
    if not summary.startswith(SUMMARY_PREFIX):
        return out
    for part in summary[len(SUMMARY_PREFIX) :].split(" | "):
        kind, _, item = part.partition(": ")
        if kind == "the caller said" and item:
            out.facts.extend(i for i in item.split("; ") if i)
        elif kind == "asked" and item:
            out.topics.extend(i for i in item.split("; ") if i)
    return out


def extractive_summary(summary: str, messages: Sequence[ChatMessage]) -> str:
    """Fold ``messages`` into ``summary``: the newest topics asked, and the caller's own facts."""
    state = _parse(summary)
    pending_question: str | None = None
    for message in messages:
        text = message.content.replace("|", " ").replace(";", ",")
        if message.role == "user":
            if _FACT.search(text):
                state.facts.append(_clip(text, 14))
            pending_question = _clip(text, 10)
            state.topics.append(pending_question)
        elif message.role == "assistant" and pending_question is not None and state.topics:
            state.topics[-1] = f"{pending_question} (you said {_clip(text, 10)})"
            pending_question = None
    facts = list(dict.fromkeys(state.facts))[-MAX_FACTS:]
    topics = state.topics[-MAX_TOPICS:]
    parts = []
    if facts:
        parts.append("the caller said: " + "; ".join(facts))
    if topics:
        parts.append("asked: " + "; ".join(topics))
    return SUMMARY_PREFIX + " | ".join(parts) if parts else ""


@dataclass(frozen=True, slots=True)
class Fold:
    """Messages due to be folded into the summary (ids of the oldest recent messages)."""

    ids: tuple[int, ...]
    messages: tuple[ChatMessage, ...]
    summary: str  # the summary they fold into


class Conversation:
    """The call's context for replies: system prompt, rolling summary, recent messages."""

    def __init__(
        self, system_prompt: str, *, keep: int = 24, fold: int = 12, summarize: Summarizer | None = None
    ) -> None:
        if not 0 < fold <= keep:
            raise ValueError("fold must be between 1 and keep")
        self.summarize = summarize or extractive_summary
        self.system = ChatMessage("system", system_prompt)
        self.keep = keep
        self.fold = fold
        self.summary = ""
        self._recent: list[tuple[int, ChatMessage]] = []
        self._ids = itertools.count()
        self._folding = False

    def append(self, message: ChatMessage) -> int:
        """Add a message; returns its id (for :meth:`replace`)."""
        mid = next(self._ids)
        self._recent.append((mid, message))
        # A summarizer that never answers must not let the context grow without bound.
        if len(self._recent) > 2 * self.keep:
            del self._recent[: len(self._recent) - 2 * self.keep]
        return mid

    def replace(self, mid: int, message: ChatMessage) -> bool:
        """Replace a message that is still verbatim (the final ASR pass); False once folded."""
        for i, (other, old) in enumerate(self._recent):
            if other == mid and old.role == message.role:
                self._recent[i] = (mid, message)
                return True
        return False

    @property
    def recent(self) -> list[ChatMessage]:
        return [m for _, m in self._recent]

    def messages(self, *extra: ChatMessage) -> list[ChatMessage]:
        """What a reply sees: system prompt, the summary (a second system message), recent turns."""
        summary = [ChatMessage("system", self.summary)] if self.summary else []
        return [self.system, *summary, *self.recent, *extra]

    def step(self) -> Fold | None:
        """The next fold to run in the background, when one is due and none is running."""
        if self._folding or len(self._recent) <= self.keep:
            return None
        self._folding = True
        oldest = self._recent[: self.fold]
        return Fold(tuple(i for i, _ in oldest), tuple(m for _, m in oldest), self.summary)

    def apply(self, fold: Fold, summary: str | None) -> None:
        """Put a finished fold in place (``None``: the summarizer failed; keep them verbatim)."""
        self._folding = False
        if summary is None:
            return
        done = set(fold.ids)
        self._recent = [(i, m) for i, m in self._recent if i not in done]
        self.summary = summary

    async def run(self, fold: Fold) -> None:
        """Summarize ``fold`` in an executor thread and put it in place."""
        summary: str | None = None
        try:
            summary = await run_blocking(self.summarize, fold.summary, fold.messages)
        except Exception:
            log.exception("the conversation summary failed; older turns stay verbatim")
        finally:
            self.apply(fold, summary)
