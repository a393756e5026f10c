"""The long-call benchmark's bookkeeping: its microphone, per-minute figures and false turns."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from presence.bench.longcall import LongCall, Question, Reply, Sample, _take, make_microphone, report
from presence.media.audio import read_wav


def test_the_microphone_asks_a_question_every_10_to_15_seconds(tmp_path: Path) -> None:
    questions = make_microphone(tmp_path / "mic.wav", 1.0, seed=3)
    starts = [q.start_s for q in questions]
    assert len(questions) >= 4
    assert all(10.0 <= b - a <= 15.5 for a, b in itertools.pairwise(starts))
    audio, rate = read_wav(str(tmp_path / "mic.wav"))
    assert rate == 48_000 and audio.size / rate >= 60
    for q in questions:  # voiced where it says, silent before it
        assert np.abs(audio[int(q.start_s * rate) : int(q.end_s * rate)]).max() > 0.05
        assert np.abs(audio[int((q.start_s - 0.5) * rate) : int((q.start_s - 0.1) * rate)]).max() == 0


def test_replies_false_turns_and_the_minute_ratio_are_counted() -> None:
    questions = [Question("What is your name?", 5.0 + 12 * i, 6.0 + 12 * i) for i in range(50)]
    call = LongCall(questions)
    pending: dict[str, float] = {}
    origin = 100.0
    _take(call, {"name": "caller_speech_start", "t": origin + 5.02}, pending, questions)
    for i, q in enumerate(questions):
        t = origin + q.end_s + 0.6
        _take(
            call,
            {"name": "caption", "t": t, "who": "caller", "final": True, "text": q.text},
            pending,
            questions,
        )
        # the final pass's caption of the same turn is not another turn
        _take(
            call,
            {"name": "caption", "t": t + 0.5, "who": "caller", "final": True, "pass_": "final", "text": "x"},
            pending,
            questions,
        )
        slow = 1.5 if q.start_s >= 480 else 1.0
        for metric in ("end_of_turn_decided", "responder_first_token"):
            _take(call, {"name": "latency", "t": t, "metric": metric, "ms": 200.0 * slow}, pending, questions)
        msg = {"name": "latency", "t": t + 0.1, "data": {"metric": "voice_to_voice", "ms": 500.0 * slow}}
        _take(call, {**msg, **msg["data"]} if i % 2 else msg, pending, questions)  # flat or nested
    # "and the" in the silence between two questions is a false turn
    _take(
        call,
        {"name": "caption", "t": origin + 14.0, "who": "caller", "final": True, "text": "and the"},
        pending,
        questions,
    )
    call.samples = [Sample(m, 500.0 + m, 80.0) for m in range(10)]
    assert call.origin is not None and abs(call.origin - (origin + 0.02)) < 1e-9
    assert len(call.replies) == 50
    assert call.replies[0].ms == {
        "end_of_turn_decided": 200.0,
        "responder_first_token": 200.0,
        "voice_to_voice": 500.0,
    }
    assert [text for _, text in call.false_turns()] == ["and the"]
    last, first, ratio = call.ratio()
    assert (first, last) == (500.0, 750.0) and abs(ratio - 1.5) < 1e-9
    text = report(call, 10)
    assert "ratio 1.50x" in text and "false caller turns in silence: 1" in text
    assert "questions answered: 50 of 50" in text
    assert isinstance(call.replies[-1], Reply)


def test_the_soak_report_counts_growth_per_call_memory_and_drops() -> None:
    from presence.bench.soak import Minute, Soak, Talker
    from presence.bench.soak import report as soak_report

    soak = Soak(calls=10, minutes=30, idle_mb=900.0, joined_mb=1120.0)
    # memory climbs 4 MB a minute for 5 minutes, then levels off at 1160 MB; the server process
    # alone (its workers are the rest) keeps climbing 1 MB a minute
    soak.samples = [
        Minute(m, 1140.0 + 4 * min(m, 5), 500.0 + m, 1200.0, 150.0, 80.0, 11, 12) for m in range(1, 31)
    ]
    soak.talkers = [Talker(i, replies=40, v2v_s=[(60.0 * i, 0.5 + 0.01 * i)]) for i in range(10)]
    assert soak.per_call_mb() == 20.0  # (1120 - 900) / 11 calls
    assert soak.growth(25) == (5, 0.0, 0.0)  # minutes 5-30: level
    first, growth, trend = soak.growth(28)  # minutes 2-30 include the climb
    assert (first, growth) == (2, 12.0) and 0.0 < trend < 12.0  # the fit weighs the level minutes too
    assert soak.growth(25, server_only=True) == (5, 25.0, 25.0)
    assert soak.dropped() == []
    text = soak_report(soak, 25)
    assert (
        "20.0 MB per call" in text and "growth from minute 5 to minute 30: +0 MB, fitted trend +0 MB" in text
    )
    assert "the server process alone +25 MB, trend +25 MB" in text
    assert "calls dropped: 0" in text and "replies: 400" in text
    soak.talkers[3].dropped = "connection failed at 600 s"
    soak.video_dropped = "connection closed at 900 s"
    text = soak_report(soak, 25)
    assert soak.dropped() == [
        "caller 3: connection failed at 600 s",
        "video call: connection closed at 900 s",
    ]
    assert "calls dropped: 2" in text and "  - caller 3: connection failed at 600 s" in text


def test_the_soak_refuses_nonsense_arguments(capsys) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from presence.bench.soak import main as soak_main

    with pytest.raises(SystemExit) as exc:
        soak_main(["--calls", "0"])
    assert exc.value.code == 2 and "--calls must be at least 1" in capsys.readouterr().err
