"""The engine's streaming parts on their own: caller state, the ASR feed (real pocketsphinx)."""

from __future__ import annotations

import asyncio

import numpy as np

from presence.bot.asr_feed import ASRFeed, merge_overlap
from presence.bot.backends.asr import PocketsphinxStreamingASR
from presence.bot.caller_state import CallerState
from presence.media.audio import resample
from presence.seams import OUT_SAMPLE_RATE, SAMPLE_RATE, FloorState, MicroTurn, Transcript


def _turn(index: int, vad: list[float]) -> MicroTurn:
    n = len(vad)
    return MicroTurn(
        call_id="t",
        index=index,
        start=index * 0.2,
        duration=0.2,
        caller_audio=np.zeros(n * 320, np.float32),
        bot_audio=np.zeros(n * 320, np.float32),
        lost=np.zeros(n, bool),
        vad=np.asarray(vad, np.float32),
    )


def test_caller_state_steps_an_utterance_and_its_silence() -> None:
    caller, s = CallerState(0.5), FloorState()
    first = caller.step(_turn(0, [0] * 5 + [0.9] * 5), s)
    assert first.onset is not None and abs(first.onset - 0.1) < 1e-9 and first.speech_start is not None
    assert s.caller_spoke and abs(s.caller_speech_ms - 100) < 1e-6 and s.caller_silence_ms < 1e-6
    second = caller.step(_turn(1, [0] * 10), s)
    assert second.onset is None and not second.continued and second.speech_end is not None
    assert abs(s.caller_silence_ms - 200) < 1e-6
    third = caller.step(_turn(2, [0.9] + [0] * 9), s)
    assert third.continued and third.onset is None  # the same utterance goes on after a pause
    caller.end_utterance()
    caller.step(_turn(3, [0] * 10), s)
    assert not s.caller_spoke and s.caller_silence_ms == 1e9


def test_overlap_and_hold_speech_while_the_bot_talks() -> None:
    caller, s = CallerState(0.5), FloorState(bot_speaking=True, bot_held=True)
    caller.step(_turn(0, [0.9] * 10), s)
    assert abs(s.overlap_speech_ms - 200) < 1e-6 and s.hold_speech_ms == 200
    caller.step(_turn(1, [0] * 10), s)
    assert s.overlap_speech_ms == 0 and s.hold_speech_ms == 200  # the hold counts across pauses
    s.bot_speaking = s.bot_held = False
    caller.step(_turn(2, [0.9] * 10), s)
    assert s.overlap_speech_ms == 0 and s.hold_speech_ms == 0


def test_a_participant_who_leaves_mid_speech_leaves_no_overlap_behind() -> None:
    caller = CallerState(0.5)
    assert caller.voice("ann", True, 10.0) == 20  # Ann starts talking...
    caller.voice("ann", True, 10.032)
    caller.remove_participant("ann")  # ...and hangs up mid-word
    assert caller.voice("bob", False, 12.0) == 0
    # A participant whose audio just stops (no goodbye) stops counting after a moment too.
    caller.voice("cat", True, 20.0)
    assert caller.voice("bob", False, 20.1) > 0  # Cat's run is live
    assert caller.voice("bob", False, 21.0) == 0


class _Counting:
    """The real pocketsphinx stream, counting the samples it is asked to decode."""

    def __init__(self) -> None:
        self.asr = PocketsphinxStreamingASR()
        self.asr.load()
        self.samples = 0

    def start(self) -> None:
        self.asr.start()

    def accept(self, audio: np.ndarray) -> Transcript | None:
        self.samples += audio.size
        return self.asr.accept(audio)

    def finish(self) -> Transcript:
        return self.asr.finish()


async def test_a_continued_utterance_decodes_only_its_new_audio(speech) -> None:  # type: ignore[no-untyped-def]
    first = resample(speech("I would like to book a table"), OUT_SAMPLE_RATE, SAMPLE_RATE)
    second = resample(speech("for two people tonight."), OUT_SAMPLE_RATE, SAMPLE_RATE)
    asr = _Counting()

    async def no_fallback() -> str:
        return ""

    feed = ASRFeed("t", asr, no_fallback, lambda text: None)
    loop = asyncio.create_task(feed.run())
    try:
        feed.start([])
        for i in range(0, first.size, 3200):
            feed.audio(first[i : i + 3200])
        head = await asyncio.wait_for(feed.finish(), 30)
        feed.resume([])  # the caller went on after the pause
        for i in range(0, second.size, 3200):
            feed.audio(second[i : i + 3200])
        whole = await asyncio.wait_for(feed.finish(), 30)
    finally:
        loop.cancel()
    assert "table" in head.lower(), head
    assert whole.lower().startswith(head.lower()) and len(whole) > len(head) + 5, (head, whole)
    # Linear: only the last second of the first part is decoded again, for context.
    assert first.size + second.size < asr.samples <= first.size + second.size + 1.25 * SAMPLE_RATE


