"""The micro-turn engine: one per call, ticking on the bot clock whether anyone speaks or not.

Each tick it assembles a ``MicroTurn``, steps the caller's state (``CallerState``), asks the
policy for an ``Action`` and carries it out. Work that takes time never runs in the tick: the
streaming ASR is fed through ``ASRFeed``, the end-of-turn detector is asked by ``TurnProbe``,
replies are prepared by ``ReplyTask`` (speculatively, from the first silence), and the
final-pass transcription runs once the reply's first audio exists. Between ticks, ``on_voice``
gives the policy a per-VAD-chunk reflex for holds, and a detector answer (or the silence it
asked for) may take the turn at once (``policy.on_evidence``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from presence.aio import run_blocking
from presence.bot.addressee import AddresseeInput, AddresseeOptions, AddresseeTracker
from presence.bot.asr_feed import ASRFeed
from presence.bot.backends.factory import Backends
from presence.bot.between_ticks import BetweenTicks
from presence.bot.caller_state import CallerState
from presence.bot.context import Conversation, Fold
from presence.bot.floor_actions import FloorActions
from presence.bot.jobs.types import JobResult
from presence.bot.keypad import Keypad
from presence.bot.policy import InterruptionOptions, is_backchannel, is_filler
from presence.bot.reply import ReplyTask, plain_words
from presence.bot.results import CallResults
from presence.bot.second_pass import SecondPass
from presence.bot.turn_latency import report_voice_to_voice
from presence.bot.turn_probe import TurnProbe
from presence.clock import now, on_grid, sleep_until
from presence.config import Settings
from presence.events import Ev, EventLog
from presence.media.audio import speech_level_dbfs
from presence.media.microturn import MicroTurnAssembler
from presence.media.speech import SpeechTrack, Utterance
from presence.seams import SAMPLE_RATE, CallEvent, ChatMessage, FloorPolicy, FloorState, MicroTurn

if TYPE_CHECKING:
    from presence.bot.jobs.call_jobs import CallJobs

log = logging.getLogger(__name__)

MAX_TURN_AUDIO_S = 30.0  # the turn audio kept for the final pass and the fallback transcription


class Engine(FloorActions, BetweenTicks, Keypad, SecondPass):
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
        self.conversation = Conversation(settings.system_prompt)
        self.turns = 0
        self.actions: dict[str, int] = {}
        self._thr = settings.vad_threshold
        # The same vocabulary the rule policy uses (lowercased once, as its options do).
        self._bc_words = InterruptionOptions.from_settings(settings).backchannel_words
        self.caller = CallerState(settings.vad_threshold)
        self._asr = backends.asr_factory() if backends.asr_factory else None
        self.asr = ASRFeed(call_id, self._asr, self._transcribe_turn, self._on_partial)
        self.probe = TurnProbe(
            backends.turn_detector, self._on_probe, repeat=settings.eot_detector_reading != "first"
        )
        self.addressee = AddresseeTracker(AddresseeOptions(bot_name=settings.bot_name))
        self._evidence_timer: asyncio.TimerHandle | None = None
        self._keys: list[str] = []
        self._keys_timer: asyncio.TimerHandle | None = None
        self.keys_taken: Callable[[str], bool] | None = None
        # (speaker, words) -> what to say, from what the call itself holds ("what did I miss?"
        # in a meeting), or None for an ordinary reply
        self.answer_from_call: Callable[[str, str], str | None] | None = None
        # An interpreter's room: people talk to each other, and the bot only to its name.
        self.name_only = False
        self._preroll: deque[np.ndarray] = deque(maxlen=2)
        self._turn_audio: deque[np.ndarray] = deque(maxlen=int(MAX_TURN_AUDIO_S / assembler.duration))
        self._turn_audio_end = 0.0  # bot clock at the end of the last turn audio kept
        self._pending: ReplyTask | None = None  # prepared, not yet on the floor
        self._pending_text: asyncio.Future[str] | None = None
        self._pending_user_text = ""
        self._live: ReplyTask | None = None  # committed to the speech track
        self._commit_when_ready = False
        self._turn_end_t: float | None = None
        self._user_id: int | None = None
        self._cut: Utterance | None = None
        self._cut_at = -1e9
        self._bot_last_spoke_at: float | None = None
        self._bot_last_answered: str | None = None
        self._turn_speakers: set[str] = set()
        self._began_with_name = False  # this utterance's words were once the bot's name alone
        self._side_talk: str | None = None  # why the speech over the bot is for someone else
        self._state_name = ""
        self.results = CallResults(events, self._fixed_reply, self._spawn)
        self._tasks: set[asyncio.Task[object]] = set()
        self._main: asyncio.Task[None] | None = None
        track.on_utterance_end(self._on_utterance_end)
        events.listen(self._on_event)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"engine-{self.call_id}")
        self._spawn(self.asr.run(), "asr")
        self._set_state("listening")

    async def stop(self) -> None:
        # The clock first: a tick between cancelling the replies and the clock could start a
        # reply that nobody cancels.
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._main
            self._main = None
        self._cancel_evidence_timer()
        self._cancel_keys_timer()
        self.probe.armed = False
        await self.probe.close()
        for reply in (self._pending, self._live, *self.results.replies()):
            if reply is not None:
                await reply.cancel()
        self._pending = self._live = None
        self.results.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await run_blocking(self.policy.close)  # a model slot
        close = getattr(self._asr, "close", None)  # a stream in a worker process
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
        grid = self.settings.microturn_grid
        next_tick = on_grid(now() + step, step) if grid else now() + step
        while True:
            await sleep_until(next_tick)
            turn = self.assembler.assemble(next_tick - step)
            next_tick += step
            late = now() - next_tick
            if late > step:  # the process stalled: skip ahead instead of ticking in a burst
                log.warning("call %s: micro-turn clock %.0f ms late", self.call_id, late * 1000)
                next_tick = on_grid(now() + step, step) if grid else now() + step
            started = now()
            try:
                await self._process(turn)
            except Exception:
                log.exception("call %s: micro-turn %d failed", self.call_id, turn.index)
            if self.on_step is not None:
                self.on_step(now() - started)

    async def _process(self, turn: MicroTurn) -> None:
        s = self.state
        s.bot_speaking = self.track.speaking
        s.bot_held = self.track.held
        self._track_caller(turn)
        self._judge_overlap()
        s.reply_ready = self._pending is not None and bool(self._pending.utterance.segments)
        s.result_waiting = self.results.waiting
        s.result_urgent = self.results.urgent
        self._maybe_speculate()
        self.probe.armed = self.caller.utt_start is not None and not s.bot_speaking
        # A model policy batches its forward with every other call's in an executor.
        action = await self.policy.decide(turn, s)
        self.actions[action.floor.value] = self.actions.get(action.floor.value, 0) + 1
        self._apply(action, turn)
        self._update_state_name()

    # ------------------------------------------------------------------ caller tracking
    def _track_caller(self, turn: MicroTurn) -> None:
        step = self.caller.step(turn, self.state)
        if step.speech_start is not None:
            self.events.emit(Ev.CALLER_SPEECH_START, step.speech_start)
        if step.onset is not None:
            self._begin_caller_utterance()
        elif step.continued and (self._pending is not None or self._pending_text is not None):
            self._restart_utterance()
        if step.onset is not None or step.continued:
            # Not the detector's answer: the tick hears the speech a playout delay after the
            # chunk reader, which already dropped any answer older than the speech (on_voice).
            self._turn_speakers.update(turn.speaking)
        if self.caller.utt_start is not None:
            self._turn_audio.append(turn.caller_audio)
            self._turn_audio_end = turn.end
            self.asr.audio(turn.caller_audio)
        if step.speech_end is not None:
            self.events.emit(Ev.CALLER_SPEECH_END, step.speech_end)
        self._preroll.append(turn.caller_audio)

    def _judge_overlap(self) -> None:
        """Speech over the bot that sounds meant for someone else keeps it held, never yielding."""
        reason = None
        if self.state.bot_speaking and self.caller.utt_start is not None and self._turn_audio:
            speaker = next(iter(self._turn_speakers)) if len(self._turn_speakers) == 1 else ""
            level = speech_level_dbfs(np.concatenate(self._turn_audio))
            reason = self.addressee.side_talk(self.state.partial_text, speaker, level, self._side_talk)
        self._side_talk = reason
        self.state.side_talk = reason is not None

    def _begin_caller_utterance(self) -> None:
        # The onset is in this tick's audio; the preroll (up to 400 ms) keeps the first phoneme.
        self._turn_audio.clear()
        self._turn_audio.extend(self._preroll)
        self._turn_speakers.clear()
        self.asr.start(list(self._preroll))
        self._drop_pending()  # a speculative reply for an earlier utterance is stale

    def _restart_utterance(self) -> None:
        """The caller went on after a pause we had started answering: drop the answer and
        continue the ASR's utterance (its text so far is kept; only new audio is decoded, after
        a second of context)."""
        if self._commit_when_ready:
            return  # too late: the turn was taken; the caller will barge in if they mean it
        self._drop_pending()
        self.asr.resume(list(self._preroll)[-1:])

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._spawn(self._pending.cancel(), "cancel-reply")
            self._pending = None
        if self._pending_text is not None:
            self._pending_text.cancel()
            self._pending_text = None
        # New words (or none yet) to judge: until then the detector's "finished" alone does not
        # end the turn, even when its answer comes before the first micro-turn of the silence.
        self.state.text_eot_probability = None
        self.state.text_eot_pending = self.backends.text_turn_detector is not None

    def _end_caller_utterance(self) -> None:
        self.caller.end_utterance()
        self._turn_audio.clear()
        self.probe.armed = False
        self._cancel_evidence_timer()
        self.state.partial_text = ""
        self.state.name_only = False
        self._began_with_name = False
        self.state.caller_spoke = False
        self.state.eot_probability = None

    def remove_participant(self, participant: str) -> None:
        """A participant left: their voiced run, detector audio and unfinished words go too
        (nobody is left to answer them)."""
        self.caller.remove_participant(participant)
        self.probe.remove_participant(participant)
        mine = self.caller.utt_start is not None and self._turn_speakers <= {participant}
        if mine and not self._commit_when_ready:
            self._drop_pending()
            self.asr.drop()
            self._end_caller_utterance()

    # ------------------------------------------------------------------ replies
    def _maybe_speculate(self) -> None:
        s = self.state
        if (
            self.caller.utt_start is None
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
        future = self.asr.finish()
        self._pending_text = future
        future.add_done_callback(self._text_ready)

    def _prepare_reply(self, text: str) -> None:
        self._pending_user_text = text
        self._pending = ReplyTask(
            self.backends.responder,
            self.backends.tts,
            self._context(ChatMessage("user", text)),
            self.events,
        )

    def _text_ready(self, fut: asyncio.Future[str]) -> None:
        if fut.cancelled() or fut is not self._pending_text:
            return
        text = fut.result() if fut.exception() is None else ""
        self.events.emit(Ev.ASR_FINAL, chars=len(text))
        if self._pending is not None and plain_words(text) != plain_words(self._pending_user_text):
            self._spawn(self._pending.cancel(), "cancel-reply")
            self._pending = None
        if text:
            self._set_words(text)  # the policy's completeness check reads the final
        if self._commit_when_ready:
            self._take_turn(text)
            return
        if self.name_only and self.settings.bot_name.lower() not in text.lower():
            text = ""  # not for the bot: nothing is judged or prepared (the interpreter needs the CPU)
        if self._pending is None and text and not is_backchannel(text, self._bc_words):
            if self.state.text_eot_pending and not is_filler(text):
                self._spawn(self._judge_words(fut, text), "text-turn")  # then prepares the reply
                return
            self._prepare_reply(text)
        self.state.text_eot_pending = False  # nothing to judge: the words alone decide

    def _take_turn(self, text: str) -> None:
        """End of the caller's turn with its text: commit the reply (or resume after noise)."""
        self._commit_when_ready = False
        self._pending_text = None
        audio = np.concatenate(self._turn_audio) if self._turn_audio else np.zeros(0, np.float32)
        # The level of the speech, not of the silence after it: a decision that came late added
        # seconds of it, and a short question then read as several dB quieter than the caller's
        # usual, i.e. as someone else in the room (off-axis), and went unanswered.
        silent = int(max(0.0, self._turn_audio_end - self.caller.last_voiced) * SAMPLE_RATE)
        level = speech_level_dbfs(audio[: audio.size - silent] if silent < audio.size else audio)
        speakers = sorted(self._turn_speakers)
        began_with_name = self._began_with_name
        self._end_caller_utterance()
        verdict = None
        judged = AddresseeInput(
            text=text,
            participant=speakers[0] if len(speakers) == 1 else "",
            level_dbfs=level,
            now=now(),
            bot_last_spoke_at=self._bot_last_spoke_at,
            bot_last_answered=self._bot_last_answered,
            participants=len(self.assembler.participants),
            began_with_name=began_with_name,
        )
        if text and not is_backchannel(text, self._bc_words) and not is_filler(text):
            verdict = self.addressee.step(judged)
            if not verdict.addressed:
                self.events.emit(
                    Ev.NOT_ADDRESSED, text=text, reason=verdict.reason, speaker=", ".join(speakers)
                )
        if verdict is None or not verdict.addressed:
            # Noise, a cough, "mm-hm", "and the" or talk to someone else: not a turn for the
            # bot. A reply that was cut by it carries on.
            if self._cut is not None and now() - self._cut_at < 8.0:
                rest = self._cut.remainder()
                self._cut = None
                if rest.segments:
                    self.track.play(rest)
                    self.events.emit(Ev.PLAYBACK_RESUMED, reason="false interruption")
            self._drop_pending()
            if (
                verdict is not None
                and verdict.reason == "not addressed"
                and not self.name_only  # an interpreter's room: its CPU goes to the interpretation
                and self.addressee.may_name_bot(text)
            ):
                self._look_again(judged, speakers, audio)
            return
        self._answer(text, speakers, audio)

    def _answer(self, text: str, speakers: list[str], audio: np.ndarray) -> None:
        """Reply to an addressed turn: background work's acknowledgement, an answer from the
        call itself, or the prepared (or a new) reply; then the final pass."""
        self._bot_last_answered = speakers[0] if len(speakers) == 1 else None
        self._cut = None
        self._user_id = self.conversation.append(ChatMessage("user", text))
        self.events.emit(
            Ev.CAPTION, who="caller", text=text, final=True, turn=self.turns, speaker=", ".join(speakers)
        )
        reply = self._pending
        spoken = self.results.route(text)
        speaker = ", ".join(speakers)
        if spoken is None and self.answer_from_call is not None:
            spoken = self.answer_from_call(speaker, text)
        asked = (self.results.routed, speaker, spoken is not None)
        if spoken is not None:  # background work: acknowledge it and keep the conversation going
            if reply is not None:
                self._spawn(reply.cancel(), "cancel-reply")
            reply = self._fixed_reply(spoken)
        elif reply is None or plain_words(self._pending_user_text) != plain_words(text):
            if reply is not None:
                self._spawn(reply.cancel(), "cancel-reply")
            reply = ReplyTask(self.backends.responder, self.backends.tts, self._context(), self.events)
        self._pending = None
        self._commit(reply)
        if self.backends.transcriber is not None and audio.size:
            self._spawn(self._final_pass(reply, audio, self._user_id, self.turns, asked), "final-asr")
        self.turns += 1

    @property
    def history(self) -> list[ChatMessage]:
        """What the next reply sees: system prompt, rolling summary, recent turns."""
        return self.conversation.messages()

    def _context(self, *extra: ChatMessage) -> list[ChatMessage]:
        return self.conversation.messages(*extra)

    def _remember(self, message: ChatMessage) -> None:
        self.conversation.append(message)
        fold = self.conversation.step()
        if fold is not None:  # off the reply path: the summary lands when it is ready
            self._spawn(self._fold(fold), "summary")

    async def _fold(self, fold: Fold) -> None:
        await self.conversation.run(fold)
        # The context's front changed: into the model's cache now, not the next first token.
        await self.backends.responder.prefill(self.conversation.messages())

    def _fixed_reply(self, text: str) -> ReplyTask:
        return ReplyTask(self.backends.responder, self.backends.tts, [], self.events, fixed_text=text)

    # ------------------------------------------------------------------ background jobs
    @property
    def jobs(self) -> CallJobs | None:
        return self.results.jobs

    @jobs.setter
    def jobs(self, jobs: CallJobs | None) -> None:
        self.results.jobs = jobs

    def on_job_result(self, result: JobResult) -> None:
        """The one door for background results: the policy picks the moment to say them."""
        if self.results.add(result):
            self.assembler.add_event("result")

    def _speak_result(self) -> None:
        result, reply = self.results.pop()
        self._remember(ChatMessage("tool", f"{result.kind} result: {reply.fixed_text}"))
        self._commit(reply)

    def _commit(self, reply: ReplyTask) -> None:
        if self._live is not None and not self._live.done:
            self._spawn(self._live.cancel(), "cancel-reply")
        self._live = reply
        self.track.play(reply.utterance)

    def _on_utterance_end(self, utt: Utterance) -> None:
        if utt.started_at is not None:
            self._bot_last_spoke_at = now()
        heard = utt.heard_text()
        if heard:
            self._remember(ChatMessage("assistant", heard + ("…" if utt.flushed else "")))

    def _on_event(self, event: CallEvent) -> None:
        # Voice-to-voice as the bot sees it, with its breakdown, for the page and /metrics.
        live = self._live
        if event.name != Ev.BOT_FIRST_PACKET_SENT or live is None or self._turn_end_t is None:
            return
        if event.data.get("utterance") == live.utterance.id:
            end, self._turn_end_t = self._turn_end_t, None
            seconds = report_voice_to_voice(self.events, end, event.t, live.utterance.id)
            if self.on_latency is not None:
                self.on_latency("voice_to_voice", seconds)

    # ------------------------------------------------------------------ background work
    def _on_partial(self, text: str) -> None:
        if self.caller.utt_start is not None:
            self._set_words(text)
            self.events.emit(Ev.CAPTION, who="caller", text=text, final=False, turn=self.turns)

    def _set_words(self, text: str) -> None:
        self.state.partial_text = text
        self.state.name_only = self.addressee.is_summons(text)
        self._began_with_name |= self.state.name_only
