"""From a ``MicroTurn`` (+ ``FloorState``) to the model's raw input arrays, with clear errors.

Validation lives here, on the host, so a bad micro-turn is rejected before it reaches a batch
(where it would poison every call of the batch) and the message says what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from presence.bot.policy import content_words, sounds_unfinished
from presence.model.configuration import EVENT_NAMES, PresenceInteractionConfig
from presence.seams import FloorState, MicroTurn, VideoFrame

MAX_ASPECT = 4.0  # wider or taller frames than 4:1 are not camera frames


@dataclass(slots=True)
class TurnArrays:
    """One micro-turn as the model reads it (numpy, host side)."""

    caller_audio: np.ndarray  # (samples,) float32
    bot_audio: np.ndarray  # (samples,) float32
    caller_vad: np.ndarray  # (frames,) float32
    caller_lost: np.ndarray  # (frames,) float32 0/1
    video: np.ndarray  # (3, S, S) uint8
    video_mask: bool
    events: np.ndarray  # (num_events,) float32 0/1


def _audio(name: str, audio: object, expected: int, micro_turn_ms: int, allow_empty: bool) -> np.ndarray:
    if not isinstance(audio, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise ValueError(f"{name} must be mono (1-D), got shape {audio.shape}")
    if audio.size == 0 and allow_empty:
        return np.zeros(expected, dtype=np.float32)
    if audio.size != expected:
        rate = audio.size * 1000 // micro_turn_ms
        raise ValueError(
            f"{name} has {audio.size} samples, expected {expected} ({micro_turn_ms} ms at 16 kHz); "
            f"it looks like {rate} Hz audio: resample to 16 kHz (presence.media.audio.resample)"
        )
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{name} must be float audio in [-1, 1], got dtype {audio.dtype}")
    out = audio.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    return out


def _check_rgb(rgb: object, min_side: int) -> np.ndarray:
    if not isinstance(rgb, np.ndarray):
        raise TypeError(f"a video frame must be a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a video frame must be RGB of shape (height, width, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"a video frame must be uint8 RGB, got dtype {rgb.dtype}")
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise ValueError(f"a video frame of {w}x{h} is too small: both sides must be at least {min_side} px")
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise ValueError(f"a video frame of {w}x{h} has an odd aspect ratio (more than {MAX_ASPECT:g}:1)")
    return rgb


def preprocess_frame(rgb: np.ndarray, size: int, min_side: int = 16) -> np.ndarray:
    """RGB (H, W, 3) uint8 of any reasonable size -> (3, size, size) uint8: centre-crop to a
    square (the speaker is usually centred), then an anti-aliased resize."""
    rgb = _check_rgb(rgb, min_side)
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(rgb[top : top + side, left : left + side])
    if side == size:
        return square.transpose(2, 0, 1).copy()
    x = torch.from_numpy(square).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8).numpy()


def event_flags(turn_events: tuple[str, ...], state: FloorState | None) -> np.ndarray:
    """The event tokens of a micro-turn: see configuration.EVENT_NAMES."""
    names = [e.lower() for e in turn_events]
    flags = {
        "result": any("result" in e for e in names) or bool(state is not None and state.result_waiting),
        "result_urgent": bool(state is not None and state.result_urgent),
        "reply_ready": bool(state is not None and state.reply_ready) or "reply_ready" in names,
        "bot_speaking": bool(state is not None and state.bot_speaking),
        "bot_held": bool(state is not None and state.bot_held),
    }
    eot = state.eot_probability if state is not None else None
    words = state.partial_text if state is not None else ""
    values = {
        **flags,
        "eot_asked": eot is not None,
        "eot_complete": eot or 0.0,
        "words_unfinished": sounds_unfinished(words),
        "content_words": min(content_words(words, frozenset()), 4) / 4,
    }
    return np.array([float(values[name]) for name in EVENT_NAMES], dtype=np.float32)


def encode_turn(turn: MicroTurn, state: FloorState | None, config: PresenceInteractionConfig) -> TurnArrays:
    """Validate one micro-turn and turn it into model inputs (raises ValueError/TypeError)."""
    if not isinstance(turn, MicroTurn):
        raise TypeError(f"expected a MicroTurn, got {type(turn).__name__}")
    samples, frames = config.samples_per_turn, config.frames_per_turn
    caller = turn.caller_audio
    if isinstance(caller, np.ndarray) and caller.size == 0:
        raise ValueError(
            f"empty micro-turn {turn.index} of call {turn.call_id!r}: caller_audio holds no samples "
            f"(a micro-turn carries {samples} samples; missing audio is zeros marked lost)"
        )
    if abs(turn.duration * 1000 - config.micro_turn_ms) > 1e-3:
        raise ValueError(
            f"micro-turn lasts {turn.duration * 1000:g} ms, the model was trained on "
            f"{config.micro_turn_ms} ms micro-turns (setting micro_turn_ms)"
        )
    caller = _audio("caller_audio", caller, samples, config.micro_turn_ms, allow_empty=False)
    # No bot audio at all (a call with the output muted) is silence, not an error.
    bot = _audio("bot_audio", turn.bot_audio, samples, config.micro_turn_ms, allow_empty=True)
    vad = np.asarray(turn.vad, dtype=np.float32).reshape(-1)
    lost = np.asarray(turn.lost).reshape(-1)
    if vad.size != frames or lost.size != frames:
        raise ValueError(
            f"vad and lost must hold one entry per {config.frame_ms} ms frame ({frames}), "
            f"got {vad.size} and {lost.size}"
        )
    if not np.isfinite(vad).all():
        raise ValueError("vad contains NaN or infinite values")
    video = np.zeros((3, config.image_size, config.image_size), dtype=np.uint8)
    has_video = False
    if turn.video:
        frame = turn.video[-1]  # the most recent frame of the window
        if not isinstance(frame, VideoFrame):
            raise TypeError(f"MicroTurn.video must hold VideoFrame objects, got {type(frame).__name__}")
        video = preprocess_frame(frame.rgb, config.image_size, config.image_patch)
        has_video = True
    return TurnArrays(
        caller_audio=caller,
        bot_audio=bot,
        caller_vad=np.clip(vad, 0.0, 1.0),
        caller_lost=lost.astype(np.float32),
        video=video,
        video_mask=has_video,
        events=event_flags(turn.events, state)[: config.num_events],
    )


def stack_turns(items: list[TurnArrays]) -> dict[str, np.ndarray]:
    """A batch of encoded micro-turns as arrays with a leading batch axis."""
    return {
        "caller_audio": np.stack([i.caller_audio for i in items]),
        "bot_audio": np.stack([i.bot_audio for i in items]),
        "caller_vad": np.stack([i.caller_vad for i in items]),
        "caller_lost": np.stack([i.caller_lost for i in items]),
        "video": np.stack([i.video for i in items]),
        "video_mask": np.array([i.video_mask for i in items], dtype=bool),
        "events": np.stack([i.events for i in items]),
    }
