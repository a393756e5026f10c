"""Simultaneous-interpretation metrics as pure functions (``presence bench interpret``).

Inputs are plain data on one clock, the bot's monotonic clock (``presence.clock.now``): ASR
words ``(text, start_s, end_s)`` of what the listener heard, the source utterance's onset and
offset (its voiced part as sent), and the ``interpretation_segment`` event dicts. Definitions
(shared/notes/benchmarks.md, "Simultaneous translation"):

- StartOffset = the first output word's start - the source onset; EndOffset = the last output
  word's end - the source offset.
- LAAL (Papi et al. 2022, SimulEval's length-adaptive average lagging) for speech output: d_i =
  the end of output word i - the source onset, |X| = the source's duration, tau = the first i
  with d_i >= |X| (else all words), LAAL = (1/tau) sum_{i<=tau} (d_i - (i-1) |X| / max(|Y|, |Y*|))
  with |Y| the output words and |Y*| the reference's.
- ASR-BLEU: sacrebleu's ``corpus_bleu`` (13a tokens) of the listener's transcripts against the
  references, both lower-cased and stripped of punctuation (:func:`normalise`) as ASR-BLEU
  usually is: whisper's punctuation and casing are not the interpreter's doing.
- Untranslated share: 1 - (source words a kept segment covered) / (source words), pooled over
  sentences; "covered" is :func:`covered`.
"""

from __future__ import annotations

import bisect
import difflib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from presence.bench.fdb.metrics import Word, percentile

SEGMENT_EVENT = "interpretation_segment"
TIME_TOLERANCE_S = 0.3  # a segment's source_start/end against the source ASR's word times
SIMILAR = 0.6  # difflib letter ratio from which two tokens are one word (see ``similar``)
VOICED_MARGIN_S = 0.5  # an output word this far from any received sound is whisper inventing it
FRAME_S = 0.02  # a received audio frame
SNAP_S = 0.1  # silence inside a word's whisper times that moves its start or end (not jitter)

# What the bench prints next to its figures.
TARGETS = {
    "end_offset_median_s": 2.5,  # at most
    "laal_median_s": 3.0,  # at most
    "bleu_es_en": 25.0,  # at least
    "bleu_vs_consecutive": -3.0,  # es-en, simultaneous - consecutive, at least
    "untranslated_share": 0.05,  # at most
}

_PUNCT = re.compile(r"[^\w'\s]+")
_SPACES = re.compile(r"\s+")


# ------------------------------------------------------------------------------ text
def normalise(text: str) -> str:
    """Lower case, no punctuation (apostrophes kept: "can't"), single spaces; accents kept."""
    text = unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'").lower()
    return _SPACES.sub(" ", _PUNCT.sub(" ", text)).strip()


def tokens(text: str) -> list[str]:
    """Words for matching one transcript against another: :func:`normalise`, accents folded."""
    folded = unicodedata.normalize("NFKD", normalise(text))
    return "".join(c for c in folded if not unicodedata.combining(c)).split()


def word_recall(reference: str, hypothesis: str) -> float | None:
    """The share of the reference's words that the hypothesis has, in order (``difflib``,
    accents and punctuation aside): how well whisper reads the bench's own voice back."""
    ref, hyp = tokens(reference), tokens(hypothesis)
    if not ref:
        return None
    blocks = difflib.SequenceMatcher(None, ref, hyp, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks) / len(ref)


def asr_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of transcripts against one reference each, both normalised."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError("one reference per hypothesis")
    if not hypotheses:
        return float("nan")
    hyps = [normalise(h) for h in hypotheses]
    refs = [normalise(r) for r in references]
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


# ------------------------------------------------------------------------------ timing
def voiced_words(
    words: Iterable[Word], voiced: Sequence[float], margin_s: float = VOICED_MARGIN_S
) -> list[Word]:
    """The words as heard. ``voiced``: the arrival times of the received frames that sounded,
    sorted (each stamps the end of a FRAME_S frame, as presence.caller.Recorder does).

    A word with no sound within ``margin_s`` of it is whisper inventing it in silence ("Thank
    you.") and goes; a word that whisper starts in silence (its first word of a window often
    begins at the window's start) starts at the first sound after that, and one it ends in
    silence ends at the last sound before (silence longer than SNAP_S: arrival jitter stays)."""
    kept = []
    for text, start, end in words:
        i = bisect.bisect_left(voiced, start - margin_s)
        if i == len(voiced) or voiced[i] > end + margin_s:
            continue
        after = bisect.bisect_left(voiced, start)  # the first frame that ends at or after start
        if after < len(voiced) and voiced[after] - FRAME_S > start + SNAP_S and voiced[after] < end:
            start = voiced[after] - FRAME_S
        before = bisect.bisect_right(voiced, end) - 1  # the last frame that ends by end
        silent_after = before + 1 == len(voiced) or voiced[before + 1] - FRAME_S > end
        if before >= 0 and start < voiced[before] < end - SNAP_S and silent_after:
            end = voiced[before]
        kept.append((text, start, end))
    return kept


