"""The micro-turn engine: one per call, ticking on the bot clock whether anyone speaks or not.

Each tick it assembles a ``MicroTurn``, updates what it knows of the floor, asks the policy for
an ``Action`` and carries it out. Work that takes time never runs in the tick: the streaming
ASR is fed through its own queue, replies are prepared by ``ReplyTask`` (speculatively, from
the first silence), and the final-pass transcription runs once the reply's first audio exists.
Between ticks, ``on_voice`` gives the policy a per-VAD-chunk reflex for holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from presence.aio import run_blocking
from presence.bot.backends.factory import Backends
from presence.bot.jobs.types import JobResult
from presence.bot.policy import RESULT, RuleParams, is_backchannel
from presence.bot.reply import ReplyTask, synthesize
from presence.clock import now, sleep_until
from presence.config import Settings
from presence.events import Ev, EventLog
from presence.media.microturn import MicroTurnAssembler
from presence.media.speech import SpeechTrack, Utterance
from presence.seams import Action, CallEvent, ChatMessage, Floor, FloorPolicy, FloorState, MicroTurn

if TYPE_CHECKING:
    from presence.bot.jobs.bridge import CallJobs

log = logging.getLogger(__name__)

_QUIET_CHUNKS_TO_END_RUN = 3  # ~100 ms of unvoiced VAD chunks end an overlap run (word gaps don't)
_SPEECH_END_HANGOVER_S = 0.16
# Backchannel audio, synthesised once per (TTS instance, text).
_BC_CLIPS: dict[tuple[int, str], np.ndarray] = {}
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def _norm(text: str) -> str:
    """Text compared for "is this the same question": case, punctuation and spacing ignored."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


