"""The ``think`` job kind: one call to the "deep" model, off the real-time path.

Either an OpenAI-compatible chat endpoint (``think_url``, e.g. ``http://127.0.0.1:8000/v1``;
streaming or not) or a local callable handed to the worker as ``think_fn`` (the bot's local
LLM). The callable gets ``(messages, max_tokens)`` and may be sync (run in a thread),
async, a sync generator or an async generator of text pieces.

Errors are clear :class:`JobError` s; unreachable servers, 429 and 5xx answers are
:class:`TransientJobError` s, which the worker retries.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from presence.bot.backends.responder import ResponderError, openai_client, stream_chat
from presence.bot.jobs.types import JobError, TransientJobError

Messages = list[dict[str, str]]
LocalLLM = Callable[[Messages, int], Any]


def build_messages(args: dict[str, Any]) -> Messages:
    messages = args.get("messages")
    if messages is not None:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise JobError("think: args.messages must be a non-empty list of {role, content} strings")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt = args.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise JobError("think: give args.prompt (str) or args.messages")
    out: Messages = []
    system = args.get("system")
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": prompt})
    return out


async def chat_http(
    url: str,
    messages: Messages,
    *,
    model: str = "",
    api_key: str = "",
    max_tokens: int = 512,
    temperature: float = 0.7,
    stream: bool = False,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """One chat completion from an OpenAI-compatible endpoint (the live responder's client);
    returns text, model, finish_reason and usage."""
    base = url.rstrip("/").removesuffix("/chat/completions")
    payload: dict[str, Any] = {
        "model": model or "default",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    meta: dict[str, Any] = {}
    try:
        async with openai_client(base, api_key, min(10.0, timeout_s), timeout_s) as client:
            pieces = stream_chat(client, payload, api_key=api_key, meta=meta)
            text = "".join(await asyncio.wait_for(_collect(pieces), timeout_s))
    except ResponderError as exc:
        raise (TransientJobError if exc.transient else JobError)(f"think: {exc}") from None
    except TimeoutError:
        raise TransientJobError(f"think: {base} gave no whole answer within {timeout_s:g} s") from None
    return {
        "text": text,
        "model": meta.get("model") or model,
        "finish_reason": meta.get("finish_reason"),
        "usage": meta.get("usage") or {},
    }


async def _collect(pieces: AsyncIterator[str]) -> list[str]:
    return [piece async for piece in pieces]


async def chat_local(fn: LocalLLM, messages: Messages, max_tokens: int) -> dict[str, Any]:
    """Call the bot's local model; blocking callables run in a thread, off the event loop."""
    try:
        if inspect.isasyncgenfunction(fn):
            text = "".join([piece async for piece in fn(messages, max_tokens)])
        elif inspect.iscoroutinefunction(fn):
            text = _join(await fn(messages, max_tokens))
        else:
            text = await asyncio.to_thread(lambda: _join(fn(messages, max_tokens)))
    except JobError:
        raise
    except Exception as exc:
        raise JobError(f"think: local model failed: {type(exc).__name__}: {exc}") from exc
    return {"text": text, "model": getattr(fn, "__name__", "local"), "finish_reason": None, "usage": {}}


def _join(out: Any) -> str:
    if isinstance(out, str):
        return out
    if isinstance(out, Iterable):
        return "".join(str(p) for p in out)
    raise JobError(f"think: local model returned {type(out).__name__}, expected text")


async def handle(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Job kind ``think``: args ``prompt`` or ``messages``, optional ``system``, ``max_tokens``,
    ``temperature``, ``stream``."""
    messages = build_messages(args)
    max_tokens = args.get("max_tokens", 512)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 32_768:
        raise JobError("think: args.max_tokens must be an int in 1..32768")
    temperature = args.get("temperature", 0.7)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise JobError("think: args.temperature must be a number in [0, 2]")
    options = getattr(ctx, "options", {}) or {}
    fn = options.get("think_fn")
    if fn is not None:
        result = await chat_local(fn, messages, max_tokens)
        return {**result, "source": "local"}
    url = options.get("think_url")
    if not url:
        raise JobError("think: no model configured (set llm_url / think_url, or give the worker think_fn)")
    remaining = ctx.remaining() if hasattr(ctx, "remaining") else 60.0
    result = await chat_http(
        str(url),
        messages,
        model=str(options.get("think_model", "")),
        api_key=str(options.get("think_api_key", "")),
        max_tokens=max_tokens,
        temperature=float(temperature),
        stream=bool(args.get("stream", True)),
        timeout_s=max(0.5, min(float(options.get("think_timeout_s", 120.0)), remaining)),
    )
    return {**result, "source": "http"}


def responder_think_fn(responder: Any) -> LocalLLM:
    """The bot's own ``Responder`` (the local LLM by default) as a ``think_fn`` for workers."""
    from presence.seams import ChatMessage

    async def think(messages: Messages, max_tokens: int) -> AsyncIterator[str]:
        chat = [ChatMessage(str(m.get("role", "user")), str(m.get("content", ""))) for m in messages]
        async for piece in responder.stream(chat):
            yield piece

    think.__name__ = f"responder:{getattr(responder, 'name', 'local')}"
    return think
