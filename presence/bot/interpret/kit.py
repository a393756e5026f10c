"""The interpreter's backends: ASR and TTS per language, a translator per pair.

Built on first use and shared by every call of the process (a whisper model is 145 MB; an
Apertium pair is one long-lived process per direction). English reuses the bot's own
transcriber and voice when they can serve (whisper tiny.en reads a pass in ~0.5 s here, the
multilingual base in ~1.2 s).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from presence.bot.backends.asr import WhisperTranscriber
from presence.bot.backends.languages import asr_for, tts_for
from presence.bot.backends.translate import build_translator, check_pairs
from presence.bot.backends.tts import EspeakTTS, PiperTTS
from presence.config import Settings
from presence.seams import TTS, Transcriber, Translator

log = logging.getLogger(__name__)


class LanguageKit:
    def __init__(self, settings: Settings, transcriber: Transcriber | None, tts: TTS) -> None:
        self.settings = settings
        self._english_asr = transcriber if isinstance(transcriber, WhisperTranscriber) else None
        self._english_tts = tts if getattr(tts, "language", "en") == "en" else None
        self._asr: dict[str, WhisperTranscriber] = {}
        self._tts: dict[str, TTS] = {}
        self._translators: dict[tuple[str, str], Translator] = {}
        self._lock = threading.RLock()
        self._prepared: set[str] = set()  # what prepare() has run once: "asr:es", "es>en"...

    def check(self, languages: list[str]) -> None:
        """Raise BackendMissing (with the package or setting to fix it) for a pair that has no
        translator; cheap: nothing is loaded."""
        check_pairs(self.settings, sorted(set(languages)))

    def asr(self, language: str) -> WhisperTranscriber:
        with self._lock:
            if language not in self._asr:
                # the bot's own transcriber is whisper_model (or tiny.en): one load, not two
                if language == "en" and self._english_asr is not None:
                    self._asr[language] = self._english_asr
                else:
                    self._asr[language] = asr_for(self.settings, language)
            return self._asr[language]

    def tts(self, language: str) -> TTS:
        """The interpreter's voice for ``language``, ``interpret_speech_rate`` faster than the
        bot's: an interpreter who speaks at the speaker's pace falls behind every pause."""
        with self._lock:
            if language not in self._tts:
                voice = self._english_tts if language == "en" and self._english_tts is not None else None
                voice = voice or tts_for(self.settings, language)
                rate = self.settings.interpret_speech_rate
                if isinstance(voice, PiperTTS):
                    voice = voice.faster(rate)
                elif isinstance(voice, EspeakTTS):
                    voice = EspeakTTS(
                        voice.voice, speed=min(500, round(voice.speed * rate)), language=voice.language
                    )
                self._tts[language] = voice
            return self._tts[language]

    def translator(self, source: str, target: str) -> Translator:
        with self._lock:
            key = (source, target)
            if key not in self._translators:
                self._translators[key] = build_translator(self.settings, source, target)
            return self._translators[key]

    def prepare(self, languages: list[str], speech_to_english: bool) -> None:
        """Blocking: load what a room of these languages needs, one tiny run each, each once."""
        silence = np.zeros(8000, dtype=np.float32)
        for language in sorted(set(languages)):
            if self._first(f"asr:{language}"):
                self.asr(language).transcribe(silence, streaming=True)
                load = getattr(self.tts(language), "load", None)
                if load is not None:
                    load()
            for other in sorted(set(languages) - {language}):
                if not self._first(f"{language}>{other}"):
                    continue
                if speech_to_english and other == "en":
                    self.asr(language).transcribe(silence, task="translate", streaming=True)
                else:
                    self.translator(language, other).translate("ok")

    def _first(self, item: str) -> bool:
        with self._lock:
            first = item not in self._prepared
            self._prepared.add(item)
            return first

    def close(self) -> None:
        with self._lock:
            for translator in self._translators.values():
                try:
                    translator.close()
                except Exception:
                    log.exception("closing a translator failed")
            self._translators.clear()
