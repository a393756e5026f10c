"""``presence bench aec``: server-side echo cancellation, offline and over a real call.

(``presence bench echo`` would be the wrong name: ``presence.bench.echo`` is the bare aiortc
echo server the latency bench compares CPU with.)

Part 1, media level, for every candidate canceller: piper's voice as the bot's far end, fed
back at -10 dB and 100/300 ms late, with a caller talking over parts of it. Prints the echo
return loss enhancement after convergence (ERLE, far end alone), how much of the caller's voice
survives (correlation with the clean near end, alone and in double talk) and the CPU cost per
second of audio (one thread, 20 ms chunks as the reader feeds them).

Part 2, a real call: the real bot (``presence serve``, rules responder, a long greeting) and
an aiortc caller whose microphone hears the bot: what it receives goes back into its uplink at
-10 dB, 100 ms late (on top of the network's and jitter buffer's own delay), while it asks a
few things. Once with ``echo_cancel=off`` and once per canceller with ``echo_cancel=on``: false
barge-ins per minute (``barge_in_detected`` while the caller is silent) and the caller's word
error rate in the bot's final captions (whisper on the audio after the canceller) against the
script.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import sys
import time
from collections.abc import Sequence

import numpy as np

from presence.caller import Caller, PlayerTrack, Recorder
from presence.clock import now
from presence.media.audio import FrameResampler, resample
from presence.media.echo import CANCELLERS
from presence.seams import OUT_SAMPLE_RATE, SAMPLE_RATE

ECHO_DB = -10.0
ECHO_DELAY_S = 0.1
FIRST_LINE_S = 16.0  # the caller's first line, after the greeting
SPACING_S = 15.0  # between the caller's lines: the bot's answer fits in between

BOT_LINES = [
    "Thanks for calling. I can help you with your account, your bills and your plans, and I can "
    "also look things up for you while we talk.",
    "Let me tell you about the options we have today. The basic plan includes unlimited calls "
    "and ten gigabytes of data.",
]
CALLER_LINES = [
    "Could you tell me how much the basic plan costs every month?",
    "I would like to move my appointment to next Tuesday afternoon.",
    "My internet has been very slow since the storm last week.",
]
GREETING = (
    "Hi, I'm Presence. Thanks for calling. I can help you with your account, your bills and your "
    "plans, and I can also look things up for you while we talk. Let me tell you about the options "
    "we have today. What would you like to do?"
)


def _tts() -> tuple[object, int]:
    from presence.bot.backends.tts import PiperTTS

    tts = PiperTTS()
    return tts, tts.sample_rate


def say16(tts: object, text: str) -> np.ndarray:
    audio = np.concatenate(list(tts.synthesize(text)))  # type: ignore[attr-defined]
    return resample(audio, tts.sample_rate, SAMPLE_RATE)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- media level
def erle_db(echo: np.ndarray, residual: np.ndarray) -> float:
    return 10 * float(np.log10(np.sum(echo**2) / max(float(np.sum(residual**2)), 1e-12)))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def near_corr(out: np.ndarray, near: np.ndarray, at: int, max_lag: int = 320) -> tuple[float, int]:
    """Correlation of the output at ``at`` with the clean near end, allowing for the canceller's
    own latency (AEC3 hands its audio back 8 ms late); also the lag found."""
    n = near.size - max_lag
    lags = range(0, max_lag + 1, 4)
    scores = [corr(out[at + lag : at + lag + n], near[:n]) for lag in lags]
    best = int(np.argmax(scores))
    return scores[best], lags[best]


def run_canceller(name: str, mic: np.ndarray, far: np.ndarray, chunk: int = 320) -> tuple[np.ndarray, float]:
    """The canceller over ``mic`` with ``far`` as reference, in reader-sized chunks; returns the
    output and the thread CPU seconds it took."""
    ec = CANCELLERS[name]()
    out = np.zeros_like(mic)
    n = mic.size // chunk * chunk
    t0 = time.thread_time()
    for i in range(0, n, chunk):
        out[i : i + chunk] = ec.process(mic[i : i + chunk], far[i : i + chunk])
    return out, time.thread_time() - t0


def media_level(names: Sequence[str]) -> list[str]:
    tts, _ = _tts()
    far = np.concatenate(
        [say16(tts, BOT_LINES[0]), np.zeros(SAMPLE_RATE // 2, np.float32), say16(tts, BOT_LINES[1])]
    )
    near = say16(tts, CALLER_LINES[0])
    gain = 10 ** (ECHO_DB / 20)
    lines = [
        "## Media level: piper far end fed back at -10 dB",
        "",
        "| canceller | delay | ERLE far only (dB) | near alone: corr (lag) | double talk: corr (raw mic) | CPU ms per s of audio |",
        "|---|---|---|---|---|---|",
    ]
    for delay_s in (ECHO_DELAY_S, 0.3):
        d = int(delay_s * SAMPLE_RATE)
        # far end plays; 1 s of caller alone after it (far silent); then double talk.
        ref = np.concatenate(
            [far, np.zeros(near.size + SAMPLE_RATE, np.float32), far[: near.size + SAMPLE_RATE]]
        )
        echo = np.concatenate([np.zeros(d, np.float32), ref])[: ref.size] * gain
        talk = np.zeros_like(ref)
        alone_at = far.size + d + SAMPLE_RATE // 2
        double_at = far.size + near.size + SAMPLE_RATE + SAMPLE_RATE // 2
        talk[alone_at : alone_at + near.size] = near
        talk[double_at : double_at + near.size] = near
        mic = echo + talk
        conv = 3 * SAMPLE_RATE  # ERLE after 3 s of convergence, far end alone
        for name in names:
            out, cpu = run_canceller(name, mic, ref)
            erle = erle_db(echo[conv : far.size], out[conv : far.size])
            alone, lag = near_corr(out, near, alone_at)
            dt, _ = near_corr(out, near, double_at)
            dt_raw, _ = near_corr(mic, near, double_at)
            ms = cpu * 1000 / (ref.size / SAMPLE_RATE)
            lines.append(
                f"| {name} | {delay_s * 1000:.0f} ms | {erle:.1f} | {alone:.2f} ({lag / 16:.0f} ms) "
                f"| {dt:.2f} ({dt_raw:.2f}) | {ms:.1f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


# ---------------------------------------------------------------------------- the inbound path
def conversation(tts: object) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, str]]]:
    """The bot's side of a call (its greeting and two long answers) and the caller's lines in
    the pauses, the last one over the bot's speech: the far end and the near end at 16 kHz,
    and the caller's lines as (start, end, text) in samples."""
    bot = [say16(tts, GREETING), *(say16(tts, line) for line in BOT_LINES)]
    caller = [say16(tts, line) for line in CALLER_LINES]
    far_parts: list[np.ndarray] = []
    lines: list[tuple[int, int, str]] = []
    pos = 0
    for i, speech in enumerate(bot):
        far_parts += [speech, np.zeros(SAMPLE_RATE, np.float32)]
        pos += speech.size + SAMPLE_RATE
        line = caller[i]
        if i < len(bot) - 1:  # in the pause after the bot's turn
            lines.append((pos, pos + line.size, CALLER_LINES[i]))
            far_parts.append(np.zeros(line.size + SAMPLE_RATE, np.float32))
            pos += line.size + SAMPLE_RATE
        else:  # over the end of the bot's last answer (double talk)
            start = pos - SAMPLE_RATE - 2 * SAMPLE_RATE
            lines.append((start, start + line.size, CALLER_LINES[i]))
    far = np.concatenate([*far_parts, np.zeros(6 * SAMPLE_RATE, np.float32)])
    near = np.zeros(far.size, np.float32)
    for (start, end, _text), line in zip(lines, caller, strict=True):
        near[start:end] += line
    return far, near, lines


