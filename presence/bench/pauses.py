"""Sentences with a pause to think, for measuring whether the bot speaks into it (FDB's pause
category, made the same way: piper's comma pause stretched to about 1.5 s)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from presence.media.audio import resample
from presence.seams import OUT_SAMPLE_RATE, SAMPLE_RATE

PAUSED = [
    "I was thinking about the weekend, and maybe we could go hiking.",
    "When I got home yesterday evening, the power was out again.",
    "If you have a minute, could you check my last invoice?",
    "The package arrived this morning, but the box was completely empty.",
    "After the update last night, my phone keeps restarting.",
]
PAUSE_S = 1.5  # FDB's pause category stretches the comma pause to about this


@dataclass
class PausedClip:
    audio48: np.ndarray
    pause_start: float  # the stretched comma pause, seconds into the clip
    pause_end: float
    voiced_end: float


def make_paused_clips(texts: list[str], pause_s: float = PAUSE_S) -> list[PausedClip]:
    """Piper sentences with their comma pause stretched to ``pause_s`` (FDB's pause category)."""
    from presence.bench.fdb.stimuli import find_comma_pause, stretch_pause
    from presence.bot.backends.tts import PiperTTS

    tts, out = PiperTTS(), []
    for text in texts:
        audio16 = resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, SAMPLE_RATE)
        span = find_comma_pause(audio16)
        if span is None:
            continue
        stretched, start, end = stretch_pause(audio16, span, pause_s)
        voiced = np.flatnonzero(np.abs(stretched) > 0.02)
        out.append(
            PausedClip(
                resample(stretched, SAMPLE_RATE, OUT_SAMPLE_RATE), start, end, (voiced[-1] + 1) / SAMPLE_RATE
            )
        )
    return out
