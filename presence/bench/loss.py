"""``presence bench loss``: how much of a caller's audio reaches the model when packets get lost.

A real aiortc caller speaks piper sentences to the real bot, served in this process; on the way
in, the bot's audio receiver drops RTP packets (random loss at several rates, and loss in 100 ms
bursts: the kernel here has no netem, so the loss is simulated in-process, after the network
and before aiortc's jitter buffer). For every loss pattern, with the bot's concealment on and
off (``opus_plc``), it prints the share of the caller's audio time that reaches the model (20 ms
frames handed to the micro-turns and not silence-filled as lost) and the word error rate of
whisper (the bundled tiny.en) on exactly that audio, medians over the sentences. The caller's
encoder sends in-band FEC, as browsers do.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from presence.media.microturn import FrameBuffer, Pulled
from presence.seams import FRAME_SAMPLES, OUT_SAMPLE_RATE

SENTENCES: tuple[str, ...] = (
    "I would like to change the delivery address for my order.",
    "The weather was lovely when we walked along the river yesterday.",
    "Could you please tell me when the next train leaves for the city?",
    "My sister bought a small red car from a dealer near the station.",
)
FRAME_S = 0.02


@dataclass(frozen=True)
class Pattern:
    name: str
    rate: float  # share of packets dropped, on average
    burst: int = 1  # packets dropped in a row per loss event (5 = 100 ms)


PATTERNS: tuple[Pattern, ...] = (
    Pattern("0 %", 0.0),
    Pattern("2 %", 0.02),
    Pattern("5 %", 0.05),
    Pattern("10 %", 0.10),
    Pattern("5 % in 100 ms bursts", 0.05, burst=5),
)


class LossyLink:
    """Drops RTP packets on their way into an aiortc receiver (wraps its packet handler).

    Each packet starts a loss event with probability ``rate / burst``; an event drops ``burst``
    packets in a row. The first ``skip`` packets always pass (the call settles first)."""

    def __init__(self, rate: float, burst: int = 1, seed: int = 0, skip: int = 50) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.skip = skip
        self.random = random.Random(seed)
        self.passed = 0
        self.dropped = 0
        self._dropping = 0

    def drop(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        if self._dropping == 0 and self.rate > 0 and self.random.random() < self.rate / self.burst:
            self._dropping = self.burst
        if self._dropping > 0:
            self._dropping -= 1
            return True
        return False

    def attach(self, receiver: Any) -> None:
        original: Callable[..., Awaitable[None]] = receiver._handle_rtp_packet

        async def handle(packet: Any, arrival_time_ms: int) -> None:
            if self.drop():
                self.dropped += 1
                return
            self.passed += 1
            await original(packet, arrival_time_ms=arrival_time_ms)

        receiver._handle_rtp_packet = handle


class Tap:
    """Records, by stream frame, what reaches a participant's ``FrameBuffer`` (``pushed``: the
    decoded audio, however late) and what it hands to the micro-turns in time (``frames``)."""

    def __init__(self, buffer: FrameBuffer) -> None:
        self.frames: dict[int, np.ndarray] = {}  # stream frame index -> 16 kHz audio (not lost)
        self.pushed: set[int] = set()
        self.stream = np.zeros(0, dtype=np.float32)  # everything pushed, by stream position
        original_pull, original_push = buffer.pull, buffer.push

        def pull(n: int, t: float | None = None) -> Pulled:
            pulled = original_pull(n, t)
            if buffer._next is not None:
                first = buffer._next - n
                for i in np.flatnonzero(~pulled.lost):
                    self.frames[first + int(i)] = pulled.audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]
            return pulled

        def push(
            audio: np.ndarray, vad: float | None = None, arrival: float | None = None, pos: int | None = None
        ) -> None:
            if pos is not None and pos >= 0:
                end = pos + audio.size
                if end > self.stream.size:
                    self.stream = np.concatenate((self.stream, np.zeros(end - self.stream.size, np.float32)))
                self.stream[pos:end] = audio
                # the frames that start inside this audio
                self.pushed.update(range(-(-pos // FRAME_SAMPLES), -(-end // FRAME_SAMPLES)))
            original_push(audio, vad, arrival, pos)

        buffer.pull = pull  # type: ignore[method-assign]
        buffer.push = push  # type: ignore[method-assign]

    def window(self, start: int, count: int) -> tuple[np.ndarray, float, float]:
        """Frames ``[start, start + count)``: the 16 kHz audio the micro-turns got (silence where
        lost), the share they got in time, and the share that reached the buffer at all."""
        silence = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        frames = range(start, start + count)
        audio = np.concatenate([self.frames.get(k, silence) for k in frames])
        on_time = sum(k in self.frames for k in frames) / max(1, count)
        arrived = sum(k in self.pushed for k in frames) / max(1, count)
        return audio, on_time, arrived

    def envelope(self, start: int, count: int) -> np.ndarray:
        """Loudness of every frame that reached the buffer (0 elsewhere)."""
        out = np.zeros(count)
        for i in range(count):
            k = start + i
            if k >= 0 and (k + 1) * FRAME_SAMPLES <= self.stream.size:
                frame = self.stream[k * FRAME_SAMPLES : (k + 1) * FRAME_SAMPLES]
                out[i] = float(np.sqrt(np.mean(np.square(frame))))
        return out


def frame_rms(audio48: np.ndarray) -> np.ndarray:
    n = audio48.size // 960
    return np.sqrt(np.mean(np.square(audio48[: n * 960].reshape(n, 960)), axis=1))


def align(tap: Tap, sent: np.ndarray, search: int = 25) -> int:
    """Frames to add to a caller frame index to get the bot's index (envelope correlation)."""
    best, best_score = 0, -np.inf
    for shift in range(-search, search + 1):
        got = tap.envelope(shift, sent.size)
        score = float(np.dot(got, sent))
        if score > best_score:
            best, best_score = shift, score
    return best


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)] / max(1, len(ref))


