"""The interpreter's streaming states and the room mix, frame by frame (no network)."""

from __future__ import annotations

import numpy as np

from presence.bot.interpret.stable import Segmenter, StablePrefix, Word
from presence.bot.interpret.stream import SpeakerStream
from presence.clock import now
from presence.media.mix import Hearing, RoomMix
from presence.seams import SAMPLE_RATE


def words(text: str, start: float = 0.0, step: float = 0.3) -> list[Word]:
    return [Word(w, start + i * step, start + (i + 1) * step - 0.05) for i, w in enumerate(text.split())]


def test_a_word_is_committed_once_two_hypotheses_agree_on_it() -> None:
    stable = StablePrefix()
    assert stable.step(words("la reunión de man")) == []
    assert [w.text for w in stable.step(words("la reunión de mañana empieza"))] == ["la", "reunión", "de"]
    # the changing tail waits; what is committed is never handed out again
    got = stable.step(words("la reunión de mañana empieza a las diez"))
    assert [w.text for w in got] == ["mañana", "empieza"]
    assert [w.text for w in stable.flush(words("la reunión de mañana empieza a las diez."))] == [
        "a",
        "las",
        "diez.",
    ]
    assert stable.flush() == []


def test_a_window_cut_inside_a_committed_word_does_not_say_it_twice() -> None:
    stable = StablePrefix()
    stable.flush(words("we meet at ten"))  # ends at 1.15 s
    # the next window starts at 1.1 s and hears "ten" again before the new words
    again = [Word("ten,", 1.05, 1.2), *words("and then we eat", start=1.3)]
    assert [w.text for w in stable.flush(again)] == ["and", "then", "we", "eat"]


def test_segments_end_at_clauses_and_never_grow_past_max_words() -> None:
    seg = Segmenter(max_words=5)
    out = seg.step(words("Well, we meet at ten, and then"))
    # "Well," alone is too short to be a clause of its own
    assert [" ".join(w.text for w in s) for s in out] == ["Well, we meet at ten,"]
    out = seg.step(words("one two three four five six seven"))
    assert [" ".join(w.text for w in s) for s in out] == ["and then one two three"]
    assert [" ".join(w.text for w in s) for s in seg.step([], boundary=True)] == ["four five six seven"]


def _chunks(stream: SpeakerStream, voiced: bool, seconds: float, t: float) -> tuple[list, float]:
    n = 512
    passes = []
    for _ in range(int(seconds * SAMPLE_RATE / n)):
        t += n / SAMPLE_RATE
        p = stream.step(np.full(n, 0.1 if voiced else 0.0, dtype=np.float32), 0.9 if voiced else 0.0, t)
        if p is not None:
            passes.append(p)
            stream.done(p.end if p.boundary else None)
    return passes, t


def test_simultaneous_reads_while_the_speaker_talks_and_commits_at_a_pause() -> None:
    stream = SpeakerStream("ana", "es", step_s=0.7, pause_s=0.35, end_s=0.8)
    passes, t = _chunks(stream, False, 1.0, 100.0)
    assert passes == []
    passes, t = _chunks(stream, True, 2.2, t)
    assert len(passes) == 3 and not any(p.boundary for p in passes)  # every 0.7 s of speech
    assert passes[0].start < 101.0  # the window keeps a little audio from before the onset
    passes, t = _chunks(stream, False, 1.0, t)
    assert [p.boundary for p in passes] == [True]  # one boundary at the pause, none after
    # the next utterance's window starts after the cut, not at the first one's onset
    passes, t = _chunks(stream, True, 0.8, t)
    assert passes and passes[0].start > 103.0


def test_consecutive_reads_once_when_the_turn_has_ended() -> None:
    stream = SpeakerStream("ana", "es", simultaneous=False, end_s=0.8)
    passes, t = _chunks(stream, True, 3.0, 0.0)
    assert passes == []
    passes, t = _chunks(stream, False, 0.5, t)
    assert passes == []  # a pause is not the end of the turn
    passes, t = _chunks(stream, False, 0.5, t)
    assert len(passes) == 1 and passes[0].final and passes[0].audio.size >= 3.0 * SAMPLE_RATE


