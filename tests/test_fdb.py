"""Full-Duplex-Bench-style measurement: metric branches, stimuli, calibration, a small live run."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from browser import require_chromium
from conftest import need

from presence.bench.fdb import metrics as m
from presence.bench.fdb.score import (
    SampleData,
    activity_segments,
    join_hyphenated,
    score_sample,
    vad_segments,
)
from presence.bench.fdb.stimuli import (
    CATEGORIES,
    RATE,
    SampleMeta,
    Synthesizer,
    Voice,
    find_comma_pause,
    generate,
    load_meta,
    stretch_pause,
)
from presence.bench.fdb.timeline import ArrivalPlacer

# ------------------------------------------------------------------------------ FDB v1 rule


def test_turn_over_rule_branches() -> None:
    assert m.turn_over([]) == 0  # no words
    assert m.turn_over([("yeah", 1.0, 1.3)]) == 0  # a short backchannel
    three_short = [("oh", 1.0, 1.2), ("I", 1.2, 1.3), ("see", 1.3, 1.9)]
    assert m.turn_over(three_short) == 0  # < 1 s and <= 3 words
    four_short = [*three_short, ("yes", 1.9, 1.95)]
    assert m.turn_over(four_short) == 1  # < 1 s but 4 words
    assert m.turn_over([("well", 1.0, 1.5), ("okay", 1.8, 2.1)]) == 1  # >= 1 s with 2 words
    assert m.pause_tor([]) == 0 and m.pause_tor(four_short) == 1


def test_turn_taking_latency_clipping_and_means() -> None:
    words = [("sure", 2.0, 2.4), ("I", 2.5, 2.6), ("can", 2.6, 2.9), ("help", 2.9, 3.4)]
    late = m.turn_taking(words, user_end=1.5)
    assert late.tor == 1 and late.latency == pytest.approx(0.5) and late.raw_latency == pytest.approx(0.5)
    early = m.turn_taking(words, user_end=2.3)  # answered before the user finished
    assert early.tor == 1 and early.latency == 0.0 and early.raw_latency == pytest.approx(-0.3)
    none = m.turn_taking([("mm", 3.0, 3.2)], user_end=2.0)
    assert none == m.TurnResult(0, None, None)
    agg = m.aggregate_turns([late, early, none])
    assert agg["n"] == 3 and agg["tor"] == pytest.approx(2 / 3)
    assert agg["latency_s"] == pytest.approx(0.25)  # mean over TOR = 1 samples only
    assert m.aggregate_turns([])["tor"] is None


def test_interruption_uses_words_after_the_interruption() -> None:
    words = [("so", 1.0, 1.2), ("the", 1.2, 1.4), ("bill", 1.4, 2.0), ("okay", 4.2, 4.5), ("the", 4.5, 4.6),
             ("date", 4.6, 5.0), ("is", 5.0, 5.2), ("Monday", 5.2, 5.8)]  # fmt: skip
    r = m.interruption(words, interrupt_end=4.0)
    assert r.tor == 1 and r.latency == pytest.approx(0.2)
    assert m.interruption(words[:3], interrupt_end=4.0).tor == 0  # nothing after it


# ------------------------------------------------------------------------------ backchannel


def test_backchannel_v1_branches() -> None:
    # No output at all: TOR 0, no backchannels, JSD 1.
    r = m.backchannel_v1([], [], 10.0)
    assert (r.tor, r.backchannels, r.frequency, r.jsd) == (0, (), 0.0, 1.0)
    # One short "mm-hm": a backchannel, not a turn.
    r = m.backchannel_v1([(2.0, 2.5)], [("mm-hm", 2.05, 2.4)], 10.0)
    assert r.tor == 0 and r.backchannels == ((2.0, 2.5),) and r.frequency == pytest.approx(0.1)
    assert 0.0 < r.jsd < 1.0
    # A segment longer than 3 s is a turn (and stops the scan).
    assert m.backchannel_v1([(1.0, 4.5), (5.0, 5.3)], [], 10.0).tor == 1
    # More than 3 overlapping words in a short segment: a turn.
    words = [("a", 2.0, 2.1), ("b", 2.1, 2.2), ("c", 2.2, 2.3), ("d", 2.3, 2.4)]
    assert m.backchannel_v1([(2.0, 2.5)], words, 10.0).tor == 1
    # Short but 3 words: a turn; 1-3 s with few words: a turn.
    assert m.backchannel_v1([(2.0, 2.5)], words[:3], 10.0).tor == 1
    assert m.backchannel_v1([(2.0, 3.5)], words[:1], 10.0).tor == 1
    # A word straddling the segment start counts as overlapping.
    assert m.backchannel_v1([(2.0, 2.5)], [("x", 1.9, 2.1), ("y", 2.1, 2.2), ("z", 2.2, 2.6)], 10.0).tor == 1


def test_backchannel_jsd_against_a_reference() -> None:
    ref = m.human_backchannel_reference([(2.0, 3.0)], 10.0)
    assert math.isclose(sum(ref), 1.0) and np.argmax(ref) == int(2.3 / 0.2)
    at_pause = m.backchannel_v1([(2.3, 2.6)], [("mm", 2.3, 2.5)], 10.0, human=ref)
    elsewhere = m.backchannel_v1([(8.0, 8.3)], [("mm", 8.0, 8.2)], 10.0, human=ref)
    assert at_pause.jsd < elsewhere.jsd
    assert m.js_distance([1, 0], [1, 0]) == pytest.approx(0.0)
    assert m.js_distance([1, 0], [0, 1]) == pytest.approx(math.sqrt(math.log(2)))
    # No pauses: a uniform reference; the default constant is uniform too.
    assert len(set(m.human_backchannel_reference([], 1.0))) == 1
    hist = m.backchannel_histogram([(0.0, 0.1)], 1.0)
    assert hist.size == 6 and math.isclose(hist.sum(), 1.0)
    agg = m.aggregate_backchannel([at_pause, elsewhere])
    assert agg["n"] == 2 and agg["tor"] == 0.0


# ------------------------------------------------------------------------------ v1.5, FD-Bench


def test_merge_and_v15_latencies() -> None:
    assert m.merge_segments([(3.0, 4.0), (0.0, 1.0), (1.5, 2.0)], 0.5) == [(0.0, 2.0), (3.0, 4.0)]
    assert m.merge_segments([(1.0, 0.5)], 0.5) == []  # reversed segments are dropped
    user = [(5.0, 5.5), (6.0, 7.0)]  # merged across 0.5 s (<= 0.6)
    system = [(2.0, 5.8), (8.0, 8.3), (8.7, 9.0)]  # the last two merge (gap 0.4 <= 0.5)
    assert m.stop_latencies(user, system) == [pytest.approx(0.8)]  # overlap 5.0 .. 5.8
    assert m.response_latencies(user, system) == [pytest.approx(1.0)]  # 7.0 -> 8.0
    assert m.stop_latencies([(0.0, 1.0)], [(2.0, 3.0)]) == []
    assert m.response_latencies([(4.0, 5.0)], [(1.0, 2.0)]) == []  # no later system speech


def test_fd_bench_counts() -> None:
    turns = [(0.0, 3.0), (6.0, 8.0), (10.0, 12.0)]
    # turn 1: reply at 3.2 (SR, FSED 0.2); the system talks 3.2-7.0, so turn 2 interrupts it
    # and it stops at 7.0 < 8.0 (SI, IRD 1.0); turn 2's reply at 8.1; turn 3: early at 10.5.
    system = [(3.2, 7.0), (8.1, 9.5), (10.5, 13.0)]
    r = m.fd_bench(turns, system)
    assert r.rounds == 3 and r.early_interrupts == 1 and r.successful_replies == 2
    assert r.fsed == pytest.approx((0.2, 0.1))
    assert (r.interrupts, r.successful_interrupts) == (1, 1) and r.ird == pytest.approx((1.0,))
    assert r.eir == pytest.approx(1 / 3) and r.srr == pytest.approx(2 / 3) and r.sir == 1.0
    # A reply inside the last 0.5 s of the turn still counts; the system not stopping is no SI.
    r = m.fd_bench([(0.0, 2.0), (3.0, 3.5)], [(1.7, 4.0)], reply_turns=[True, False])
    assert r.successful_replies == 1 and r.fsed == pytest.approx((-0.3,))
    assert r.reply_rounds == 1 and r.interrupts == 1 and r.successful_interrupts == 0
    empty = m.fd_bench([], [])
    assert empty.eir is None and empty.srr is None and empty.sir is None
    agg = m.aggregate_fd_bench([m.fd_bench(turns, system), empty])
    assert agg["rounds"] == 3 and agg["fsed_median_s"] == pytest.approx(0.15) and agg["sir"] == 1.0


# ------------------------------------------------------------------------------ engineering


def test_engineering_metrics() -> None:
    bot = [(0.5, 0.8), (3.4, 6.0)]
    assert m.voice_to_voice(3.0, bot, user_start=1.0) == pytest.approx(0.4)
    assert m.voice_to_voice(3.0, [(2.8, 4.0)], user_start=1.0) == pytest.approx(-0.2)  # talked over
    assert m.voice_to_voice(3.0, [], user_start=1.0) is None
    # A backchannel before the reply's first packet is not the reply.
    assert m.voice_to_voice(3.0, [(3.1, 3.4), (3.9, 5.0)], 1.0, reply_sent_at=3.85) == pytest.approx(0.9)
    assert m.barge_in_stop(4.0, bot) == pytest.approx(2.0)
    assert m.barge_in_stop(2.0, bot) is None  # the bot was silent
    events = [{"name": "playback_held", "t": 4.1}, {"name": "barge_in_detected", "t": 4.6}]
    assert m.stopped_for(events, 4.0, 5.0) and not m.stopped_for(events, 5.0, 6.0)
    assert m.false_barge_in_rate([True, False, False, False]) == 0.25 and m.false_barge_in_rate([]) is None
    timeline = [
        {"name": "caller_speech_end", "t": 2.9},
        {"name": "end_of_turn_decided", "t": 3.4},
        {"name": "responder_first_token", "t": 3.5},
        {"name": "tts_first_audio", "t": 3.7},
        {"name": "bot_first_packet_sent", "t": 3.8},
        {"name": "bot_first_packet_sent", "t": 9.0},
    ]
    assert m.latency_breakdown(timeline, 3.0) == pytest.approx(
        {
            "caller_speech_end": -0.1,
            "end_of_turn_decided": 0.4,
            "responder_first_token": 0.5,
            "tts_first_audio": 0.7,
            "bot_first_packet_sent": 0.8,
        }
    )
    assert m.latency_breakdown([], 3.0) == {}
    s = m.summarize([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["p50"] == 2.0 and m.summarize([])["p95"] is None
    # Whisper's early first word is moved to the audio onset, its stretched last word back to
    # the audio's end; words over audio stay, words with no audio inside are left alone.
    snapped = m.snap_words(
        [("hi", 1.0, 1.6), ("there", 1.7, 2.0), ("you.", 2.1, 3.5), ("x", 5.0, 5.1)], [(1.4, 2.2)]
    )
    assert snapped == [("hi", 1.4, 1.6), ("there", 1.7, 2.0), ("you.", 2.1, 2.3), ("x", 5.0, 5.1)]
    # "I heard you." in 0.4 s of audio (whisper put "you." at 3.14-4.44) is backchannel-length,
    # not a 1.7 s turn.
    heard = m.snap_words([("I", 2.71, 2.94), ("heard", 2.94, 3.14), ("you.", 3.14, 4.44)], [(2.71, 3.12)])
    assert heard[-1] == ("you.", 3.14, 3.22) and m.turn_over(heard) == 0


# ------------------------------------------------------------------------------ segmentation


class ScriptedVAD:
    """Speech probability from a list, one value per 512-sample chunk."""

    chunk_samples = 512

    def __init__(self, probs: list[float]) -> None:
        self.probs = probs
        self.i = 0

    def probability(self, chunk: np.ndarray) -> float:
        p = self.probs[self.i] if self.i < len(self.probs) else 0.0
        self.i += 1
        return p

    def reset(self) -> None:
        self.i = 0


def test_vad_segments_follow_silero_rules() -> None:
    w = 512 / RATE  # 32 ms
    probs = (
        [0.0] * 10 + [0.9] * 20 + [0.0] * 10 + [0.9] * 3 + [0.0] * 20 + [0.9] * 15 + [0.2] * 2 + [0.9] * 10
    )
    audio = np.zeros(len(probs) * 512, dtype=np.float32)
    segs = vad_segments(audio, ScriptedVAD(probs), decimals=None)  # type: ignore[arg-type]
    # The 3-chunk blip (96 ms < 250 ms) is dropped; the 2-chunk dip (64 ms < 100 ms) is bridged.
    assert len(segs) == 2
    assert segs[0][0] == pytest.approx(10 * w - 0.03) and segs[0][1] == pytest.approx(30 * w + 0.03)
    assert segs[1][0] == pytest.approx(63 * w - 0.03) and segs[1][1] == pytest.approx(len(probs) * w)
    rounded = vad_segments(audio, ScriptedVAD(probs))  # type: ignore[arg-type]
    assert rounded[0] == (round(10 * w - 0.03, 1), round(30 * w + 0.03, 1))


def test_hyphenated_pieces_are_one_word() -> None:
    words = [("M", 1.0, 1.1), ("-H", 1.1, 1.2), ("-M.", 1.2, 1.5), ("yes", 2.0, 2.2)]
    assert join_hyphenated(words) == [("M-H-M.", 1.0, 1.5), ("yes", 2.0, 2.2)]
    assert join_hyphenated([("-odd", 0.0, 0.1)]) == [("-odd", 0.0, 0.1)]


def test_activity_segments() -> None:
    audio = np.zeros(RATE * 2, dtype=np.float32)
    audio[1600:4800] = 0.1  # 0.1 .. 0.3 s
    audio[5600:8000] = 0.1  # 0.35 .. 0.5 s: merged (gap 50 ms)
    audio[16000:17600] = 0.1  # 1.0 .. 1.1 s
    assert activity_segments(audio) == [pytest.approx((0.1, 0.5)), pytest.approx((1.0, 1.1))]
    assert activity_segments(np.zeros(100, dtype=np.float32)) == []


def test_arrival_placer_uses_the_earliest_arrival() -> None:
    placer = ArrivalPlacer(1000, t0=0.0)
    # Frames of 20 samples; the first arrives 15 ms late (jitter-buffer start-up).
    assert placer.place(20, 0.035, 0) == (15, True)
    assert placer.place(20, 0.040, 20) == (20, False)  # the anchor moves back to the floor
    assert placer.place(20, 0.070, 40)[0] == 40  # a late frame does not move it
    start, new_run = placer.place(20, 0.300, 60)  # arrival 240 ms later than predicted: a gap
    assert new_run and start == 280


# ------------------------------------------------------------------------------ stimuli


def test_comma_pause_is_found_and_stretched() -> None:
    tone = (0.3 * np.sin(np.arange(RATE) * 0.2)).astype(np.float32)
    audio = np.concatenate([tone, np.zeros(3200, dtype=np.float32), tone])
    span = find_comma_pause(audio)
    assert span is not None and abs(span[0] - RATE) <= 160 and abs(span[1] - RATE - 3200) <= 160
    out, start, end = stretch_pause(audio, span, 1.5)
    assert end - start == pytest.approx(1.5, abs=0.011) and out.size == audio.size + int(1.5 * RATE) - (
        span[1] - span[0]
    )
    assert find_comma_pause(tone) is None


def test_stimuli_layout_and_determinism(tmp_path: Path) -> None:
    synth = Synthesizer()
    first = generate(tmp_path / "a", CATEGORIES, 1, seed=7, synth=synth)
    second = generate(tmp_path / "b", CATEGORIES, 1, seed=7, synth=Synthesizer())
    assert [d.parent.name for d in first] == list(CATEGORIES)
    for a, b in zip(first, second, strict=True):
        assert (a / "input.wav").read_bytes() == (b / "input.wav").read_bytes()
        meta = load_meta(a)
        assert meta.duration_s > 1 and meta.user_turns and meta.turn_end is not None
        for inj in meta.injections:
            assert (a / inj.wav).is_file() and inj.after_event == "bot_speech_start"
    pause = load_meta(first[0])
    (p0, p1), = pause.pauses  # fmt: skip
    assert 0.69 <= p1 - p0 <= 2.6 and len(pause.user_turns) == 2
    assert (first[0] / "pause.json").is_file()
    assert load_meta(first[CATEGORIES.index("background")]).background["snr_db"] in (0, 10, 20)
    # Different seeds pick different scripts.
    other = generate(tmp_path / "c", ["turn_taking"], 3, seed=8, synth=synth)
    assert len({load_meta(d).text for d in other} | {load_meta(first[1]).text}) >= 2
    # Every voice engine synthesises.
    for engine, name in (("espeak", "en-gb"), ("flite", "kal"), ("piper", "joe")):
        assert synth(Voice(engine, name), "Hello there.").size > RATE // 4


def test_score_sample_on_a_built_timeline() -> None:
    """The scorer's wiring with stand-in models: an interruption the bot stops for."""
    meta = SampleMeta(
        id="interruption_000", category="interruption", seed=1, version=1, voice="v", text="q?",
        duration_s=6.0, user_turns=[{"start": 0.5, "end": 1.5, "text": "q?"}], turn_end=1.5,
    )  # fmt: skip
    output = np.zeros(6 * RATE, dtype=np.float32)
    output[int(2.0 * RATE) : int(3.2 * RATE)] = 0.1  # the answer, cut at 3.2
    output[int(4.3 * RATE) : int(5.5 * RATE)] = 0.1  # the reply to the interruption
    played = np.zeros_like(output)
    injections = [{"kind": "interruption", "start": 3.0, "end": 4.0, "missed": False, "text": "wait"}]
    events = [{"name": "bot_first_packet_sent", "t": 1.95}, {"name": "barge_in_detected", "t": 3.15}]

    class Words:
        def transcribe(self, audio: np.ndarray) -> object:
            from presence.seams import Transcript

            # Cropped at the interruption end (4.0): the reply starts 0.3 s in; whisper says 0.0.
            return Transcript("ok the date is monday", True, (("ok", 0.0, 0.5), ("the", 0.5, 0.6),
                              ("date", 0.6, 0.9), ("is", 0.9, 1.0), ("monday", 1.0, 1.5)))  # fmt: skip

    res = score_sample(
        SampleData(meta, output, played, events, injections),
        Words(),
        lambda: ScriptedVAD([]),  # type: ignore[arg-type]
    )
    assert res["tor"] == 1 and res["latency_s"] == pytest.approx(0.3, abs=0.011)
    assert res["barge_in_stop_s"] == [pytest.approx(0.2, abs=0.011)]
    assert res["barge_in_stopped_event"] == [True]
    assert res["voice_to_voice_s"] == pytest.approx(0.5, abs=0.011)


