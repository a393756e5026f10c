"""report.json, report.md and PNG plots of one or more scored configurations, side by side."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from presence.media.audio import read_wav

from .metrics import BREAKDOWN_EVENTS, DEFAULT_HUMAN_BACKCHANNEL_DIST
from .stimuli import RATE

# Published Full-Duplex-Bench v1 rows (shared/notes/benchmarks.md; Parakeet ASR).
PUBLISHED_V1: tuple[dict[str, Any], ...] = (
    {
        "system": "GPT-Realtime",
        "pause_tor_synth": 0.010,
        "pause_tor_real": 0.120,
        "bc_tor": 0.000,
        "bc_freq": 0.007,
        "tt_tor": 1.000,
        "tt_latency": 1.470,
        "int_tor": 0.970,
        "int_latency": 1.500,
    },
    {
        "system": "Gemini Live 2.0",
        "pause_tor_synth": 0.255,
        "pause_tor_real": 0.310,
        "bc_tor": 0.091,
        "bc_freq": 0.012,
        "tt_tor": 0.655,
        "tt_latency": 1.301,
        "int_tor": 0.891,
        "int_latency": 1.183,
    },
    {
        "system": "Moshi",
        "pause_tor_synth": 0.985,
        "pause_tor_real": 0.980,
        "bc_tor": 1.000,
        "bc_freq": 0.001,
        "tt_tor": 0.941,
        "tt_latency": 0.265,
        "int_tor": 1.000,
        "int_latency": 0.257,
    },
    {
        "system": "Freeze-Omni",
        "pause_tor_synth": 0.642,
        "pause_tor_real": 0.481,
        "bc_tor": 0.636,
        "bc_freq": 0.001,
        "tt_tor": 0.336,
        "tt_latency": 0.953,
        "int_tor": 0.867,
        "int_latency": 1.409,
    },
    {
        "system": "PersonaPlex",
        "pause_tor_synth": 0.584,
        "pause_tor_real": 0.662,
        "bc_tor": 0.327,
        "bc_freq": 0.025,
        "tt_tor": 0.992,
        "tt_latency": 0.070,
        "int_tor": 1.000,
        "int_latency": 0.400,
    },
)
PUBLISHED_FD_BENCH = {"IRD (Moshi, best)": 1.35, "EIR (best)": 0.09}

NOTES: tuple[str, ...] = (
    "Scoring ASR is whisper tiny.en (faster-whisper, word timestamps), not the Parakeet / "
    "CrisperWhisper used for the published rows: TOR decisions near the 1 s / 3-word thresholds "
    "and word-start latencies can differ. Word starts that whisper puts in silence are moved to "
    "the audio onset inside the word.",
    "Stimuli are synthetic (Piper joe, espeak-ng and flite voices, or the subset named by "
    "--voices in each configuration's settings), not FDB's recordings: compare the published "
    "'synth' pause column, and read the rest as indicative. The end-of-turn detector of "
    "policy=fused is fooled by flite and confused by espeak-ng: judge it on piper.",
    "Replied to side talk: the bot took the side talk as a caller turn (end_of_turn_decided after "
    "it began, not set aside by a not_addressed event) and spoke after it; words alone would "
    "count a reply that simply carries on after being interrupted.",
    "Backchannel TOR/freq/JSD are measured on the 'monologue' category (the FDB v1 setting: the "
    "system listens to a long turn). FDB's JSD compares with per-sample ICC human ground truth, "
    "which is not available offline; we use a stand-in reference with mass 0.3-0.7 s into each of "
    "the speaker's pauses (Ward & Tsukahara 2000). DEFAULT_HUMAN_BACKCHANNEL_DIST = "
    f"{DEFAULT_HUMAN_BACKCHANNEL_DIST} (uniform) is used when no reference is given. JSD is the "
    "Jensen-Shannon distance (scipy's jensenshannon, natural log), as FDB computes it.",
    "Latencies in seconds. Interruption relevance (0-5, judged by an LLM in FDB) is not scored.",
    "FD-Bench uses the output's Silero VAD segments as they are: the bot's own 'mm-hm' "
    "backchannels during a user turn count as early starts (EIR).",
    "Timeline 0 = the first input sample sent; output.wav is the bot's audio as the caller "
    "received it (loopback WebRTC; the transport's own delay, ~35 ms for aiortc and ~15 ms for "
    "Chromium, is included: see calibration).",
)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _get(d: Mapping[str, Any] | None, *path: str) -> Any:
    cur: Any = d
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return [*lines, ""]


def write_report(
    out: Path,
    configs: Mapping[str, Mapping[str, Any]],
    *,
    calibration: Mapping[str, Any] | None = None,
    timelines: int = 4,
) -> dict[str, Path]:
    """Write report.json, report.md and the plots under ``out``.

    ``configs`` maps a label ("rules eot=500") to ``{"settings": {...}, "aggregate": <from
    score.aggregate>, "samples": [<score_sample results>], "dir": run directory}``.
    """
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, configs, timelines=timelines)
    report = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "notes": list(NOTES),
        "published_v1": list(PUBLISHED_V1),
        "published_fd_bench": PUBLISHED_FD_BENCH,
        "calibration": calibration,
        "configs": {
            label: {k: v for k, v in cfg.items() if k != "dir"} | {"dir": str(cfg.get("dir", ""))}
            for label, cfg in configs.items()
        },
        "plots": {k: str(v.relative_to(out)) for k, v in plots.items()},
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path = out / "report.md"
    md_path.write_text(render_markdown(configs, plots, out, calibration))
    return {"json": json_path, "md": md_path, **plots}


def render_markdown(
    configs: Mapping[str, Mapping[str, Any]],
    plots: Mapping[str, Path],
    out: Path,
    calibration: Mapping[str, Any] | None = None,
) -> str:
    lines = ["# Full-Duplex-Bench-style results", ""]
    lines += [f"- {n}" for n in NOTES] + [""]
    if calibration:
        transport = _get(calibration, "transport_s")
        error = _get(calibration, "max_error_s")
        lines += [
            "Calibration (echo bot with known delays, cross-correlation): loopback transport "
            f"{_fmt(None if transport is None else transport * 1000, 1)} ms, largest error after "
            f"subtracting it {_fmt(None if error is None else error * 1000, 1)} ms (tolerance 10 ms).",
            "",
        ]
    agg = {label: cfg.get("aggregate", {}) for label, cfg in configs.items()}

    def cat(label: str, c: str, *path: str) -> Any:
        return _get(agg[label], "categories", c, *path)

    lines += ["## FDB v1 (published rows for reference)", ""]
    header = [
        "system",
        "pause TOR ↓ (synth/real)",
        "backchannel TOR ↓ / freq / JSD",
        "turn-taking TOR ↑ / latency s",
        "interruption TOR ↑ / latency s",
    ]
    rows: list[list[Any]] = []
    for label in configs:
        rows.append(
            [
                f"**{label}**",
                f"{_fmt(cat(label, 'pause', 'pause_tor'))} / –",
                f"{_fmt(cat(label, 'monologue', 'backchannel', 'tor'))} / "
                f"{_fmt(cat(label, 'monologue', 'backchannel', 'frequency'))} / "
                f"{_fmt(cat(label, 'monologue', 'backchannel', 'jsd'))}",
                f"{_fmt(cat(label, 'turn_taking', 'tor'))} / {_fmt(cat(label, 'turn_taking', 'latency_s'))}",
                f"{_fmt(cat(label, 'interruption', 'tor'))} / {_fmt(cat(label, 'interruption', 'latency_s'))}",
            ]
        )
    for p in PUBLISHED_V1:
        rows.append(
            [
                f"{p['system']} (published)",
                f"{p['pause_tor_synth']:.3f} / {p['pause_tor_real']:.3f}",
                f"{p['bc_tor']:.3f} / {p['bc_freq']:.3f} / –",
                f"{p['tt_tor']:.3f} / {p['tt_latency']:.3f}",
                f"{p['int_tor']:.3f} / {p['int_latency']:.3f}",
            ]
        )
    lines += _table(header, rows)

    lines += ["## FDB v1.5 overlap handling (stop latency p50 s / response latency p50 s)", ""]
    v15_cats = ["interruption", "backchannel", "side_talk", "background"]
    rows = []
    for label in configs:
        row: list[Any] = [label]
        for c in v15_cats:
            row.append(
                f"{_fmt(cat(label, c, 'v15_stop_latency_s', 'p50'))} / "
                f"{_fmt(cat(label, c, 'v15_response_latency_s', 'p50'))}"
            )
        rows.append(row)
    lines += _table(["config", *v15_cats], rows)

    lines += ["## FD-Bench (pooled over categories; medians)", ""]
    rows = []
    for label in configs:
        fd = _get(agg[label], "overall", "fd_bench") or {}
        rows.append(
            [
                label,
                fd.get("srr"),
                fd.get("eir"),
                fd.get("fsed_median_s"),
                fd.get("sir"),
                fd.get("ird_median_s"),
            ]
        )
    rows.append(
        [
            "published best",
            None,
            PUBLISHED_FD_BENCH["EIR (best)"],
            None,
            None,
            PUBLISHED_FD_BENCH["IRD (Moshi, best)"],
        ]
    )
    lines += _table(["config", "SRR ↑", "EIR ↓", "FSED s", "SIR ↑", "IRD s"], rows)

    lines += ["## Engineering", ""]
    rows = []
    for label in configs:
        o = _get(agg[label], "overall") or {}
        rows.append(
            [
                label,
                f"{_fmt(_get(o, 'voice_to_voice_s', 'p50'))} / {_fmt(_get(o, 'voice_to_voice_s', 'p95'))}",
                f"{_fmt(_get(o, 'barge_in_stop_s', 'p50'))} / {_fmt(_get(o, 'barge_in_stop_s', 'p95'))}",
                _fmt(o.get("false_barge_in_rate")),
                f"{_fmt(cat(label, 'background', 'tor'))} / {_fmt(cat(label, 'side_talk', 'side_talk_response_tor'))}",
            ]
        )
    lines += _table(
        [
            "config",
            "voice-to-voice p50 / p95 s",
            "barge-in stop p50 / p95 s",
            "false barge-in rate",
            "background TOR / replied to side talk",
        ],
        rows,
    )
    lines += ["Latency breakdown (p50 s after the user's scripted speech end, from the bot's events):", ""]
    names = list(BREAKDOWN_EVENTS)
    rows = [
        [label, *[_get(agg[label], "overall", "breakdown_s", n, "p50") for n in names]] for label in configs
    ]
    lines += _table(["config", *names], rows)

    lines += ["## Per category", ""]
    for label in configs:
        lines += [f"### {label}", ""]
        rows = []
        for c, a in (_get(agg[label], "categories") or {}).items():
            rows.append(
                [
                    c,
                    a.get("n"),
                    a.get("errors"),
                    a.get("missed_injections"),
                    _get(a, "voice_to_voice_s", "p50"),
                    a.get("false_barge_in_rate"),
                    _get(a, "fd_bench", "eir"),
                    _get(a, "fd_bench", "srr"),
                ]
            )
        lines += _table(
            ["category", "n", "errors", "missed injections", "v2v p50 s", "false barge-in", "EIR", "SRR"],
            rows,
        )
        by_snr = cat(label, "background", "by_snr")
        if by_snr:
            lines += [
                "Background by SNR (dB): "
                + ", ".join(
                    f"{snr}: TOR {_fmt(v.get('tor'))}, latency {_fmt(v.get('latency_s'))}"
                    for snr, v in by_snr.items()
                ),
                "",
            ]
    if plots:
        lines += ["## Plots", ""]
        for name, path in plots.items():
            lines += [f"![{name}]({path.relative_to(out)})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    out: Path, configs: Mapping[str, Mapping[str, Any]], *, timelines: int = 4
) -> dict[str, Path]:
    plt = _plt()
    plots: dict[str, Path] = {}
    # Latency CDFs.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "voice_to_voice_s", "voice-to-voice latency"),
        (axes[1], "barge_in_stop_s", "barge-in stop latency"),
    ):
        for label, cfg in configs.items():
            values: list[float] = []
            for s in cfg.get("samples", []):
                v = s.get(key)
                values += [x for x in (v if isinstance(v, list) else [v]) if x is not None]
            if values:
                xs = np.sort(values)
                ax.step(
                    xs,
                    np.arange(1, xs.size + 1) / xs.size,
                    where="post",
                    marker="o",  # a CDF of few trials is mostly its points
                    markersize=3,
                    label=f"{label} (n={xs.size})",
                )
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.set_ylabel("share of trials")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    plots["latency_cdf"] = out / "latency_cdf.png"
    fig.savefig(plots["latency_cdf"], dpi=110)
    plt.close(fig)

    # Per-category bars.
    metrics_spec: list[tuple[str, tuple[str, ...], str]] = [
        ("pause TOR ↓", ("pause", "pause_tor"), "lower"),
        ("turn-taking TOR ↑", ("turn_taking", "tor"), "higher"),
        ("interruption TOR ↑", ("interruption", "tor"), "higher"),
        ("background TOR ↑", ("background", "tor"), "higher"),
        ("monologue BC TOR ↓", ("monologue", "backchannel", "tor"), "lower"),
        ("false barge-in: backchannel ↓", ("backchannel", "false_barge_in_rate"), "lower"),
        ("false barge-in: side talk ↓", ("side_talk", "false_barge_in_rate"), "lower"),
    ]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(configs))
    x = np.arange(len(metrics_spec))
    for k, (label, cfg) in enumerate(configs.items()):
        vals = [_get(cfg.get("aggregate"), "categories", *path) for _name, path, _d in metrics_spec]
        bars = ax.bar(x + k * width, [0.0 if v is None else v for v in vals], width, label=label)
        # A zero and a missing value look alike as bars: print the numbers.
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in vals], fontsize=6)
    ax.set_xticks(x + width * (len(configs) - 1) / 2)
    ax.set_xticklabels([n for n, _p, _d in metrics_spec], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("rate")
    ax.set_title("per-category rates (arrows: better direction)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots["categories"] = out / "categories.png"
    fig.savefig(plots["categories"], dpi=110)
    plt.close(fig)

    # Timelines of a few trials (one per category, from the first configuration).
    if configs and timelines > 0:
        first_label, first = next(iter(configs.items()))
        seen: set[str] = set()
        picked = []
        for s in first.get("samples", []):
            if s["category"] not in seen:
                seen.add(s["category"])
                picked.append(s)
        run_dir = Path(first.get("dir", out))
        for s in picked[:timelines]:
            sample_dir = run_dir / s["category"] / s["id"]
            if (sample_dir / "output.wav").is_file():
                path = out / f"timeline_{s['id']}.png"
                plot_timeline(sample_dir, s, path, title=f"{first_label}: {s['id']}")
                plots[f"timeline_{s['id']}"] = path
    return plots


EVENT_STYLE: dict[str, tuple[str, str]] = {
    "asr_final": ("tab:gray", "ASR"),
    "end_of_turn_decided": ("tab:green", "EOT"),
    "responder_first_token": ("tab:olive", "token"),
    "tts_first_audio": ("tab:cyan", "TTS"),
    "bot_first_packet_sent": ("tab:blue", "1st pkt"),
    "barge_in_detected": ("tab:red", "barge-in"),
    "playback_flushed": ("darkred", "flush"),
    "playback_held": ("tab:orange", "hold"),
    "playback_resumed": ("gold", "resume"),
    "backchannel_emitted": ("tab:purple", "bot mm-hm"),
    "injection_start": ("black", "inject"),
}


def plot_timeline(sample_dir: Path, scored: Mapping[str, Any], path: Path, title: str = "") -> None:
    """Caller and bot waveforms on the shared timeline, user turns shaded, events marked."""
    plt = _plt()
    played_path = sample_dir / "played.wav"
    caller = read_wav(str(played_path if played_path.is_file() else sample_dir / "input.wav"), RATE)[0]
    bot = read_wav(str(sample_dir / "output.wav"), RATE)[0]
    run = json.loads((sample_dir / "events.json").read_text())
    meta = json.loads((sample_dir / "meta.json").read_text())
    t_c = np.arange(caller.size) / RATE
    t_b = np.arange(bot.size) / RATE
    fig, axes = plt.subplots(2, 1, figsize=(12, 4.8), sharex=True)
    axes[0].plot(t_c, caller, lw=0.4, color="tab:gray")
    axes[0].set_ylabel("caller")
    for turn in meta.get("user_turns", []):
        axes[0].axvspan(turn["start"], turn["end"], color="tab:green", alpha=0.12)
    for inj in run.get("injections", []):
        if "start" in inj:
            axes[0].axvspan(inj["start"], inj["end"], color="tab:red", alpha=0.15)
            axes[0].text(
                inj["start"],
                0.9,
                inj.get("kind", ""),
                fontsize=7,
                color="tab:red",
                transform=axes[0].get_xaxis_transform(),
            )
    axes[1].plot(t_b, bot, lw=0.4, color="tab:blue")
    axes[1].set_ylabel("bot (received)")
    for word, start, _end in scored.get("words", [])[:40]:
        axes[1].text(
            start, 0.03, word, fontsize=6, rotation=45, color="navy", transform=axes[1].get_xaxis_transform()
        )
    levels: dict[str, int] = {}
    for event in run.get("events", []):
        style = EVENT_STYLE.get(str(event.get("name")))
        if style is None:
            continue
        t = float(event["t"])
        for ax in axes:
            ax.axvline(t, color=style[0], lw=0.8, alpha=0.8)
        k = levels.setdefault(style[1], len(levels))
        axes[1].text(
            t,
            0.92 - 0.1 * (k % 6),
            style[1],
            fontsize=7,
            color=style[0],
            transform=axes[1].get_xaxis_transform(),
        )
    for ax, wave in zip(axes, (caller, bot), strict=True):
        peak = max(0.05, float(np.abs(wave).max(initial=0.0))) * 1.1  # speech is quiet: zoom in
        ax.set_ylim(-peak, peak)
        ax.grid(alpha=0.2)
    axes[1].set_xlabel("seconds from the first input sample")
    axes[0].set_title(title or sample_dir.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
