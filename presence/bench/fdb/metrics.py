"""Full-Duplex-Bench (v1, v1.5), FD-Bench and engineering metrics as pure functions.

Everything here works on plain data: ASR words ``(text, start_s, end_s)``, speech segments
``(start_s, end_s)``, user turn boundaries and event dicts ``{"name", "t"}``, all in seconds on one
timeline (0 = the first input sample sent). No audio, no models: the scorer produces the inputs.

The definitions follow shared/notes/benchmarks.md; where the published scripts differ from the
written definition in a detail, the docstring says which one is implemented and why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Word = tuple[str, float, float]
Segment = tuple[float, float]

# FDB v1 turn-over rule: output shorter than this with at most TURN_MAX_WORDS words is not a turn.
TURN_MIN_DURATION_S = 1.0
TURN_MAX_WORDS = 3
# FDB v1 backchannel rule.
BC_TURN_SEGMENT_S = 3.0  # a VAD segment longer than this is a turn
BC_MAX_DURATION_S = 1.0  # a backchannel is shorter than this...
BC_MAX_WORDS = 2  # ...and has at most this many words
BC_TURN_WORDS = 3  # more overlapping words than this make a segment a turn
BC_BIN_S = 0.2  # JSD histogram bin
BC_EPSILON = 1e-10
# FDB v1.5 merge gaps.
V15_USER_GAP_S = 0.6
V15_SYSTEM_GAP_S = 0.5
# FD-Bench: a start earlier than this before the user's end is an early interrupt.
FDBENCH_EARLY_S = 0.5

# No aggregate human backchannel-timing distribution has been published that we can ship: FDB
# v1 compares with per-sample ICC ground truth (icc_gt_distribution.json), which is not available
# offline. The default is therefore the uninformative uniform distribution (one bin, stretched
# to the output's length by the same interpolation FDB applies); pass a per-sample reference
# (see ``human_backchannel_reference``) for a meaningful JSD.
DEFAULT_HUMAN_BACKCHANNEL_DIST: tuple[float, ...] = (1.0, 1.0)


# ------------------------------------------------------------------------------ helpers


def merge_segments(segments: Iterable[Segment], gap_s: float) -> list[Segment]:
    """Sort and merge segments separated by at most ``gap_s`` seconds."""
    merged: list[list[float]] = []
    for start, end in sorted((float(s), float(e)) for s, e in segments):
        if end < start:
            continue
        if merged and start - merged[-1][1] <= gap_s:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear) or None for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def mean(values: Sequence[float | int]) -> float | None:
    return float(sum(values) / len(values)) if len(values) else None


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def words_after(words: Sequence[Word], t: float) -> list[Word]:
    """Words that start at or after ``t`` (what an ASR of the audio cropped at ``t`` would see)."""
    return [w for w in words if w[1] >= t]


# ------------------------------------------------------------------------------ FDB v1


def turn_over(words: Sequence[Word]) -> int:
    """FDB v1 turn-over rule: 1 when the output words form a turn, else 0.

    No words -> 0; (last word end - first word start) < 1 s with <= 3 words -> 0 (a
    backchannel or noise); anything else -> 1.
    """
    if not words:
        return 0
    duration = words[-1][2] - words[0][1]
    if duration < TURN_MIN_DURATION_S and len(words) <= TURN_MAX_WORDS:
        return 0
    return 1


def pause_tor(words: Sequence[Word]) -> int:
    """Pause handling: the turn-over rule over the whole output (lower is better)."""
    return turn_over(words)


@dataclass(frozen=True, slots=True)
class TurnResult:
    """One sample's turn-over (0/1) and, when it took the turn, its clipped latency."""

    tor: int
    latency: float | None  # seconds, negative clipped to 0; None when tor == 0
    raw_latency: float | None  # unclipped (negative = started before the reference)


