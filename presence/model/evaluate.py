"""Run floor policies over labelled dialogues and score them the same way.

Both the rule policy and the model get the same micro-turns and the same ``FloorState``
(``dialogue.StateTracker``: the engine's caller tracking over the Silero VAD of the mix, the bot's
speaking / held / reply-ready states from the script, ASR words 0.6 s late). HOLD and RESUME
count as "continue" (the bot keeps its turn).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from presence.model.configuration import FLOOR_ACTIONS
from presence.model.dialogue import MT_S, Dialogue, StateTracker, microturns
from presence.model.inputs import encode_turn
from presence.model.streaming import DecodeParams, InteractionStreamer, decide_action
from presence.seams import Action, Floor, FloorPolicy, FloorState

_INDEX = {name: i for i, name in enumerate(FLOOR_ACTIONS)}


def action_index(action: Action) -> int:
    if action.floor in (Floor.HOLD, Floor.RESUME):
        return _INDEX["continue"]
    return _INDEX[action.floor.value]


def run_policy(factory: Callable[[], FloorPolicy], dialogues: Sequence[Dialogue]) -> list[np.ndarray]:
    """Step a fresh policy through each dialogue; returns the predicted action indices."""
    out = []
    for d in dialogues:
        policy = factory()
        tracker = StateTracker(d)
        preds = np.zeros(d.turns, np.int64)
        for k, turn in enumerate(microturns(d)):
            state = tracker.update(k, turn)
            action = policy.step(turn, state)
            if action.floor is Floor.BACKCHANNEL:
                state.last_backchannel_at = turn.start  # what the engine does when it plays one
            preds[k] = action_index(action)
        close = getattr(policy, "close", None)
        if close is not None:
            close()
        out.append(preds)
    return out


def run_model(
    streamer: InteractionStreamer,
    dialogues: Sequence[Dialogue],
    keep_states: list[list[FloorState]] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All dialogues at once, one slot each, one batched step per micro-turn (what the
    ``BatchedScheduler`` does for concurrent calls). Returns (actions, probabilities); with
    ``keep_states`` (an empty list) also a copy of every FloorState the model saw."""
    if keep_states is not None:
        keep_states.extend([] for _ in dialogues)
    slots = [streamer.allocate(f"eval-{i}") for i in range(len(dialogues))]
    try:
        trackers = [StateTracker(d) for d in dialogues]
        turns = [microturns(d) for d in dialogues]
        preds = [np.zeros(d.turns, np.int64) for d in dialogues]
        probs = [np.zeros((d.turns, len(FLOOR_ACTIONS)), np.float32) for d in dialogues]
        for k in range(max(d.turns for d in dialogues)):
            live = [i for i, d in enumerate(dialogues) if k < d.turns]
            states = [trackers[i].update(k, turns[i][k]) for i in live]
            arrays = [encode_turn(turns[i][k], s, streamer.config) for i, s in zip(live, states, strict=True)]
            outputs = streamer.step_encoded(
                [slots[i] for i in live], arrays, states, [turns[i][k].start for i in live]
            )
            for i, state, output in zip(live, states, outputs, strict=True):
                if keep_states is not None:
                    keep_states[i].append(copy.copy(state))
                if output.action.floor is Floor.BACKCHANNEL:
                    state.last_backchannel_at = turns[i][k].start
                preds[i][k] = action_index(output.action)
                probs[i][k] = [output.probs[name] for name in FLOOR_ACTIONS]
        return preds, probs
    finally:
        for slot in slots:
            streamer.free(slot)


def decode_offline(
    dialogues: Sequence[Dialogue],
    probs: Sequence[np.ndarray],
    states: Sequence[Sequence[FloorState]],
    params: DecodeParams,
) -> list[np.ndarray]:
    """Re-decide the actions of a recorded run with other thresholds (no forward needed)."""
    out = []
    for d, p, ss in zip(dialogues, probs, states, strict=True):
        preds = np.zeros(d.turns, np.int64)
        last_bc = -1e9
        for k in range(d.turns):
            state = copy.copy(ss[k])
            state.last_backchannel_at = last_bc
            action = decide_action(p[k], state, k * MT_S, params)
            if action.floor is Floor.BACKCHANNEL:
                last_bc = k * MT_S
            preds[k] = action_index(action)
        out.append(preds)
    return out


