"""``presence bench fdb``: stimuli -> live calls against in-process bots -> scores -> report.

Each configuration (floor policy x end-of-turn silence) gets its own real server (signaling +
CallManager) in this process, sharing one set of warmed-up backends; every sample is a real
WebRTC call played in real time, one after the other (the machine may have two cores), made
by an in-process aiortc caller or, with ``--transport chromium``, by headless Chromium.
Scoring runs after all calls, so whisper never competes with a live call for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from presence.bot.backends.factory import Backends, build_backends, warm_up
from presence.bot.calls import CallManager
from presence.browser import Chromium, chromium_problem, launch_chromium
from presence.config import Settings
from presence.signaling.app import run_server

from . import score as scoring
from .report import write_report
from .runner import TRANSPORTS, run_sample
from .stimuli import CATEGORIES, available_voices, generate

log = logging.getLogger(__name__)

# What a sample directory carries from the stimuli into a run directory.
_STIMULUS_FILES = ("input.wav", "meta.json", "clean_input.wav", "pause.json", "turn_taking.json")


@dataclass(frozen=True)
class Config:
    policy: str
    eot_silence_ms: int
    # Reply text of this configuration; "" takes the run's --responder (and keeps the label short).
    responder: str = ""

    @property
    def label(self) -> str:
        base = f"{self.policy} eot={self.eot_silence_ms}ms" if self.policy == "rules" else self.policy
        return f"{base} text={self.responder}" if self.responder else base

    @property
    def dirname(self) -> str:
        base = f"{self.policy}-eot{self.eot_silence_ms}" if self.policy == "rules" else self.policy
        return f"{base}-{self.responder}" if self.responder else base


RESPONDERS = ("auto", "llama", "openai", "rules")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="presence bench fdb",
        description="Full-Duplex-Bench-style measurement of the bot over real WebRTC calls",
    )
    p.add_argument(
        "--policy",
        default="rules,fused",
        help="floor policies, comma separated: the old silence rule against the default [rules,fused]",
    )
    p.add_argument(
        "--category",
        action="append",
        help=f"categories (repeat or comma separate) [all: {','.join(CATEGORIES)}]",
    )
    p.add_argument("--limit", type=int, default=50, help="samples per category [50]")
    p.add_argument("--out", type=Path, default=Path("fdb-results"), help="output directory [fdb-results]")
    p.add_argument(
        "--eot-silence-ms",
        default="300",
        help="end-of-turn silences of the rules policy to compare, comma separated [300]",
    )
    p.add_argument("--seed", type=int, default=1234, help="stimulus seed [1234]")
    p.add_argument(
        "--voices",
        default="all",
        choices=tuple(VOICE_SETS),
        help="stimulus voices: all, piper (natural prosody only: the end-of-turn detector is fooled "
        "by flite and confused by espeak-ng), synthetic (espeak-ng and flite) [all]",
    )
    p.add_argument(
        "--responder",
        default="rules",
        help="reply text, comma separated from auto, llama, openai, rules; several run every policy "
        "with each [rules: deterministic, so runs compare floor control, not wording]",
    )
    p.add_argument(
        "--configs",
        help="instead of --policy x --responder: policy:responder pairs, comma separated, e.g. "
        "rules:auto,fused:auto,fused:rules (the issue's run: both policies with the LLM, and the "
        "default with rule text)",
    )
    p.add_argument(
        "--transport",
        default="aiortc",
        choices=TRANSPORTS,
        help="who makes the calls: an in-process aiortc caller, or headless Chromium "
        "(apt-get install chromium; pip install playwright) [aiortc]",
    )
    p.add_argument("--no-calibration", action="store_true", help="skip the echo-bot calibration")
    p.add_argument("--timelines", type=int, default=4, help="timeline plots to draw [4]")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score the finished run in --out again with the current scorer (no calls) and rewrite its report",
    )
    return p


def _progress(prefix: str) -> Any:
    started = time.monotonic()

    def show(done: int, total: int, name: str) -> None:
        elapsed = time.monotonic() - started
        eta = elapsed / done * (total - done) if done else 0.0
        print(
            f"\r[fdb] {prefix} {done}/{total} {name:<22} {elapsed:5.0f} s elapsed, ~{eta:4.0f} s left",
            end="" if done < total else "\n",
            file=sys.stderr,
            flush=True,
        )

    return show


def _prepare(stimulus: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in stimulus.iterdir():
        if path.name in _STIMULUS_FILES or path.name.startswith("inject_"):
            shutil.copy2(path, target / path.name)
    return target


async def run_config(
    config: Config,
    stimuli: Sequence[Path],
    out: Path,
    backends: Backends,
    *,
    responder: str = "rules",
    transport: str = "aiortc",
    show_progress: bool = True,
) -> list[Path]:
    """Serve one configuration and play every stimulus to it; returns the run directories."""
    settings = Settings.from_env(
        None,
        port=0,
        greeting="",
        policy=config.policy,
        eot_silence_ms=config.eot_silence_ms,
        responder=responder,
    )
    manager = CallManager(settings, backends)
    runner = await run_server(settings, manager)
    show = _progress(config.label) if show_progress else None
    dirs: list[Path] = []
    # One browser for the configuration, a fresh page per call.
    browser: Chromium | None = await launch_chromium() if transport == "chromium" else None
    try:
        for i, stimulus in enumerate(stimuli):
            target = _prepare(stimulus, out / config.dirname / stimulus.parent.name / stimulus.name)
            await run_sample(settings.base_url, target, transport=transport, browser=browser)
            # The call must be gone before the next starts: one call at a time.
            for _ in range(50):
                if not manager.sessions:
                    break
                await asyncio.sleep(0.1)
            dirs.append(target)
            if show is not None:
                show(i + 1, len(stimuli), stimulus.name)
    finally:
        if browser is not None:
            await browser.close()
        await runner.cleanup()
    return dirs


VOICE_SETS: dict[str, Callable[[str], bool]] = {
    "all": lambda engine: True,
    "piper": lambda engine: engine == "piper",
    "synthetic": lambda engine: engine != "piper",
}


async def run_benchmark(
    out: Path,
    configs: Sequence[Config],
    categories: Sequence[str] = CATEGORIES,
    limit: int = 50,
    *,
    seed: int = 1234,
    responder: str = "rules",
    transport: str = "aiortc",
    backends: Backends | None = None,
    calibration: bool = True,
    timelines: int = 4,
    show_progress: bool = True,
    voices: str = "all",
) -> dict[str, Path]:
    """The whole pipeline; returns the written report files (``json``, ``md``, plots)."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = [v for v in available_voices() if VOICE_SETS[voices](v[0])]
    if not chosen:
        raise ValueError(f"no {voices} voice is installed here")
    stimuli = generate(
        out / ("stimuli" if voices == "all" else f"stimuli-{voices}"),
        categories,
        limit,
        seed,
        voices=chosen,
        progress=_progress("stimuli") if show_progress else None,
    )
    # One set of backends per reply text (the responder also judges the words' end of turn).
    built: dict[str, Backends] = {}

    async def backends_for(config: Config) -> Backends:
        if backends is not None:
            return backends
        name = config.responder or responder
        if name not in built:
            built[name] = build_backends(Settings.from_env(None, port=0, greeting="", responder=name))
            await warm_up(built[name])
        return built[name]

    scoring_backends = backends or await backends_for(configs[0])
    calib: dict[str, Any] | None = None
    if calibration:
        from .calibrate import calibrate

        report = await calibrate(out=out, transport=transport)
        calib = report.to_json()
        if show_progress:
            print(
                f"[fdb] calibration: transport {report.transport_s * 1000:.1f} ms, "
                f"max error {report.max_error_s * 1000:.1f} ms",
                file=sys.stderr,
            )
    run_dirs: dict[Config, list[Path]] = {}
    for config in configs:
        run_dirs[config] = await run_config(
            config,
            stimuli,
            out,
            await backends_for(config),
            responder=config.responder or responder,
            transport=transport,
            show_progress=show_progress,
        )
    settings = {
        config.label: {
            "policy": config.policy,
            "eot_silence_ms": config.eot_silence_ms,
            "responder": config.responder or responder,
            "voices": voices,
        }
        for config in configs
    }
    runs = {
        config.label: (settings[config.label], out / config.dirname, dirs)
        for config, dirs in run_dirs.items()
    }
    results = await _score(runs, scoring.Scorer(asr=scoring_backends.transcriber), show_progress)
    return write_report(out, results, calibration=calib, timelines=timelines)


