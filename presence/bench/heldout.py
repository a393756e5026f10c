"""Floor policies side by side on held-out dialogues: ``presence bench heldout``.

The held-out split says sentences and uses caller voices that training never saw
(``presence.model.data``). Every policy gets the same micro-turns and the same ``FloorState``
(``StateTracker``: the engine's caller tracking, smart-turn's answer where the engine would
hold it, script words 0.6 s late): the fused rule (the default), the silence-only rule, and
one row per interaction-model checkpoint. Rows are printed for all dialogues and per caller
voice family (natural prosody: piper and Kokoro; espeak-ng, which confuses the detector).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from presence.model.data import DataSpec, load_dialogues
from presence.model.dialogue import Dialogue
from presence.model.evaluate import Report, run_model, run_policy, score

COLUMNS = (
    "| voices | policy | balanced acc. | macro-F1 | turn ends missed | speak latency p50 s | "
    "pauses taken | side talk answered | false yields | yield latency s |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def row(voices: str, name: str, r: Report) -> str:
    f, e = r.frame, r.events
    return (
        f"| {voices} | {name} | {f['balanced_accuracy']:.3f} | {f['macro_f1']:.3f} | "
        f"{e['turn_ends_missed']}/{e['turn_ends']} | {e['speak_latency_s_p50']} | "
        f"{e['pause_false_speak_rate']} | {e['side_talk_false_speak_rate']} | {e['false_yield_rate']} | "
        f"{e['yield_latency_s_mean']} |"
    )


def families(dialogues: Sequence[Dialogue]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"all": list(range(len(dialogues)))}
    for i, d in enumerate(dialogues):
        voice = str(d.meta.get("caller_voice", ""))
        key = "espeak-ng" if voice.startswith("espeak") else "piper + Kokoro"
        out.setdefault(key, []).append(i)
    return out


def policies(checkpoints: Sequence[str]) -> dict[str, Callable[[Sequence[Dialogue]], list]]:  # type: ignore[type-arg]
    from presence.bot.policy import RuleBasedPolicy, RuleParams
    from presence.config import Settings
    from presence.model import load_pretrained
    from presence.model.streaming import InteractionStreamer

    def rules(fused: bool) -> Callable[[Sequence[Dialogue]], list]:  # type: ignore[type-arg]
        params = RuleParams.from_settings(Settings(policy="fused")) if fused else RuleParams()
        return lambda ds: run_policy(lambda: RuleBasedPolicy(params), ds)

    def model(path: str) -> Callable[[Sequence[Dialogue]], list]:  # type: ignore[type-arg]
        def run(ds: Sequence[Dialogue]) -> list:  # type: ignore[type-arg]
            streamer = InteractionStreamer(load_pretrained(path or None), max_slots=max(1, len(ds)))
            return run_model(streamer, ds)[0]

        return run

    out = {"fused (default)": rules(True), "rules (silence only)": rules(False)}
    for path in checkpoints:
        out[f"model {Path(path).name if path else 'shipped'}"] = model(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="presence bench heldout", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="an interaction-model checkpoint folder; repeat for several (default: the shipped one)",
    )
    parser.add_argument("--dialogues", type=int, default=24, help="held-out dialogues [24]")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of a dialogue [40]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--espeak-only", action="store_true", help="espeak-ng callers only (fast to make)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    spec = DataSpec("heldout", args.dialogues, args.seconds, args.seed, args.espeak_only)

    def progress(i: int, n: int) -> None:
        print(
            f"generated {i}/{n} held-out dialogues ({time.perf_counter() - started:.0f} s)", file=sys.stderr
        )

    dialogues = load_dialogues(spec, progress)
    groups = families(dialogues)
    print(
        f"presence bench heldout: {len(dialogues)} dialogues of ~{args.seconds:g} s "
        f"({', '.join(f'{k} {len(v)}' for k, v in groups.items() if k != 'all')})"
    )
    print(COLUMNS)
    for name, run in policies(args.checkpoint or [""]).items():
        preds = run(dialogues)
        for voices, idx in groups.items():
            print(row(voices, name, score([dialogues[i] for i in idx], [preds[i] for i in idx])), flush=True)
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0
