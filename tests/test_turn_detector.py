"""The smart-turn v3.2 end-of-turn detector with its real model, and its factory wiring."""

from __future__ import annotations

import importlib.metadata
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import need
from conftest import test_settings as make_settings

from presence.bot.backends.factory import BackendConfigError, Backends, build_backends, warm_up
from presence.bot.backends.turn import MODEL_FILE, PIPECAT_PIN, SmartTurnDetector, bundled_model_path
from presence.seams import SAMPLE_RATE, TurnDetector


def _pipecat_installed() -> bool:
    try:
        importlib.metadata.distribution("pipecat-ai")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def need_model() -> None:
    need(_pipecat_installed(), f"the smart-turn model needs `pip install --no-deps {PIPECAT_PIN}`")


@pytest.fixture(scope="module")
def detector() -> SmartTurnDetector:
    need_model()
    turn = SmartTurnDetector()
    turn.load()
    return turn


# ---------------------------------------------------------------------------- the model


def test_loads_offline_from_the_installed_wheel(detector: SmartTurnDetector) -> None:
    path = bundled_model_path()
    assert path.name == MODEL_FILE and path.is_file()
    assert path.as_posix().endswith("pipecat/audio/turn/smart_turn/data/" + MODEL_FILE)
    assert detector.model_path == path
    assert isinstance(detector, TurnDetector) and detector.name == "smart-turn"
    for audio in (
        np.zeros(SAMPLE_RATE // 2, dtype=np.float32),  # shorter than 8 s: padded on the left
        np.zeros(0, dtype=np.float32),
        0.1 * np.random.default_rng(0).standard_normal(10 * SAMPLE_RATE).astype(np.float32),  # cut to 8 s
    ):
        p = detector.probability(audio)
        assert 0.0 <= p <= 1.0


def test_probability_is_deterministic_and_thread_safe(detector: SmartTurnDetector) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    clips = [0.05 * rng.standard_normal(SAMPLE_RATE * (1 + k)).astype(np.float32) for k in range(4)]
    alone = [detector.probability(c) for c in clips]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(detector.probability, clips * 3))
    assert together == pytest.approx(alone * 3, abs=1e-6)


def test_lazy_load_on_first_use() -> None:
    need_model()
    turn = SmartTurnDetector()  # cheap: nothing loaded yet
    assert 0.0 <= turn.probability(np.zeros(SAMPLE_RATE, dtype=np.float32)) <= 1.0


# Each pair: a finished sentence, and the words after which the same audio is cut mid-clause
# (before a word that starts with a stop consonant, whose closure gives a clean cut). Piper
# samples its prosody, so the scores vary from run to run: the first two pairs separated by
# 0.4 or more in each of 60 runs (a finished sentence scores ~0.95, rarely under 0.5); the others
# are noisier (a cut sometimes scores 0.6-0.9) and only count on average (mean gap 0.47-0.8).
PAIRS = (
    ("I was thinking we could go to the park tomorrow.", "I was thinking we could go to the"),
    ("He parked his car behind the bakery.", "He parked his car behind the"),
    ("I left my keys in the kitchen this morning.", "I left my keys in the"),
    ("Can we meet at the cafe near the station?", "Can we meet at the"),
    ("We watched a movie at the cinema last night.", "We watched a movie at the"),
    ("Please put the boxes in the garage.", "Please put the boxes in the"),
)
ROBUST = 2
FRAME = SAMPLE_RATE // 100  # 10 ms


def _levels_db(audio: np.ndarray) -> np.ndarray:
    n = audio.size // FRAME
    power = np.mean(np.square(audio[: n * FRAME].reshape(n, FRAME), dtype=np.float64), axis=1)
    return 10 * np.log10(power + 1e-12)


def _voiced_end(audio: np.ndarray) -> int:
    levels = _levels_db(audio)
    return int(np.flatnonzero(levels > levels.max() - 40)[-1] + 1) * FRAME


def _cut_point(full: np.ndarray, prefix_samples: int) -> int:
    """The quietest 30 ms within 200 ms of where the prefix (synthesised alone) ends."""
    levels = np.convolve(_levels_db(full), np.ones(3) / 3, mode="same")
    centre = prefix_samples // FRAME
    lo, hi = max(1, centre - 20), min(levels.size - 1, centre + 20)
    return (lo + int(np.argmin(levels[lo:hi])) - 1) * FRAME


