"""Train the interaction model on synthetic dialogues and score it against the rule policy.

CLI entry: ``main(argv)`` (wired as ``presence train-interaction``). A small configuration
trains on a 2-core CPU in under ten minutes; ``--device cuda --size base`` trains larger ones.

    presence train-interaction --out presence/model/checkpoint --minutes 8

Steps: generate (or read cached) train and held-out dialogues (``presence.model.data``), train
with a time budget (cosine learning rate over the budget), then step the trained model through
the held-out calls with the streaming API and the rule policy with the same floor states, and
write the checkpoint (safetensors + config.json), ``metrics.json`` and a model card README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from presence.bot.policy import RuleBasedPolicy, RuleParams
from presence.config import Settings
from presence.model.configuration import FLOOR_ACTIONS, PresenceInteractionConfig
from presence.model.data import DataSpec, load_dialogues
from presence.model.dialogue import Dialogue
from presence.model.evaluate import Report, calibrate, format_report, run_model, run_policy, score
from presence.model.modeling import PresenceInteractionModel
from presence.model.sources import ESPEAK_NAMES, HELDOUT_ESPEAK
from presence.model.streaming import InteractionStreamer
from presence.seams import FloorState

log = logging.getLogger(__name__)

# Presets. "small" is the committed CPU checkpoint; "1b" is for GPU benchmarks (random weights).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "window_turns": 4,
        "image_patch": 32,
    },
    "small": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 384,
        "window_turns": 16,
        "image_patch": 32,
    },
    "base": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
        "window_turns": 32,
        "image_patch": 16,
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 20,
        "num_attention_heads": 16,
        "intermediate_size": 8192,
        "window_turns": 16,
        "image_patch": 16,
    },
}


def make_config(size: str, **overrides: Any) -> PresenceInteractionConfig:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: one of {', '.join(SIZES)}")
    return PresenceInteractionConfig(**{**SIZES[size], **overrides})


def class_weights(dialogues: Sequence[Dialogue], cap: float = 25.0) -> list[float]:
    """Inverse square-root frequency: rare decisions (yield, backchannel) still count."""
    counts = np.bincount(np.concatenate([d.actions for d in dialogues]), minlength=len(FLOOR_ACTIONS))
    freq = np.maximum(counts / counts.sum(), 1e-4)
    w = np.minimum(freq**-0.5, cap * float(np.min(freq**-0.5)))
    w = w / float(np.sum(w * freq))  # mean weight per example stays 1
    return [round(float(x), 4) for x in w]


RARE = ("backchannel", "speak", "yield", "interrupt")  # the decisions crops are centred on
HARD_NEGATIVE_WEIGHT = 4.0


def hard_negative_weights(d: Dialogue, weight: float = HARD_NEGATIVE_WEIGHT) -> np.ndarray:
    """(N,) loss weight per micro-turn: the moments where a wrong 'speak' or 'yield' costs a
    caller most count ``weight`` times: a mid-sentence pause (from 200 ms in), side talk and the
    second after it, and backchannels or side talk over the bot (and 600 ms after)."""
    t_end = (np.arange(d.turns) + 1) * 0.2
    w = np.ones(d.turns, np.float32)
    speaking = d.bot_speaking
    for start, end in d.meta["pauses"]:
        w[(t_end > start + 0.2) & (t_end <= end)] = weight
    for start, end, during_bot in d.meta["side_talk"]:
        window = (t_end > start) & (t_end <= end + 1.0)
        w[window & speaking if during_bot else window] = weight
    for start, end in d.meta["caller_backchannels"]:
        w[(t_end > start) & (t_end <= end + 0.6) & speaking] = weight
    return w


class Batcher:
    """Random crops of ``seq`` micro-turns: a fifth from a call's start, half ending shortly
    after a rare decision (class-balanced: an urgent-result interrupt is drawn as often as an
    end of turn), the rest anywhere."""

    def __init__(self, dialogues: Sequence[Dialogue], seq: int, seed: int) -> None:
        self.items: list[dict[str, torch.Tensor]] = []
        self.events: dict[str, list[tuple[int, int]]] = {}  # class -> (dialogue, micro-turn)
        for d in dialogues:
            if d.turns < seq:
                continue
            x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.inputs().items()}
            x["action_labels"] = torch.from_numpy(d.actions)
            x["vap_labels"] = torch.from_numpy(d.vap)
            x["alert_labels"] = torch.from_numpy(d.alert)
            if d.eot_target is not None:
                x["teacher_labels"] = torch.from_numpy(d.eot_target)
            x["action_weights"] = torch.from_numpy(hard_negative_weights(d))
            self.items.append(x)
            for cls in RARE:
                for k in np.flatnonzero(d.actions == FLOOR_ACTIONS.index(cls)):
                    self.events.setdefault(cls, []).append((len(self.items) - 1, int(k)))
        if not self.items:
            raise ValueError(f"no dialogue is {seq} micro-turns long")
        self.seq = seq
        self.rng = np.random.default_rng(seed)
        lengths = np.array([x["action_labels"].shape[0] for x in self.items], dtype=np.float64)
        self.p = lengths / lengths.sum()
        self.classes = sorted(self.events)

    def batch(self, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for _ in range(size):
            roll = self.rng.random()
            if 0.2 <= roll < 0.7 and self.classes:
                where = self.events[self.classes[int(self.rng.integers(len(self.classes)))]]
                i, k = where[int(self.rng.integers(len(where)))]
                n = self.items[i]["action_labels"].shape[0]
                start = min(max(0, k + int(self.rng.integers(1, 9)) - self.seq), n - self.seq)
            else:
                i = int(self.rng.choice(len(self.items), p=self.p))
                n = self.items[i]["action_labels"].shape[0]
                start = 0 if roll < 0.2 else int(self.rng.integers(0, n - self.seq + 1))
            for key, value in self.items[i].items():
                parts.setdefault(key, []).append(value[start : start + self.seq])
        return {key: torch.stack(v).to(device, non_blocking=True) for key, v in parts.items()}


def train(
    model: PresenceInteractionModel,
    dialogues: Sequence[Dialogue],
    *,
    device: torch.device,
    minutes: float,
    max_steps: int,
    batch: int,
    seq: int,
    lr: float,
    seed: int,
    log_every: int = 10,
) -> dict[str, Any]:
    model.to(device).train()
    batcher = Batcher(dialogues, seq, seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed.slot" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed.slot" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    budget = minutes * 60.0
    warmup = 15
    started = time.perf_counter()
    history: list[dict[str, float]] = []
    step = 0
    while step < max_steps:
        elapsed = time.perf_counter() - started
        frac = max(step / max_steps, elapsed / budget)
        if frac >= 1.0:
            break
        # Warm-up, then cosine down to 5 % over whichever runs out first: steps or time.
        scale = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x = batcher.batch(batch, device)
        out = model(**x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % log_every == 0 or step == 1:
            row = {
                "step": step,
                "seconds": round(time.perf_counter() - started, 1),
                "loss": round(float(out.loss.detach()), 4),
                "action": round(float(out.action_loss.detach()), 4),
                "vap": round(float(out.vap_loss.detach()), 4),
                "alert": round(float(out.alert_loss.detach()), 4),
                "teacher": round(float(out.teacher_loss.detach()), 4)
                if out.teacher_loss is not None
                else None,
                "lr": round(lr * scale, 6),
            }
            history.append(row)
            print(json.dumps(row), flush=True)
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - started, 1), "history": history}


def rule_policy(settings_defaults: bool = False) -> RuleBasedPolicy:
    params = RuleParams.from_settings(Settings.from_env({})) if settings_defaults else RuleParams()
    return RuleBasedPolicy(params)


def evaluate(
    model: PresenceInteractionModel, dialogues: Sequence[Dialogue], device: torch.device | str = "cpu"
) -> dict[str, Report]:
    streamer = InteractionStreamer(model, max_slots=max(1, len(dialogues)), device=device)
    preds, _ = run_model(streamer, dialogues)
    return {
        "model": score(dialogues, preds),
        "rules (silence only)": score(dialogues, run_policy(rule_policy, dialogues)),
        "fused (the default)": score(dialogues, run_policy(lambda: rule_policy(True), dialogues)),
    }


def model_card(
    out: Path,
    config: PresenceInteractionConfig,
    train_spec: DataSpec,
    heldout_spec: DataSpec,
    train_info: dict[str, Any],
    reports: dict[str, Report],
    data_seconds: float,
    device: str,
) -> str:
    params = sum(p.numel() for p in PresenceInteractionModel(config).parameters())
    decode = getattr(config, "decode_params", None) or "defaults"
    size_mb = (
        sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json"))
        / 1e6
    )
    rows = []
    for name, rep in reports.items():
        f, e = rep.frame, rep.events
        rows.append(
            f"| {name} | {f['balanced_accuracy']:.3f} | {f['macro_f1']:.3f} | {f['accuracy']:.3f} | "
            f"{e['speak_latency_s_mean']} | {e['turn_ends_missed']}/{e['turn_ends']} | "
            f"{e['pause_false_speak_rate']} | {e['side_talk_false_speak_rate']} | {e['yield_latency_s_mean']} | "
            f"{e['false_yield_rate']} |"
        )
    per_class = []
    for name, rep in reports.items():
        cells = " | ".join(
            f"{m['precision']:.2f}/{m['recall']:.2f}/{m['f1']:.2f}" for m in rep.frame["per_class"].values()
        )
        per_class.append(f"| {name} | {cells} |")
    return f"""# Presence interaction model (small)

