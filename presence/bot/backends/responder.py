"""Reply text (seams.Responder): an OpenAI-compatible endpoint or fixed rules, and what every
responder shares (the local llama.cpp model is :mod:`presence.bot.backends.llama`).

Every ``stream`` is an async generator of text deltas; the event loop never waits on one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from presence.bot.numbers import parse_number, say_number
from presence.seams import ChatMessage

log = logging.getLogger(__name__)

BOT_NAME = "Presence"
DEFAULT_SYSTEM_PROMPT = (
    "You are Presence, a friendly voice assistant on a call. Answer in one or two short spoken sentences."
)


class ResponderError(RuntimeError):
    """A responder could not produce a reply (endpoint down, HTTP error, broken stream).

    ``status`` is the HTTP status of a refused request; ``transient`` says that trying again
    later may work (unreachable, timed out, 429 or 5xx)."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


# ---------------------------------------------------------------------------- OpenAI-compatible


def openai_client(
    base_url: str, api_key: str = "", connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0
) -> Any:
    """The project's one OpenAI-compatible client (the live responder and the ``think`` job).

    No retries (the reply path cannot wait for them; the job worker retries on its own) and no
    total limit (a long reply is fine); a stalled connect or read is not."""
    from openai import AsyncOpenAI, Timeout

    return AsyncOpenAI(
        base_url=base_url.rstrip("/"),
        api_key=api_key or "unused",  # a local server wants none: the header is left out below
        max_retries=0,
        timeout=Timeout(None, connect=connect_timeout_s, read=read_timeout_s),
    )


async def stream_chat(
    client: Any, payload: dict[str, Any], *, api_key: str = "", meta: dict[str, Any] | None = None
) -> AsyncIterator[str]:
    """``POST {base_url}/chat/completions`` and yield the reply's content as it arrives.

    A server that ignores ``stream`` and sends the whole completion as JSON is read as one
    piece. ``meta`` (when given) receives ``model``, ``finish_reason`` and ``usage``. Every
    failure is a :class:`ResponderError` that names the endpoint."""
    import openai

    url = f"{client.base_url}".rstrip("/") + "/chat/completions"
    meta = {} if meta is None else meta
    headers = {} if api_key else {"Authorization": openai.omit}
    timeout = client.timeout
    try:
        raw = await client.chat.completions.with_raw_response.create(**payload, extra_headers=headers)
        if raw.headers.get("content-type", "").startswith("application/json"):
            text = _completion(await raw.http_response.aread(), url, meta)
            if text:
                yield text
            return
        async for chunk in raw.parse():
            meta["model"] = chunk.model or meta.get("model")
            choice = chunk.choices[0] if chunk.choices else None
            if choice is not None and choice.delta.content:
                yield choice.delta.content
            if choice is not None and choice.finish_reason:
                meta["finish_reason"] = choice.finish_reason
            if chunk.usage is not None:
                meta["usage"] = chunk.usage.model_dump()
    except openai.APIStatusError as exc:
        status = exc.status_code
        detail = _error_detail(exc)
        raise ResponderError(
            f"{url} answered HTTP {status}: {detail or '(empty)'}",
            status=status,
            transient=status == 429 or status >= 500,
        ) from None
    except openai.APITimeoutError as exc:
        raise ResponderError(
            f"{url} did not answer in time (connect {timeout.connect:g} s, read {timeout.read:g} s)",
            transient=True,
        ) from exc
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        raise ResponderError(f"cannot talk to {url}: {cause}; check llm_url", transient=True) from exc
    except openai.APIError as exc:  # an error event inside the stream
        raise ResponderError(f"{url} reported an error mid-stream: {exc.message}") from None
    except ValueError as exc:  # a stream event that is not JSON
        raise ResponderError(
            f"{url} sent a malformed stream event: {exc}: {str(getattr(exc, 'doc', ''))[:200]!r}"
        ) from None
    if "finish_reason" not in meta:
        raise ResponderError(f"{url} closed the stream before the reply was finished", transient=True)


def _error_detail(exc: Any) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        body = error.get("message", error) if isinstance(error, dict) else error
    return str(body if body is not None else exc.message)[:300].strip()