@dataclass
class CallResult:
    on_time: list[float]  # per clip: share of its frames the micro-turns got (not lost)
    arrived: list[float]  # per clip: share of its frames decoded at all, however late
    wers: list[float]  # per clip (empty without an ASR)
    dropped: float  # share of packets the link dropped
    filled: int  # packets the bot's receiver stepped over and had filled (FEC or PLC)


async def call_once(
    server: Any,
    clips: Sequence[tuple[str, np.ndarray]],
    pattern: Pattern,
    seed: int,
    asr: Any = None,
    gap_s: float = 0.6,
) -> CallResult:
    """One call: a real aiortc caller says every clip (48 kHz) to ``server`` (``.url``, and its
    in-process ``.manager``) through a lossy link into the bot's receiver."""
    from presence.caller import Caller

    caller = Caller(url=server.url, name="caller")
    try:
        await caller.connect()
        deadline = time.monotonic() + 10
        session = peer = None
        while time.monotonic() < deadline:
            session = server.manager.sessions.get(caller.call_id)
            peer = next(iter(session.peers.values()), None) if session else None
            if peer is not None and peer.audio is not None:
                break
            await asyncio.sleep(0.02)
        if session is None or peer is None or peer.audio is None:
            raise RuntimeError("the bot never attached the caller's audio")
        link = LossyLink(pattern.rate, pattern.burst, seed=seed)
        for transceiver in peer.link.pc.getTransceivers():
            if transceiver.kind == "audio":
                link.attach(transceiver.receiver)
        tap = Tap(session.assembler.participants[peer.participant])
        await asyncio.sleep(1.2)  # past the link's warm-up packets
        starts: list[int] = []
        player = caller.player
        for _text, audio in clips:
            first_sample_at = await caller.say(audio, OUT_SAMPLE_RATE)
            starts.append(round((first_sample_at - (player._start or first_sample_at)) / FRAME_S))
            await asyncio.sleep(audio.size / OUT_SAMPLE_RATE + gap_s)
        await asyncio.sleep(0.6)  # the last frames' playout delay and tick
        # The caller's frame k is the bot's frame k + shift (the bot counts from the first
        # packet it decoded); find the shift from the loudness of what was sent.
        sent_env = np.zeros(starts[-1] + clips[-1][1].size // 960 + 1)
        for start, (_t, audio) in zip(starts, clips, strict=True):
            env = frame_rms(audio)
            sent_env[start : start + env.size] = env
        shift = align(tap, sent_env)
        result = CallResult([], [], [], 0.0, _filled(peer))
        loop = asyncio.get_running_loop()
        for start, (text, audio) in zip(starts, clips, strict=True):
            got, on_time, arrived = tap.window(start + shift, audio.size // 960)
            result.on_time.append(on_time)
            result.arrived.append(arrived)
            if asr is not None:
                transcript = await loop.run_in_executor(None, asr.transcribe, got)
                result.wers.append(wer(text, transcript.text))
        result.dropped = link.dropped / max(1, link.passed + link.dropped)
        return result
    finally:
        await caller.hangup()


def _filled(peer: Any) -> int:
    for transceiver in peer.link.pc.getTransceivers():
        buffer = getattr(transceiver.receiver, "_RTCRtpReceiver__jitter_buffer", None)
        if transceiver.kind == "audio" and hasattr(buffer, "lost"):
            return int(buffer.lost)
    return 0


@dataclass
class _Server:
    url: str
    manager: Any


# The bot as deployed on the inbound path (opus, 16 kHz, Silero VAD, micro-turns), with the
# costly parts that do not touch it switched off, so a busy 2-core machine keeps real time.
LIGHT = {
    "asr": "none",
    "transcriber": "none",
    "turn_detector": "none",
    "text_turn_detector": "none",
    "responder": "rules",
    "tts": "espeak",
    "policy": "rules",
}


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def run(args: argparse.Namespace) -> int:
    from presence.bot.backends.asr import WhisperTranscriber
    from presence.bot.backends.factory import build_backends, warm_up
    from presence.bot.backends.tts import PiperTTS
    from presence.bot.calls import CallManager
    from presence.config import Settings
    from presence.media.audio import resample
    from presence.media.opus_plc import available, unavailable_reason
    from presence.signaling.app import run_server

    if not available():
        print(f"libopus is not available ({unavailable_reason()}): install libopus0", file=sys.stderr)
        return 1
    started = time.monotonic()
    tts = PiperTTS()
    clips = [
        (text, resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, OUT_SAMPLE_RATE))
        for text in SENTENCES[: args.sentences]
    ]
    asr = WhisperTranscriber()
    asr.load()
    base: dict[str, object] = {"port": 0, "greeting": "", "jobs": "off", "peer_timeout_s": 5.0, **LIGHT}
    backends = build_backends(Settings.from_env({}, **base))
    await warm_up(backends)
    wanted = [w.strip() for w in args.patterns.split(",") if w.strip()]
    patterns = [p for p in PATTERNS if not wanted or p.name in wanted or p.name.split()[0] in wanted]
    rows: dict[tuple[str, bool], CallResult] = {}
    for conceal in (False, True):
        settings = Settings.from_env({}, **base, opus_plc=conceal)
        manager = CallManager(settings, backends)
        runner = await run_server(settings, manager)
        try:
            for index, pattern in enumerate(patterns):
                result = await call_once(
                    _Server(settings.base_url, manager), clips, pattern, seed=args.seed + index, asr=asr
                )
                rows[pattern.name, conceal] = result
                print(
                    f"  concealment {'on ' if conceal else 'off'} {pattern.name:<22} dropped {result.dropped:5.1%}"
                    f"  to the model {_median(result.on_time):6.1%}  decoded {_median(result.arrived):6.1%}"
                    f"  WER {_median(result.wers):6.1%}  filled {result.filled}"
                    f"  (to the model per sentence: {', '.join(f'{v:.0%}' for v in result.on_time)})",
                    flush=True,
                )
                await asyncio.sleep(0.5)
        finally:
            await runner.cleanup()
    print()
    print(report(rows, [p.name for p in patterns], len(clips), time.monotonic() - started))
    return 0


def report(rows: dict[tuple[str, bool], CallResult], names: Sequence[str], clips: int, seconds: float) -> str:
    def cell(name: str, conceal: bool, what: str) -> str:
        r = rows.get((name, conceal))
        if r is None:
            return "-"
        if what == "wer":
            return f"{_median(r.wers) * 100:.1f}"
        return f"{_median(getattr(r, what)):.1%}"

    lines = [
        f"Caller audio under simulated packet loss: {clips} piper sentences per row, medians over them.",
        "to the model: share of the sentence's 20 ms frames the micro-turns got (not silence-filled as lost);",
        "decoded: share that reached the bot's frame buffer at all, however late; WER: whisper tiny.en",
        "on the audio the model got, in %. off = aiortc's own jitter buffer and decoder, on = opus_plc.",
        "",
        f"{'loss pattern':<22} {'dropped':>7} | {'to the model':^17} | {'decoded':^17} | {'WER %':^13} | filled",
        f"{'':<22} {'':>7} | {'off':>8} {'on':>8} | {'off':>8} {'on':>8} | {'off':>6} {'on':>6} |",
    ]
    for name in names:
        r = rows.get((name, True)) or rows.get((name, False))
        dropped = f"{r.dropped:.1%}" if r else "-"
        filled = str(rows[name, True].filled) if (name, True) in rows else "-"
        lines.append(
            f"{name:<22} {dropped:>7} | {cell(name, False, 'on_time'):>8} {cell(name, True, 'on_time'):>8} | "
            f"{cell(name, False, 'arrived'):>8} {cell(name, True, 'arrived'):>8} | "
            f"{cell(name, False, 'wer'):>6} {cell(name, True, 'wer'):>6} | {filled:>6}"
        )
    lines += ["", f"total {seconds:.0f} s"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="presence bench loss", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=3, help="sentences per loss pattern (up to 4)")
    parser.add_argument(
        "--patterns", default="", help="loss patterns to run, comma separated: 0,2,5,10,burst (default: all)"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if "burst" in args.patterns:
        args.patterns = args.patterns.replace("burst", PATTERNS[-1].name)
    return asyncio.run(run(args))