def test_side_talk_counts_as_answered_only_when_the_bot_took_it_as_a_turn() -> None:
    """Words after the side talk are the interrupted reply going on unless a turn was taken on it."""
    meta = SampleMeta(
        id="side_talk_000", category="side_talk", seed=1, version=1, voice="v", text="q?",
        duration_s=7.0, user_turns=[{"start": 0.5, "end": 1.5, "text": "q?"}], turn_end=1.5,
    )  # fmt: skip
    output = np.zeros(7 * RATE, dtype=np.float32)
    output[int(2.0 * RATE) : int(6.5 * RATE)] = 0.1  # the bot talks through and after it
    injections = [{"kind": "side_talk", "start": 3.0, "end": 4.0, "missed": False, "text": "hey sam"}]

    class Words:
        def transcribe(self, audio: np.ndarray) -> object:
            from presence.seams import Transcript

            return Transcript("and so on and so forth", True, (("and", 4.5, 4.8), ("so", 4.9, 5.2),
                              ("on", 5.3, 5.6), ("and", 5.7, 5.9), ("so", 6.0, 6.2), ("forth", 6.3, 6.4)))  # fmt: skip

    def score(events: list[dict[str, object]]) -> int:
        data = SampleData(meta, output, np.zeros_like(output), events, injections)
        res = score_sample(data, Words(), lambda: ScriptedVAD([]))  # type: ignore[arg-type]
        return int(res["side_talk_response_tor"])

    first = {"name": "end_of_turn_decided", "t": 1.8}
    assert score([first]) == 0  # carried on with its reply: no answer to the side talk
    taken = {"name": "end_of_turn_decided", "t": 4.3}
    assert score([first, taken]) == 1  # took the side talk as a turn and spoke
    assert score([first, taken, {"name": "not_addressed", "t": 4.5}]) == 0  # then set it aside


