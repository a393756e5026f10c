"""``presence bench interpret``'s metrics on hand-computed cases, its corpus, and its Spanish
voice read back by the interpreter's whisper (real models)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from conftest import need

from presence.bench.interpret_corpus import CORPUS, WARMUP, pairs
from presence.bench.interpret_metrics import (
    Row,
    asr_bleu,
    bleu_differences,
    checks,
    count_covered,
    end_offset,
    laal,
    normalise,
    segments,
    start_offset,
    summarise,
    table,
    tokens,
    untranslated_share,
    voiced_words,
    word_laal,
    word_recall,
)


# ------------------------------------------------------------------------------ timing
def test_laal_matches_the_hand_computed_value() -> None:
    # |X| = 4 s; delays 1, 2, 3, 5, 6 s; tau = 4 (the first delay >= 4 s).
    # |Y| = 5 > |Y*| = 4: rate 4/5 -> (1 + (2 - .8) + (3 - 1.6) + (5 - 2.4)) / 4 = 6.2 / 4
    assert laal([1, 2, 3, 5, 6], 4.0, 4) == pytest.approx(1.55)
    # a longer reference (8 words) wins the max: rate 4/8 -> (1 + 1.5 + 2 + 3.5) / 4 = 2.0
    assert laal([1, 2, 3, 5, 6], 4.0, 8) == pytest.approx(2.0)
    # no output word reaches |X|: tau = every word; rate 10/2 -> (1 + (2 - 5)) / 2
    assert laal([1, 2], 10.0, 2) == pytest.approx(-1.0)
    assert laal([], 4.0, 4) is None


def test_offsets_and_word_laal_take_the_output_words_on_the_source_clock() -> None:
    words = [("uno", 10.5, 11.0), ("dos", 11.2, 12.0), ("tres", 12.5, 13.0), ("cuatro", 14.2, 15.0)]
    words.append(("cinco", 15.5, 16.0))
    assert start_offset(words, 10.0) == pytest.approx(0.5)
    assert end_offset(words, 14.0) == pytest.approx(2.0)
    assert start_offset([], 10.0) is None and end_offset([], 14.0) is None
    # word ends - onset = 1, 2, 3, 5, 6 s over a 4 s source, a 4-word reference: 1.55 as above
    assert word_laal(words, 10.0, 14.0, "One, two, three... four!") == pytest.approx(1.55)


def test_words_far_from_any_received_sound_are_whisper_inventing_them() -> None:
    voiced = [10.0, 10.02, 10.04, 12.0]
    words = [("hello", 10.0, 10.3), ("there", 11.6, 11.9), ("thanks", 14.0, 14.5)]
    assert [w for w, _, _ in voiced_words(words, voiced)] == ["hello", "there"]
    assert voiced_words(words, []) == []
    # whisper starts and ends a word in the silence around its sound: the sound's edges count
    sound = [round(10.72 + 0.02 * k, 2) for k in range(10)]  # frames ending 10.72 .. 10.90
    assert voiced_words([("late", 10.3, 11.2)], sound) == [("late", pytest.approx(10.7), 10.9)]
    assert voiced_words([("late", 10.65, 10.95)], sound) == [("late", 10.65, 10.95)]  # within SNAP_S


# ------------------------------------------------------------------------------ text
def test_text_normalisation_keeps_words_and_accents_but_not_case_or_punctuation() -> None:
    assert normalise("¿Me oyes BIEN, Ana?  I can’t.") == "me oyes bien ana i can't"
    assert tokens("Está en la reunión.") == ["esta", "en", "la", "reunion"]


def test_asr_bleu_is_100_for_identical_text_and_ignores_case_and_punctuation() -> None:
    refs = ["The meeting starts after lunch.", "Can you share your screen?"]
    assert asr_bleu(refs, refs) == pytest.approx(100.0)
    assert asr_bleu(["the meeting starts after lunch", "can you share your screen"], refs) == pytest.approx(
        100.0
    )
    assert asr_bleu(["banana", "orange apple"], refs) < 5.0
    with pytest.raises(ValueError):
        asr_bleu(["one"], [])


def test_word_recall_counts_the_reference_words_heard_in_order() -> None:
    assert word_recall("Necesito el informe antes del viernes.", "necesito informar antes de el viernes") == (
        pytest.approx(3 / 6)
    )
    assert word_recall("", "anything") is None


# ------------------------------------------------------------------------------ segments
def _segment(
    t: float, start: float, end: float, source_text: str, dropped: object = False
) -> dict[str, object]:
    return {
        "name": "interpretation_segment",
        "t": t,
        "speaker": "speaker-en",
        "source_language": "en",
        "target_language": "es",
        "source_text": source_text,
        "text": "...",
        "source_start": start,
        "source_end": end,
        "committed_at": t - 0.1,
        "dropped": dropped,
    }


def test_segments_are_counted_once_and_a_later_drop_takes_one_out() -> None:
    first, second = _segment(11.0, 10.0, 10.6, "we need"), _segment(12.0, 10.7, 11.4, "more time")
    shed = {**second, "t": 12.5, "dropped": "behind"}  # queued, then shed: the same segment
    stale = _segment(13.0, 11.5, 12.0, "today", dropped="stale")
    other = {**_segment(12.0, 10.0, 11.0, "no"), "target_language": "fr"}
    late = _segment(30.0, 20.0, 21.0, "next sentence")
    events = [first, {"name": "caption", "t": 11.5}, second, shed, stale, other, late, dict(first)]
    kept, dropped = segments(events, "en", "es", since=10.0, until=20.0)
    assert [e["source_text"] for e in kept] == ["we need"]
    assert dropped == 2


def test_untranslated_share_by_the_kept_segments_source_text() -> None:
    source = [
        ("We", 10.0, 10.2),
        ("need", 10.2, 10.5),
        ("more", 10.7, 11.0),
        ("time,", 11.0, 11.4),
        ("–", 11.4, 11.4),  # punctuation alone is no word
        ("today.", 11.5, 12.0),
    ]
    kept = [_segment(11.0, 10.0, 10.5, "We need"), _segment(12.0, 11.5, 12.0, "to day")]
    # "we need" equal; "today" heard as "to day" ("day" is alike); "more time" never said
    assert count_covered(source, kept, tolerance_s=0.0) == (3, 5)
    assert untranslated_share(source, kept, tolerance_s=0.0) == pytest.approx(2 / 5)
    # within 0.3 s of a segment's source span, "time," (middle 11.2) was read too: covered
    assert count_covered(source, kept) == (4, 5)
    assert untranslated_share(source, []) == pytest.approx(1.0)
    assert untranslated_share([], kept) is None
    # an ASR variant of a word ("tiem") still covers it; a skipped word does not
    variant = [_segment(11.0, 10.0, 11.4, "we need more tiem"), _segment(12.0, 11.5, 12.0, "")]
    assert count_covered(source[:4], variant[:1]) == (4, 4)
    assert count_covered(source[:4], [_segment(11.0, 10.0, 10.1, "we more time")], tolerance_s=0.0) == (3, 4)


def test_untranslated_share_by_time_for_speech_translated_segments() -> None:
    # Spanish speech translated to English by whisper: no source text, the source span counts.
    source = [("mañana", 10.0, 10.5), ("no", 10.6, 10.8), ("puedo", 10.9, 11.3), ("venir", 11.3, 11.8)]
    kept = [{**_segment(12.0, 9.9, 11.0, ""), "source_language": "es", "target_language": "en"}]
    # middles 10.25, 10.7 and 11.1 lie in [9.6, 11.3]; 11.55 does not; 11.1 is past 11.0
    assert count_covered(source, kept) == (3, 4)
    assert count_covered(source, kept, tolerance_s=0.0) == (2, 4)


# ------------------------------------------------------------------------------ summary
def _row(policy: str, direction: str, heard: str, end: float | None, covered: int = 4) -> Row:
    return Row(
        policy=policy,
        direction=direction,
        reference="I can't come to the office tomorrow.",
        heard=heard,
        start_offset_s=None if end is None else end - 2.0,
        end_offset_s=end,
        laal_s=None if end is None else end + 0.5,
        source_words=4,
        covered_words=covered,
        dropped=1,
        source_recall=1.0,
    )


def test_summary_table_and_targets() -> None:
    rows = [
        _row("simultaneous", "es-en", "I can't come to the office tomorrow.", 1.0),
        _row("simultaneous", "es-en", "", None, covered=0),
        _row("consecutive", "es-en", "I can't come to the office tomorrow.", 3.0),
        _row("consecutive", "es-en", "I can't come to the office tomorrow.", 4.0),
    ]
    summary = summarise(rows)
    simultaneous, consecutive = summary["simultaneous es-en"], summary["consecutive es-en"]
    assert (simultaneous["n"], simultaneous["heard"], simultaneous["dropped"]) == (2, 1, 2)
    assert simultaneous["untranslated_share"] == pytest.approx(0.5)
    assert consecutive["end_offset_s_median"] == pytest.approx(3.5)
    assert consecutive["bleu"] == pytest.approx(100.0)
    assert bleu_differences(summary)["es-en"] < -3.0
    verdicts = dict(checks(summary))
    assert verdicts["simultaneous es-en: EndOffset median 1.00 s <= 2.5 s"] is True
    assert verdicts["consecutive es-en: EndOffset median 3.50 s <= 2.5 s"] is False
    assert verdicts["simultaneous es-en: untranslated % 50.00 <= 5"] is False
    assert any(
        what.startswith("ASR-BLEU es-en simultaneous - consecutive") and met is False
        for what, met in verdicts.items()
    )
    text = table(summary)
    assert "| simultaneous | es-en | 2 | 1 |" in text and "50.0 %" in text


# ------------------------------------------------------------------------------ corpus
@pytest.mark.parametrize("direction", ["en-es", "es-en"])
def test_the_corpus_has_thirty_pairs_a_direction_a_third_of_them_long(direction: str) -> None:
    source, target = direction.split("-")
    corpus = CORPUS[direction]
    assert len(corpus) >= 30
    assert 3 * sum(p.long for p in corpus) >= len(corpus)
    assert len({p.source for p in corpus}) == len(corpus)
    for pair in corpus:
        assert (pair.source_language, pair.target_language, pair.direction) == (source, target, direction)
        assert pair.reference.strip() and pair.source.strip()
        assert not re.search(r"\d", pair.source + pair.reference), pair  # whisper writes digits at whim
        if pair.long:
            assert 15 <= pair.words <= 30 and "," in pair.source
    chosen = pairs(direction)
    assert sorted(p.source for p in chosen) == sorted(p.source for p in corpus)
    assert [p.long for p in chosen[:6]] == [False, False, True, False, False, True]  # mixed
    assert len(pairs(direction, limit=5)) == 5
    assert WARMUP[source] not in {p.source for p in corpus}
    with pytest.raises(ValueError):
        pairs("fr-en")


# ------------------------------------------------------------------------------ real models
def test_a_spanish_sentence_in_espeak_is_read_back_by_the_interpreters_whisper() -> None:
    need(shutil.which("espeak-ng") is not None, "espeak-ng (apt-get install espeak-ng) speaks Spanish")
    from presence.bench.interpret import as_16k
    from presence.bench.interpret_corpus import clips, transcriber

    pair = next(p for p in CORPUS["es-en"] if p.source.startswith("El cliente está muy contento"))
    clip = clips("es", [pair.source])[pair.source]
    assert 1.0 < clip.voiced_end - clip.voiced_start <= clip.duration < 6.0
    assert clips("es", [pair.source])[pair.source] is clip  # synthesised once
    result = transcriber("es").transcribe(as_16k(clip))
    heard = set(tokens(result.text))
    # whisper base reads espeak-ng roughly ("trabajo" once came back as "tabaco")
    assert len({"cliente", "contento", "trabajo"} & heard) >= 2, result.text
    assert result.words and all(0.0 <= a <= b <= clip.duration + 0.1 for _, a, b in result.words)


# ------------------------------------------------------------------------------ the driver, offline
class _Recorder:
    """What presence.caller.Recorder offers the driver, filled by hand (16 kHz from ``t0``)."""

    def __init__(self) -> None:
        from presence.clock import now

        self.t0, self.rate = now(), 16_000
        self.buffer = np.zeros(0, dtype=np.float32)
        self.voiced: list[float] = []
        self.last_voiced_at: float | None = None

    def place(self, audio: np.ndarray, at: float) -> None:
        start = int((at - self.t0) * self.rate)
        self.buffer = np.concatenate([self.buffer, np.zeros(max(0, start + audio.size - self.buffer.size))])
        self.buffer[start : start + audio.size] = audio
        frame = self.rate // 50
        for k in range(audio.size // frame):
            if np.abs(audio[k * frame : (k + 1) * frame]).max() > 0.01:
                self.voiced.append(at + (k + 1) / 50)
        self.last_voiced_at = self.voiced[-1] if self.voiced else None

    def audio(self, until: float | None = None) -> np.ndarray:
        return self.buffer.astype(np.float32)


class _Caller:
    def __init__(self) -> None:
        self.recorder = _Recorder()
        self.events: list[dict[str, object]] = []


async def test_the_driver_scores_a_sentence_from_what_the_listener_received() -> None:
    """``measure`` over stand-in callers: the "interpreter" plays the reference 0.8 s after the
    source ends, reports one speech-translated segment, and a stale one it dropped."""
    import argparse
    import asyncio

    from presence.bench.interpret import measure
    from presence.bench.interpret_corpus import clips, transcriber
    from presence.clock import now
    from presence.media.audio import resample

    pair = next(p for p in CORPUS["es-en"] if p.source == "Gracias por la información.")
    clip = clips("es", [pair.source])[pair.source]
    played = clips("en", [pair.reference])[pair.reference]  # the "interpretation": the reference
    speaker, listener = _Caller(), _Caller()
    transcriber("en")  # loaded before the clock matters
    source_words = [("Gracias", 0.0, 0.4), ("por", 0.4, 0.6), ("la", 0.6, 0.7), ("información.", 0.7, 1.4)]

    async def interpret(t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + clip.voiced_end + 0.8 - now()))
        segment = {**_segment(now(), t0, t0 + 1.4, ""), "source_language": "es", "target_language": "en"}
        listener.events += [segment, {**segment, "source_start": t0, "committed_at": 0.0, "dropped": "stale"}]
        listener.recorder.place(resample(played.pcm.astype(np.float32) / 32767, 48_000, 16_000), now())

    async def say(audio: np.ndarray, rate: int) -> float:
        t0 = now()
        asyncio.get_running_loop().create_task(interpret(t0))
        return t0

    speaker.say = say  # type: ignore[attr-defined]
    args = argparse.Namespace(quiet_s=0.6, wait_s=8.0)
    r = await measure(speaker, listener, pair, clip, source_words, "simultaneous", 0, args)  # type: ignore[arg-type]
    assert set(tokens(r.heard)) >= {"thank", "you", "information"}, r.heard
    gap = played.voiced_start + 0.8  # the reference's first voice after the source's end
    assert r.start_offset_s == pytest.approx(clip.voiced_end - clip.voiced_start + gap, abs=0.35)
    assert r.end_offset_s == pytest.approx(0.8 + played.voiced_end, abs=0.35)
    assert r.laal_s is not None and r.laal_s > 0.8
    assert (r.covered_words, r.source_words, r.dropped) == (4, 4, 1)
    assert r.source_recall == pytest.approx(1.0) and r.direction == "es-en"
    assert 0.5 <= r.waited_s <= 0.8 + played.duration + 1.0
    assert not r.sound_before_segment
    assert r.spilled == 0 and r.interpreted[0]["source_end"] == pytest.approx(1.4)