async def _score(
    runs: dict[str, tuple[dict[str, Any], Path, list[Path]]], scorer: scoring.Scorer, show_progress: bool
) -> dict[str, dict[str, Any]]:
    """Score every configuration's sample directories (off the event loop)."""
    results: dict[str, dict[str, Any]] = {}
    for label, (settings, run_dir, dirs) in runs.items():
        samples = await asyncio.to_thread(
            scorer.score_dirs, dirs, _progress(f"score {label}") if show_progress else None
        )
        results[label] = {
            "settings": settings,
            "aggregate": scoring.aggregate(samples),
            "samples": samples,
            "dir": run_dir,
        }
    return results


async def rescore(out: Path, *, timelines: int = 4, show_progress: bool = True) -> dict[str, Path]:
    """Score an earlier run in ``out`` again with the current scorer: no calls are placed.

    The configurations, their directories and the calibration come from ``out/report.json``;
    every sample directory with an ``events.json`` under a configuration's directory counts.
    """
    report_path = out / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found: --rescore needs a finished run's directory")
    previous = json.loads(report_path.read_text())
    runs: dict[str, tuple[dict[str, Any], Path, list[Path]]] = {}
    for label, cfg in previous.get("configs", {}).items():
        # The run's own folder under ``out`` first: the whole directory may have been moved.
        run_dir = out / Path(cfg["dir"]).name
        if not run_dir.is_dir():
            run_dir = Path(cfg["dir"])
        dirs = sorted(p.parent for p in run_dir.glob("*/*/events.json"))
        runs[label] = (cfg.get("settings", {}), run_dir, dirs)
    results = await _score(runs, scoring.Scorer(), show_progress)
    return write_report(out, results, calibration=previous.get("calibration"), timelines=timelines)


