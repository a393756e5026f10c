"""Scores recorded samples: ASR words + Silero VAD segments -> per-sample and per-category metrics.

The scoring ASR is the bundled whisper tiny.en (faster-whisper, word timestamps); the published
FDB numbers used Parakeet/CrisperWhisper, so absolute TORs near the 1 s / 3-word thresholds can
differ. VAD segments use Silero with FDB's ``get_speech_timestamps`` defaults. Engineering
numbers (voice-to-voice, barge-in stop) use the output's raw energy instead: they ask for the
first and last audio sample, which Silero's padding would blur.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from presence.media.audio import read_wav
from presence.seams import VAD, Transcriber

from . import metrics as m
from .stimuli import RATE, SampleMeta, load_meta

log = logging.getLogger(__name__)

# Silero get_speech_timestamps defaults (what FDB calls).
VAD_THRESHOLD = 0.5
VAD_MIN_SPEECH_MS = 250
VAD_MIN_SILENCE_MS = 100
VAD_SPEECH_PAD_MS = 30
VAD_WINDOW = 512
# Energy activity of the bot's audio (engineering metrics).
ACTIVITY_FRAME_S = 0.01
ACTIVITY_DBFS = -50.0
ACTIVITY_GAP_S = 0.15  # shorter gaps are inside speech (stops, closures)
# After a non-interrupting overlap ends, how long a stop still counts as caused by it.
FALSE_STOP_WINDOW_S = 1.5
REPLY_CATEGORIES = frozenset({"turn_taking", "background", "interruption", "backchannel", "side_talk"})


def vad_segments(
    audio: np.ndarray,
    vad: VAD,
    threshold: float = VAD_THRESHOLD,
    min_speech_ms: int = VAD_MIN_SPEECH_MS,
    min_silence_ms: int = VAD_MIN_SILENCE_MS,
    speech_pad_ms: int = VAD_SPEECH_PAD_MS,
    decimals: int | None = 1,
) -> list[m.Segment]:
    """Silero's ``get_speech_timestamps`` (no max-speech split), 16 kHz, seconds.

    Speech starts at a window with p >= threshold and ends after ``min_silence_ms`` below
    threshold - 0.15; shorter than ``min_speech_ms`` is dropped; segments are padded by
    ``speech_pad_ms`` (half the gap when closer); seconds are rounded to ``decimals`` like
    ``return_seconds=True`` does.
    """
    vad.reset()
    window = VAD_WINDOW
    n = audio.size
    probs = []
    for start in range(0, n, window):
        chunk = audio[start : start + window]
        if chunk.size < window:
            chunk = np.pad(chunk, (0, window - chunk.size))
        probs.append(vad.probability(chunk.astype(np.float32)))
    neg = max(threshold - 0.15, 0.01)
    min_speech = RATE * min_speech_ms / 1000
    min_silence = RATE * min_silence_ms / 1000
    pad = int(RATE * speech_pad_ms / 1000)
    speeches: list[list[int]] = []
    triggered = False
    start_at = 0
    temp_end = 0
    for i, p in enumerate(probs):
        pos = window * i
        if p >= threshold and temp_end:
            temp_end = 0
        if p >= threshold and not triggered:
            triggered = True
            start_at = pos
            continue
        if p < neg and triggered:
            if not temp_end:
                temp_end = pos
            if pos - temp_end < min_silence:
                continue
            if temp_end - start_at > min_speech:
                speeches.append([start_at, temp_end])
            temp_end = 0
            triggered = False
    if triggered and n - start_at > min_speech:
        speeches.append([start_at, n])
    for i, sp in enumerate(speeches):
        if i == 0:
            sp[0] = max(0, sp[0] - pad)
        if i != len(speeches) - 1:
            silence = speeches[i + 1][0] - sp[1]
            if silence < 2 * pad:
                sp[1] += silence // 2
                speeches[i + 1][0] = max(0, speeches[i + 1][0] - silence // 2)
            else:
                sp[1] = min(n, sp[1] + pad)
                speeches[i + 1][0] = max(0, speeches[i + 1][0] - pad)
        else:
            sp[1] = min(n, sp[1] + pad)
    if decimals is None:
        return [(s / RATE, e / RATE) for s, e in speeches]
    return [(round(s / RATE, decimals), round(e / RATE, decimals)) for s, e in speeches]


def activity_segments(
    audio: np.ndarray, threshold_dbfs: float = ACTIVITY_DBFS, gap_s: float = ACTIVITY_GAP_S
) -> list[m.Segment]:
    """Where the audio has any sound (10 ms frames over ``threshold_dbfs``), merged across
    gaps up to ``gap_s``: the first and last bot audio the caller received."""
    frame = int(ACTIVITY_FRAME_S * RATE)
    k = audio.size // frame
    if k == 0:
        return []
    power = np.mean(np.square(audio[: k * frame].reshape(k, frame), dtype=np.float64), axis=1)
    loud = 10 * np.log10(power + 1e-12) > threshold_dbfs
    segments: list[m.Segment] = []
    idx = np.flatnonzero(loud)
    if idx.size == 0:
        return []
    run_start = prev = int(idx[0])
    for i in idx[1:]:
        if i != prev + 1:
            segments.append((run_start * ACTIVITY_FRAME_S, (prev + 1) * ACTIVITY_FRAME_S))
            run_start = int(i)
        prev = int(i)
    segments.append((run_start * ACTIVITY_FRAME_S, (prev + 1) * ACTIVITY_FRAME_S))
    return m.merge_segments(segments, gap_s)


def transcribe_words(asr: Transcriber, audio: np.ndarray, offset_s: float = 0.0) -> list[m.Word]:
    """Words with times on the timeline. Like FDB: the audio is cropped 0.5 s after its last
    non-silent sample (whisper loops on long silence); silence alone yields no words."""
    loud = np.flatnonzero(np.abs(audio) > 1e-3)
    if loud.size == 0:
        return []
    audio = audio[: min(audio.size, int(loud[-1]) + RATE // 2)]
    transcript = asr.transcribe(audio)
    return join_hyphenated(
        [(w, round(s + offset_s, 3), round(e + offset_s, 3)) for w, s, e in transcript.words]
    )


def join_hyphenated(words: Sequence[m.Word]) -> list[m.Word]:
    """Join pieces whisper splits off a hyphenated word ("M", "-H", "-M." -> "M-H-M."), so an
    "mm-hm" counts as the one word it is in the 3-word and 2-word rules."""
    out: list[m.Word] = []
    for text, start, end in words:
        if out and text.startswith("-"):
            prev = out[-1]
            out[-1] = (prev[0] + text, prev[1], end)
        else:
            out.append((text, start, end))
    return out


@dataclass
class SampleData:
    """What scoring one sample needs, loaded from its directory (or built in a test)."""

    meta: SampleMeta
    output: np.ndarray
    played: np.ndarray
    events: list[dict[str, Any]]
    injections: list[dict[str, Any]]
    error: str | None = None

    @classmethod
    def load(cls, sample_dir: Path) -> SampleData:
        meta = load_meta(sample_dir)
        output = read_wav(str(sample_dir / "output.wav"), RATE)[0]
        played_path = sample_dir / "played.wav"
        played = read_wav(str(played_path if played_path.is_file() else sample_dir / "input.wav"), RATE)[0]
        run = json.loads((sample_dir / "events.json").read_text())
        return cls(meta, output, played, run.get("events", []), run.get("injections", []), run.get("error"))


def score_sample(data: SampleData, asr: Transcriber, vad_factory: Callable[[], VAD]) -> dict[str, Any]:
    """All metrics of one sample as a JSON-able dict (None where a metric does not apply)."""
    meta = data.meta
    cat = meta.category
    duration = data.output.size / RATE
    vad = vad_factory()
    out_vad = vad_segments(data.output, vad)
    user_vad = vad_segments(data.played, vad)
    bot = activity_segments(data.output)
    injected = [r for r in data.injections if not r.get("missed") and "start" in r]
    interrupts = [r for r in injected if r.get("kind") == "interruption"]
    if cat == "interruption" and interrupts:
        cut = float(interrupts[0]["end"])
        words = transcribe_words(asr, data.output[int(cut * RATE) :], offset_s=cut)
    else:
        words = transcribe_words(asr, data.output)
    # Whisper starts a word after silence too early; the energy onset is the truth (a
    # deviation from FDB, whose ASR has the same bias: see snap_words).
    words = m.snap_words(words, bot)
    res: dict[str, Any] = {
        "id": meta.id,
        "category": cat,
        "error": data.error,
        "duration_s": round(duration, 3),
        "text": " ".join(w for w, _s, _e in words),
        "words": [list(w) for w in words],
        "output_vad": [list(s) for s in out_vad],
        "input_vad": [list(s) for s in user_vad],
        "bot_activity": [list(s) for s in bot],
        "injections": data.injections,
        "missed_injections": sum(1 for r in data.injections if r.get("missed")),
    }
    turn_end = meta.turn_end if meta.turn_end is not None else 0.0
    turn_start = meta.user_turns[0]["start"] if meta.user_turns else 0.0
    # --- FDB v1
    if cat == "pause":
        res["pause_tor"] = m.pause_tor(words)
    if cat in ("turn_taking", "background"):
        tt = m.turn_taking(words, turn_end)
        res.update(tor=tt.tor, latency_s=tt.latency, raw_latency_s=tt.raw_latency)
    if cat == "interruption":
        if interrupts:
            it = m.interruption(words, float(interrupts[0]["end"]))
            res.update(tor=it.tor, latency_s=it.latency, raw_latency_s=it.raw_latency)
        else:
            res.update(tor=None, latency_s=None, raw_latency_s=None, note="interruption not played")
    if cat == "monologue":
        bc = m.backchannel_v1(
            out_vad,
            words,
            duration,
            human=m.human_backchannel_reference([tuple(p) for p in meta.pauses], duration),
        )
        res.update(
            backchannel_tor=bc.tor,
            backchannel_freq=bc.frequency,
            backchannel_jsd=bc.jsd,
            backchannels=[list(s) for s in bc.backchannels],
            pause_tor=m.pause_tor(words),
        )
    # --- FDB v1.5 (every category: overlap and response of the merged VAD segments)
    res["stop_latencies_s"] = m.stop_latencies(user_vad, out_vad)
    res["response_latencies_s"] = m.response_latencies(user_vad, out_vad)
    # --- FD-Bench: the scripted user turn (a paused sentence or a monologue is one turn) and
    # real interruptions; backchannels and side talk are not turns.
    turns: list[m.Segment] = [(turn_start, turn_end)] if meta.user_turns else []
    reply = [cat in REPLY_CATEGORIES] if turns else []
    for r in interrupts:
        turns.append((float(r["start"]), float(r["end"])))
        reply.append(True)
    fd = m.fd_bench(turns, out_vad, reply_turns=reply)
    res["fd_bench"] = {
        "rounds": fd.rounds,
        "early_interrupts": fd.early_interrupts,
        "reply_rounds": fd.reply_rounds,
        "successful_replies": fd.successful_replies,
        "fsed_s": list(fd.fsed),
        "interrupts": fd.interrupts,
        "successful_interrupts": fd.successful_interrupts,
        "ird_s": list(fd.ird),
    }
    # --- engineering
    if cat in REPLY_CATEGORIES:
        sent = [
            float(e["t"])
            for e in data.events
            if e.get("name") == "bot_first_packet_sent" and float(e["t"]) >= turn_start
        ]
        res["voice_to_voice_s"] = m.voice_to_voice(
            turn_end, bot, user_start=turn_start, reply_sent_at=sent[0] if sent else None
        )
        res["breakdown_s"] = m.latency_breakdown(data.events, turn_end)
    res["barge_in_stop_s"] = [m.barge_in_stop(float(r["start"]), bot) for r in interrupts]
    res["barge_in_stopped_event"] = [
        m.stopped_for(data.events, float(r["start"]), float(r["end"]) + FALSE_STOP_WINDOW_S)
        for r in interrupts
    ]
    non_floor = [r for r in injected if r.get("kind") in ("backchannel", "side_talk")]
    res["false_barge_in"] = [
        m.stopped_for(data.events, float(r["start"]), float(r["end"]) + FALSE_STOP_WINDOW_S)
        for r in non_floor
    ]
    # Only overlaps that met the bot talking can make it stop.
    res["overlapped_bot"] = [m.barge_in_stop(float(r["start"]), bot) is not None for r in non_floor]
    if cat == "background" and meta.background:
        res["snr_db"] = meta.background.get("snr_db")
        window_end = float(meta.background.get("end", turn_end)) + 0.5
        res["false_barge_in"] = [m.stopped_for(data.events, turn_end, window_end)]
    if cat == "side_talk" and non_floor:
        # Did the bot answer the side talk? Its words after the side talk (FDB v1's turn-over
        # rule) are no answer by themselves: a bot that carries on with the reply the side talk
        # interrupted says words there too. An answer is a caller turn taken on the side talk
        # (end_of_turn_decided after it began) that was not then set aside as not addressed.
        start, after = float(non_floor[0]["start"]), float(non_floor[0]["end"])
        took = any(e.get("name") == "end_of_turn_decided" and float(e["t"]) >= start for e in data.events)
        skipped = any(e.get("name") == "not_addressed" and float(e["t"]) >= start for e in data.events)
        spoke = m.turn_over(m.words_after(words, after + 0.3))
        res["side_talk_response_tor"] = int(bool(spoke) and took and not skipped)
    return res


def _flat(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None]


def aggregate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-category and overall aggregates of :func:`score_sample` results."""
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_cat.setdefault(s["category"], []).append(s)
    cats: dict[str, Any] = {}
    for cat, rows in sorted(by_cat.items()):
        agg: dict[str, Any] = {"n": len(rows), "errors": sum(1 for r in rows if r.get("error"))}
        if cat == "pause":
            agg["pause_tor"] = m.mean([r["pause_tor"] for r in rows])
        if cat in ("turn_taking", "background", "interruption"):
            results = [
                m.TurnResult(int(r["tor"]), r["latency_s"], r.get("raw_latency_s"))
                for r in rows
                if r.get("tor") is not None
            ]
            agg.update({k: v for k, v in m.aggregate_turns(results).items() if k != "n"})
            agg["scored"] = len(results)
        if cat == "background":
            by_snr: dict[str, list[m.TurnResult]] = {}
            for r in rows:
                if r.get("tor") is None:
                    continue
                snr = str(r.get("snr_db", "?"))
                by_snr.setdefault(snr, []).append(m.TurnResult(int(r["tor"]), r["latency_s"], None))
            agg["by_snr"] = {k: m.aggregate_turns(v) for k, v in sorted(by_snr.items())}
        if cat == "monologue":
            results_bc = [
                m.BackchannelResult(
                    r["backchannel_tor"],
                    tuple(map(tuple, r["backchannels"])),
                    r["backchannel_freq"],
                    r["backchannel_jsd"],
                )
                for r in rows
            ]
            agg["backchannel"] = m.aggregate_backchannel(results_bc)
            agg["pause_tor"] = m.mean([r["pause_tor"] for r in rows])
        if cat == "side_talk":
            agg["side_talk_response_tor"] = m.mean(_flat([r.get("side_talk_response_tor") for r in rows]))
        agg["v15_stop_latency_s"] = m.summarize([x for r in rows for x in r["stop_latencies_s"]])
        agg["v15_response_latency_s"] = m.summarize([x for r in rows for x in r["response_latencies_s"]])
        agg["fd_bench"] = m.aggregate_fd_bench([_fd(r["fd_bench"]) for r in rows])
        v2v = _flat([r.get("voice_to_voice_s") for r in rows])
        if v2v:
            agg["voice_to_voice_s"] = m.summarize(v2v)
        stops = _flat([x for r in rows for x in r["barge_in_stop_s"]])
        if stops or any(r["barge_in_stop_s"] for r in rows):
            agg["barge_in_stop_s"] = m.summarize(stops)
            agg["barge_in_stopped"] = m.mean(
                [1 if x else 0 for r in rows for x in r["barge_in_stopped_event"]]
            )
        flags = [bool(f) for r in rows for f in r.get("false_barge_in", [])]
        if flags:
            agg["false_barge_in_rate"] = m.false_barge_in_rate(flags)
            agg["false_barge_in_n"] = len(flags)
        agg["missed_injections"] = sum(r["missed_injections"] for r in rows)
        agg["breakdown_s"] = _breakdown([r.get("breakdown_s") or {} for r in rows])
        cats[cat] = agg
    overall_v2v = _flat([r.get("voice_to_voice_s") for r in samples])
    overall_stop = _flat([x for r in samples for x in r["barge_in_stop_s"]])
    overall_false = [bool(f) for r in samples for f in r.get("false_barge_in", [])]
    return {
        "categories": cats,
        "overall": {
            "samples": len(samples),
            "voice_to_voice_s": m.summarize(overall_v2v),
            "barge_in_stop_s": m.summarize(overall_stop),
            "false_barge_in_rate": m.false_barge_in_rate(overall_false),
            "fd_bench": m.aggregate_fd_bench([_fd(r["fd_bench"]) for r in samples]),
            "breakdown_s": _breakdown([r.get("breakdown_s") or {} for r in samples]),
        },
    }