def turn_taking(words: Sequence[Word], user_end: float) -> TurnResult:
    """Smooth turn-taking: TOR of the output and latency = first word start - user turn end.

    Negative latency (answering before the user finished) is clipped to 0, as FDB does; that
    is why pause TOR must always be reported next to it.
    """
    tor = turn_over(words)
    if not tor:
        return TurnResult(0, None, None)
    raw = words[0][1] - user_end
    return TurnResult(1, max(0.0, raw), raw)


def interruption(words: Sequence[Word], interrupt_end: float) -> TurnResult:
    """User interruption: TOR on the output after the interruption ends, and its latency.

    FDB transcribes the output cropped at the interruption end; words starting earlier are
    dropped here for the same effect when the words come from the whole output.
    """
    return turn_taking(words_after(words, interrupt_end), interrupt_end)


def aggregate_turns(results: Sequence[TurnResult]) -> dict[str, float | int | None]:
    """TOR = mean over samples; latency = mean over the samples with TOR = 1 (FDB v1)."""
    lat = [r.latency for r in results if r.tor and r.latency is not None]
    return {
        "n": len(results),
        "tor": mean([r.tor for r in results]),
        "latency_s": mean(lat),
        "latency_p50_s": percentile(lat, 50),
    }


def _segment_words(words: Sequence[Word], start: float, end: float) -> list[Word]:
    # FDB's overlap test: inside, straddling the end, or straddling the start.
    out = []
    for w in words:
        ws, we = w[1], w[2]
        if (ws >= start and we <= end) or (ws <= end and we > end) or (ws <= start and we > start):
            out.append(w)
    return out


@dataclass(frozen=True, slots=True)
class BackchannelResult:
    tor: int
    backchannels: tuple[Segment, ...]
    frequency: float  # backchannels per second of output
    jsd: float


