"""The figures and tables of ``presence bench meeting`` (see presence/bench/meeting.py)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from presence.bench.meeting import TurnResult

STAGES = ("end_of_turn_decided", "responder_first_token", "tts_first_audio")
NAN = float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else NAN


def summarise(
    turns: list[TurnResult], direct: list[dict[str, float]], cpu: dict[str, dict[str, float]]
) -> dict[str, Any]:
    side = [t for t in turns if t.kind == "side"]
    asked = [t for t in turns if t.kind != "side"]
    recaps = [t for t in turns if t.kind == "recap"]
    answered = [t for t in asked if t.v2v_s is not None and t.bot_clock_s is not None]

    def direct_values(name: str) -> list[float]:
        return [d[name] for d in direct if name in d]

    latency = {
        "voice_to_voice": ([t.v2v_s for t in asked if t.v2v_s is not None], direct_values("v2v_s")),
        **{
            f"speech end -> {n}": ([t.stages_s[n] for t in asked if n in t.stages_s], direct_values(n))
            for n in STAGES
        },
        "speech end -> bot's first frame sent": (
            [t.bot_clock_s for t in asked if t.bot_clock_s is not None],
            direct_values("bot_clock_s"),
        ),
        "first frame sent -> heard (transport)": (
            [t.v2v_s - t.bot_clock_s for t in answered],  # type: ignore[operator]
            [d["v2v_s"] - d["bot_clock_s"] for d in direct if "v2v_s" in d and "bot_clock_s" in d],
        ),
    }
    return {
        "turns": len(turns),
        "attribution": sum(t.attributed for t in turns) / max(1, len(turns)),
        "unheard": sum(not t.heard for t in turns),
        "misattributed": [asdict(t) for t in turns if t.heard and not t.attributed],
        "side_talk": len(side),
        "side_talk_replied": sum(t.replied for t in side) / max(1, len(side)),
        "side_talk_backchannels": sum(t.backchannel for t in side),
        "questions": len(asked),
        "answered": sum(t.replied for t in asked) / max(1, len(asked)),
        "recaps": len(recaps),
        "recaps_from_transcript": sum(" said " in t.answer for t in recaps),
        "latency_s": {k: {"meeting": m, "direct": d} for k, (m, d) in latency.items()},
        "direct_questions": len(direct),
        "cpu": cpu,
    }


def _ok(good: bool) -> str:
    return "yes" if good else "**no**"


def table(s: dict[str, Any], failover: dict[str, Any] | None) -> str:
    att, side, ans = s["attribution"], s["side_talk_replied"], s["answered"]
    recaps = s["recaps_from_transcript"]
    lines = [
        "| metric | n | value | target | met |",
        "|---|---|---|---|---|",
        f"| speaker attribution (transcript line with the right name) | {s['turns']} | {att:.2f} "
        f"({s['unheard']} unheard, {len(s['misattributed'])} wrong) | >= 0.95 | {_ok(att >= 0.95)} |",
        f"| side talk the bot spoke after | {s['side_talk']} | {side:.2f} | <= 0.10 | {_ok(side <= 0.10)} |",
        f"| side talk with a bot backchannel in it | {s['side_talk']} | {s['side_talk_backchannels']} | - | - |",
        f"| questions to the bot answered | {s['questions']} | {ans:.2f} | >= 0.95 | {_ok(ans >= 0.95)} |",
        f"| 'what did I miss?' answered with a recap | {s['recaps']} | {recaps} | all | {_ok(recaps == s['recaps'])} |",
        "",
        "| latency (ms) | meeting n | p50 | p95 | direct n | p50 | p95 | meeting - direct p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, both in s["latency_s"].items():
        m, d = ([v * 1000 for v in both[k]] for k in ("meeting", "direct"))
        lines.append(
            f"| {name} | {len(m)} | {pct(m, 50):.0f} | {pct(m, 95):.0f} | {len(d)} | {pct(d, 50):.0f} "
            f"| {pct(d, 95):.0f} | {pct(m, 50) - pct(d, 50):+.0f} |"
        )
    c = s["cpu"]
    m, h = c.get("meeting", {}), c.get("humans_alone", {})
    mp, mj, hp, hj = (x.get(k, NAN) for x in (m, h) for k in ("process_pct", "janus_pct"))
    lines += [
        "",
        "| CPU (% of one core) | seconds | this process | Janus |",
        "|---|---|---|---|",
        f"| the meeting: bot + 4 humans | {m.get('seconds', 0):.0f} | {mp:.1f} | {mj:.1f} |",
        f"| the 4 humans alone (each receiving one feed) | {h.get('seconds', 0):.0f} | {hp:.1f} | {hj:.1f} |",
        f"| the bot, one joined meeting (difference) | - | {mp - hp:.1f} | {mj - hj:.1f} |",
    ]
    if failover is not None:
        lines += ["", "| failover (SIGKILL of the node in the room) | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in failover.items()]
    return "\n".join(lines)


def turn_table(turns: list[TurnResult]) -> str:
    lines = [
        "| # | speaker | kind | verdict | right name | bot spoke | v2v ms | heard (streaming ASR) | whisper | bot said |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in turns:
        v2v = f"{t.v2v_s * 1000:.0f}" if t.v2v_s is not None else "-"
        heard = "; ".join(f"{s or '?'}: {x}" for s, _, x in t.heard) or "-"
        spoke = "yes" if t.replied else "backchannel" if t.backchannel else "no"
        lines.append(
            f"| {t.index + 1} | {t.speaker} | {t.kind} | {t.reason} | {t.attributed} | {spoke} | {v2v} "
            f"| {heard} | {t.whisper or '-'} | {t.answer[:100] or '-'} |"
        )
    lines.append("\naddressed*: taken for the bot with no name in its words (the streaming ASR's partials")
    lines.append("showed the name, or the follow-up rule: a question or request soon after the bot spoke)")
    return "\n".join(lines)
