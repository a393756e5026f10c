"""Machine translation (seams.Translator): Apertium (offline, rule-based), an OpenAI-compatible
endpoint, or a transformers seq2seq model. ``translate`` is blocking: run it in an executor.

:func:`build_translator` picks one per pair from the settings; :func:`check_pairs` says cheaply
(nothing loaded or started) whether every pair of a room's languages can be served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from presence.bot.backends import looks_like_path
from presence.bot.backends.apertium import (
    ApertiumTranslator,
    apertium_runs,
    available_pairs,
    pair_hint,
)
from presence.bot.backends.errors import TranslationError
from presence.bot.backends.languages import LANGUAGES, BackendMissing, check_language
from presence.bot.backends.responder import ResponderError, openai_client, stream_chat
from presence.config import Settings
from presence.seams import Translator

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------- OpenAI-compatible
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _io_loop() -> asyncio.AbstractEventLoop:
    """One event loop thread for every endpoint translator, so that the project's async OpenAI
    client (and its error handling) serves a blocking ``translate`` with pooled connections."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="presence-translate-io", daemon=True).start()
        return _loop


class OpenAITranslator:
    """Any OpenAI-compatible chat endpoint: a short instruction, the text, temperature 0."""

    name = "openai"

    def __init__(
        self,
        source: str,
        target: str,
        base_url: str,
        model: str,
        api_key: str = "",
        *,
        timeout_s: float = 5.0,
    ) -> None:
        self.source, self.target = check_language(source), check_language(target)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.system_prompt = (
            f"Translate from {LANGUAGES[self.source]} to {LANGUAGES[self.target]}. "
            "Answer with the translation only."
        )
        self.client = openai_client(self.base_url, api_key, min(5.0, timeout_s), timeout_s)

    async def _ask(self, payload: dict[str, Any]) -> str:
        return "".join([piece async for piece in stream_chat(self.client, payload, api_key=self.api_key)])

    def translate(self, text: str) -> str:
        text = " ".join(text.split())
        if not text:
            return ""
        payload = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": text},
            ],
            "stream": False,
            "temperature": 0,
            # A cap, not a target: room for a translation longer than its source in any script.
            "max_tokens": 32 + 2 * len(text),
        }
        future = asyncio.run_coroutine_threadsafe(self._ask(payload), _io_loop())
        try:
            answer = future.result(self.timeout_s + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TranslationError(
                f"{self.base_url} did not translate in {self.timeout_s:g} s", transient=True
            ) from None
        except ResponderError as exc:
            raise TranslationError(str(exc), transient=exc.transient) from exc
        answer = answer.strip()
        if len(answer) > 1 and answer[0] == answer[-1] and answer[0] in "\"'" and text[0] not in "\"'":
            answer = answer[1:-1].strip()  # some models quote their answer
        return answer

    def close(self) -> None:
        future = asyncio.run_coroutine_threadsafe(self.client.close(), _io_loop())
        try:
            future.result(2)
        except Exception:  # closing a connection pool that is already broken: nothing to do
            log.debug("closing the translation client failed", exc_info=True)


# ------------------------------------------------------------------------------ transformers
def downloads_allowed() -> bool:
    """Hub ids are fetched only when PRESENCE_ALLOW_DOWNLOAD=1 (nothing is downloaded by default)."""
    return os.environ.get("PRESENCE_ALLOW_DOWNLOAD", "").strip().lower() in ("1", "true", "yes")


def _model_id(model: str, source: str, target: str) -> str:
    # "Helsinki-NLP/opus-mt-{source}-{target}" names one single-direction model per pair.
    return model.format(source=source, target=target) if "{" in model else model


class TransformersTranslator:
    """A transformers seq2seq model (Marian, T5, BART...) by local path or hub id, on CPU, greedy."""

    name = "transformers"

    def __init__(self, source: str, target: str, model: str, *, max_input_tokens: int = 256) -> None:
        self.source, self.target = check_language(source), check_language(target)
        self.model_id = _model_id(model, self.source, self.target)
        if looks_like_path(self.model_id):
            self.model_id = str(Path(self.model_id).expanduser())
        self.max_input_tokens = max_input_tokens
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _from_pretrained(self, local_only: bool) -> tuple[Any, Any]:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_id, local_files_only=local_only)
        model = AutoModelForSeq2SeqLM.from_pretrained(self.model_id, local_files_only=local_only)
        return tokenizer, model.eval()

    def load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            started = time.perf_counter()
            try:
                self._tokenizer, self._model = self._from_pretrained(local_only=True)
            except (OSError, ValueError) as exc:  # not on disk / not in the hub cache
                if not downloads_allowed() or looks_like_path(self.model_id):
                    raise BackendMissing(
                        f"cannot load the translation model {self.model_id!r} ({str(exc).splitlines()[0]})",
                        "set translate_model to a local seq2seq model folder or a hub id already in the "
                        "cache (PRESENCE_ALLOW_DOWNLOAD=1 fetches hub ids)",
                    ) from exc
                self._tokenizer, self._model = self._from_pretrained(local_only=False)
            log.info("translation model %s loaded in %.2f s", self.model_id, time.perf_counter() - started)

    def translate(self, text: str) -> str:
        import torch

        text = " ".join(text.split())
        if not text:
            return ""
        self.load()
        with self._lock, torch.inference_mode():
            inputs = self._tokenizer(
                text, return_tensors="pt", truncation=True, max_length=self.max_input_tokens
            )
            inputs.pop("token_type_ids", None)
            output = self._model.generate(
                **inputs, do_sample=False, num_beams=1, max_new_tokens=16 + 2 * inputs["input_ids"].shape[1]
            )
        return str(self._tokenizer.decode(output[0], skip_special_tokens=True)).strip()

    def close(self) -> None:
        with self._lock:
            self._model = self._tokenizer = None


