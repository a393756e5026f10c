"""What a bot-hosted room sounds like: everyone hears everyone, and in the participants'
own languages once any of them declares one.

A session of a room (not a one-to-one call, not a meeting on an SFU, where the SFU carries the
participants to each other) holds one ``RoomAudio``: a ``RoomMix`` with a track per listener,
and, from the first participant who declares a language, an ``Interpreter`` whose channels the
mix plays to the listeners of each language. Participants who declared nothing speak and hear
the room's default language (``interpret_default_language``).
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from presence.aio import interpret_executor
from presence.bot.backends.languages import BackendMissing
from presence.bot.engine import Engine
from presence.bot.interpret.interpreter import Channel, Interpreter
from presence.bot.interpret.kit import LanguageKit
from presence.config import Settings
from presence.events import EventLog
from presence.media.mix import Hearing, MixTrack, RoomMix, VoiceQueue
from presence.media.speech import SpeechTrack
from presence.signaling.contract import CallRejected, JoinOptions

log = logging.getLogger(__name__)


class RoomAudio:
    def __init__(
        self,
        settings: Settings,
        kit: LanguageKit | None,
        events: EventLog,
        track: SpeechTrack,
        engine: Engine,
    ) -> None:
        self.settings = settings
        self.kit = kit
        self.events = events
        self.engine = engine
        self.mix = RoomMix(track.next_samples, settings.interpret_duck_db)
        self.interpreter: Interpreter | None = None

    @property
    def cap(self) -> int:
        return min(self.settings.max_peers_per_room, self.settings.room_mix_max_peers)

    def admit(self, options: JoinOptions) -> None:
        """CallRejected when this participant's language cannot be served in this room: no
        translator for a pair (with the package or setting that would fix it)."""
        if options.language is None:
            return
        if self.kit is None:
            raise CallRejected(400, "no_interpreter", "this server has no interpreter backends")
        default = self.settings.interpret_default_language
        languages = {h.language or default for h in self.mix.people.values()}
        try:
            self.kit.check([*languages, options.language])
        except BackendMissing as exc:
            raise CallRejected(400, "language_unavailable", str(exc)) from exc

    def add(self, participant: str, options: JoinOptions) -> VoiceQueue:
        """A participant joins: their voice goes into the mix (the buffer their reader fills)."""
        if options.language is not None and self.interpreter is None:
            self._start_interpreter()
        language = options.language
        if self.interpreter is not None and language is None:
            language = self.settings.interpret_default_language
        queue = self.mix.add(Hearing(participant, language, options.original))
        if self.interpreter is not None and language is not None:
            self.interpreter.join(participant, language)
            self._prepare()
        return queue

    def listen(self, participant: str) -> MixTrack:
        return self.mix.listen(participant)

    def remove(self, participant: str) -> None:
        self.mix.remove(participant)
        if self.interpreter is not None:
            self.interpreter.leave(participant)

    def on_voice(self, participant: str, prob: float, t: float, piece: np.ndarray) -> None:
        if self.interpreter is not None:
            self.interpreter.on_voice(participant, prob, t, piece)

    async def close(self) -> None:
        if self.interpreter is not None:
            await self.interpreter.close()

    # ------------------------------------------------------------------ the interpreter
    def _start_interpreter(self) -> None:
        assert self.kit is not None
        self.interpreter = Interpreter(
            self.settings, self.kit, self.events, self._add_channel, interpret_executor()
        )
        previous = self.engine.answer_from_call

        def command(speaker: str, text: str) -> str | None:
            assert self.interpreter is not None
            said = self.interpreter.command(speaker, text)
            return said if said is not None or previous is None else previous(speaker, text)

        self.engine.answer_from_call = command
        self.engine.name_only = True
        # Those who joined before anyone declared a language speak the room's default.
        for hearing in self.mix.people.values():
            hearing.language = self.settings.interpret_default_language
            self.interpreter.join(hearing.participant, hearing.language)

    def _add_channel(self, channel: Channel) -> None:
        self.mix.add_channel(channel.language, channel.track.next_samples, lambda: channel.track.speaking)

    def _prepare(self) -> None:
        """Load what this room's languages need in the background (the first segment would
        wait for it otherwise); the kit skips what it has prepared before."""
        assert self.interpreter is not None and self.kit is not None
        languages = sorted(set(self.interpreter.languages.values()))
        if len(languages) < 2:
            return
        speech = self.settings.interpret_speech_translate
        task = asyncio.get_running_loop().run_in_executor(
            interpret_executor(), self.kit.prepare, languages, speech
        )
        task.add_done_callback(_log_failure)


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("interpreter warm-up failed (the first segments will load it): %s", done.exception())
