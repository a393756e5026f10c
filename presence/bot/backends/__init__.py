"""Offline backends behind the protocols in :mod:`presence.seams` (VAD, ASR, TTS, responders).

Each backend lives in its own module and is chosen from the settings in one place:
:func:`presence.bot.backends.factory.build_backends`.
"""

from pathlib import Path


def looks_like_path(value: str) -> bool:
    """Whether a model setting names something on disk (else a hub id like ``owner/name``)."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()