def inbound_path(names: Sequence[str]) -> list[str]:
    """The reader's path offline: reference on the bot clock, the caller's uplink (the bot's
    voice back at -10 dB, 100 ms late, plus 50 ms of network, and the caller's lines), the
    :class:`EchoStage` in 20 ms frames, then the real Silero VAD and the real whisper pass.
    Counts what the barge-in reflex would act on while the caller is silent."""
    from presence.bot.backends.asr import WhisperTranscriber
    from presence.bot.backends.vad import SileroVAD
    from presence.config import Settings
    from presence.media.echo import EchoStage, ReferenceBuffer

    settings = Settings()
    tts, _ = _tts()
    far, near, lines = conversation(tts)
    echo = np.concatenate([np.zeros(int(ECHO_DELAY_S * SAMPLE_RATE), np.float32), far])[: far.size]
    mic = echo * np.float32(10 ** (ECHO_DB / 20)) + near
    whisper = WhisperTranscriber()
    script = " ".join(text for _s, _e, text in lines)
    minutes = far.size / SAMPLE_RATE / 60
    out_lines = [
        f"## The inbound path offline: {minutes * 60:.0f} s of conversation, the bot's voice back at "
        f"{ECHO_DB:.0f} dB, {ECHO_DELAY_S * 1000:.0f} ms (+50 ms network); real Silero VAD and whisper",
        "",
        f"Voiced runs while the caller is silent: at least {settings.hold_onset_ms} ms pauses the bot "
        f"(a hold), at least {settings.barge_in_ms} ms is a barge-in once words are recognised, "
        f"{settings.barge_in_max_ms} ms even without. WER: whisper on each of the caller's lines.",
        "",
        "| canceller | holds / min | barge-ins (≥ 500 ms) / min | (≥ 1500 ms) / min | caller voiced kept | caller WER | CPU ms per s |",
        "|---|---|---|---|---|---|---|",
    ]
    silent = np.ones(far.size, dtype=bool)
    for start, end, _t in lines:
        silent[max(0, start - SAMPLE_RATE // 5) : end + SAMPLE_RATE // 2] = False
    for name in ["off", *names]:
        if name == "off":
            cleaned, cpu = mic, 0.0
        else:
            reference = ReferenceBuffer(seconds=far.size / SAMPLE_RATE + 5)
            t0, frame = 1000.0, SAMPLE_RATE // 50
            for k in range(far.size // frame):  # the speech track: each frame at its send time
                reference.write(far[k * frame : (k + 1) * frame], t0 + k * 0.02)
            stage = EchoStage(CANCELLERS[name](), reference)
            parts = [
                stage.process(mic[k * frame : (k + 1) * frame], k * frame, t0 + (k + 1) * 0.02 + 0.05)
                for k in range(mic.size // frame)
            ]
            cleaned, cpu = np.concatenate(parts), stage.busy_s
        vad = SileroVAD()
        chunk = vad.chunk_samples
        probs = np.array(
            [vad.probability(cleaned[i : i + chunk]) for i in range(0, cleaned.size - chunk, chunk)]
        )
        voiced = probs >= settings.vad_threshold
        chunk_s = chunk / SAMPLE_RATE
        runs: list[float] = []
        run = 0
        for i, v in enumerate(voiced):
            if v and silent[i * chunk]:
                run += 1
            elif run:
                runs.append(run * chunk_s * 1000)
                run = 0
        caller_chunks = [
            i
            for i in range(voiced.size)
            if not silent[i * chunk] and np.abs(near[i * chunk : (i + 1) * chunk]).max() > 0.05
        ]
        kept = float(np.mean(voiced[caller_chunks])) if caller_chunks else float("nan")
        heard = []
        for start, end, _t in lines:
            lag = SAMPLE_RATE // 50  # the stage runs less than a frame behind
            heard.append(whisper.transcribe(cleaned[max(0, start - 3200) : end + lag + 8000]).text)
        w = wer(script, " ".join(heard))
        row = (
            f"| {name} | {sum(r >= settings.hold_onset_ms for r in runs) / minutes:.1f} "
            f"| {sum(r >= settings.barge_in_ms for r in runs) / minutes:.1f} "
            f"| {sum(r >= settings.barge_in_max_ms for r in runs) / minutes:.1f} "
            f"| {kept:.2f} | {w:.2f} | {cpu * 1000 / (far.size / SAMPLE_RATE):.1f} |"
        )
        out_lines.append(row)
        print(row, " heard:", heard, file=sys.stderr, flush=True)
    return out_lines


# ---------------------------------------------------------------------------- a real call
class EchoPath:
    """What the caller's loudspeaker played, heard again by its microphone ``delay_s`` later."""

    def __init__(self, delay_s: float, gain_db: float, max_s: float) -> None:
        from presence.bench.fdb.echo import DelayLine

        self.line = DelayLine(delay_s, OUT_SAMPLE_RATE, max_s=max_s)
        self.gain = 10 ** (gain_db / 20)
        self._resample = FrameResampler(OUT_SAMPLE_RATE)

    def heard(self, frame: object, arrived: float) -> None:
        self.line.write(self._resample(frame) * self.gain, arrived)  # type: ignore[arg-type]

    def read(self, at: float, n: int) -> np.ndarray:
        return self.line.read(at, n)


class _Tee:
    """A received track that also hands each frame to the echo path."""

    def __init__(self, track: object, path: EchoPath) -> None:
        self.track, self.path = track, path

    async def recv(self) -> object:
        frame = await self.track.recv()  # type: ignore[attr-defined]
        self.path.heard(frame, now())
        return frame


class EchoRecorder(Recorder):
    def __init__(self, path: EchoPath) -> None:
        super().__init__()
        self.path = path

    def attach(self, track: object) -> None:  # type: ignore[override]
        super().attach(_Tee(track, self.path))  # type: ignore[arg-type]


class EchoPlayer(PlayerTrack):
    """The caller's microphone: its own clips plus the echo of the bot."""

    def __init__(self, path: EchoPath) -> None:
        super().__init__()
        self.path = path

    def next_samples(self) -> np.ndarray:
        own = super().next_samples()
        return np.clip(own + self.path.read(self.frame_time, own.size), -1.0, 1.0)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(ref: str, hyp: str) -> float:
    r, h = _words(ref), _words(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)] / max(1, len(r))


async def one_call(label: str, overrides: dict[str, object], clips: list[np.ndarray], seconds: float) -> dict:
    from presence.bench.latency import start_bot
    from presence.config import Settings

    settings = Settings.from_env({}, responder="rules")
    bot = await start_bot(settings, greeting=GREETING, jobs="off", **overrides)
    path = EchoPath(ECHO_DELAY_S, ECHO_DB, seconds + 60)
    caller = Caller(bot.url, name="speakerphone", player=EchoPlayer(path), recorder=EchoRecorder(path))
    spoken: list[tuple[float, float]] = []
    try:
        await caller.connect()
        t_start = now()
        # A fixed script, the same with and without a canceller: silent through the greeting
        # (about 13 s), then a line every SPACING_S; silent while the bot answers each.
        for i, clip in enumerate(clips):
            at = FIRST_LINE_S + i * SPACING_S
            if at + SPACING_S > seconds:
                break
            await asyncio.sleep(max(0.0, t_start + at - now()))
            started = await caller.say(clip, OUT_SAMPLE_RATE)
            spoken.append((started, started + clip.size / OUT_SAMPLE_RATE))
        await asyncio.sleep(max(0.0, t_start + seconds - now()))
        t_end = now()
    finally:
        with contextlib.suppress(Exception):
            await caller.hangup()
        await bot.stop()
    events = caller.events
    minutes = (t_end - t_start) / 60

    def caller_silent(t: float) -> bool:
        return not any(a - 0.3 <= t <= b + 1.0 for a, b in spoken)

    barges = [e for e in events if e.get("name") == "barge_in_detected" and e.get("by") != "bot"]
    false = [e for e in barges if caller_silent(float(e["t"]))]  # type: ignore[arg-type]
    # A hold is the bot pausing for a possible barge-in: a self-interruption too, if only brief.
    holds = [e for e in events if e.get("name") == "playback_held" and caller_silent(float(e["t"]))]  # type: ignore[arg-type]
    # The last final caption of each caller turn: whisper's pass replaces the streaming one.
    by_turn: dict[object, str] = {}
    for e in events:
        if e.get("name") == "caption" and e.get("who") != "bot" and e.get("final"):
            by_turn[e.get("turn")] = str(e.get("text", ""))
    finals = list(by_turn.values())
    script = " ".join(CALLER_LINES[: len(spoken)])
    heard = " ".join(finals)
    result = {
        "label": label,
        "minutes": minutes,
        "barge_ins": len(barges),
        "false_barge_ins": len(false),
        "false_per_min": len(false) / minutes,
        "holds": len(holds),
        "holds_per_min": len(holds) / minutes,
        "hold_times": [round(float(e["t"]) - t_start, 1) for e in holds],  # type: ignore[arg-type]
        "names": dict(collections.Counter(str(e.get("name")) for e in events)),
        "wer": wer(script, heard),
        "heard": heard,
        "turns": sum(1 for e in events if e.get("name") == "bot_speech_start"),
    }
    print(
        f"{label}: {len(false)} false barge-ins, {len(holds)} false holds in {minutes:.1f} min, "
        f"WER {result['wer']:.2f}, heard: {heard!r}, holds at {result['hold_times']} s, "
        f"events: {result['names']}",
        file=sys.stderr,
        flush=True,
    )
    return result


async def call_level(names: Sequence[str], seconds: float) -> list[str]:
    tts, rate = _tts()
    clips = [resample(np.concatenate(list(tts.synthesize(t))), rate, OUT_SAMPLE_RATE) for t in CALLER_LINES]  # type: ignore[attr-defined]
    conditions: list[tuple[str, dict[str, object]]] = [("echo_cancel=off", {"echo_cancel": "off"})]
    conditions += [(f"echo_cancel=on ({n})", {"echo_cancel": "on", "echo_canceller": n}) for n in names]
    results = [await one_call(label, o, clips, seconds) for label, o in conditions]
    lines = [
        f"## A real call: bot echo fed back at {ECHO_DB:.0f} dB, {ECHO_DELAY_S * 1000:.0f} ms "
        "(+ network and jitter buffer)",
        "",
        "| condition | minutes | barge-ins | false barge-ins (caller silent) | per minute "
        "| false holds (bot paused, caller silent) | per minute | bot turns | caller WER |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['minutes']:.2f} | {r['barge_ins']} | {r['false_barge_ins']} "
            f"| {r['false_per_min']:.1f} | {r['holds']} | {r['holds_per_min']:.1f} | {r['turns']} | {r['wer']:.2f} |"
        )
    lines.append("")
    lines.append(f"caller script: {' '.join(CALLER_LINES)!r}")
    for r in results:
        lines.append(f"{r['label']}: the bot's whisper captions of the caller: {r['heard']!r}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="presence bench aec", description=__doc__.splitlines()[0])
    p.add_argument("--cancellers", default=",".join(CANCELLERS), help="candidates, comma-separated")
    p.add_argument("--call-seconds", type=float, default=62.0, help="length of each call")
    p.add_argument("--skip-call", action="store_true", help="media level only")
    args = p.parse_args(argv)
    names = [n for n in args.cancellers.split(",") if n]
    print(f"presence bench aec: {os.cpu_count()} cores, no GPU", flush=True)
    for line in media_level(names):
        print(line, flush=True)
    print(flush=True)
    for line in inbound_path(names):
        print(line, flush=True)
    if not args.skip_call:
        print(flush=True)
        for line in asyncio.run(call_level(names, args.call_seconds)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
