"""``presence bench textturn``: does the local LLM tell a pause from a finished turn by the words?

The text end-of-turn detector (``TextTurnDetector``) on the project's own sentences, none of
them from the FDB stimuli: 20 prefixes a speaker pauses after ("When my flight lands tomorrow
morning") and 20 finished turns, as clean text and as the streaming ASR would garble them
(lower case, no punctuation). Prints every probability, a threshold sweep (prefixes caught as
unfinished against finished turns delayed) and the time per judgement. The default
``eot_text_threshold`` was chosen from this sweep.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Sequence

from presence.bot.backends.llama import LlamaResponder
from presence.seams import ChatMessage

UNFINISHED: tuple[str, ...] = (
    "I wanted to ask whether",
    "When my flight lands tomorrow morning",
    "If you could send me the details",
    "The problem with my account",
    "What I really need right now",
    "Because I was out of town last week",
    "My brother and I were planning",
    "After the meeting ends this afternoon",
    "The book I ordered from your store",
    "Although the hotel was very nice",
    "Could you tell me if",
    "I'm calling about the package that",
    "Since my card expired last month",
    "The reason I'm calling today",
    "Once the repair is done",
    "Whenever I try to log in",
    "Unless the weather gets worse",
    "The best time for me to call back",
    "Before I forget to mention it",
    "Every time I open the app",
)
FINISHED: tuple[str, ...] = (
    "I need to change my delivery address.",
    "My flight lands tomorrow morning.",
    "Can you send me the details?",
    "The hotel was very nice.",
    "I'm calling about my package.",
    "My card expired last month.",
    "What time do you open on Saturday?",
    "I would like to speak to a manager.",
    "The app keeps crashing when I open it.",
    "Please call me back after five.",
    "I lost my keys yesterday.",
    "How much does the blue one cost?",
    "That sounds great, thank you.",
    "I want to cancel my order.",
    "Is the museum open on Mondays?",
    "We need a table for six people.",
    "My internet has been down since Monday.",
    "Can I pay with a credit card?",
    "I forgot my password again.",
    "Tell me a joke.",
)
CONTEXT = (ChatMessage("user", "Hello?"), ChatMessage("assistant", "Hi there! How can I help you today?"))
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def asr_form(text: str) -> str:
    """What the streaming ASR gives: lower case, no punctuation."""
    return " ".join(re.sub(r"[^\w' ]", " ", text.lower()).split())


def run(
    responder: LlamaResponder, forms: Sequence[str] = ("clean", "asr")
) -> dict[str, dict[str, list[float]]]:
    responder.load()
    responder.turn_probability([*CONTEXT, ChatMessage("user", "Hello.")])  # the examples into the cache
    out: dict[str, dict[str, list[float]]] = {}
    times: list[float] = []
    for form in forms:
        out[form] = {}
        for label, group in (("unfinished", UNFINISHED), ("finished", FINISHED)):
            values = []
            for text in group:
                words = asr_form(text) if form == "asr" else text
                started = time.perf_counter()
                values.append(responder.turn_probability([*CONTEXT, ChatMessage("user", words)]))
                times.append((time.perf_counter() - started) * 1000)
                print(f"  {form:5} {label:10} {values[-1]:.3f}  {words}")
            out[form][label] = values
    ordered = sorted(times)
    print(
        f"\ntime per judgement: p50 {statistics.median(times):.0f} ms, p95 {ordered[int(0.95 * (len(ordered) - 1))]:.0f} ms"
    )
    print("\n| text | threshold | prefixes judged unfinished | finished turns judged unfinished |")
    print("|---|---|---|---|")
    for form, groups in out.items():
        for thr in THRESHOLDS:
            caught = sum(p < thr for p in groups["unfinished"]) / len(groups["unfinished"])
            delayed = sum(p < thr for p in groups["finished"]) / len(groups["finished"])
            print(f"| {form} | {thr:.2f} | {caught:.0%} | {delayed:.0%} |")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="presence bench textturn", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a GGUF file (default: the bundled Gemma 270M)")
    p.add_argument("--prompt", default="auto", choices=("auto", "fewshot", "chat"), help="llm_prompt [auto]")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    run(LlamaResponder(model_path=args.model or None, prompt_style=args.prompt, n_threads=args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
