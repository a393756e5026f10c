"""The translators' error, apart so that every translator module can raise it."""

from __future__ import annotations


class TranslationError(RuntimeError):
    """A translation failed (timed out, the process or endpoint broke); ``transient``: a retry may work."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