def start_offset(words: Sequence[Word], source_start: float) -> float | None:
    return words[0][1] - source_start if words else None


def end_offset(words: Sequence[Word], source_end: float) -> float | None:
    return words[-1][2] - source_end if words else None


def laal(delays: Sequence[float], source_duration: float, reference_words: int) -> float | None:
    """Length-adaptive average lagging of output units emitted ``delays`` seconds after the
    source began (in order), for a source of ``source_duration`` s; None without output."""
    if not delays or source_duration <= 0:
        return None
    rate = source_duration / max(len(delays), reference_words)
    tau = next((i + 1 for i, d in enumerate(delays) if d >= source_duration), len(delays))
    return sum(d - i * rate for i, d in enumerate(delays[:tau])) / tau


def word_laal(words: Sequence[Word], source_start: float, source_end: float, reference: str) -> float | None:
    """LAAL of output words: each word's end, less the source onset, is its delay."""
    return laal([w[2] - source_start for w in words], source_end - source_start, len(tokens(reference)))


# ------------------------------------------------------------------------------ segments
def segment_key(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """One segment's identity: it is reported when queued and again if later dropped."""
    return tuple(
        event.get(k) for k in ("speaker", "target_language", "source_start", "source_end", "committed_at")
    )


def segments(
    events: Iterable[Mapping[str, Any]], source: str, target: str, since: float, until: float
) -> tuple[list[Mapping[str, Any]], int]:
    """The ``source`` -> ``target`` segments reported in [since, until): those kept (never
    dropped, each once, in source order) and how many were dropped."""
    seen: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    dropped: set[tuple[Any, ...]] = set()
    for e in events:
        if (
            e.get("name") != SEGMENT_EVENT
            or e.get("source_language") != source
            or e.get("target_language") != target
            or not since <= float(e.get("t", 0.0)) < until
        ):
            continue
        key = segment_key(e)
        seen.setdefault(key, e)
        if e.get("dropped"):
            dropped.add(key)
    kept = [e for k, e in seen.items() if k not in dropped]
    kept.sort(key=lambda e: (float(e.get("source_start") or 0.0), float(e.get("committed_at") or 0.0)))
    return kept, len(dropped)


def similar(a: str, b: str) -> bool:
    """Two tokens that are one word heard twice: equal, or alike in SIMILAR of their letters
    (difflib's ratio: "tiem"/"time" 0.75, "day"/"today" 0.75, "more"/"to" 0.33)."""
    return a == b or difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= SIMILAR


def align(said: Sequence[str], heard: Sequence[str]) -> set[int]:
    """Indices of ``said`` matched, in order, by a token of ``heard``: the alignment with the
    most matches (an equal token counts 1, a :func:`similar` one 0.75)."""
    n, m = len(said), len(heard)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]

    def pair(i: int, j: int) -> float:
        return 1.0 if said[i] == heard[j] else 0.75 if similar(said[i], heard[j]) else 0.0

    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            take = pair(i, j)
            score[i][j] = max(score[i + 1][j], score[i][j + 1], take + score[i + 1][j + 1] if take else 0.0)
    matched: set[int] = set()
    i = j = 0
    while i < n and j < m:
        take = pair(i, j)
        if take and score[i][j] == take + score[i + 1][j + 1]:
            matched.add(i)
            i, j = i + 1, j + 1
        elif score[i + 1][j] >= score[i][j + 1]:
            i += 1
        else:
            j += 1
    return matched


def covered(
    source: Sequence[Word], kept: Sequence[Mapping[str, Any]], tolerance_s: float = TIME_TOLERANCE_S
) -> list[bool]:
    """Which source words a kept segment covered. ``source``: the words as spoken (whisper's
    reading of the clip as sent, times on the bot clock).

    - by text, for segments that carry ``source_text``: their words, in source order, are
      aligned with the source words (:func:`align`: accents and punctuation aside, a word or an
      ASR variant of it); a source word with a match is covered;
    - by time, for every segment: a source word whose middle lies within [source_start -
      tolerance, source_end + tolerance] is covered: the interpreter read that audio and said
      something for it. (By text alone, a word the interpreter's ASR misheard would count as
      never interpreted: that is ASR-BLEU's to show, not this share's.)
    """
    said = [tokens(w[0]) for w in source]
    flat = [i for i, parts in enumerate(said) for _ in parts]  # each source token's word
    heard = [t for e in kept if e.get("source_text") for t in tokens(str(e["source_text"]))]
    done = [False] * len(source)
    for k in align([t for parts in said for t in parts], heard):
        done[flat[k]] = True
    spans = [
        (float(e["source_start"]) - tolerance_s, float(e["source_end"]) + tolerance_s)
        for e in kept
        if e.get("source_start") is not None and e.get("source_end") is not None
    ]
    for i, (_, start, end) in enumerate(source):
        middle = (start + end) / 2
        if any(a <= middle <= b for a, b in spans):
            done[i] = True
    return done