CALLER_FACING = (
    "pause_false_speak_rate",
    "side_talk_false_speak_rate",
    "false_yield_rate",
    "missed_rate",
    "barge_in_missed_rate",
)


def caller_errors(report: Report) -> dict[str, float]:
    """The five ways a caller feels a floor decision go wrong, as rates (0 where none occurred):
    pauses taken, side talk answered, yields to a backchannel or side talk, turn ends missed,
    barge-ins the bot talked through."""
    e = report.events
    out = {k: float(e.get(k) or 0.0) for k in CALLER_FACING[:3]}
    out["missed_rate"] = e["turn_ends_missed"] / e["turn_ends"] if e["turn_ends"] else 0.0
    out["barge_in_missed_rate"] = (
        e["interruptions_missed"] / e["interruptions"] if e["interruptions"] else 0.0
    )
    return out


def objective(report: Report) -> float:
    """What thresholds are chosen for: macro-F1 (it weighs precision with recall; balanced
    accuracy alone rewards saying "speak" / "yield" far too often), less a quarter point for
    each caller-facing error rate (``caller_errors``)."""
    return float(report.frame["macro_f1"]) - 0.25 * sum(caller_errors(report).values())


def _grid() -> list[DecodeParams]:
    return [
        DecodeParams(
            speak_threshold=speak,
            yield_threshold=yld,
            interrupt_threshold=rare,
            backchannel_threshold=rare,
            min_overlap_ms=overlap,
        )
        # Low thresholds too: a small model trained for minutes is often unsure of its best calls.
        for speak in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        for yld in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
        for rare in (0.3, 0.5, 0.7)
        for overlap in (0.0, 300.0, 500.0, 700.0, 1000.0)
    ]


def calibrate(
    dialogues: Sequence[Dialogue],
    probs: Sequence[np.ndarray],
    states: Sequence[Sequence[FloorState]],
    baseline: Report | None = None,
) -> tuple[DecodeParams, float, bool]:
    """Thresholds that maximise ``objective`` on a validation run. With a ``baseline`` (the
    fused rule on the same calls), the thresholds first minimise by how much they are worse
    than it on the caller-facing errors (summed over the errors where they are worse), then
    maximise ``objective``: the model is meant to replace the rule, not to trade one complaint
    for another. Returns (params, objective, whether it is no worse than the baseline)."""
    bound = caller_errors(baseline) if baseline is not None else None
    best: tuple[float, float, DecodeParams] | None = None
    for params in _grid():
        report = score(dialogues, decode_offline(dialogues, probs, states, params))
        errors = caller_errors(report)
        worse = 0.0 if bound is None else sum(max(0.0, errors[k] - bound[k]) for k in CALLER_FACING)
        value = objective(report)
        if (
            best is None
            or worse < best[0] - 1e-9
            or (abs(worse - best[0]) <= 1e-9 and value > best[1] + 1e-9)
        ):
            best = (worse, value, params)
    assert best is not None
    return best[2], best[1], bound is not None and best[0] <= 1e-9


@dataclass
class Report:
    frame: dict[str, Any] = field(default_factory=dict)
    events: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"frame": self.frame, "events": self.events}


def frame_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    per_class: dict[str, dict[str, float]] = {}
    recalls, f1s = [], []
    for i, name in enumerate(FLOOR_ACTIONS):
        tp = int(np.sum((preds == i) & (labels == i)))
        fp = int(np.sum((preds == i) & (labels != i)))
        fn = int(np.sum((preds != i) & (labels == i)))
        support = tp + fn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": support,
            "predicted": tp + fp,
        }
        if support:
            recalls.append(recall)
            f1s.append(f1)
    return {
        "accuracy": round(float(np.mean(labels == preds)), 4),
        "balanced_accuracy": round(float(np.mean(recalls)), 4),
        "macro_f1": round(float(np.mean(f1s)), 4),
        "per_class": per_class,
        "micro_turns": int(labels.size),
    }