# ------------------------------------------------------------------------------ live


@pytest.mark.slow
async def test_calibration_measures_a_known_echo_delay(tmp_path: Path) -> None:
    from presence.bench.fdb.calibrate import TOLERANCE_S, calibrate

    report = await calibrate((0.3, 0.7), out=tmp_path)
    assert 0.0 < report.transport_s < 0.2, report.to_json()
    assert report.max_error_s <= TOLERANCE_S, report.to_json()
    for run in report.runs:
        assert run.onset_s is not None and abs(run.onset_s - run.xcorr_s) < 0.01
    assert json.loads((tmp_path / "calibration.json").read_text())["max_error_s"] <= TOLERANCE_S


async def live_bench_backends(backends):  # type: ignore[no-untyped-def]
    """The session's real models, with the deterministic responder: its long replies give the
    live interruptions and backchannels something to land on (the report needs matplotlib)."""
    need(
        importlib.util.find_spec("matplotlib") is not None,
        "matplotlib is not installed (pip install matplotlib)",
    )
    from presence.bot.backends.factory import warm_up
    from presence.bot.backends.responder import RuleResponder

    bench_backends = dataclasses.replace(backends, responder=RuleResponder())
    await warm_up(bench_backends)
    return bench_backends


@pytest.mark.slow
async def test_small_live_run_writes_the_report(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    from presence.bench.fdb.cli import Config, run_benchmark

    bench_backends = await live_bench_backends(backends)
    files = await run_benchmark(
        tmp_path,
        [Config("rules", 500)],
        CATEGORIES,
        limit=1,
        backends=bench_backends,
        calibration=False,
        timelines=2,
        show_progress=False,
    )
    report = json.loads(files["json"].read_text())
    cfg = report["configs"]["rules eot=500ms"]
    cats = cfg["aggregate"]["categories"]
    assert set(cats) == set(CATEGORIES)
    assert all(c["errors"] == 0 for c in cats.values())
    run_dir = tmp_path / "rules-eot500"
    for category in CATEGORIES:
        sample = run_dir / category / f"{category}_000"
        inp = (sample / "input.wav").stat().st_size
        assert (sample / "output.wav").stat().st_size == inp  # FDB: equal length
        events = json.loads((sample / "events.json").read_text())["events"]
        assert events[0]["name"] == "input_start"
    # The bot answered a plain question, over real WebRTC.
    assert cats["turn_taking"]["tor"] == 1.0
    assert cfg["aggregate"]["overall"]["voice_to_voice_s"]["n"] >= 1
    md = files["md"].read_text()
    assert "GPT-Realtime" in md and "whisper tiny.en" in md
    for key in ("latency_cdf", "categories"):
        assert files[key].stat().st_size > 10_000
    assert any(k.startswith("timeline_") for k in files)


# ------------------------------------------------------------------------------ chromium


def test_page_clock_maps_context_and_performance_time() -> None:
    from presence.bench.fdb.chromium import PageClock

    clock = PageClock(wall_minus_mono=1_000.0)
    # The render timings' minimum is the mapping; a late render (2003.2) does not move it.
    clock.add({"lags": [[0, 2000.5], [4096, 2000.0], [8192, 2003.2]], "perf": None})
    clock.add({"lags": [], "perf": 5000.25})
    clock.add({"lags": [], "perf": 5000.05})  # a sample taken between ticks: the maximum wins
    assert clock.ctx_to_mono(1.5) == pytest.approx(1.5 + 2.0 - 1_000.0)
    assert clock.mono_to_ctx(clock.ctx_to_mono(3.0)) == pytest.approx(3.0)
    assert clock.perf_to_mono(1000.0) == pytest.approx(6.00025 - 1_000.0)


def test_received_packets_are_placed_by_arrival_and_rtp_time() -> None:
    """The chromium transport's recording: packets decoded and laid out like TimedRecorder."""
    from aiortc.codecs.opus import OpusEncoder

    from presence.bench.fdb.calibrate import onset
    from presence.bench.fdb.chromium import PageClock, place_packets
    from presence.media.audio import make_frame

    rate48 = 48_000
    audio = np.zeros(rate48, dtype=np.float32)
    audio[int(0.5 * rate48) : int(0.6 * rate48)] = 0.5 * np.sin(np.arange(int(0.1 * rate48)) * 0.1)
    encoder = OpusEncoder()
    rng = np.random.default_rng(3)
    clock = PageClock(wall_minus_mono=0.0)
    clock.add({"lags": [[0, 0.0]], "perf": 0.0})  # performance ms == monotonic ms
    packets: list[list[object]] = []
    base_rtp, base_seq = 2**32 - 960 * 10, 65_530  # both wrap during the clip
    for k in range(rate48 // 960):
        payloads, _ = encoder.encode(make_frame(audio[k * 960 : (k + 1) * 960], k * 960))
        for payload in payloads:
            # A packet arrives when its 20 ms are complete, sometimes a little late.
            arrived = 1000.0 + (k + 1) * 20 + (0.0 if k % 5 == 0 else float(rng.uniform(0, 15)))
            rtp, seq = (base_rtp + k * 960) % 2**32, (base_seq + k) % 2**16
            packets.append([arrived, rtp, seq, base64.b64encode(payload).decode()])
    packets[20], packets[21] = packets[21], packets[20]  # reordered
    packets.insert(30, list(packets[30]))  # duplicated
    origin = 1.2  # 200 ms into the stream
    heard = place_packets(packets, clock, origin, origin + 1.0)
    # The burst left at 0.5 s of the stream: 0.3 s on the timeline (Opus adds its 6.5 ms).
    got = onset(heard)
    assert got is not None and abs(got - 0.3 - 0.0065) < 0.004, got
    assert heard.size >= int(0.8 * RATE)


async def test_chromium_transport_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from presence import browser
    from presence.bench.fdb.runner import run_sample

    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(browser.ChromiumUnavailable, match="apt-get install chromium"):
        await run_sample("http://127.0.0.1:9", tmp_path, transport="chromium")


@pytest.mark.slow
@pytest.mark.browser
async def test_calibration_over_chromium_measures_a_known_echo_delay(tmp_path: Path) -> None:
    require_chromium()
    from presence.bench.fdb.calibrate import TOLERANCE_S, calibrate

    report = await calibrate((0.4,), out=tmp_path, transport="chromium")
    assert 0.0 < report.transport_s < 0.2, report.to_json()
    assert report.max_error_s <= TOLERANCE_S, report.to_json()
    for run in report.runs:
        assert run.onset_s is not None and abs(run.onset_s - run.xcorr_s) < 0.01
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["transport"] == "chromium" and saved["max_error_s"] <= TOLERANCE_S
    events = json.loads((tmp_path / "calibration" / "events.json").read_text())
    assert events["transport"] == "chromium" and events["receiver"]["packets"] > 100


@pytest.mark.slow
@pytest.mark.browser
async def test_small_live_run_over_chromium(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    require_chromium()
    from presence.bench.fdb.cli import Config, run_benchmark

    bench_backends = await live_bench_backends(backends)
    files = await run_benchmark(
        tmp_path,
        [Config("rules", 500)],
        ["interruption", "turn_taking"],
        limit=1,
        transport="chromium",
        backends=bench_backends,
        calibration=False,
        timelines=0,
        show_progress=False,
    )
    cats = json.loads(files["json"].read_text())["configs"]["rules eot=500ms"]["aggregate"]["categories"]
    assert all(c["errors"] == 0 for c in cats.values())
    for category in ("interruption", "turn_taking"):
        sample = tmp_path / "rules-eot500" / category / f"{category}_000"
        assert (sample / "output.wav").stat().st_size == (sample / "input.wav").stat().st_size
        run = json.loads((sample / "events.json").read_text())
        assert run["transport"] == "chromium" and run["error"] is None
        assert run["events"][0]["name"] == "input_start"
        names = {e["name"] for e in run["events"] if e["source"] == "bot"}
        assert "bot_speech_start" in names, names  # the bot's events came over the data channel
    # The live interruption was played on the bot's event.
    sample = tmp_path / "rules-eot500" / "interruption" / "interruption_000"
    (injection,) = json.loads((sample / "events.json").read_text())["injections"]
    assert injection["missed"] is False
    # The page's clock maps to the monotonic one within a few ms on an idle machine; a starved
    # render thread shifts it by tens of ms (seen: 50), which the calibration reports.
    assert injection["start"] - injection["trigger_t"] == pytest.approx(injection["offset_s"], abs=0.08)
    assert json.loads((sample / "interrupt.json").read_text())[0]["timestamp"] == [
        injection["start"],
        injection["end"],
    ]
    assert cats["turn_taking"]["tor"] == 1.0


def test_configurations_from_the_command_line() -> None:
    from presence.bench.fdb.cli import Config, configs_from

    configs, text = configs_from("rules,fused", "auto", "300,500")
    assert text == "auto" and configs == [Config("rules", 300), Config("rules", 500), Config("fused", 300)]
    configs, text = configs_from("", "", "300", "rules:auto,fused:auto,fused:rules")
    assert text == "auto"
    assert [c.label for c in configs] == ["rules eot=300ms text=auto", "fused text=auto", "fused text=rules"]
    assert configs[2].dirname == "fused-rules"
    configs, _ = configs_from("fused", "auto,rules", "300")
    assert [c.responder for c in configs] == ["auto", "rules"]
    for bad in (("nope", "auto", "300", None), ("fused", "gpt", "300", None), ("fused", "auto", "x", None)):
        with pytest.raises(ValueError):
            configs_from(*bad)
    with pytest.raises(ValueError, match="policy:responder"):
        configs_from("", "", "300", "fused")
