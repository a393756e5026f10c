"""Audio end-of-turn detection (seams.TurnDetector): Pipecat's smart-turn v3.2 ONNX model.

smart-turn is a small Whisper-encoder classifier that hears whether the speaker sounds
finished (falling pitch, a complete phrase) or mid-clause. It reads the last 8 s of 16 kHz
audio as an 80x800 Whisper log-mel and answers P(turn complete) in ~tens of ms on one core.

The model file ships inside the ``pipecat-ai`` wheel (``pip install --no-deps
pipecat-ai==1.14.0``); pipecat itself is never imported (its import needs many extra
packages): the file is found through the distribution's metadata. The log-mel is
faster-whisper's numpy extractor (a dependency already), fed exactly as pipecat feeds its own
extractor: the last 8 s, zero-padded on the left, normalised to zero mean and unit variance.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from presence.bot.backends import looks_like_path
from presence.seams import SAMPLE_RATE

log = logging.getLogger(__name__)

PIPECAT_PIN = "pipecat-ai==1.14.0"
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
_WHEEL_PATH = f"pipecat/audio/turn/smart_turn/data/{MODEL_FILE}"
WINDOW_S = 8  # the model hears the last 8 s
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE  # 128000 -> 800 mel frames
_NORM_EPS = 1e-7  # transformers' / pipecat's zero-mean unit-variance epsilon
_SETTING = "turn_detector_model (PRESENCE_TURN_DETECTOR_MODEL)"


def bundled_model_path() -> Path:
    """The smart-turn v3.2 ONNX file inside the installed pipecat-ai wheel (not imported)."""
    how = (
        f"pip install --no-deps {PIPECAT_PIN} (the wheel ships the model), or set {_SETTING} "
        f"to a local {MODEL_FILE}, or set turn_detector=none"
    )
    try:
        dist = importlib.metadata.distribution("pipecat-ai")
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"the smart-turn model needs the pipecat-ai package: {how}") from exc
    candidates = [f for f in dist.files or () if f.as_posix() == _WHEEL_PATH]
    path = Path(str(dist.locate_file(candidates[0] if candidates else _WHEEL_PATH)))
    if not path.is_file():
        raise FileNotFoundError(
            f"pipecat-ai {dist.version} is installed but has no {_WHEEL_PATH} (expected {path}): {how}"
        )
    return path


def is_local_path(value: str) -> bool:
    """Whether a ``turn_detector_model`` value names a file (else a hub id ``owner/name``)."""
    return value.endswith(".onnx") or looks_like_path(value)


def split_hub_id(value: str) -> tuple[str, str]:
    """``owner/name`` or ``owner/name:file.onnx`` -> (repo id, file name)."""
    repo, _, filename = value.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(
            f"{value!r} is neither an existing .onnx file nor a hub id; set {_SETTING} to a "
            f"local .onnx path, a hub id like pipecat-ai/smart-turn-v3 (optionally "
            f"pipecat-ai/smart-turn-v3:{MODEL_FILE}), or leave it empty for the pipecat-ai wheel's"
        )
    return repo, filename or MODEL_FILE


def _hub_download(value: str) -> Path:
    repo, filename = split_hub_id(value)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise FileNotFoundError(
            f"{_SETTING}={value!r} is a hub id but huggingface_hub is not installed; pip install "
            f"huggingface_hub, or set it to a local .onnx file"
        ) from exc
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:  # offline, unknown repo or file, no access
        raise FileNotFoundError(
            f"could not fetch {filename} from the hub repo {repo} ({type(exc).__name__}: {exc}); "
            f"offline? download it once with network access, or set {_SETTING} to a local "
            f".onnx file, or leave it empty for the one in {PIPECAT_PIN}"
        ) from exc


def smart_turn_features(audio: np.ndarray, extractor: Any) -> np.ndarray:
    """``input_features`` [1, 80, 800] float32 for 16 kHz mono audio, as pipecat builds them.

    The last 8 s (zero-padded on the left when shorter), normalised over the whole 8 s buffer
    (padding included, as transformers' extractor does once pipecat has padded), then the
    Whisper log-mel without the extractor's extra right padding (800 frames, not 801).
    """
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    if x.size >= WINDOW_SAMPLES:
        x = x[-WINDOW_SAMPLES:]
    else:
        x = np.pad(x, (WINDOW_SAMPLES - x.size, 0))
    x = (x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)
    mel = np.asarray(extractor(x, padding=0), dtype=np.float32)
    return mel[np.newaxis, :, :]


class SmartTurnDetector:
    """smart-turn v3.2 (ONNX, CPU): P(the speaker's turn is complete) from the last 8 s.

    Constructing is cheap (it only finds the file; a hub id is fetched in :meth:`load`);
    :meth:`load` creates the session (one intra-op thread: the bot shares two cores with the
    VAD, ASR and TTS). Stateless and thread-safe: one instance serves every call.
    """

    name = "smart-turn"

    def __init__(self, model: str | Path | None = None) -> None:
        value = str(model or "")
        self._hub_id: str | None = None
        self.model_path: Path | None
        if not value:
            self.model_path = bundled_model_path()
        elif is_local_path(value):
            self.model_path = Path(value).expanduser()
            if not self.model_path.is_file():
                raise FileNotFoundError(
                    f"smart-turn model {self.model_path} does not exist; set {_SETTING} to a "
                    f"{MODEL_FILE}-like .onnx file, or leave it empty for the one in "
                    f"{PIPECAT_PIN} (pip install --no-deps {PIPECAT_PIN})"
                )
        else:
            split_hub_id(value)  # a malformed id fails here, at start
            self._hub_id = value
            self.model_path = None
        self._lock = threading.Lock()
        self._session: Any = None
        self._extractor: Any = None
        self._input = "input_features"

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        """Create the ONNX session (and fetch a hub model first); idempotent, thread-safe."""
        if self._session is not None:
            return
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime
            from faster_whisper.feature_extractor import FeatureExtractor

            if self.model_path is None:
                assert self._hub_id is not None
                self.model_path = _hub_download(self._hub_id)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            session = onnxruntime.InferenceSession(
                str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
            inputs = session.get_inputs()
            if len(inputs) != 1 or list(inputs[0].shape)[1:] != [80, 800]:
                raise ValueError(
                    f"{self.model_path} is not a smart-turn v3 model: it takes "
                    f"{[(i.name, i.shape) for i in inputs]}, not input_features [batch, 80, 800]"
                )
            self._input = inputs[0].name
            self._extractor = FeatureExtractor(
                feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=WINDOW_S, n_fft=400
            )
            self._session = session
            log.info("smart-turn loaded from %s", self.model_path)

    def probability(self, audio: np.ndarray) -> float:
        """P(turn complete) for 16 kHz float32 mono ``audio`` ending now (blocking)."""
        if self._session is None:
            self.load()
        features = smart_turn_features(audio, self._extractor)
        outputs = self._session.run(None, {self._input: features})
        p = float(np.asarray(outputs[0]).reshape(-1)[0])  # the graph ends in a sigmoid already
        return min(max(p, 0.0), 1.0) if np.isfinite(p) else 0.0
