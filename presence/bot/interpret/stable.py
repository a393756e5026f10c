"""The stable prefix of a streaming transcript: which words an interpreter may say already.

Whisper re-reads a growing window of a speaker's audio every pass, and its last words change
from pass to pass while the speaker is mid-word. ``StablePrefix`` is the local-agreement policy
(Polák et al. 2022, used by whisper_streaming): a word is committed once two successive
hypotheses agree on it, or at a clause boundary (a pause in the voice), where every word heard
so far is committed. ``Segmenter`` groups committed words into the pieces worth translating on
their own: up to a clause's punctuation, a pause, or ``max_words``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NORM = re.compile(r"[^\w']+")
SENTENCE_END = re.compile(r"[.?!…]$")
CLAUSE_END = re.compile(r"[,;:]$")


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    start: float  # seconds on the speaker's stream clock (the bot clock)
    end: float


def _key(word: Word) -> str:
    return _NORM.sub("", word.text.lower())


def collapse_repeats(words: list[Word], keep: int = 2) -> list[Word]:
    """A decoding that loops ("no, no, no, no, no"): cut where a word or a pair of words comes
    a ``keep + 1``-th time in a row; what follows a loop is whisper's invention too."""
    keys: list[str] = []
    for i, word in enumerate(words):
        keys.append(_key(word))
        for n in (1, 2):
            tail = keys[-n * (keep + 1) :]
            if len(tail) == n * (keep + 1) and all(k == tail[j % n] for j, k in enumerate(tail)):
                return words[: i + 1 - n]
    return list(words)


class StablePrefix:
    """One speaker's utterance: ``step`` each hypothesis, get the words newly committed."""

    OVERLAP_S = 0.12  # a hypothesis word starting this close before the committed end is a repeat

    def __init__(self) -> None:
        self.committed: list[Word] = []
        self._previous: list[Word] = []

    @property
    def committed_end(self) -> float:
        return self.committed[-1].end if self.committed else float("-inf")

    def _fresh(self, hypothesis: list[Word]) -> list[Word]:
        """The part of a hypothesis after what is committed (by time, then by repeated words:
        a window that starts inside a committed word hears it again)."""
        words = [w for w in hypothesis if w.start >= self.committed_end - self.OVERLAP_S]
        tail = [_key(w) for w in self.committed[-5:]]
        for n in range(min(len(tail), len(words)), 0, -1):
            if tail[-n:] == [_key(w) for w in words[:n]]:
                return words[n:]
        return words

    def step(self, hypothesis: list[Word], horizon: float = float("inf")) -> list[Word]:
        """Commit the longest prefix this hypothesis shares with the previous one, among the
        words that end before ``horizon`` (a word at a window's cut is often a guess)."""
        fresh = self._fresh(hypothesis)
        agreed: list[Word] = []
        for old, new in zip(self._previous, fresh, strict=False):
            if _key(old) != _key(new) or not _key(new) or new.end > horizon:
                break
            agreed.append(new)
        self.committed.extend(agreed)
        self._previous = fresh[len(agreed) :]
        return agreed

    def flush(self, hypothesis: list[Word] | None = None) -> list[Word]:
        """A clause boundary: commit everything of ``hypothesis`` (else of the last one) not
        committed yet."""
        fresh = self._fresh(hypothesis) if hypothesis is not None else self._previous
        fresh = [w for w in fresh if _key(w)]
        self.committed.extend(fresh)
        self._previous = []
        return fresh

    def reset(self) -> None:
        self.committed.clear()
        self._previous = []


class Segmenter:
    """Committed words -> segments: a clause (its punctuation), or ``max_words`` of one."""

    def __init__(self, max_words: int = 10, min_clause_words: int = 3) -> None:
        self.max_words = max_words
        self.min_clause_words = min_clause_words  # "Well," alone is not worth a voice of its own
        self.pending: list[Word] = []

    def step(self, words: list[Word], boundary: bool = False) -> list[list[Word]]:
        out: list[list[Word]] = []
        for word in words:
            self.pending.append(word)
            n = len(self.pending)
            clause = CLAUSE_END.search(word.text) and n >= self.min_clause_words
            if SENTENCE_END.search(word.text) or clause or n >= self.max_words:
                out.append(self.pending)
                self.pending = []
        if boundary and self.pending:
            out.append(self.pending)
            self.pending = []
        return out
