"""One speaker's voice as the interpreter hears it: utterances, and when to read them again.

``SpeakerStream.step`` takes each scored 32 ms chunk of the speaker (the same cleaned 16 kHz
audio and VAD probability the engine gets) and answers with a ``Pass`` when the ASR should
read the window again:

- simultaneous: every ``step_s`` of new speech (the words so far, for the stable prefix), and at
  a pause of ``pause_s`` (250 ms: piper pauses ~380 ms at a comma; a plosive's gap is under 100) (a clause boundary: everything heard is committed and the window is
  cut there, so the next pass reads only new audio);
- consecutive (the baseline): once, when the turn has ended (``end_s`` of silence), over the
  whole utterance.

One pass is in flight at a time per speaker (``done`` frees it): a slow CPU reads less often,
it never queues passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from presence.seams import SAMPLE_RATE

TAIL_S = 0.15  # silence kept after the last voice in a window that ends at a pause


@dataclass(frozen=True, slots=True)
class Pass:
    audio: np.ndarray  # 16 kHz, the window to read
    start: float  # bot-clock time of audio[0]
    boundary: bool  # commit everything heard (a pause or the end of the turn)
    final: bool  # the utterance is over

    @property
    def end(self) -> float:
        return self.start + self.audio.size / SAMPLE_RATE


class SpeakerStream:
    def __init__(
        self,
        participant: str,
        language: str,
        *,
        simultaneous: bool = True,
        vad_threshold: float = 0.5,
        step_s: float = 0.7,
        pause_s: float = 0.25,
        end_s: float = 0.8,
        max_window_s: float = 20.0,
        preroll_s: float = 0.2,
    ) -> None:
        self.participant = participant
        self.language = language
        self.simultaneous = simultaneous
        self.vad_threshold = vad_threshold
        self.step_s, self.pause_s, self.end_s = step_s, pause_s, end_s
        self.max_window = int(max_window_s * SAMPLE_RATE)
        self.preroll = int(preroll_s * SAMPLE_RATE)
        self.busy = False  # a pass is being read
        self._chunks: list[np.ndarray] = []
        self._size = 0
        self._start = 0.0  # bot-clock time of the window's first sample
        self._speaking = False  # inside an utterance (speech, or a pause shorter than end_s)
        self._silence = 0.0  # seconds of silence since the last voiced chunk
        self._unread = 0  # voiced samples since the last pass
        self._boundary_due = False  # speech since the last clause boundary
        self._cut_at: float | None = None  # a clause boundary not read yet (bot clock)
        self._voiced_end = 0.0  # bot-clock end of the last voiced chunk

    def step(self, piece: np.ndarray, prob: float, t: float) -> Pass | None:
        """One scored chunk ending at bot-clock time ``t``; a pass to read, or None."""
        voiced = prob >= self.vad_threshold
        if not self._speaking and not voiced:
            self._keep_preroll(piece, t)
            return None
        self._append(piece, t)
        if voiced:
            self._speaking, self._silence, self._boundary_due = True, 0.0, True
            self._unread += piece.size
            self._voiced_end = t
        else:
            self._silence += piece.size / SAMPLE_RATE
            if self.simultaneous and self._boundary_due and self._silence >= self.pause_s:
                # a clause boundary, remembered even while a pass is being read: the next
                # pass reads up to just after the last voice and commits it all, however the
                # speaker goes on (whisper invents words in a window's trailing silence:
                # "thank you", "okay okay okay")
                self._cut_at, self._boundary_due = min(t, self._voiced_end + TAIL_S), False
        if self.busy:
            return None
        ended = self._silence >= self.end_s
        if not self.simultaneous:
            if ended or self._size >= self.max_window:
                return self._take(min(t, self._voiced_end + TAIL_S), boundary=True, final=ended)
            return None
        if self._cut_at is not None:
            cut, self._cut_at = self._cut_at, None
            return self._take(cut, boundary=True, final=ended)
        if self._size >= self.max_window:
            return self._take(t, boundary=True, final=False)
        if ended:
            self._reset_utterance()
        elif voiced and self._unread >= self.step_s * SAMPLE_RATE:
            return self._take(t, boundary=False, final=False)
        return None

    def done(self, trim_to: float | None = None, took_s: float = 0.0) -> None:
        """The pass finished (in ``took_s``); drop the window's audio before ``trim_to``.

        The next mid-clause pass waits for ``step_s`` more speech after this one ended, not
        after it began: back to back, whisper held both cores here and the scorer of every
        voice fell seconds behind. Clause boundaries are read at once."""
        self.busy = False
        self._unread = min(self._unread, 0) - int(took_s * SAMPLE_RATE)
        if trim_to is not None and self._size:
            cut = int(round((trim_to - self._start) * SAMPLE_RATE))
            if cut > 0:
                audio = self._window()[cut:]
                self._chunks, self._size = [audio], audio.size
                self._start = trim_to

    # ------------------------------------------------------------------ internals
    def _take(self, until: float, *, boundary: bool, final: bool) -> Pass:
        """A pass over the window up to bot-clock time ``until``."""
        self.busy = True
        self._unread = 0
        audio = self._window()[: max(0, int(round((until - self._start) * SAMPLE_RATE)))]
        p = Pass(audio=audio, start=self._start, boundary=boundary, final=final)
        if final:
            self._reset_utterance()
        return p

    def _window(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros(0, dtype=np.float32)

    def _append(self, piece: np.ndarray, t: float) -> None:
        if not self._chunks:
            self._start = t - piece.size / SAMPLE_RATE
        self._chunks.append(piece)
        self._size += piece.size

    def _keep_preroll(self, piece: np.ndarray, t: float) -> None:
        self._append(piece, t)
        if self._size > self.preroll:
            audio = self._window()[-self.preroll :]
            self._chunks, self._size = [audio], audio.size
            self._start = t - audio.size / SAMPLE_RATE

    def _reset_utterance(self) -> None:
        self._speaking, self._silence, self._unread, self._boundary_due = False, 0.0, 0, False
        self._cut_at = None
        self._chunks, self._size = [], 0