A causal transformer that decides the floor of a call every 200 ms micro-turn from raw inputs:
the caller's 16 kHz audio in 40 ms patches of raw samples (plus their log-energy, the VAD
probability and packet-loss flags of their 20 ms frames), the bot's own output audio on its own
patch projection, raw {config.image_patch}x{config.image_patch} RGB pixel patches of the sampled
camera frame (Fuyu-style; a learned token when there is none), event tokens (background result
waiting, result urgent, reply ready, bot speaking, bot held) and one summary token per micro-turn. Every input goes
through a linear layer: no pretrained encoder. Heads: floor action ({", ".join(FLOOR_ACTIONS)}),
voice-activity projection of both parties over the next {config.vap_bins} x {config.vap_bin_ms} ms,
and a visual-alert logit.

Load offline: `PresenceInteractionModel.from_pretrained("presence/model/checkpoint")` (importing
`presence.model` registers the architecture with AutoConfig/AutoModel; no remote code).

## Size
- {params / 1e6:.2f} M parameters, {size_mb:.1f} MB on disk (float32 safetensors + config).
- hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads,
  {config.tokens_per_turn} tokens per micro-turn, attention window {config.window_turns} micro-turns
  ({config.window_turns * config.micro_turn_ms / 1000:g} s) plus {config.num_memory} memory slots
  (running means of evicted micro-turns, decays {config.memory_decays}).

