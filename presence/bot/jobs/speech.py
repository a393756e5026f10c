"""Words for the call: the acknowledgement said when jobs start, and a result as one short sentence.

Both are plain text for the TTS: no markdown, no lists, no symbols it would spell out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any

from presence.bot.jobs.types import JobRequest, JobResult, JobStatus, error_tag
from presence.bot.numbers import say_number

SNIPPET_WORDS = 25

_ACKS: dict[frozenset[str], str] = {
    frozenset({"search"}): "Let me look that up.",
    frozenset({"code"}): "Let me work that out.",
    frozenset({"think"}): "Let me think about that for a moment.",
    frozenset({"search", "code"}): "Let me look that up and work that out for you.",
    frozenset({"search", "think"}): "Let me look that up and think it through.",
    frozenset({"code", "think"}): "Let me work that out and think it through.",
    frozenset({"search", "code", "think"}): "Let me look into all of that for you.",
}
_NOUNS = {"search": "the search", "code": "the calculation", "think": "thinking that through"}


def acknowledgement(requests: Iterable[JobRequest | str]) -> str:
    """A short spoken acknowledgement for the jobs just dispatched ('' for none)."""
    kinds = frozenset(r if isinstance(r, str) else r.kind for r in requests)
    if not kinds:
        return ""
    return _ACKS.get(kinds & {"search", "code", "think"}) or "Let me work on that."


# ---------------------------------------------------------------------- results
def speakable(result: JobResult) -> str:
    """One or two short spoken sentences for a job's result (or its failure)."""
    if result.status is JobStatus.CANCELLED:
        return f"I stopped {_NOUNS.get(result.kind, 'that job')}."
    if not result.ok:
        return f"I couldn't finish {_NOUNS.get(result.kind, 'that job')}: {short_reason(result.error or '')}."
    value = result.value
    if isinstance(value, str):
        return _first_sentences(value, 2) or "That's done."
    if result.kind == "search":
        return _search(value)
    if result.kind == "code":
        return _code(value)
    if result.kind == "think":
        return _first_sentences(str(value.get("text", "")), 2) or "I have no good answer to that."
    return "That's done."


def short_reason(error: str) -> str:
    """'JobError: search: docs_dir '/x' is not a directory' -> 'docs_dir '/x' is not a directory'."""
    low = error.lower()
    if low.startswith(("timeout", "deadline")) or "timed out" in low:
        return "it took too long"
    if low.startswith("lost"):
        return "the job queue restarted"
    if error_tag(error) == "dead":  # exactly: "deadline ..." is no dead letter
        return "it kept failing"
    text = re.sub(r"^[A-Za-z_]*(?:Error|Exception)\s*:\s*", "", error)  # the exception type
    text = re.sub(r"^(?:search|code|think|web search)\s*:\s*", "", text)  # the kind's own prefix
    text = re.sub(r"\s*\(.*$", "", text)  # hints in parentheses are for operators
    words = text.split()
    text = " ".join(words[:12]).rstrip(".,;:")
    return text or "something went wrong"


def _search(value: dict[str, Any]) -> str:
    hits = value.get("hits") or []
    query = str(value.get("query", "")).strip()
    if not hits:
        return f"I couldn't find anything about {query} in the documents." if query else "I found nothing."
    best = hits[0]
    source = _source_name(best)
    snippet = _best_snippet(str(best.get("text") or best.get("snippet") or ""), query)
    if not snippet:
        return f"The best match is {source}, but it has no text I can read out."
    return f"According to {source}: {snippet}"


def _source_name(hit: dict[str, Any]) -> str:
    if hit.get("title"):
        return str(hit["title"])
    path = str(hit.get("path") or hit.get("url") or "the documents")
    stem = PurePath(path).stem if "/" in path or "." in path else path
    return re.sub(r"[-_]+", " ", stem).strip() or "the documents"


_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z0-9])")


def _plain(text: str) -> str:
    """Markdown to speakable text: links to their words, no emphasis marks or code ticks."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[*_`]{1,3}([^*_`]+)[*_`]{1,3}", r"\1", text)
    text = re.sub(r"^\s*(?:[-*+]|\d+[.)])\s+", "", text)  # a list marker
    return " ".join(text.split())


def _best_snippet(text: str, query: str) -> str:
    from presence.bot.jobs.search import tokenize  # light: the same stemming the index used

    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    sentences = [s for ln in lines for s in _SENTENCE_RE.split(_plain(ln)) if s.strip()]
    if not sentences:
        return ""
    terms = set(tokenize(query))
    scores = [len(terms & set(tokenize(s))) for s in sentences]
    best = max(range(len(sentences)), key=lambda i: (scores[i], -i))
    chosen = sentences[best]
    if len(chosen.split()) < 8 and best + 1 < len(sentences):  # a fragment: add the next one
        chosen = f"{chosen} {sentences[best + 1]}"
    return _trim(chosen, SNIPPET_WORDS)


def _trim(text: str, words: int) -> str:
    parts = text.split()
    if len(parts) <= words:
        out = " ".join(parts)
    else:
        out = " ".join(parts[:words]).rstrip(",;:-")
    return out if out.endswith((".", "!", "?")) else out + "."


def _code(value: dict[str, Any]) -> str:
    error = value.get("error")
    if error:
        return f"I couldn't work that out: {short_reason(str(error))}."
    lines = [ln.strip() for ln in str(value.get("stdout", "")).splitlines() if ln.strip()]
    if not lines:
        return "The code ran, but printed nothing."
    try:  # an exact integer of any size stays exact: factorial(200) is no "infinity"
        return f"That comes to {say_number(lines[-1])}."
    except ValueError:
        return f"The code printed: {_trim(lines[-1], SNIPPET_WORDS)}"


def _first_sentences(text: str, n: int) -> str:
    text = " ".join(_plain(ln) for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#"))
    sentences = [s for s in _SENTENCE_RE.split(text) if s.strip()]
    return _trim(" ".join(sentences[:n]), 60) if sentences else ""


__all__ = ["acknowledgement", "short_reason", "speakable"]