def configs_from(
    policy: str, responder: str, eot_silence_ms: str, pairs: str | None = None
) -> tuple[list[Config], str]:
    """The configurations to run, and the run's reply text, from the command line's options.

    Every policy runs with every responder (the rule policy once per silence threshold; a
    learned policy once), or exactly the ``policy:responder`` pairs given. Configurations are
    named by their reply text only when it differs between them. Raises ValueError.
    """
    allowed = Settings.__dataclass_fields__["policy"].metadata.get("choices") or ("rules",)
    try:
        eots = [int(v) for v in _csv(eot_silence_ms)]
    except ValueError:
        raise ValueError("--eot-silence-ms takes integers, e.g. 300,500,800") from None
    if pairs:
        chosen = [tuple(c.split(":", 1)) for c in _csv(pairs)]
        if not chosen or any(len(c) != 2 or c[0] not in allowed or c[1] not in RESPONDERS for c in chosen):
            raise ValueError(
                f"--configs takes policy:responder pairs: policies {allowed}, responders {RESPONDERS}"
            )
        combos = [(c[0], c[1]) for c in chosen]
    else:
        policies, responders = _csv(policy), _csv(responder)
        if not policies or any(p not in allowed for p in policies):
            raise ValueError(f"--policy takes policies from {allowed}, comma separated")
        if not responders or any(r not in RESPONDERS for r in responders):
            raise ValueError(f"--responder takes {', '.join(RESPONDERS)}, comma separated")
        combos = [(p, r) for r in responders for p in policies]
    if not eots:
        raise ValueError("--eot-silence-ms needs at least one value")
    texts = list(dict.fromkeys(r for _, r in combos))
    configs = [
        Config(p, e, r if len(texts) > 1 else "")
        for p, r in combos
        for e in (eots if p == "rules" and not pairs else eots[:1])
    ]
    return configs, texts[0]


async def main(argv: Sequence[str] | None = None) -> int:
    """``presence bench fdb [--policy ...] [--category ...] [--limit N] [--out DIR] [--eot-silence-ms ...]``."""
    args = parser().parse_args(argv)
    if args.rescore:
        try:
            files = await rescore(args.out, timelines=args.timelines)
        except FileNotFoundError as exc:
            print(f"[fdb] {exc}", file=sys.stderr)
            return 2
        return _summarize(files)
    categories: list[str] = []
    for value in args.category or [",".join(CATEGORIES)]:
        categories += _csv(value)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        print(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("--limit must be at least 1", file=sys.stderr)
        return 2
    try:
        configs, responder = configs_from(args.policy, args.responder, args.eot_silence_ms, args.configs)
    except ValueError as exc:
        print(f"[fdb] {exc}", file=sys.stderr)
        return 2
    if args.transport == "chromium" and (problem := chromium_problem()) is not None:
        print(f"--transport chromium: {problem}", file=sys.stderr)
        return 2
    files = await run_benchmark(
        args.out,
        configs,
        categories,
        args.limit,
        seed=args.seed,
        responder=responder,
        transport=args.transport,
        calibration=not args.no_calibration,
        timelines=args.timelines,
        voices=args.voices,
    )
    return _summarize(files)


def _summarize(files: dict[str, Path]) -> int:
    print(f"[fdb] report: {files['md']}", file=sys.stderr)
    summary = json.loads(Path(files["json"]).read_text())
    for label, cfg in summary["configs"].items():
        o = cfg["aggregate"]["overall"]
        v2v = o["voice_to_voice_s"]
        print(
            f"{label}: v2v p50 {v2v['p50']} s, barge-in stop p50 {o['barge_in_stop_s']['p50']} s, "
            f"false barge-in {o['false_barge_in_rate']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
