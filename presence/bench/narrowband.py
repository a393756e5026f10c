"""``presence bench narrowband``: what a phone line does to the VAD, the end-of-turn detector
and the ASR.

Every sentence (piper's voice, with a comma where people pause) is heard three ways: as the
bot hears a WebRTC caller (16 kHz from Opus: here the clean 16 kHz), through G.711 mu-law at
8 kHz (a plain phone line: PCMU, what Twilio and Telnyx stream), as the reader passes G.711 on
(with its -70 dB floor above 4 kHz), and through G.722 (wideband SIP). The codecs are aiortc's, the same code a call runs. For each channel:

- VAD: the share of Silero's 32 ms chunks whose voiced/unvoiced call agrees with the clean audio.
- End of turn: smart-turn's probability on the whole sentence ("finished") and on the audio up
  to its comma pause ("unfinished"), each with 200 ms of silence after; accuracy at 0.5 and the
  mean probabilities.
- ASR: whisper's (the final pass) and pocketsphinx's (the streaming recogniser) word error rate.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import numpy as np
from aiortc.codecs import get_decoder, get_encoder
from aiortc.jitterbuffer import JitterFrame

from presence.bench.fdb.stimuli import find_comma_pause
from presence.media.audio import FrameResampler, make_frame, resample
from presence.media.inbound import DITHER
from presence.media.rtp import codec_parameters
from presence.seams import OUT_SAMPLE_RATE, SAMPLE_RATE
from presence.signaling.sip.sdp import G722, PCMU, RtpCodec

SENTENCES = [
    "I was thinking about the weekend, and maybe we could go hiking.",
    "When I got home yesterday evening, the power was out again.",
    "If you have a minute, could you check my last invoice?",
    "My daughter starts school next week, so I need to change the pickup time.",
    "The package arrived this morning, but the box was completely empty.",
    "Before we go any further, I would like to know the total price.",
    "I called last Tuesday, and nobody ever called me back.",
    "If the weather is good on Saturday, we will take the boat out.",
    "After the update last night, my phone keeps restarting.",
    "Since you are asking, the blue one looked better to me.",
    "When the train was late again, I missed my connection to the airport.",
    "Although the room was small, the view over the harbour was lovely.",
]
CHANNELS = ("wideband", "g711", "g711+dither", "g722")
_WORD = re.compile(r"[a-z0-9']+")


def codec_round_trip(audio16: np.ndarray, codec: RtpCodec) -> np.ndarray:
    """16 kHz audio through a codec as a call sends it: 20 ms frames at 48 kHz into aiortc's
    encoder, its payloads through the decoder, back to 16 kHz mono."""
    encoder, decoder = get_encoder(codec_parameters(codec)), get_decoder(codec_parameters(codec))
    audio48 = resample(audio16, SAMPLE_RATE, OUT_SAMPLE_RATE)
    frame = OUT_SAMPLE_RATE // 50
    audio48 = np.concatenate([audio48, np.zeros(-audio48.size % frame + 2 * frame, np.float32)])
    back = FrameResampler(SAMPLE_RATE)
    out: list[np.ndarray] = []
    ts = 0
    for i in range(0, audio48.size, frame):
        payloads, _ = encoder.encode(make_frame(audio48[i : i + frame], i))
        for payload in payloads:
            for decoded in decoder.decode(JitterFrame(data=payload, timestamp=ts)):
                out.append(back(decoded))
            ts += codec.clock_rate // 50
    heard = np.concatenate(out) if out else np.zeros(0, np.float32)
    # the encoders hold the first frame back: line the output up with the input
    lag = (
        int(np.argmax(np.correlate(heard[: SAMPLE_RATE // 2], audio16[:2000], mode="valid")))
        if heard.size > SAMPLE_RATE // 2
        else 0
    )
    return heard[lag : lag + audio16.size]


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = _WORD.findall(reference.lower()), _WORD.findall(hypothesis.lower())
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1] / max(1, len(ref))


def _vad_calls(vad, audio: np.ndarray, threshold: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    n = audio.size // 512
    return np.array([vad.probability(audio[i * 512 : (i + 1) * 512]) >= threshold for i in range(n)])


def run(limit: int) -> dict[str, dict[str, float]]:
    from presence.bot.backends.asr import PocketsphinxStreamingASR, WhisperTranscriber
    from presence.bot.backends.tts import PiperTTS
    from presence.bot.backends.turn import SmartTurnDetector
    from presence.bot.backends.vad import SileroVAD

    tts, detector, whisper, sphinx = (
        PiperTTS(),
        SmartTurnDetector(),
        WhisperTranscriber(),
        PocketsphinxStreamingASR(),
    )
    detector.load()
    silence = np.zeros(int(0.2 * SAMPLE_RATE), np.float32)
    rng = np.random.default_rng(0)
    stats: dict[str, dict[str, list[float]]] = {c: {} for c in CHANNELS}
    t0 = time.monotonic()
    for k, text in enumerate(SENTENCES[:limit]):
        clean = resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, SAMPLE_RATE)
        g711 = codec_round_trip(clean, PCMU)
        dither = rng.standard_normal(g711.size).astype(np.float32) * DITHER  # as the reader adds it
        heard = {
            "wideband": clean,
            "g711": g711,
            "g711+dither": g711 + dither,
            "g722": codec_round_trip(clean, G722),
        }
        span = find_comma_pause(clean)
        reference_vad = _vad_calls(SileroVAD(), clean, 0.5)
        for channel, audio in heard.items():
            s = stats[channel]
            calls = _vad_calls(SileroVAD(), audio, 0.5)
            n = min(calls.size, reference_vad.size)
            s.setdefault("vad_agreement", []).append(float((calls[:n] == reference_vad[:n]).mean()))
            p_done = detector.probability(np.concatenate([audio, silence]))
            s.setdefault("p_finished", []).append(p_done)
            s.setdefault("right", []).append(float(p_done >= 0.5))
            if span is not None:
                p_cut = detector.probability(np.concatenate([audio[: span[0]], silence]))
                s.setdefault("p_unfinished", []).append(p_cut)
                s.setdefault("right", []).append(float(p_cut < 0.5))
            s.setdefault("whisper_wer", []).append(wer(text, whisper.transcribe(audio).text))
            sphinx.start()
            sphinx.accept(audio)
            s.setdefault("sphinx_wer", []).append(wer(text, sphinx.finish().text))
        print(
            f"\r  {k + 1}/{min(limit, len(SENTENCES))} sentences, {time.monotonic() - t0:.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    return {c: {name: statistics.fmean(v) for name, v in s.items()} for c, s in stats.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| channel | VAD agrees with clean | P(finished) on finished | P(finished) at the comma | right at 0.5 | whisper WER | pocketsphinx WER |",
        "|---|---|---|---|---|---|---|",
    ]
    for channel in CHANNELS:
        r = results[channel]
        lines.append(
            f"| {channel} | {r['vad_agreement']:.3f} | {r['p_finished']:.3f} | {r.get('p_unfinished', float('nan')):.3f} "
            f"| {r['right']:.0%} | {r['whisper_wer']:.3f} | {r['sphinx_wer']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="presence bench narrowband", description=__doc__)
    parser.add_argument("--limit", type=int, default=len(SENTENCES), help="sentences to use")
    args = parser.parse_args(argv)
    print(
        f"presence bench narrowband: {min(args.limit, len(SENTENCES))} piper sentences, 3 channels",
        file=sys.stderr,
    )
    print(table(run(args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