def count_covered(
    source: Sequence[Word], kept: Sequence[Mapping[str, Any]], tolerance_s: float = TIME_TOLERANCE_S
) -> tuple[int, int]:
    """(source words :func:`covered`, source words), punctuation-only "words" left out."""
    done = [d for d, w in zip(covered(source, kept, tolerance_s), source, strict=True) if tokens(w[0])]
    return sum(done), len(done)


def untranslated_share(
    source: Sequence[Word], kept: Sequence[Mapping[str, Any]], tolerance_s: float = TIME_TOLERANCE_S
) -> float | None:
    """1 - covered / source words (:func:`count_covered`); None for no source words."""
    done, total = count_covered(source, kept, tolerance_s)
    return 1.0 - done / total if total else None


# ------------------------------------------------------------------------------ summary
@dataclass
class Row:
    """One sentence's figures, as :func:`summarise` reads them."""

    policy: str
    direction: str
    reference: str
    heard: str
    start_offset_s: float | None
    end_offset_s: float | None
    laal_s: float | None
    source_words: int
    covered_words: int
    dropped: int
    source_recall: float | None = None  # :func:`word_recall` of whisper's reading of the source clip


def summarise(rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """Per "policy direction": medians and p95s, ASR-BLEU, the pooled untranslated share."""
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys((r.policy, r.direction) for r in rows):
        group = [r for r in rows if (r.policy, r.direction) == key]
        figures: dict[str, Any] = {"policy": key[0], "direction": key[1], "n": len(group)}
        figures["heard"] = sum(1 for r in group if r.end_offset_s is not None)
        for name in ("start_offset_s", "end_offset_s", "laal_s"):
            values = [v for r in group if (v := getattr(r, name)) is not None]
            figures[f"{name}_median"] = percentile(values, 50)
            figures[f"{name}_p95"] = percentile(values, 95)
        figures["bleu"] = asr_bleu([r.heard for r in group], [r.reference for r in group])
        words = sum(r.source_words for r in group)
        figures["untranslated_share"] = 1 - sum(r.covered_words for r in group) / words if words else None
        figures["dropped"] = sum(r.dropped for r in group)
        recalls = [v for r in group if (v := r.source_recall) is not None]
        figures["source_recall"] = sum(recalls) / len(recalls) if recalls else None
        out[f"{key[0]} {key[1]}"] = figures
    return out


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| policy | direction | n | heard | StartOffset med / p95 s | EndOffset med / p95 s (med <= 2.5) "
        "| LAAL med / p95 s (med <= 3.0) | ASR-BLEU | untranslated (<= 5 %) | dropped segments "
        "| source read back |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in summary.values():
        lines.append(
            f"| {f['policy']} | {f['direction']} | {f['n']} | {f['heard']} "
            f"| {_s(f['start_offset_s_median'])} / {_s(f['start_offset_s_p95'])} "
            f"| {_s(f['end_offset_s_median'])} / {_s(f['end_offset_s_p95'])} "
            f"| {_s(f['laal_s_median'])} / {_s(f['laal_s_p95'])} | {f['bleu']:.1f} "
            f"| {_pct(f['untranslated_share'], 1)} | {f['dropped']} | {_pct(f['source_recall'], 0)} |"
        )
    return "\n".join(lines)


def bleu_differences(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Per direction run under both policies: simultaneous BLEU - consecutive BLEU."""
    out = {}
    for f in summary.values():
        other = summary.get(f"consecutive {f['direction']}")
        if f["policy"] == "simultaneous" and other is not None:
            out[f["direction"]] = float(f["bleu"]) - float(other["bleu"])
    return out


def checks(summary: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, bool | None]]:
    """Each target against its figure: (what, met); met is None where there is no figure."""
    out: list[tuple[str, bool | None]] = []

    def check(what: str, value: float | None, limit: float, at_most: bool, unit: str = "") -> None:
        met = None if value is None or value != value else (value <= limit if at_most else value >= limit)
        shown = "-" if met is None else f"{value:.2f}{unit}"
        out.append((f"{what} {shown} {'<=' if at_most else '>='} {limit:g}{unit}", met))

    for name, f in summary.items():
        check(
            f"{name}: EndOffset median", f["end_offset_s_median"], TARGETS["end_offset_median_s"], True, " s"
        )
        check(f"{name}: LAAL median", f["laal_s_median"], TARGETS["laal_median_s"], True, " s")
        share = f["untranslated_share"]
        limit = 100 * TARGETS["untranslated_share"]
        check(f"{name}: untranslated %", None if share is None else 100 * share, limit, True)
        if f["direction"] == "es-en":
            check(f"{name}: ASR-BLEU", f["bleu"], TARGETS["bleu_es_en"], False)
    diff = bleu_differences(summary).get("es-en")
    if diff is not None:
        check("ASR-BLEU es-en simultaneous - consecutive", diff, TARGETS["bleu_vs_consecutive"], False)
    return out