def _tone(freq: float, n: int = 320) -> np.ndarray:
    return (0.2 * np.sin(2 * np.pi * freq * np.arange(n) / SAMPLE_RATE)).astype(np.float32)


def test_each_listener_hears_the_others_and_never_themselves() -> None:
    mix = RoomMix(lambda: np.zeros(960, dtype=np.float32))
    a, b = mix.add(Hearing("a")), mix.add(Hearing("b"))
    t0 = now() - 1.2  # 1.2 s of both voices, arrived as on a live call up to now
    for k in range(60):
        a.push(_tone(500), 0.9, t0 + k * 0.02, k * 320)
        b.push(np.full(320, 0.3, dtype=np.float32), 0.9, t0 + k * 0.02, k * 320)
    _, frame = mix.frame(0)
    assert set(frame.voices) == {"a", "b"}
    heard_by_a = mix.mix(frame, Hearing("a"))
    heard_by_b = mix.mix(frame, Hearing("b"))
    assert np.allclose(heard_by_a, 0.3, atol=1e-3)  # b's level only
    assert abs(float(heard_by_b.mean())) < 0.02 and heard_by_b.std() > 0.1  # a's tone only


def test_the_original_is_ducked_under_the_interpretation_and_muted_on_request() -> None:
    busy = {"on": False}
    mix = RoomMix(lambda: np.zeros(960, dtype=np.float32), duck_db=-20.0)
    mix.add_channel("en", lambda: np.full(960, 0.1, dtype=np.float32), lambda: busy["on"])
    voice = mix.add(Hearing("ana", "es"))
    mix.add(Hearing("ben", "en"))
    t0 = now() - 1.2
    for k in range(62):
        voice.push(np.full(320, 0.5, dtype=np.float32), 0.9, t0 + k * 0.02, k * 320)
    _, quiet = mix.frame(0)
    busy["on"] = True
    _, speaking = mix.frame(1)
    ben = Hearing("ben", "en")
    assert np.allclose(mix.mix(quiet, ben), 0.6, atol=1e-3)  # original at full level + channel
    assert np.allclose(mix.mix(speaking, ben), 0.1 + 0.05, atol=1e-3)  # ducked by 20 dB
    assert np.allclose(mix.mix(speaking, Hearing("ben", "en", original=False)), 0.1, atol=1e-3)
    # the Spanish speaker hears neither her own voice nor the English channel
    assert np.allclose(mix.mix(speaking, Hearing("ana", "es")), 0.0)


def test_a_pause_heard_while_a_pass_is_read_is_still_a_clause_boundary() -> None:
    stream = SpeakerStream("ana", "es", step_s=0.7, pause_s=0.25, end_s=0.8)
    n, t = 512, 0.0
    busy = None
    for voiced, seconds in ((True, 1.0), (False, 0.35), (True, 1.0)):
        for _ in range(int(seconds * SAMPLE_RATE / n)):
            t += n / SAMPLE_RATE
            p = stream.step(np.full(n, 0.1, dtype=np.float32), 0.9 if voiced else 0.0, t)
            if p is not None and busy is None:
                busy = p  # this pass is "being read" through the pause and after it
    assert busy is not None and not busy.boundary
    stream.done()
    p = stream.step(np.full(n, 0.1, dtype=np.float32), 0.9, t + 0.032)
    # the next pass reads up to the pause and commits it all
    assert p is not None and p.boundary and 1.1 < p.end < 1.2  # 150 ms after the last voice


def test_a_decoding_that_loops_is_cut_to_two_repeats() -> None:
    from presence.bot.interpret.stable import collapse_repeats

    def said(text: str) -> str:
        return " ".join(w.text for w in collapse_repeats(words(text)))

    assert said("I need it before Wednesday, no, no, no, no, no") == "I need it before Wednesday, no, no,"
    assert said("and we eat, we eat, we eat, we eat") == "and we eat, we eat,"
    assert said("okay okay okay okay thank you") == "okay okay"
    assert said("I think that that is fine") == "I think that that is fine"