def backchannel_histogram(backchannels: Sequence[Segment], duration_s: float) -> np.ndarray:
    """FDB's 0.2 s-binned backchannel timing histogram (+epsilon, normalised)."""
    bins = np.zeros(int(duration_s / BC_BIN_S) + 1, dtype=float)
    for start, end in backchannels:
        first, last = int(start / BC_BIN_S), int(end / BC_BIN_S)
        bins[first : min(last, bins.size - 1) + 1] += 1
    bins = bins + BC_EPSILON
    return bins / bins.sum()


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon distance, natural log (what scipy's ``jensenshannon`` returns and FDB
    reports as "JSD"): sqrt of the divergence; inputs are normalised first."""
    a = np.asarray(p, dtype=float)
    b = np.asarray(q, dtype=float)
    a = a / a.sum()
    b = b / b.sum()
    m = (a + b) / 2

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float(np.sum(x[mask] * np.log(x[mask] / m[mask])))

    return math.sqrt(max(0.0, (kl(a) + kl(b)) / 2))


def _resize(reference: Sequence[float], n: int) -> np.ndarray:
    # FDB: linear interpolation of the reference onto the prediction's bin count.
    ref = np.asarray(reference, dtype=float)
    if ref.size == 1:
        return np.full(n, ref[0])
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, ref.size), ref)


def backchannel_v1(
    segments: Sequence[Segment],
    words: Sequence[Word],
    duration_s: float,
    human: Sequence[float] | None = None,
) -> BackchannelResult:
    """FDB v1 backchannel metrics of one output (the system listening to a long user turn).

    Each Silero VAD segment of the output: longer than 3 s -> a turn; otherwise its overlapping
    words are counted: more than 3 -> a turn; shorter than 1 s with <= 2 words -> a backchannel;
    anything else -> a turn. TOR = 1 when any segment is a turn (the written definition; FDB's
    script overwrites TOR per segment, so its last short segment wins, which we do not copy).
    Frequency = backchannels / output seconds. JSD: Jensen-Shannon distance between the 0.2 s
    backchannel histogram and ``human`` (default: DEFAULT_HUMAN_BACKCHANNEL_DIST); 1 when there
    is no backchannel.
    """
    tor = 0
    backchannels: list[Segment] = []
    for start, end in segments:
        duration = end - start
        if duration > BC_TURN_SEGMENT_S:
            tor = 1
            break
        n_words = len(_segment_words(words, start, end))
        if n_words > BC_TURN_WORDS or duration >= BC_MAX_DURATION_S or n_words > BC_MAX_WORDS:
            tor = 1
            continue
        backchannels.append((start, end))
    frequency = len(backchannels) / duration_s if duration_s > 0 else 0.0
    if not backchannels:
        jsd = 1.0
    else:
        hist = backchannel_histogram(backchannels, duration_s)
        reference = _resize(human if human is not None else DEFAULT_HUMAN_BACKCHANNEL_DIST, hist.size)
        jsd = js_distance(hist, np.clip(reference, 0.0, None) + BC_EPSILON)
    return BackchannelResult(tor, tuple(backchannels), frequency, jsd)


def human_backchannel_reference(
    pauses: Sequence[Segment], duration_s: float, delay_s: float = 0.3, width_s: float = 0.4
) -> list[float]:
    """A stand-in per-sample human reference: listeners backchannel shortly into the speaker's
    pauses (Ward & Tsukahara 2000). Mass ``delay_s`` .. ``delay_s + width_s`` after each pause
    start, 0.2 s bins. Not the ICC ground truth FDB uses."""
    bins = np.zeros(int(duration_s / BC_BIN_S) + 1, dtype=float)
    for start, end in pauses:
        lo = start + delay_s
        hi = min(end, lo + width_s)
        if hi <= lo:
            hi = lo + BC_BIN_S
        bins[int(lo / BC_BIN_S) : min(int(hi / BC_BIN_S), bins.size - 1) + 1] += 1
    if not bins.any():
        bins[:] = 1.0
    return list(bins / bins.sum())


def aggregate_backchannel(results: Sequence[BackchannelResult]) -> dict[str, float | int | None]:
    return {
        "n": len(results),
        "tor": mean([r.tor for r in results]),
        "frequency": mean([r.frequency for r in results]),
        "jsd": mean([r.jsd for r in results]),
    }


# ------------------------------------------------------------------------------ FDB v1.5


def stop_latencies(
    user_segments: Sequence[Segment],
    system_segments: Sequence[Segment],
    user_gap_s: float = V15_USER_GAP_S,
    system_gap_s: float = V15_SYSTEM_GAP_S,
) -> list[float]:
    """FDB v1.5 stop latency: the duration of each user-and-system overlap, after merging user
    segments across gaps <= 0.6 s and system segments across gaps <= 0.5 s."""
    users = merge_segments(user_segments, user_gap_s)
    systems = merge_segments(system_segments, system_gap_s)
    out = []
    for us, ue in users:
        for ss, se in systems:
            overlap = min(ue, se) - max(us, ss)
            if overlap > 0:
                out.append(overlap)
    return out


def response_latencies(
    user_segments: Sequence[Segment],
    system_segments: Sequence[Segment],
    user_gap_s: float = V15_USER_GAP_S,
    system_gap_s: float = V15_SYSTEM_GAP_S,
) -> list[float]:
    """FDB v1.5 response latency: each merged user segment's end -> the start of the next
    merged system segment (user segments with no later system segment give none)."""
    users = merge_segments(user_segments, user_gap_s)
    systems = merge_segments(system_segments, system_gap_s)
    out = []
    for _us, ue in users:
        nxt = next((ss for ss, _se in systems if ss >= ue), None)
        if nxt is not None:
            out.append(nxt - ue)
    return out


# ------------------------------------------------------------------------------ FD-Bench


@dataclass(frozen=True, slots=True)
class FDBenchResult:
    rounds: int  # user turns (EIR denominator)
    early_interrupts: int
    reply_rounds: int  # user turns that expect a reply inside the recording (SRR denominator)
    successful_replies: int
    fsed: tuple[float, ...]  # first-speech emitting delay of each successful reply
    interrupts: int
    successful_interrupts: int
    ird: tuple[float, ...]  # interrupt response delay of each successful interruption

    @property
    def eir(self) -> float | None:
        return self.early_interrupts / self.rounds if self.rounds else None

    @property
    def srr(self) -> float | None:
        return self.successful_replies / self.reply_rounds if self.reply_rounds else None

    @property
    def sir(self) -> float | None:
        return self.successful_interrupts / self.interrupts if self.interrupts else None


def fd_bench(
    user_turns: Sequence[Segment],
    system_segments: Sequence[Segment],
    early_s: float = FDBENCH_EARLY_S,
    reply_turns: Sequence[bool] | None = None,
) -> FDBenchResult:
    """FD-Bench counts for one session.

    Per user turn (a round):
    * EI: a system segment starts more than 0.5 s before the user's end (inside the turn).
    * SR: a system segment starts within the last 0.5 s of the turn or after it, before the
      next user turn; FSED = that start - user end. Only turns with ``reply_turns[i]`` True
      (default all) count here: a stimulus that ends with the user's turn has no room for one.
    * user interrupt: the user turn starts inside a system segment; SI when that system
      segment ends before the user turn does; IRD = system end - user start.
    """
    turns = sorted((float(s), float(e)) for s, e in user_turns)
    systems = sorted((float(s), float(e)) for s, e in system_segments)
    flags = list(reply_turns) if reply_turns is not None else [True] * len(turns)
    ei = reply_rounds = sr = interrupts = si = 0
    fsed: list[float] = []
    ird: list[float] = []
    for i, (us, ue) in enumerate(turns):
        nxt = turns[i + 1][0] if i + 1 < len(turns) else math.inf
        active = next(((ss, se) for ss, se in systems if ss < us < se), None)
        if active is not None:
            interrupts += 1
            if active[1] < ue:
                si += 1
                ird.append(active[1] - us)
        early = any(us < ss < ue - early_s for ss, _se in systems)
        ei += early
        if not flags[i]:
            continue
        reply_rounds += 1
        if early:
            continue
        start = next((ss for ss, _se in systems if ue - early_s <= ss < nxt), None)
        if start is not None:
            sr += 1
            fsed.append(start - ue)
    return FDBenchResult(len(turns), ei, reply_rounds, sr, tuple(fsed), interrupts, si, tuple(ird))


def aggregate_fd_bench(results: Sequence[FDBenchResult]) -> dict[str, float | int | None]:
    """Pooled rates and medians (FD-Bench reports medians of FSED and IRD)."""
    rounds = sum(r.rounds for r in results)
    reply_rounds = sum(r.reply_rounds for r in results)
    interrupts = sum(r.interrupts for r in results)
    fsed = [x for r in results for x in r.fsed]
    ird = [x for r in results for x in r.ird]
    return {
        "rounds": rounds,
        "eir": sum(r.early_interrupts for r in results) / rounds if rounds else None,
        "reply_rounds": reply_rounds,
        "srr": sum(r.successful_replies for r in results) / reply_rounds if reply_rounds else None,
        "fsed_median_s": median(fsed),
        "interrupts": interrupts,
        "sir": sum(r.successful_interrupts for r in results) / interrupts if interrupts else None,
        "ird_median_s": median(ird),
    }


# ------------------------------------------------------------------------------ engineering


def voice_to_voice(
    user_end: float,
    bot_segments: Sequence[Segment],
    user_start: float = -math.inf,
    reply_sent_at: float | None = None,
) -> float | None:
    """End of the caller's speech -> first bot audio the caller received.

    The first bot segment that starts after ``user_start`` counts, so a bot that talks over the
    end of the turn gets a negative value (not clipped: this is an engineering number). When
    the bot said when it sent the reply's first packet (``reply_sent_at``), segments that
    began before it (a backchannel, say) are skipped: the reply cannot arrive before it left.
    None when the bot never spoke.
    """
    floor = user_start if reply_sent_at is None else max(user_start, reply_sent_at - 0.02)
    start = next(
        (s for s, e in sorted(bot_segments) if s >= floor or (reply_sent_at is not None and e > floor)), None
    )
    if start is None:
        return None
    return max(start, floor) - user_end if reply_sent_at is not None else start - user_end


WORD_TAIL_S = 0.1  # how far past the audio's end a snapped word may still reach


def snap_words(words: Sequence[Word], activity: Sequence[Segment]) -> list[Word]:
    """Move word edges that fall in silence onto the audio inside the word.

    Whisper's cross-attention alignment often starts the first word after a silence at the
    start of the window, and stretches the last word before a silence far into it ("I heard
    you." spoken in 0.4 s scored as a 1.7 s turn); the audio's onset and offset are the truth.
    A word with no audio at all inside its span is left as it is.
    """
    spans = sorted(activity)
    out: list[Word] = []
    for text, start, end in words:
        if not any(s <= start < e for s, e in spans):
            onset = next((s for s, _e in spans if start < s < end), None)
            if onset is not None:
                start = onset
        # The last audio that began before the word ends; a soft tail may sit just past it.
        tail = max((e for s, e in spans if s < end), default=None)
        if tail is not None and start <= tail + WORD_TAIL_S < end:
            end = round(tail + WORD_TAIL_S, 3)
        out.append((text, start, end))
    return out


def barge_in_stop(onset: float, bot_segments: Sequence[Segment]) -> float | None:
    """Caller starts over the bot -> last bot audio sample received (end of the bot segment
    that was playing at the onset). None when the bot was not speaking at the onset."""
    for start, end in sorted(bot_segments):
        if start <= onset < end:
            return end - onset
    return None


FLOOR_LOST_EVENTS = ("barge_in_detected", "playback_flushed")


def stopped_for(events: Sequence[Mapping[str, object]], start: float, end: float) -> bool:
    """Whether the bot gave the floor up (a barge-in or a flush) between ``start`` and
    ``end`` (seconds on the timeline): for a backchannel, side talk or noise that is a false
    barge-in."""
    for event in events:
        t = event.get("t")
        if event.get("name") in FLOOR_LOST_EVENTS and isinstance(t, int | float) and start <= t <= end:
            return True
    return False


def false_barge_in_rate(flags: Sequence[bool]) -> float | None:
    """Share of non-interrupting overlaps (backchannel, side talk, noise) the bot stopped for."""
    return mean([1 if f else 0 for f in flags])


BREAKDOWN_EVENTS = (
    "caller_speech_end",
    "asr_final",
    "end_of_turn_decided",
    "responder_first_token",
    "tts_first_audio",
    "bot_first_packet_sent",
)


def latency_breakdown(
    events: Sequence[Mapping[str, object]], user_end: float, window_s: float = 10.0
) -> dict[str, float]:
    """Seconds from the user's (scripted) speech end to the first of each of the bot's own
    pipeline events after it (``caller_speech_end`` may precede it slightly: the bot's VAD),
    looked for within ``window_s``. Missing events are left out."""
    out: dict[str, float] = {}
    for name in BREAKDOWN_EVENTS:
        lo = user_end - 1.0 if name == "caller_speech_end" else user_end - 0.5
        times = sorted(
            float(e["t"])  # type: ignore[arg-type]
            for e in events
            if e.get("name") == name
            and isinstance(e.get("t"), int | float)
            and lo <= float(e["t"]) <= user_end + window_s  # type: ignore[arg-type]
        )
        if times:
            out[name] = times[0] - user_end
    return out


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, p50 and p95 of a list of seconds."""
    return {
        "n": len(values),
        "mean": mean(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
    }
