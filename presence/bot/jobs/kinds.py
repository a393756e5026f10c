"""Registry of job kinds: name -> handler, imported lazily so a worker loads only what it serves."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from presence.bot.jobs.types import TEST_KINDS
from presence.bot.jobs.worker import Handler

log = logging.getLogger(__name__)

# The bundled sample corpus lives in ``docs/`` at the repository root (not package data): found
# next to the source tree in a checkout or an editable install, else in the working directory.
_BUNDLED_DOCS_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "docs",
    Path("docs"),
)

HANDLERS: dict[str, str] = {
    "search": "presence.bot.jobs.search:handle",
    "code": "presence.bot.jobs.code:handle",
    "think": "presence.bot.jobs.think:handle",
    "noop": "presence.bot.jobs.basic:noop",
    "echo": "presence.bot.jobs.basic:echo",
    "sleep": "presence.bot.jobs.basic:sleep",  # TEST_KINDS: only with test_kinds=True
    "fail": "presence.bot.jobs.basic:fail",
}


def load_handlers(kinds: Iterable[str], *, test_kinds: bool = False) -> dict[str, Handler]:
    """The handlers of ``kinds``; the test-only kinds (sleep, fail) only with ``test_kinds``."""
    handlers: dict[str, Handler] = {}
    for kind in kinds:
        target = HANDLERS.get(kind)
        if target is None:
            raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(sorted(HANDLERS))}")
        if kind in TEST_KINDS and not test_kinds:
            raise ValueError(
                f"job kind {kind!r} is for tests only: enable it with --test-kinds (option test_kinds)"
            )
        module, _, attr = target.partition(":")
        handlers[kind] = getattr(importlib.import_module(module), attr)
    return handlers


def options_from_settings(settings: Any) -> dict[str, Any]:
    """Worker options taken from :class:`presence.config.Settings` (absent fields are skipped)."""
    options: dict[str, Any] = {}
    for option, attr in (
        ("think_url", "llm_url"),
        ("think_api_key", "llm_api_key"),
        ("think_model", "llm_model"),
        ("docs_dir", "jobs_docs_dir"),
        ("web_search_url", "web_search_url"),
    ):
        value = getattr(settings, attr, None)
        if value:
            options[option] = value
    return options


def resolve_docs_dir(configured: str = "") -> str | None:
    """The folder the ``search`` kind indexes: ``configured`` when set (even if missing: the
    search job then fails with a clear message), else the bundled ``docs/`` folder, else None."""
    if configured:
        return os.path.expanduser(configured)
    for candidate in _BUNDLED_DOCS_CANDIDATES:
        if candidate.is_dir():
            return str(candidate.resolve())
    log.warning(
        "jobs: no documents folder for the search job (looked for %s); set PRESENCE_JOBS_DOCS_DIR",
        " and ".join(str(c) for c in _BUNDLED_DOCS_CANDIDATES),
    )
    return None
