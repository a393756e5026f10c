"""The Presence interaction model: a transformers-compatible causal transformer over raw audio,
raw pixel patches and event tokens that decides the floor every micro-turn.

Importing this package registers the architecture with ``AutoConfig`` / ``AutoModel``, so
``AutoModel.from_pretrained(path)`` works on a saved checkpoint without ``trust_remote_code``.
The trained small checkpoint lives in :data:`CHECKPOINT_DIR`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel

from presence.model.configuration import EVENT_NAMES, FLOOR_ACTIONS, PresenceInteractionConfig
from presence.model.modeling import PresenceInteractionModel, PresenceInteractionOutput, StreamCache

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def _register() -> None:
    # exist_ok keeps a second import (or a reload in tests) from raising.
    try:
        AutoConfig.register(PresenceInteractionConfig.model_type, PresenceInteractionConfig, exist_ok=True)
    except TypeError:  # transformers versions without exist_ok
        try:
            AutoConfig.register(PresenceInteractionConfig.model_type, PresenceInteractionConfig)
        except ValueError:
            pass
    try:
        AutoModel.register(PresenceInteractionConfig, PresenceInteractionModel, exist_ok=True)
    except TypeError:
        try:
            AutoModel.register(PresenceInteractionConfig, PresenceInteractionModel)
        except ValueError:
            pass


_register()


def load_pretrained(path: str | Path | None = None, device: str | None = None) -> PresenceInteractionModel:
    """The trained checkpoint (default: the bundled one), in eval mode, offline, through the
    Auto classes (the architecture is registered above, no remote code)."""
    where = Path(path or CHECKPOINT_DIR).expanduser()
    if not (where / "config.json").is_file():
        raise FileNotFoundError(
            f"no interaction model checkpoint in {where} (config.json and model.safetensors, as "
            "presence train-interaction --out writes them; setting interaction_model)"
        )
    model = AutoModel.from_pretrained(str(where), local_files_only=True)
    if not isinstance(model, PresenceInteractionModel):
        raise ValueError(f"{where} holds a {type(model).__name__}, not a Presence interaction model")
    if device is not None:
        model = model.to(device)
    return model.eval()


__all__ = [
    "CHECKPOINT_DIR",
    "EVENT_NAMES",
    "FLOOR_ACTIONS",
    "PresenceInteractionConfig",
    "PresenceInteractionModel",
    "PresenceInteractionOutput",
    "StreamCache",
    "load_pretrained",
]