def _completion(body: bytes, url: str, meta: dict[str, Any]) -> str:
    """A whole (non-streamed) completion's text."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        message = choice.get("message") or {}
        meta.update(
            model=data.get("model"),
            finish_reason=choice.get("finish_reason") or "stop",
            usage=data.get("usage") or {},
        )
        return str(message.get("content") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ResponderError(f"{url} sent a malformed completion: {body[:200]!r}") from exc


class OpenAIResponder:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama...), through
    the ``openai`` SDK, streaming: each ``choices[0].delta.content`` is yielded as it arrives."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_tokens: int = 48,
        temperature: float = 0.3,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
    ) -> None:
        if not base_url:
            raise ValueError("OpenAIResponder needs llm_url (PRESENCE_LLM_URL)")
        if not model:
            raise ValueError("OpenAIResponder needs a model name: set llm_model (PRESENCE_LLM_MODEL)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.client = openai_client(self.base_url, api_key, connect_timeout_s, read_timeout_s)

    async def prefill(self, messages: Sequence[ChatMessage]) -> None:
        return None  # a remote server keeps its own cache

    def payload(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        # A "tool" message without a tool_call_id is refused by OpenAI-style servers: a
        # background result goes as a system note instead.
        wire = [{"role": "system" if m.role == "tool" else m.role, "content": m.content} for m in messages]
        if not any(m.role == "system" for m in messages):
            wire.insert(0, {"role": "system", "content": self.system_prompt})
        return {
            "model": self.model,
            "messages": wire,
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        async for delta in stream_chat(self.client, self.payload(messages), api_key=self.api_key):
            yield delta


# ---------------------------------------------------------------------------- rules

_OPERATORS: dict[str, tuple[str, Callable[[float, float], float | None]]] = {
    "plus": ("plus", lambda a, b: a + b),
    "+": ("plus", lambda a, b: a + b),
    "add": ("plus", lambda a, b: a + b),
    "minus": ("minus", lambda a, b: a - b),
    "-": ("minus", lambda a, b: a - b),
    "times": ("times", lambda a, b: a * b),
    "multiplied by": ("times", lambda a, b: a * b),
    "x": ("times", lambda a, b: a * b),
    "*": ("times", lambda a, b: a * b),
    "divided by": ("divided by", lambda a, b: a / b if b else None),
    "over": ("divided by", lambda a, b: a / b if b else None),
    "/": ("divided by", lambda a, b: a / b if b else None),
}
_NUM = r"(-?\d+(?:\.\d+)?|(?:(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)[- ]?)?[a-z]+)"
_ARITHMETIC = re.compile(
    rf"{_NUM}\s*(plus|\+|add|minus|-|times|multiplied by|x|\*|divided by|over|/)\s*{_NUM}"
)


def arithmetic(text: str) -> str | None:
    for match in _ARITHMETIC.finditer(text):
        a, op, b = match.group(1), match.group(2), match.group(3)
        left, right = parse_number(a), parse_number(b)
        if left is None or right is None:
            continue
        spoken, fn = _OPERATORS[op]
        result = fn(left, right)
        if result is None:
            return "I can't divide by zero."
        return f"{say_number(left)} {spoken} {say_number(right)} is {say_number(result)}."
    return None


_FILLERS = re.compile(r"\b(um+|uh+|erm*|ah+|hmm+|you know)\b,?\s*", re.IGNORECASE)
_SWAPS = {"i": "you", "me": "you", "my": "your", "mine": "yours", "i'm": "you're", "am": "are"}


def _gist(text: str, max_words: int = 10) -> str:
    cleaned = _FILLERS.sub("", text).strip(" .!?,")
    words = [_SWAPS.get(w.lower(), w) for w in cleaned.split()]
    gist = " ".join(words[:max_words]).rstrip(" ,;:")
    return gist + ("..." if len(words) > max_words else "")


def last_user(messages: Sequence[ChatMessage]) -> str:
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


def plain_text(text: str) -> str:
    """Lower case, punctuation other than arithmetic signs and apostrophes dropped."""
    return " ".join(re.sub(r"[^\w\s'+\-*/.]", " ", text.lower()).split())


class RuleResponder:
    """A deterministic fallback for when no LLM is installed or configured.

    It greets, says its name, tells the time and date, does "what is A plus/minus/times/divided
    by B" arithmetic (digits or number words up to ninety-nine), and otherwise says what it
    heard. Not a conversational model: it keeps a call usable and tests reproducible.
    """

    name = "rules"

    def __init__(
        self,
        bot_name: str = BOT_NAME,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.bot_name = bot_name
        self._clock = clock or dt.datetime.now

    def reply(self, messages: Sequence[ChatMessage]) -> str:
        """The whole reply to the last caller message."""
        last = last_user(messages)
        plain = plain_text(last)
        if not plain.strip(" .'"):
            return "Sorry, I didn't catch that. Could you say it again?"
        answer = arithmetic(plain)
        if answer:
            return answer
        if re.search(r"\b(your name|who are you|who is this|who am i talking to)\b", plain):
            return f"My name is {self.bot_name}."
        if re.search(r"\b(what time|the time|time is it)\b", plain):
            now = self._clock()
            return f"It's {now.strftime('%I:%M %p').lstrip('0')}."
        if re.search(r"\b(what day|the date|today's date|what's the date)\b", plain):
            now = self._clock()
            return f"Today is {now.strftime('%A, %B')} {now.day}."
        if re.search(r"\b(thank you|thanks)\b", plain):
            return "You're welcome!"
        if re.search(r"\b(bye|goodbye|see you)\b", plain):
            return "Goodbye! Talk to you soon."
        if re.search(r"^(hi|hello|hey|good (morning|afternoon|evening)|howdy)\b", plain):
            return f"Hello! I'm {self.bot_name}. How can I help?"
        if re.search(r"\bhow are you\b", plain):
            return "I'm doing well, thanks for asking. How can I help?"
        gist = _gist(last)
        ending = "" if gist.endswith("...") else "."
        return f"I heard you say: {gist}{ending} I can't answer that without a language model."

    async def prefill(self, messages: Sequence[ChatMessage]) -> None:
        return None  # nothing to warm

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        # Word by word, like a model would, so callers exercise their streaming path.
        words = self.reply(messages).split(" ")
        for i, word in enumerate(words):
            yield word if i == 0 else " " + word
            await asyncio.sleep(0)