def _transformers_problem(model_id: str) -> str | None:
    """Why ``model_id`` cannot load here, from the file system only (None: it should)."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return "transformers and torch are not installed (pip install transformers torch)"
    if looks_like_path(model_id):
        return None if Path(model_id).expanduser().is_dir() else f"{model_id} is not a folder"
    if downloads_allowed():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json")
    except (ImportError, ValueError) as exc:
        return f"{model_id!r} is not a usable hub id ({exc})"
    return None if isinstance(cached, str) else f"{model_id} is not in the local hub cache"


# ------------------------------------------------------------------------------------ choosing
def _choose(settings: Settings, source: str, target: str) -> str:
    """Which backend serves source->target, or BackendMissing saying what would; starts nothing."""
    if source == target:
        raise ValueError(f"nothing to translate: source and target are both {source}")
    pair = f"{LANGUAGES[source]}->{LANGUAGES[target]} ({source}->{target})"
    choice = settings.translator
    if choice == "auto":
        if (source, target) in available_pairs() and apertium_runs():
            return "apertium"
        if settings.translate_url or settings.llm_url:
            choice = "openai"
        elif settings.translate_model:
            choice = "transformers"
        else:
            raise BackendMissing(f"no translator for {pair}", pair_hint(source, target))
    if choice == "apertium" and not apertium_runs():
        raise BackendMissing("translator=apertium but Apertium is not installed", "apt-get install apertium")
    if choice == "apertium" and (source, target) not in available_pairs():
        raise BackendMissing(f"translator=apertium has no {pair} pair here", pair_hint(source, target))
    if choice == "openai":
        if not (settings.translate_url or settings.llm_url):
            raise BackendMissing(
                f"translator=openai for {pair} has no endpoint", "set translate_url (or llm_url)"
            )
        if not (settings.translate_model or settings.llm_model):
            raise BackendMissing(
                f"no model name for the translation endpoint ({pair})",
                "set translate_model to the endpoint's model name",
            )
    if choice == "transformers":
        if not settings.translate_model:
            raise BackendMissing(f"translator=transformers for {pair} has no model", "set translate_model")
        problem = _transformers_problem(_model_id(settings.translate_model, source, target))
        if problem:
            raise BackendMissing(f"no translation model for {pair}: {problem}", "set translate_model")
    if choice not in ("apertium", "openai", "transformers"):
        raise ValueError(
            f"unknown translator {choice!r}; set translator to auto, apertium, openai or transformers"
        )
    return choice


def build_translator(settings: Settings, source: str, target: str) -> Translator:
    """The translator settings.translator picks for source->target (auto: Apertium where it has the
    pair, else the OpenAI-compatible endpoint, else translate_model). Nothing is loaded yet."""
    source, target = check_language(source), check_language(target)
    choice = _choose(settings, source, target)
    if choice == "apertium":
        return ApertiumTranslator(source, target)
    if choice == "openai":
        return OpenAITranslator(
            source,
            target,
            base_url=settings.translate_url or settings.llm_url,
            model=settings.translate_model or settings.llm_model,
            api_key=settings.llm_api_key,
        )
    return TransformersTranslator(source, target, settings.translate_model)


def check_pairs(settings: Settings, languages: list[str]) -> None:
    """BackendMissing for the first ordered pair of ``languages`` no translator serves (cheap:
    a directory listing and settings; no model loaded, no process started)."""
    codes = list(dict.fromkeys(check_language(code) for code in languages))
    for source, target in itertools.permutations(codes, 2):
        _choose(settings, source, target)