def _fd(d: dict[str, Any]) -> m.FDBenchResult:
    return m.FDBenchResult(
        d["rounds"],
        d["early_interrupts"],
        d["reply_rounds"],
        d["successful_replies"],
        tuple(d["fsed_s"]),
        d["interrupts"],
        d["successful_interrupts"],
        tuple(d["ird_s"]),
    )


def _breakdown(rows: Sequence[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in m.BREAKDOWN_EVENTS:
        values = [r[name] for r in rows if name in r]
        if values:
            out[name] = m.summarize(values)
    return out


class Scorer:
    """Holds the scoring models: whisper tiny.en and Silero (loaded on first use)."""

    def __init__(self, asr: Transcriber | None = None, vad_factory: Callable[[], VAD] | None = None) -> None:
        if asr is None:
            from presence.bot.backends.asr import WhisperTranscriber

            asr = WhisperTranscriber()
        if vad_factory is None:
            from presence.bot.backends.vad import SileroVAD

            vad_factory = SileroVAD
        self.asr = asr
        self.vad_factory = vad_factory

    def score_dir(self, sample_dir: Path) -> dict[str, Any]:
        data = SampleData.load(Path(sample_dir))
        result = score_sample(data, self.asr, self.vad_factory)
        (Path(sample_dir) / "score.json").write_text(json.dumps(result, indent=1, default=str))
        return result

    def score_dirs(
        self, dirs: Sequence[Path], progress: Callable[[int, int, str], None] | None = None
    ) -> list[dict[str, Any]]:
        out = []
        for i, d in enumerate(dirs):
            if not (Path(d) / "events.json").is_file():
                log.warning("%s has no run; skipped", d)
                continue
            out.append(self.score_dir(Path(d)))
            if progress is not None:
                progress(i + 1, len(dirs), Path(d).name)
        return out
