"""``presence bench responder``: local LLMs side by side, latency and answer quality.

Each model answers the same questions as one call (the context grows, and is folded into a
rolling summary as on a real call, so llama.cpp's prompt cache works as it would there). Per
answer: first token and first speakable piece (what TTS starts on), from the request; per model,
the share of answers that contain what a correct answer must say. The models run one after
another in this process, on the threads the bot would use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from presence.bot.backends.llama import LlamaResponder
from presence.bot.backends.responder import DEFAULT_SYSTEM_PROMPT
from presence.bot.context import Conversation
from presence.bot.reply import pop_speakable
from presence.seams import ChatMessage

# (question, a regular expression a correct answer matches; None: any short friendly answer)
QUESTIONS: list[tuple[str, str | None]] = [
    ("Hello, who am I talking to?", r"presence"),
    ("What is the capital of France?", r"paris"),
    ("How many days are in a week?", r"\b(seven|7)\b"),
    ("What do bees make?", r"honey"),
    ("What color is the sky on a clear day?", r"blue"),
    ("How many legs does a spider have?", r"\b(eight|8)\b"),
    ("What is the largest planet in our solar system?", r"jupiter"),
    ("What is frozen water called?", r"\bice\b"),
    ("Which animal says moo?", r"\bcows?\b"),
    ("How many hours are in a day?", r"\b(twenty[- ]four|24)\b"),
    ("What is the capital of Japan?", r"tokyo"),
    ("What do you call a baby cat?", r"kitten"),
    ("Can you help me plan my day?", None),
    ("What should I cook for dinner tonight?", None),
    ("My name is Ada. Can you remember that?", r"\bada\b"),
    ("What is my name?", r"\bada\b"),
    ("Thanks, that's all for now.", None),
]


@dataclass
class Answer:
    question: str
    text: str
    first_token_ms: float
    first_piece_ms: float
    total_ms: float
    correct: bool | None


@dataclass
class ModelRun:
    model: str
    load_s: float
    answers: list[Answer] = field(default_factory=list)

    def row(self) -> str:
        ft = [a.first_token_ms for a in self.answers]
        fp = [a.first_piece_ms for a in self.answers]
        graded = [a.correct for a in self.answers if a.correct is not None]
        words = [len(a.text.split()) for a in self.answers]
        empty = sum(not a.text.strip() for a in self.answers)
        return (
            f"| {self.model} | {self.load_s:.1f} | {np.median(ft):.0f} / {np.percentile(ft, 95):.0f} "
            f"| {np.median(fp):.0f} / {np.percentile(fp, 95):.0f} | {sum(graded)}/{len(graded)} "
            f"| {np.mean(words):.1f} | {empty} |"
        )


def _ask(responder: LlamaResponder, messages: list[ChatMessage]) -> tuple[str, float, float, float]:
    """One answer: its text, and seconds to its first token, first speakable piece, and end."""
    t0 = time.perf_counter()
    first_token = first_piece = None
    text = buffer = ""

    def on_text(delta: str) -> bool:
        nonlocal first_token, first_piece, text, buffer
        if first_token is None and delta.strip():
            first_token = time.perf_counter() - t0
        text += delta
        buffer += delta
        pieces, buffer = pop_speakable(buffer, first=first_piece is None)
        if pieces and first_piece is None:
            first_piece = time.perf_counter() - t0
        return False

    responder.generate(messages, on_text)
    total = time.perf_counter() - t0
    return text.strip(), first_token or total, first_piece or total, total


def run_model(path: str | None, threads: int, max_tokens: int) -> ModelRun:
    responder = LlamaResponder(
        model_path=path,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        max_tokens=max_tokens,
        n_threads=threads,
        exact_arithmetic=False,
    )
    started = time.perf_counter()
    responder.load()
    run = ModelRun(Path(path).name if path else "bundled Gemma 3 270M", time.perf_counter() - started)
    conversation = Conversation(DEFAULT_SYSTEM_PROMPT)
    for question, expected in QUESTIONS:
        conversation.append(ChatMessage("user", question))
        text, first_token, first_piece, total = _ask(responder, conversation.messages())
        conversation.append(ChatMessage("assistant", text))
        fold = conversation.step()
        if fold is not None:
            conversation.apply(fold, conversation.summarize(fold.summary, fold.messages))
        correct = None if expected is None else bool(re.search(expected, text, re.IGNORECASE))
        answer = Answer(
            question,
            text,
            1000 * first_token,
            1000 * first_piece,
            1000 * total,
            correct,
        )
        run.answers.append(answer)
        print(f"  {question} -> {text!r} ({answer.first_piece_ms:.0f} ms)", file=sys.stderr)
    return run


def report(runs: list[ModelRun], threads: int) -> str:
    lines = [
        f"{len(QUESTIONS)} questions as one call, {threads} llama.cpp threads, {os.cpu_count()} cores",
        "",
        "| model | load s | first token p50 / p95 ms | first speakable piece p50 / p95 ms | correct "
        "| words per answer | empty answers |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [run.row() for run in runs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="presence bench responder", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a GGUF file (repeatable); 'bundled' is the default Gemma 3 270M (the default list)",
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (the bot uses 2)")
    parser.add_argument("--max-tokens", type=int, default=48, help="the bot's llm_max_tokens")
    parser.add_argument("--json", default="", help="also write every answer here")
    args = parser.parse_args(argv)
    models = args.model or ["bundled"]
    runs = []
    for model in models:
        print(f"{model}:", file=sys.stderr)
        runs.append(run_model(None if model == "bundled" else model, args.threads, args.max_tokens))
    print(report(runs, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0