class Engine:
    def __init__(
        self,
        call_id: str,
        settings: Settings,
        backends: Backends,
        policy: FloorPolicy,
        assembler: MicroTurnAssembler,
        track: SpeechTrack,
        events: EventLog,
        on_step: Callable[[float], None] | None = None,
        on_latency: Callable[[str, float], None] | None = None,
    ) -> None:
        self.call_id = call_id
        self.settings = settings
        self.backends = backends
        self.policy = policy
        self.assembler = assembler
        self.track = track
        self.events = events
        self.on_step = on_step
        self.on_latency = on_latency
        self.state = FloorState()
        self.history: list[ChatMessage] = [ChatMessage("system", settings.system_prompt)]
        self.turns = 0
        self.actions: dict[str, int] = {}
        self._thr = settings.vad_threshold
        # The same vocabulary the rule policy uses (lowercased once, as RuleParams does).
        self._bc_words = RuleParams.from_settings(settings).backchannel_words
        self._asr = backends.asr_factory() if backends.asr_factory else None
        self._asr_q: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._asr_started = False
        self._preroll: deque[np.ndarray] = deque(maxlen=2)
        self._turn_audio: list[np.ndarray] = []
        self._utt_start: float | None = None
        self._last_voiced = -1e9
        self._in_speech = False
        # participant -> [start of the voiced run on the bot clock (or None), unvoiced chunks since]
        self._runs: dict[str, list[float | None]] = {}
        self._pending: ReplyTask | None = None  # prepared, not yet on the floor
        self._pending_text: asyncio.Future[str] | None = None
        self._pending_user_text = ""
        self._live: ReplyTask | None = None  # committed to the speech track
        self._commit_when_ready = False
        self._turn_end_t: float | None = None
        self._user_index: int | None = None
        self._cut: Utterance | None = None
        self._cut_at = -1e9
        self._state_name = ""
        self.jobs: CallJobs | None = None  # set by the session when background jobs are on
        self._results: deque[tuple[JobResult, ReplyTask]] = deque()
        self._urgent_jobs: set[str] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._main: asyncio.Task[None] | None = None
        track.on_utterance_end(self._on_utterance_end)
        events.listen(self._on_event)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"engine-{self.call_id}")
        self._spawn(self._asr_loop(), "asr")
        self._set_state("listening")

    async def stop(self) -> None:
        tasks = [t for t in (self._main, *self._tasks) if t is not None]
        for reply in (self._pending, self._live, *(r for _, r in self._results)):
            if reply is not None:
                await reply.cancel()
        self._results.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._main = None
        for owner in (self.policy, self._asr):  # a model slot, a stream in a worker process
            close = getattr(owner, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await run_blocking(close)

    def _spawn(self, coro, name: str) -> asyncio.Task[object]:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro, name=f"{name}-{self.call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s: task %s failed", self.call_id, task.get_name(), exc_info=task.exception())

    async def say(self, text: str) -> None:
        """Speak a fixed text now (the greeting, or an acknowledgement)."""
        reply = ReplyTask(self.backends.responder, self.backends.tts, [], self.events, fixed_text=text)
        self._commit(reply)

    # ------------------------------------------------------------------ the clock
    async def _run(self) -> None:
        step = self.assembler.duration
        if self.settings.bot_backchannels:
            self._spawn(self._load_backchannel(), "backchannel-clip")
        next_tick = now() + step
        while True:
            await sleep_until(next_tick)
            turn = self.assembler.assemble(next_tick - step)
            next_tick += step
            late = now() - next_tick
            if late > step:  # the process stalled: skip ahead instead of ticking in a burst
                log.warning("call %s: micro-turn clock %.0f ms late", self.call_id, late * 1000)
                next_tick = now() + step
            started = now()
            try:
                await self._process(turn)
            except Exception:
                log.exception("call %s: micro-turn %d failed", self.call_id, turn.index)
            if self.on_step is not None:
                self.on_step(now() - started)

    async def _process(self, turn: MicroTurn) -> None:
        self._track_caller(turn)
        s = self.state
        s.bot_speaking = self.track.speaking
        s.bot_held = self.track.held
        # Speech since the hold began, across the caller's pauses: "Wait, stop." is one barge-in.
        s.hold_speech_ms = s.hold_speech_ms + 20.0 * int((turn.vad >= self._thr).sum()) if s.bot_held else 0.0
        s.reply_ready = self._pending is not None and bool(self._pending.utterance.segments)
        s.result_waiting = bool(self._results)
        s.result_urgent = any(r.job_id in self._urgent_jobs for r, _ in self._results)
        if not s.bot_speaking:
            s.overlap_speech_ms = 0.0
        self._maybe_speculate()
        # A model policy batches its forward with every other call's in an executor.
        decide = getattr(self.policy, "decide", None)
        action = await decide(turn, s) if decide is not None else self.policy.step(turn, s)
        self.actions[action.floor.value] = self.actions.get(action.floor.value, 0) + 1
        self._apply(action, turn)
        self._update_state_name()

    # ------------------------------------------------------------------ caller tracking
    def _track_caller(self, turn: MicroTurn) -> None:
        s = self.state
        voiced = turn.vad >= self._thr
        for i in np.flatnonzero(voiced):
            t = turn.start + i * 0.02
            if self._utt_start is None:
                self._begin_caller_utterance(t)
            elif self._pending is not None or self._pending_text is not None:
                self._restart_utterance()
            if not self._in_speech:
                self._in_speech = True
                self.events.emit(Ev.CALLER_SPEECH_START, t)
            self._last_voiced = t + 0.02
        if self._utt_start is not None:
            self._turn_audio.append(turn.caller_audio)
            self._asr_q.put_nowait(("audio", turn.caller_audio))
            s.caller_speech_ms = (self._last_voiced - self._utt_start) * 1000
            s.caller_silence_ms = max(0.0, (turn.end - self._last_voiced) * 1000)
        else:
            s.caller_speech_ms = 0.0
            s.caller_silence_ms = 1e9
        if self._in_speech and turn.end - self._last_voiced >= _SPEECH_END_HANGOVER_S:
            self._in_speech = False
            self.events.emit(Ev.CALLER_SPEECH_END, self._last_voiced)
        s.caller_spoke = self._utt_start is not None
        self._preroll.append(turn.caller_audio)

    def _begin_caller_utterance(self, t: float) -> None:
        self._utt_start = t
        # The onset is in this tick's audio; the preroll (up to 400 ms) keeps the first phoneme.
        self._turn_audio = list(self._preroll)
        self._asr_q.put_nowait(("start", None))
        for chunk in self._preroll:
            self._asr_q.put_nowait(("audio", chunk))
        self._drop_pending()  # a speculative reply for an earlier utterance is stale

    def _restart_utterance(self) -> None:
        """The caller went on after a pause we had started answering: drop the answer and
        re-feed the ASR (its utterance was already finished for the speculation)."""
        if self._commit_when_ready:
            return  # too late: the turn was taken; the caller will barge in if they mean it
        self._drop_pending()
        self._asr_q.put_nowait(("start", None))
        for chunk in self._turn_audio:
            self._asr_q.put_nowait(("audio", chunk))

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._spawn(self._pending.cancel(), "cancel-reply")
            self._pending = None
        if self._pending_text is not None:
            self._pending_text.cancel()
            self._pending_text = None

    def _end_caller_utterance(self) -> None:
        self._utt_start = None
        self._turn_audio = []
        self.state.partial_text = ""
        self.state.caller_spoke = False

    def on_voice(self, participant: str, prob: float, t: float) -> None:
        """Per VAD chunk, straight from the reader: the barge-in reflex."""
        run = self._runs.setdefault(participant, [None, 0])
        if prob >= self._thr:
            if run[0] is None:
                run[0] = t
            run[1] = 0
        else:
            run[1] = (run[1] or 0) + 1
            if run[1] >= _QUIET_CHUNKS_TO_END_RUN:
                run[0] = None
        s = self.state
        s.bot_speaking = self.track.speaking
        starts = [r[0] for r in self._runs.values() if r[0] is not None]
        # +20 ms: a run that just began already holds at least one frame of speech.
        s.overlap_speech_ms = (t - min(starts)) * 1000 + 20 if s.bot_speaking and starts else 0.0
        action = self.policy.on_frame(prob, s)
        if action is not None and action.floor is Floor.HOLD and not self.track.held:
            self.track.hold()
            s.bot_held = True
            # Bot-side stop latency: from the first voiced chunk's arrival to the hold.
            stop_s = s.overlap_speech_ms / 1000
            self.events.emit(Ev.LATENCY, t, metric="barge_in_stop", ms=round(stop_s * 1000, 1))
            if self.on_latency is not None:
                self.on_latency("barge_in_stop", stop_s)

    # ------------------------------------------------------------------ replies
    def _maybe_speculate(self) -> None:
        s = self.state
        if (
            self._utt_start is None
            or s.bot_speaking
            or self._pending is not None
            or self._pending_text is not None
            or s.caller_speech_ms < self.settings.min_turn_speech_ms
            or s.caller_silence_ms < max(20, self.settings.speculate_ms)
        ):
            return
        self._start_prepare()

    def _start_prepare(self) -> None:
        """Ask the ASR for its final text; the reply is prepared from it as soon as it comes.

        Not from the latest partial: it usually lacks the last word, and the wasted reply's
        TTS (piper cannot be stopped mid-piece) delayed the real one by more than it saved.
        """
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._asr_q.put_nowait(("finish", future))
        self._pending_text = future
        future.add_done_callback(self._text_ready)

    def _prepare_reply(self, text: str) -> None:
        self._pending_user_text = text
        self._pending = ReplyTask(
            self.backends.responder,
            self.backends.tts,
            [*self.history, ChatMessage("user", text)],
            self.events,
        )

    def _text_ready(self, fut: asyncio.Future[str]) -> None:
        if fut.cancelled() or fut is not self._pending_text:
            return
        text = fut.result() if fut.exception() is None else ""
        self.events.emit(Ev.ASR_FINAL, chars=len(text))
        if self._pending is not None and _norm(text) != _norm(self._pending_user_text):
            self._spawn(self._pending.cancel(), "cancel-reply")
            self._pending = None
        if text:
            self.state.partial_text = text  # the policy's completeness check reads the final
        if self._commit_when_ready:
            self._take_turn(text)
            return
        if self._pending is None and text and not is_backchannel(text, self._bc_words):
            self._prepare_reply(text)

    def _take_turn(self, text: str) -> None:
        """End of the caller's turn with its text: commit the reply (or resume after noise)."""
        self._commit_when_ready = False
        self._pending_text = None
        audio = np.concatenate(self._turn_audio) if self._turn_audio else np.zeros(0, np.float32)
        self._end_caller_utterance()
        if not text or is_backchannel(text, self._bc_words):
            # Noise, a cough or "mm-hm": not a turn. A reply that was cut by it carries on.
            if self._cut is not None and now() - self._cut_at < 8.0:
                rest = self._cut.remainder()
                self._cut = None
                if rest.segments:
                    self.track.play(rest)
                    self.events.emit(Ev.PLAYBACK_RESUMED, reason="false interruption")
            self._drop_pending()
            return
        self._cut = None
        self.history.append(ChatMessage("user", text))
        self._user_index = len(self.history) - 1
        self.events.emit(Ev.CAPTION, who="caller", text=text, final=True, turn=self.turns)
        reply = self._pending
        spoken = self._route_jobs(text)
        if spoken is not None:  # background work: acknowledge it and keep the conversation going
            if reply is not None:
                self._spawn(reply.cancel(), "cancel-reply")
            reply = self._fixed_reply(spoken)
        elif reply is None or _norm(self._pending_user_text) != _norm(text):
            if reply is not None:
                self._spawn(reply.cancel(), "cancel-reply")
            reply = ReplyTask(self.backends.responder, self.backends.tts, list(self.history), self.events)
        self._pending = None
        self._commit(reply)
        if self.backends.transcriber is not None and audio.size:
            self._spawn(self._final_pass(reply, audio, self._user_index, self.turns), "final-asr")
        self.turns += 1

    def _fixed_reply(self, text: str) -> ReplyTask:
        return ReplyTask(self.backends.responder, self.backends.tts, [], self.events, fixed_text=text)

    # ------------------------------------------------------------------ background jobs
    def _route_jobs(self, text: str) -> str | None:
        """Dispatch the jobs the caller asked for; returns what to say instead of a reply."""
        jobs = self.jobs
        if jobs is None:
            return None
        if jobs.is_cancel_request(text) and jobs.unfinished():
            self._spawn(jobs.cancel_all("the caller said never mind"), "jobs-cancel")
            return "Okay, I've stopped that."
        requests = jobs.route(text)
        if not requests:
            return None
        self._urgent_jobs.update(r.job_id for r in requests if r.urgent)
        self._spawn(jobs.dispatch(requests), "jobs-dispatch")
        for request in requests:
            self.events.emit(Ev.JOB_DISPATCHED, job_id=request.job_id, kind=request.kind)
        return jobs.acknowledgement(requests)

    def on_job_result(self, result: JobResult) -> None:
        """The one door for background results: its speech is prepared now, and the policy
        picks the moment to say it."""
        text = self.jobs.speakable(result) if self.jobs is not None else ""
        if not text:
            return
        self._results.append((result, self._fixed_reply(text)))
        self.assembler.add_event("result")

    def _speak_result(self) -> None:
        # The first result whose speech is ready goes first: no silence while another renders.
        ready = next((i for i, (_, r) in enumerate(self._results) if r.utterance.segments), 0)
        result, reply = self._results[ready]
        del self._results[ready]
        self._urgent_jobs.discard(result.job_id)
        self.history.append(ChatMessage("tool", f"{result.kind} result: {reply.fixed_text}"))
        self.events.emit(Ev.JOB_RESULT_INJECTED, job_id=result.job_id, kind=result.kind, ok=result.ok)
        self._commit(reply)

    def _commit(self, reply: ReplyTask) -> None:
        if self._live is not None and not self._live.done:
            self._spawn(self._live.cancel(), "cancel-reply")
        self._live = reply
        self.track.play(reply.utterance)

    async def _final_pass(self, reply: ReplyTask, audio: np.ndarray, index: int, turn: int) -> None:
        # Whisper costs ~0.5 s of CPU: let the reply's first audio go first.
        for _ in range(50):
            if reply.first_audio_at is not None or reply.done:
                break
            await asyncio.sleep(0.05)
        transcriber = self.backends.transcriber
        assert transcriber is not None
        result = await run_blocking(transcriber.transcribe, audio)
        if result.text and index < len(self.history) and self.history[index].role == "user":
            self.history[index] = ChatMessage("user", result.text)
            self.events.emit(Ev.CAPTION, who="caller", text=result.text, final=True, turn=turn, pass_="final")

    def _on_utterance_end(self, utt: Utterance) -> None:
        heard = utt.heard_text()
        if heard:
            self.history.append(ChatMessage("assistant", heard + ("…" if utt.flushed else "")))

    def _on_event(self, event: CallEvent) -> None:
        # Voice-to-voice as the bot sees it, with its breakdown, for the page and /metrics.
        live = self._live
        if event.name != Ev.BOT_FIRST_PACKET_SENT or live is None or self._turn_end_t is None:
            return
        if event.data.get("utterance") != live.utterance.id:
            return
        end, self._turn_end_t = self._turn_end_t, None
        marks = {"voice_to_voice": event.t}
        decided = self.events.first(Ev.END_OF_TURN_DECIDED, after=end)
        if decided is not None:
            marks[str(Ev.END_OF_TURN_DECIDED)] = decided.t
        for name in (Ev.RESPONDER_FIRST_TOKEN, Ev.TTS_FIRST_AUDIO):
            mine = [e for e in self.events.named(name) if e.data.get("utterance") == live.utterance.id]
            if mine:
                marks[str(name)] = mine[0].t
        for name, t in marks.items():
            self.events.emit(Ev.LATENCY, metric=name, ms=round((t - end) * 1000, 1))
        if self.on_latency is not None:
            self.on_latency("voice_to_voice", event.t - end)

    # ------------------------------------------------------------------ actions
    def _apply(self, action: Action, turn: MicroTurn) -> None:
        floor = action.floor
        # Taking the floor with no caller turn pending can only mean saying a waiting result
        # (a learned policy does not give the rule policy's reason).
        if floor is Floor.SPEAK and (action.reason == RESULT or (self._results and self._utt_start is None)):
            if self._results:
                self._speak_result()
        elif floor is Floor.INTERRUPT:
            if self._results:
                self.events.emit(Ev.BARGE_IN_DETECTED, reason=action.reason or "", by="bot")
                self._speak_result()
        elif floor is Floor.SPEAK:
            if self._commit_when_ready:
                return  # already taken; waiting for the ASR's final text
            self.events.emit(Ev.END_OF_TURN_DECIDED, silence_ms=self.state.caller_silence_ms)
            self._turn_end_t = self._last_voiced
            if self._pending_text is None:
                self._start_prepare()
            self._commit_when_ready = True
            if self._pending_text is not None and self._pending_text.done():
                self._text_ready(self._pending_text)
        elif floor is Floor.BACKCHANNEL:
            # The clip says the setting's text, whatever text the policy named (the model's
            # checkpoint stores its own): the event reports what the caller heard.
            text = self.settings.backchannel_text
            clip = _BC_CLIPS.get((id(self.backends.tts), text))
            if clip is not None and self.track.backchannel(clip, text):
                self.state.last_backchannel_at = turn.start
        elif floor is Floor.YIELD:
            self.events.emit(Ev.BARGE_IN_DETECTED, reason=action.reason or "")
            if self._live is not None and not self._live.done:
                self._spawn(self._live.cancel(), "cancel-reply")
            cut = self.track.flush()
            if cut is not None and cut.started_at is not None:
                self._cut, self._cut_at = cut, now()
            self.state.overlap_speech_ms = 0.0
        elif floor is Floor.HOLD:
            self.track.hold()
        elif floor is Floor.RESUME:
            self.track.resume()
            self._asr_q.put_nowait(("finish", None))  # drop the backchannel's words
            self._end_caller_utterance()
            self.state.overlap_speech_ms = 0.0
            for run in self._runs.values():
                run[0] = None

    def _update_state_name(self) -> None:
        cur = self.track.current
        if cur is not None and cur.started_at is not None and not self.track.held:
            name = "speaking"
        elif self._commit_when_ready or (self.track.speaking and not self.track.held):
            name = "thinking"
        else:
            name = "listening"
        self._set_state(name)

    def _set_state(self, name: str) -> None:
        if name != self._state_name:
            self._state_name = name
            self.events.emit(Ev.STATE, state=name)

    # ------------------------------------------------------------------ background loops
    async def _asr_loop(self) -> None:
        """Feeds the streaming ASR in order, off the event loop; answers 'finish' requests.

        A failing ASR (its worker process died) must not leave a turn waiting forever: the
        failure is logged, and a finish falls back to the whole-turn transcriber.
        """
        while True:
            kind, payload = await self._asr_q.get()
            try:
                await self._asr_step(kind, payload)
            except Exception:
                log.exception("call %s: streaming ASR %s failed", self.call_id, kind)
                if kind == "finish" and isinstance(payload, asyncio.Future) and not payload.done():
                    payload.set_result(await self._transcribe_turn())

    async def _asr_step(self, kind: str, payload: object) -> None:
        asr = self._asr
        if kind == "start":
            self._asr_started = True
            if asr is not None:
                await run_blocking(asr.start)
        elif kind == "audio":
            if asr is None or not self._asr_started:
                return
            partial = await run_blocking(asr.accept, payload)
            if partial is not None and partial.text and self._utt_start is not None:
                self.state.partial_text = partial.text
                self.events.emit(Ev.CAPTION, who="caller", text=partial.text, final=False, turn=self.turns)
        elif kind == "finish":
            text = ""
            if self._asr_started:
                self._asr_started = False
                text = (
                    (await run_blocking(asr.finish)).text
                    if asr is not None
                    else await self._transcribe_turn()
                )
            if isinstance(payload, asyncio.Future) and not payload.done():
                payload.set_result(text.strip())

    async def _transcribe_turn(self) -> str:
        if self.backends.transcriber is None or not self._turn_audio:
            return ""
        audio = np.concatenate(self._turn_audio)
        try:
            return (await run_blocking(self.backends.transcriber.transcribe, audio)).text.strip()
        except Exception:
            log.exception("call %s: transcriber failed", self.call_id)
            return ""

    async def _load_backchannel(self) -> None:
        key = (id(self.backends.tts), self.settings.backchannel_text)
        if key not in _BC_CLIPS:
            _BC_CLIPS[key] = await synthesize(self.backends.tts, key[1])