def test_separates_a_finished_sentence_from_one_cut_mid_clause(backends: Backends) -> None:
    from presence.media.audio import resample

    need_model()
    turn = backends.turn_detector
    assert turn is not None, "the default settings build the smart-turn detector"
    tts = backends.tts

    def speak(text: str) -> np.ndarray:
        audio = resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, SAMPLE_RATE)
        return audio[: _voiced_end(audio)]

    silence = np.zeros(int(0.15 * SAMPLE_RATE), dtype=np.float32)  # asked at the first silent chunk
    finished: list[float] = []
    cut: list[float] = []
    for full_text, prefix_text in PAIRS:
        full = speak(full_text)
        at = _cut_point(full, speak(prefix_text).size)
        assert 0.3 * full.size < at < 0.95 * full.size
        finished.append(turn.probability(np.concatenate([full, silence])))
        cut.append(turn.probability(np.concatenate([full[:at], silence])))
        print(f"{full_text!r}: finished {finished[-1]:.3f}, cut after {prefix_text!r} {cut[-1]:.3f}")

    for k in range(ROBUST):
        assert finished[k] - cut[k] >= 0.3, PAIRS[k][0]
    assert statistics.median(finished) >= 0.5
    assert statistics.mean(finished) - statistics.mean(cut) >= 0.3


# ---------------------------------------------------------------------------- the factory


def test_factory_builds_and_disables_the_detector() -> None:
    need_model()
    light = {"asr": "none", "transcriber": "none", "tts": "espeak", "responder": "rules"}
    built = build_backends(make_settings(**light))
    assert isinstance(built.turn_detector, SmartTurnDetector)
    assert built.turn_detector.model_path == bundled_model_path()
    assert build_backends(make_settings(turn_detector="none", **light)).turn_detector is None
    local = build_backends(make_settings(turn_detector_model=str(bundled_model_path()), **light))
    assert isinstance(local.turn_detector, SmartTurnDetector)


async def test_warm_up_loads_and_runs_the_detector() -> None:
    need_model()
    light = {"vad": "energy", "asr": "none", "transcriber": "none", "tts": "espeak", "responder": "rules"}
    built = build_backends(make_settings(**light))
    timings = await warm_up(built)
    assert "turn:smart-turn" in timings
    assert isinstance(built.turn_detector, SmartTurnDetector) and built.turn_detector.loaded


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"turn_detector_model": "/nonexistent/smart-turn.onnx"}, "turn_detector_model"),
        ({"turn_detector_model": "models/missing.onnx"}, "turn_detector_model"),
        ({"turn_detector_model": "not/a/hub-id"}, "turn_detector_model"),
        ({"turn_detector": "bogus"}, "turn_detector"),
    ],
)
def test_factory_errors_name_the_setting(overrides: dict[str, str], setting: str) -> None:
    light = {"asr": "none", "transcriber": "none", "tts": "espeak", "responder": "rules"}
    with pytest.raises(BackendConfigError, match=re.escape(setting)):
        build_backends(make_settings(**overrides, **light))


def test_missing_local_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("turn_detector_model")) as info:
        SmartTurnDetector(tmp_path / "missing.onnx")
    assert PIPECAT_PIN in str(info.value)


def test_hub_id_offline_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: set it directly
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    turn = SmartTurnDetector("pipecat-ai/smart-turn-v3")  # cheap: fetched on load
    assert turn.model_path is None
    with pytest.raises(FileNotFoundError, match="turn_detector_model") as info:
        turn.load()
    assert "pipecat-ai/smart-turn-v3" in str(info.value) and "offline" in str(info.value)


def test_endpointing_sweep_replays_the_fused_rule() -> None:
    from presence.bench.endpointing import Rule

    rule = Rule(200, 600, 2500, 0.7, 0.3)
    assert rule.fire_ms([0.9] * 30, 100, True) == 200  # confident, finished words
    assert rule.fire_ms([0.9] * 30, 100, False) == 2500  # ends on a continuation word
    assert rule.fire_ms([0.5] * 30, 100, True) == 600  # undecided
    rising = [0.1] * 5 + [0.9] * 25
    assert rule.fire_ms(rising, 100, True) == 500  # the latest answer counts
    assert Rule(200, 600, 2500, 0.7, 0.3, hold_ms=0).fire_ms(rising, 100, True) == 2500


async def test_the_probe_asks_once_per_silence_unless_told_to_repeat(detector: SmartTurnDetector) -> None:
    import asyncio

    from presence.bot.turn_probe import TurnProbe, TurnProbeResult

    for repeat, expect_more in ((False, False), (True, True)):
        answers: list[TurnProbeResult] = []
        probe = TurnProbe(detector, answers.append, interval_s=0.05, repeat=repeat)
        probe.armed = True
        speech = np.random.default_rng(0).normal(0, 0.1, SAMPLE_RATE).astype(np.float32)
        silence = np.zeros(512, np.float32)
        probe.push("a", speech, True, 1.0)
        t = 1.0
        for _ in range(20):  # 20 silent chunks, time for several answers
            t += 0.032
            probe.push("a", silence, False, t)
            await asyncio.sleep(0.1)
        await probe.close()
        assert answers and answers[0].first
        assert (len(answers) > 1) is expect_more, [a.first for a in answers]
        probe.push("a", speech, True, t + 0.1)  # new speech: its silence gets an answer again
        probe.push("a", silence, False, t + 0.2)
        await asyncio.sleep(0.5)
        assert probe.queries >= 2
        await probe.close()