def test_the_asr_backlog_is_bounded_and_keeps_its_control_items() -> None:
    async def run() -> None:
        async def fallback() -> str:
            return "fallback"

        feed = ASRFeed("t", None, fallback, lambda text: None, max_backlog=5)
        feed.start([])
        for _ in range(20):
            feed.audio(np.zeros(3200, np.float32))
        done = feed.finish()
        assert feed.dropped >= 15
        loop = asyncio.create_task(feed.run())
        assert await asyncio.wait_for(done, 5) == "fallback"  # no ASR: the whole-turn pass
        loop.cancel()

    asyncio.run(run())


def test_the_repeated_context_words_are_merged_away() -> None:
    head = "please look up the opening hours"
    assert merge_overlap(head, "opening hours and calculate seventeen") == (
        "please look up the opening hours and calculate seventeen"
    )
    # The repeat heard a little differently: cut at the last shared word.
    assert (
        merge_overlap(head, "the opening our and calculate") == "please look up the opening our and calculate"
    )
    # Both a longer shared run and a later shared word: the later one wins, so the words
    # already final ("a table") are kept (a CI run turned them into "it table").
    assert (
        merge_overlap("I would like to book a table", "like to book it table for two people tonight")
        == "I would like to book a table for two people tonight"
    )
    assert merge_overlap("", "hello there") == "hello there"
    assert merge_overlap("what time", "is it") == "what time is it"


def test_a_pause_the_chunk_reader_heard_end_is_no_silence_to_the_tick() -> None:
    """The tick runs a playout delay behind the VAD chunks: when they hear the caller go on
    after a long pause, the tick's frames (still silent) must not end the turn on it."""
    caller, s = CallerState(0.5), FloorState()
    caller.voice("ann", True, 0.18)
    caller.step(_turn(0, [0.9] * 10), s)
    for i in range(1, 8):  # 1.4 s of pause, on both clocks
        caller.voice("ann", False, i * 0.2)
        caller.step(_turn(i, [0] * 10), s)
    assert abs(s.caller_silence_ms - 1400) < 1e-6
    for k in range(7):  # she goes on; the tick has not heard it yet
        caller.voice("ann", True, 1.59 + k * 0.032)
    caller.step(_turn(8, [0] * 10), s)
    assert s.caller_silence_ms < 20
    for i in range(9, 14):  # chunks that the frames never show end no turn for good
        caller.step(_turn(i, [0] * 10), s)
    assert abs(s.caller_silence_ms - (14 * 0.2 - 1.782) * 1000) < 1e-6


def test_call_manners_check_on_a_quiet_caller_then_say_goodbye() -> None:
    from presence.bot.manners import CallManners, Manner, MannerOptions

    m = CallManners(MannerOptions(idle_prompt_s=30, idle_hangup_s=15, max_call_s=600), started=0.0)
    assert m.step(10, active_at=5, speaking=False) is None
    assert m.step(34, active_at=5, speaking=False) is None  # 29 s of quiet
    assert m.step(36, active_at=5, speaking=False) is Manner.PROMPT
    assert m.step(37, active_at=5, speaking=True) is None  # the question itself
    assert m.step(45, active_at=44, speaking=False) is None  # "yes, I'm here"
    assert m.step(70, active_at=44, speaking=False) is None  # quiet again, but not 30 s yet
    assert m.step(75, active_at=44, speaking=False) is Manner.PROMPT
    assert m.step(91, active_at=44, speaking=False) is Manner.GOODBYE
    assert m.step(200, active_at=44, speaking=False) is None  # once
    page = CallManners(MannerOptions(idle_prompt_s=30, max_call_s=600), started=0.0)
    assert page.step(100, active_at=0, speaking=False, idle_checks=False) is None
    assert page.step(601, active_at=0, speaking=False, idle_checks=False) is Manner.TIME_UP


def test_asking_for_a_person_is_told_from_other_talk() -> None:
    from presence.bot.transfer import wants_a_person

    asks = ["Can I talk to a person please?", "I want to speak to a human", "put me through to an agent"]
    other = ["What is your name?", "I am a person who likes hiking", "Can you help me with my bill?"]
    assert all(wants_a_person(t) for t in asks) and not any(wants_a_person(t) for t in other)


def test_no_mixin_stub_hides_a_method_of_the_engine() -> None:
    """The engine's mixins declare the engine's methods they call as ``raise NotImplementedError``
    stubs; one left in a mixin earlier in the MRO than the method's real home hides it (the
    whole-turn transcription, moved to second_pass.py, once raised in every dead-worker call)."""
    import ast
    import inspect
    import textwrap

    from presence.bot.engine import Engine

    def stub(fn: object) -> bool:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))  # type: ignore[arg-type]
        body = tree.body[0].body  # type: ignore[attr-defined]
        return (
            len(body) == 1
            and isinstance(body[0], ast.Raise)
            and "NotImplementedError" in ast.unparse(body[0])
        )

    hidden = [
        getattr(Engine, name).__qualname__
        for name in dir(Engine)
        if inspect.isfunction(getattr(Engine, name)) and stub(getattr(Engine, name))
    ]
    assert not hidden, hidden