## Data
Synthetic two-party calls generated offline (`presence.model.data`): {train_spec.dialogues} training
and {heldout_spec.dialogues} held-out dialogues of about {train_spec.seconds:g} s. Caller voices: piper (bundled
joe), Kokoro-82M (natural prosody; jf_alpha in training, jf_gongitsune held out) and espeak-ng
({len(ESPEAK_NAMES) - len(HELDOUT_ESPEAK)} voices in training, {len(HELDOUT_ESPEAK)} others held out; 3 speeds). Caller turns with
mid-utterance pauses of 0.7-2.5 s cut at a comma (non-final prosody), completed turns followed by
silence, caller backchannels and interruptions over the bot, side talk with a second person at a
lower level, urgent background results (the bot interrupts), background speech or noise at
0/10/20 dB SNR, bursty packet loss, a synthetic camera with occasional alert objects. The bot's
output is rendered with the rule policy's hold reflex. VAD is Silero over the caller's mix. The
teacher, smart-turn v3.2, answers at the first silent frame after speech as in a call: its
probability is an input from 100 ms later (event tokens `eot_asked`, `eot_complete`) and, from the
silence's first micro-turn, the target of a distillation head (`teacher_head`).
Held-out dialogues use sentences that never occur in training (every fifth line). Labels come
from the script: per micro-turn floor action, future voice activity, alert.
Data preparation in this run: {data_seconds:.0f} s (dialogues are cached under
~/.cache/presence/train; generating all of them from scratch takes about 4-5 minutes on 2 cores).

## Training
{train_info["steps"]} steps of {train_info.get("batch", "?")} crops x {train_info.get("seq", "?")} micro-turns,
AdamW, cosine schedule over a time budget, class-weighted cross-entropy + VAP/alert/teacher BCE, crops
class-balanced around rare decisions, on {device}: {train_info["seconds"]:.0f} s of training.
Command: `{train_info.get("command", "presence train-interaction")}`.
Decoding thresholds (stored in config.json as `decode_params`, chosen on
{train_info.get("validation", "?")} training-split calls kept out of training: first as little
worse than the fused rule on the five caller-facing errors as the model gets, then macro-F1 less
those errors; `min_overlap_ms` is the caller speech over the bot a yield needs): {decode}.