def event_metrics(dialogues: Sequence[Dialogue], preds: Sequence[np.ndarray]) -> dict[str, Any]:
    speak, yld = _INDEX["speak"], _INDEX["yield"]
    latencies: list[float] = []
    turn_ends = missed = 0
    pauses = pause_false = pause_frames = pause_frames_speak = 0
    sides = side_false = 0
    barge_lat: list[float] = []
    barges = barge_missed = 0
    overlaps = false_yield = 0
    for d, p in zip(dialogues, preds, strict=True):
        n = d.turns
        t_end = (np.arange(n) + 1) * MT_S
        speaking = d.bot_speaking
        for end, bot_start in d.meta["turn_ends"]:
            turn_ends += 1
            window = np.flatnonzero((t_end > end) & (t_end < bot_start + MT_S) & ~speaking)
            hits = window[p[window] == speak]
            if hits.size:
                latencies.append(float(t_end[hits[0]] - end))
            else:
                missed += 1
        for start, end in d.meta["pauses"]:
            pauses += 1
            window = np.flatnonzero((t_end > start) & (t_end <= end))
            pause_frames += window.size
            pause_frames_speak += int(np.sum(p[window] == speak))
            pause_false += bool(np.any(p[window] == speak))
        for start, end, during_bot in d.meta["side_talk"]:
            window = np.flatnonzero((t_end > start) & (t_end <= end + 1.0))
            if during_bot:
                window = window[speaking[window]]
                overlaps += 1
                false_yield += bool(np.any(p[window] == yld))
            else:
                sides += 1
                side_false += bool(np.any(p[window] == speak))
        for start, end in d.meta["caller_backchannels"]:
            window = np.flatnonzero((t_end > start) & (t_end <= end + 0.6) & speaking)
            overlaps += 1
            false_yield += bool(np.any(p[window] == yld))
        for onset, end in d.meta["interruptions"]:
            barges += 1
            window = np.flatnonzero((t_end > onset) & (t_end <= end + 1e-6) & speaking)
            hits = window[p[window] == yld]
            if hits.size:
                barge_lat.append(float(t_end[hits[0]] - onset))
            else:
                barge_missed += 1

    def mean(x: list[float]) -> float | None:
        return round(float(np.mean(x)), 3) if x else None

    return {
        "turn_ends": turn_ends,
        "speak_latency_s_mean": mean(latencies),
        "speak_latency_s_p50": round(float(np.median(latencies)), 3) if latencies else None,
        "turn_ends_missed": missed,
        "pauses": pauses,
        "pause_false_speak_rate": round(pause_false / pauses, 4) if pauses else None,
        "pause_speak_frame_rate": round(pause_frames_speak / pause_frames, 4) if pause_frames else None,
        "side_talk": sides,
        "side_talk_false_speak_rate": round(side_false / sides, 4) if sides else None,
        "interruptions": barges,
        "yield_latency_s_mean": mean(barge_lat),
        "interruptions_missed": barge_missed,
        "overlaps_not_barge_in": overlaps,
        "false_yield_rate": round(false_yield / overlaps, 4) if overlaps else None,
    }


def score(dialogues: Sequence[Dialogue], preds: Sequence[np.ndarray]) -> Report:
    labels = np.concatenate([d.actions for d in dialogues])
    return Report(frame_metrics(labels, np.concatenate(list(preds))), event_metrics(dialogues, preds))


def format_report(name: str, report: Report) -> str:
    f, e = report.frame, report.events
    lines = [
        f"{name}: accuracy {f['accuracy']:.3f}  balanced accuracy {f['balanced_accuracy']:.3f}  "
        f"macro-F1 {f['macro_f1']:.3f}  ({f['micro_turns']} micro-turns)"
    ]
    for cls, m in f["per_class"].items():
        lines.append(
            f"  {cls:<11} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  "
            f"support {m['support']}  predicted {m['predicted']}"
        )
    lines.append(
        f"  turn-taking: first 'speak' {e['speak_latency_s_mean']} s after a turn end (mean; p50 "
        f"{e['speak_latency_s_p50']}), missed {e['turn_ends_missed']}/{e['turn_ends']}; false 'speak' in "
        f"{e['pause_false_speak_rate']} of pauses ({e['pause_speak_frame_rate']} of pause micro-turns), "
        f"after side talk {e['side_talk_false_speak_rate']}"
    )
    lines.append(
        f"  barge-in: first 'yield' {e['yield_latency_s_mean']} s after onset, missed "
        f"{e['interruptions_missed']}/{e['interruptions']}; false 'yield' on backchannels/side talk "
        f"{e['false_yield_rate']} of {e['overlaps_not_barge_in']}"
    )
    return "\n".join(lines)