## Held-out scores
Both policies are stepped through the same held-out micro-turns with the same FloorState (engine
caller tracking over the VAD, ASR words 0.6 s late for the rule's barge-in check). HOLD/RESUME
count as continue. Latencies are from the end of the caller's speech / the interruption onset to
the end of the first micro-turn with 'speak' / 'yield'.

| policy | balanced acc. | macro-F1 | accuracy | speak latency s | missed turn ends | false speak in pauses | false speak after side talk | yield latency s | false yield |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Per class precision/recall/F1 ({" | ".join(FLOOR_ACTIONS)}):

| policy | {" | ".join(FLOOR_ACTIONS)} |
|---|{"---|" * len(FLOOR_ACTIONS)}
{chr(10).join(per_class)}

## Limits
Trained on synthetic speech only (espeak-ng, one piper voice, one Kokoro voice with a light
Japanese accent: the shipped Kokoro voices are Japanese) for minutes on a CPU; real voices,
accents and rooms will differ. Read the event columns next to the frame
scores: mid-sentence pauses are still often taken for turn ends (prosody is the only cue and
the model is small), and the rule policy, which reads the ASR's words, is better at not
yielding to backchannels and side talk. Bot backchannels are too rare in the data to be
learnt. The visual alert is trained on a synthetic flashing shape, a placeholder for real
visual events. Treat the checkpoint as a baseline to fine-tune on real calls.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="presence train-interaction", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="interaction-model", help="checkpoint directory to write")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=100_000, help="step cap")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32, help="micro-turns per training crop")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-dialogues", type=int, default=160)
    parser.add_argument("--heldout-dialogues", type=int, default=24)
    parser.add_argument("--val-dialogues", type=int, default=16, help="train-split calls kept for thresholds")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of a generated dialogue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--espeak-only", action="store_true", help="no piper voices (faster data)")
    parser.add_argument(
        "--from",
        dest="start",
        default=None,
        help="a checkpoint folder: skip training, set its thresholds again and score it",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: use --device cpu", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    train_spec = DataSpec("train", args.train_dialogues, args.seconds, args.seed, args.espeak_only)
    heldout_spec = DataSpec("heldout", args.heldout_dialogues, args.seconds, args.seed, args.espeak_only)

    def progress(i: int, n: int) -> None:
        if i % 10 == 0 or i == n:
            print(f"generated {i}/{n} dialogues ({time.perf_counter() - t0:.0f} s)", flush=True)

    train_set = load_dialogues(train_spec, progress)
    heldout = load_dialogues(heldout_spec, progress)
    data_seconds = time.perf_counter() - t0
    hours = sum(d.turns for d in train_set) * 0.2 / 3600
    print(
        f"data ready in {data_seconds:.0f} s: {len(train_set)} train ({hours:.2f} h), {len(heldout)} held-out"
    )

    # A few training-split calls stay out of training: the decoding thresholds are set on them.
    n_val = min(args.val_dialogues, len(train_set) // 5)
    train_set, val_set = train_set[: len(train_set) - n_val], train_set[len(train_set) - n_val :]
    info: dict[str, Any]
    if args.start:
        model = PresenceInteractionModel.from_pretrained(args.start)
        config = model.config
        info = dict(json.loads((Path(args.start) / "metrics.json").read_text())["train"])
        info["history"] = []
    else:
        config = make_config(args.size, action_class_weights=class_weights(train_set), teacher_head=True)
        model = PresenceInteractionModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.size}: {n_params / 1e6:.2f} M parameters, {config.tokens_per_turn} tokens per micro-turn"
    )
    if not args.start:
        info = train(
            model,
            train_set,
            device=device,
            minutes=args.minutes,
            max_steps=args.steps,
            batch=args.batch,
            seq=args.seq,
            lr=args.lr,
            seed=args.seed,
        )
        info.update(
            batch=args.batch,
            seq=args.seq,
            validation=n_val,
            command="presence train-interaction "
            + " ".join(list(argv) if argv is not None else sys.argv[1:]),
        )
    model = model.to("cpu").eval()

    met: bool | None = None  # the thresholds are no worse than fused on the validation calls
    if val_set:
        states: list[list[FloorState]] = []
        streamer = InteractionStreamer(model, max_slots=len(val_set))
        _, probs = run_model(streamer, val_set, keep_states=states)
        fused = score(val_set, run_policy(lambda: rule_policy(True), val_set))
        decode, value, met = calibrate(val_set, probs, states, baseline=fused)
        model.config.decode_params = asdict(decode)
        print(
            f"decoding thresholds from {len(val_set)} validation calls: {asdict(decode)} (score {value:.3f}; "
            + (
                "no worse than fused on every caller-facing error)"
                if met
                else "fused is better on some error)"
            )
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    reports = evaluate(model, heldout)
    for name, rep in reports.items():
        print(format_report(name, rep))
    metrics = {
        "train": {k: v for k, v in info.items() if k != "history"},
        "history": info["history"],
        "data": {
            "train": vars(train_spec),
            "heldout": vars(heldout_spec),
            "validation_dialogues": n_val,
            "seconds": round(data_seconds, 1),
        },
        "decode_params": getattr(model.config, "decode_params", None),
        "decode_no_worse_than_fused_on_validation": met,
        "heldout": {name: rep.summary() for name, rep in reports.items()},
        "device": str(device),
        "parameters": n_params,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "README.md").write_text(
        model_card(out, config, train_spec, heldout_spec, info, reports, data_seconds, str(device))
    )
    print(f"wrote {out} (training {info['seconds']:.0f} s, {info['steps']} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
