"""The rule-based floor policy on hand-built states (no audio needed)."""

from __future__ import annotations

import numpy as np
import pytest

from presence.bot.policy import (
    EndpointingOptions,
    InterruptionOptions,
    RuleBasedPolicy,
    RuleParams,
    content_words,
    is_backchannel,
    is_filler,
    sounds_unfinished,
)
from presence.config import Settings
from presence.seams import Floor, FloorState, MicroTurn

BC = frozenset({"yeah", "okay", "mm-hm", "uh-huh", "right"})


def turn(start: float = 10.0) -> MicroTurn:
    return MicroTurn(
        call_id="t",
        index=0,
        start=start,
        duration=0.2,
        caller_audio=np.zeros(3200, np.float32),
        bot_audio=np.zeros(3200, np.float32),
        lost=np.zeros(10, bool),
        vad=np.zeros(10, np.float32),
    )


@pytest.fixture
def policy() -> RuleBasedPolicy:
    return RuleBasedPolicy(RuleParams(interruption=InterruptionOptions(backchannel_words=BC)))


def test_listens_while_the_caller_talks(policy: RuleBasedPolicy) -> None:
    s = FloorState(caller_spoke=True, caller_speech_ms=900, caller_silence_ms=0)
    assert policy.step(turn(), s).floor is Floor.LISTEN


def test_end_of_turn_after_the_silence_threshold(policy: RuleBasedPolicy) -> None:
    s = FloorState(
        caller_spoke=True, caller_speech_ms=900, caller_silence_ms=299, partial_text="what time is it"
    )
    assert policy.step(turn(), s).floor is Floor.LISTEN
    s.caller_silence_ms = 300
    assert policy.step(turn(), s).floor is Floor.SPEAK


def test_a_pause_after_a_continuation_word_waits_longer(policy: RuleBasedPolicy) -> None:
    s = FloorState(
        caller_spoke=True,
        caller_speech_ms=900,
        caller_silence_ms=500,
        partial_text="i want to book a table for",
    )
    assert policy.step(turn(), s).floor is Floor.LISTEN
    s.caller_silence_ms = 800
    assert policy.step(turn(), s).floor is Floor.SPEAK


def test_a_click_is_not_a_turn(policy: RuleBasedPolicy) -> None:
    s = FloorState(caller_spoke=True, caller_speech_ms=60, caller_silence_ms=2000)
    assert policy.step(turn(), s).floor is Floor.LISTEN


def test_onset_over_the_bot_holds_at_once(policy: RuleBasedPolicy) -> None:
    s = FloorState(bot_speaking=True, overlap_speech_ms=40)
    assert policy.on_frame(0.9, s) is None
    s.overlap_speech_ms = 60
    action = policy.on_frame(0.9, s)
    assert action is not None and action.floor is Floor.HOLD
    s.bot_held = True
    assert policy.on_frame(0.9, s) is None  # already held


def test_barge_in_needs_a_real_word_or_long_speech(policy: RuleBasedPolicy) -> None:
    s = FloorState(bot_speaking=True, bot_held=True, overlap_speech_ms=600, partial_text="")
    assert policy.step(turn(), s).floor is Floor.HOLD  # no words yet: keep holding
    s.partial_text = "yeah okay"
    assert policy.step(turn(), s).floor is Floor.HOLD  # backchannel words only
    s.partial_text = "my"
    assert policy.step(turn(), s).floor is Floor.HOLD  # one word: maybe misheard ("mike, ...")
    s.partial_text = "and i'm"
    assert policy.step(turn(), s).floor is Floor.HOLD  # piper's "Mm-hm." as the ASR heard it
    s.partial_text = "the m m"
    assert policy.step(turn(), s).floor is Floor.HOLD
    s.partial_text = "wait stop"
    assert policy.step(turn(), s).floor is Floor.YIELD
    s.partial_text = ""
    s.overlap_speech_ms = 1500
    assert policy.step(turn(), s).floor is Floor.YIELD  # long speech, words or not


def test_side_talk_over_the_bot_holds_it_but_never_takes_the_floor(policy: RuleBasedPolicy) -> None:
    s = FloorState(
        bot_speaking=True,
        bot_held=True,
        overlap_speech_ms=1200,
        partial_text="hey sam can you pass",
        side_talk=True,
    )
    assert policy.step(turn(), s).floor is Floor.HOLD  # long, real words: still no barge-in
    s.caller_silence_ms = 300
    assert policy.step(turn(), s).floor is Floor.RESUME  # it ended: carry on
    s.side_talk, s.caller_silence_ms = False, 0
    assert policy.step(turn(), s).floor is Floor.YIELD  # the same speech for the bot takes it


def test_a_word_that_asks_to_stop_is_enough_and_never_resumed(policy: RuleBasedPolicy) -> None:
    # "Wait," then a breath, the next word garbled (a phone line): hold, never resume, then yield
    s = FloorState(
        bot_speaking=True, bot_held=True, overlap_speech_ms=280, caller_silence_ms=320, partial_text="wait"
    )
    assert policy.step(turn(), s).floor is Floor.HOLD
    s.caller_silence_ms, s.hold_speech_ms = 0, 520
    assert policy.step(turn(), s).floor is Floor.YIELD
    s = FloorState(bot_speaking=True, bot_held=True, overlap_speech_ms=600, partial_text="sorry")
    assert policy.step(turn(), s).floor is Floor.YIELD


def test_false_interruption_resumes(policy: RuleBasedPolicy) -> None:
    s = FloorState(
        bot_speaking=True, bot_held=True, overlap_speech_ms=250, caller_silence_ms=300, partial_text="yeah"
    )
    assert policy.step(turn(), s).floor is Floor.RESUME


def test_bot_keeps_talking_without_overlap(policy: RuleBasedPolicy) -> None:
    assert policy.step(turn(), FloorState(bot_speaking=True)).floor is Floor.CONTINUE


def test_bot_backchannels_in_a_short_pause_of_a_long_turn(policy: RuleBasedPolicy) -> None:
    s = FloorState(
        caller_spoke=True, caller_speech_ms=3500, caller_silence_ms=200, partial_text="so then we went to the"
    )
    action = policy.step(turn(start=100.0), s)
    assert action.floor is Floor.BACKCHANNEL and action.text
    s.last_backchannel_at = 99.0  # one second ago: too soon for another
    assert policy.step(turn(start=100.0), s).floor is Floor.LISTEN


def test_word_helpers() -> None:
    assert is_backchannel("Mm-hm, yeah.", frozenset({"mm-hm", "yeah"}))
    assert not is_backchannel("", BC)
    assert not is_backchannel("yeah but wait", BC)
    assert sounds_unfinished("I went to the")
    assert not sounds_unfinished("what time is it")
    assert not sounds_unfinished("")


def test_params_come_from_settings() -> None:
    params = RuleParams.from_settings(Settings(eot_silence_ms=500, backchannel_words=["Yeah"]))
    assert params.eot_silence_ms == 500 and params.interruption.backchannel_words == frozenset({"yeah"})


def test_a_long_overlap_waits_for_its_words_before_resuming(policy: RuleBasedPolicy) -> None:
    # "Wait, stop." then a pause, and the ASR has no words yet: hold, do not talk over it.
    s = FloorState(
        bot_speaking=True, bot_held=True, hold_speech_ms=600, caller_silence_ms=300, partial_text=""
    )
    assert policy.step(turn(), s).floor is Floor.HOLD
    s.partial_text = "wait stop"
    assert policy.step(turn(), s).floor is Floor.YIELD
    s.partial_text = ""
    s.caller_silence_ms = 1500  # nothing was recognised for 1.5 s: it was noise after all
    assert policy.step(turn(), s).floor is Floor.RESUME


# ---------------------------------------------------------------------------- the fused rule
ENDPOINTING = EndpointingOptions(
    min_delay_ms=200, delay_ms=600, max_delay_ms=2500, complete_threshold=0.7, incomplete_threshold=0.3
)


@pytest.fixture
def fused() -> RuleBasedPolicy:
    return RuleBasedPolicy(
        RuleParams(interruption=InterruptionOptions(backchannel_words=BC), endpointing=ENDPOINTING)
    )


def _waiting(text: str, probability: float | None, silence_ms: float) -> FloorState:
    return FloorState(
        caller_spoke=True,
        caller_speech_ms=1500,
        caller_silence_ms=silence_ms,
        partial_text=text,
        eot_probability=probability,
    )


def test_fused_takes_the_turn_early_when_confident_and_finished(fused: RuleBasedPolicy) -> None:
    assert fused.name == "fused"
    s = _waiting("what time is it", 0.9, 199)
    assert fused.step(turn(), s).floor is Floor.LISTEN
    s.caller_silence_ms = 200
    assert fused.step(turn(), s).floor is Floor.SPEAK
    assert fused.needed_silence_ms(s) == 200


def test_fused_waits_for_max_delay_on_unfinished_words(fused: RuleBasedPolicy) -> None:
    # The detector is sure, but the words end on "for": wait, up to max_delay.
    s = _waiting("i would like to book a table for", 0.95, 2499)
    assert fused.step(turn(), s).floor is Floor.LISTEN
    s.caller_silence_ms = 2500
    assert fused.step(turn(), s).floor is Floor.SPEAK


def test_fused_waits_for_max_delay_when_the_detector_says_unfinished(fused: RuleBasedPolicy) -> None:
    s = _waiting("i was thinking about the weekend", 0.1, 1500)
    assert fused.step(turn(), s).floor is Floor.LISTEN  # a 1.5 s pause to think is no turn end
    s.caller_silence_ms = 2500
    assert fused.step(turn(), s).floor is Floor.SPEAK  # never past max_delay


def test_fused_uses_the_middle_delay_without_a_decisive_cue(fused: RuleBasedPolicy) -> None:
    for probability in (None, 0.5):
        s = _waiting("what time is it", probability, 599)
        assert fused.step(turn(), s).floor is Floor.LISTEN
        s.caller_silence_ms = 600
        assert fused.step(turn(), s).floor is Floor.SPEAK


def test_fused_waits_for_max_delay_when_the_words_sound_unfinished(fused: RuleBasedPolicy) -> None:
    # The audio detector is sure and no continuation word, but the language model says the
    # words go on ("When I got home yesterday evening").
    s = _waiting("when i got home yesterday evening", 0.95, 2000)
    s.text_eot_probability = 0.02
    assert fused.step(turn(), s).floor is Floor.LISTEN
    s.caller_silence_ms = 2500
    assert fused.step(turn(), s).floor is Floor.SPEAK
    s.text_eot_probability, s.caller_silence_ms = 0.9, 200
    assert fused.step(turn(), s).floor is Floor.SPEAK  # finished words: early


def test_fused_does_not_take_the_turn_early_while_the_words_are_judged(fused: RuleBasedPolicy) -> None:
    s = _waiting("what time is it", 0.9, 300)
    s.text_eot_pending = True
    assert fused.step(turn(), s).floor is Floor.LISTEN
    assert fused.on_evidence(s) is None
    s.caller_silence_ms = 600  # the middle delay: a slow judgement never holds the turn longer
    assert fused.step(turn(), s).floor is Floor.SPEAK
    s.text_eot_pending, s.text_eot_probability, s.caller_silence_ms = False, 0.8, 300
    action = fused.on_evidence(s)
    assert action is not None and action.floor is Floor.SPEAK


def test_fused_finished_words_do_not_overrule_the_audios_doubt(fused: RuleBasedPolicy) -> None:
    # "I was thinking about the weekend, [pause] and maybe we could go hiking."
    s = _waiting("i was thinking about the weekend", 0.2, 900)
    s.text_eot_probability = 0.9
    assert fused.step(turn(), s).floor is Floor.LISTEN
    s.caller_silence_ms = 2500
    assert fused.step(turn(), s).floor is Floor.SPEAK  # never past max_delay_ms


def test_content_words_skip_backchannels_function_words_and_letters() -> None:
    assert content_words("and i'm", BC) == 1
    assert content_words("the m m", BC) == 0
    assert content_words("yeah okay", frozenset({"yeah", "okay"})) == 0
    assert content_words("Wait, stop.", BC) == 2


def test_fused_on_evidence_takes_the_turn_between_ticks_only_when_due(fused: RuleBasedPolicy) -> None:
    s = _waiting("what time is it", 0.9, 250)
    action = fused.on_evidence(s)
    assert action is not None and action.floor is Floor.SPEAK
    s.eot_probability = 0.1
    assert fused.on_evidence(s) is None  # unfinished: wait for more silence
    s.eot_probability, s.bot_speaking = 0.9, True
    assert fused.on_evidence(s) is None  # the bot has the floor: step() decides


def test_the_silence_rule_ignores_the_detector(policy: RuleBasedPolicy) -> None:
    assert policy.name == "rules"
    s = _waiting("what time is it", 0.99, 200)
    assert policy.step(turn(), s).floor is Floor.LISTEN
    s.caller_silence_ms = 300
    assert policy.step(turn(), s).floor is Floor.SPEAK


def test_fused_options_come_from_settings() -> None:
    params = RuleParams.from_settings(Settings(eot_min_delay_ms=150, eot_max_delay_ms=3000))
    assert params.endpointing is not None
    assert params.endpointing.min_delay_ms == 150 and params.endpointing.max_delay_ms == 3000
    assert RuleParams.from_settings(Settings(policy="rules")).endpointing is None
    with pytest.raises(ValueError, match="eot thresholds"):
        Settings(eot_complete_threshold=0.2, eot_incomplete_threshold=0.5)
    with pytest.raises(ValueError, match="eot delays"):
        Settings(eot_min_delay_ms=900, eot_delay_ms=600)
    with pytest.raises(ValueError, match="eot_text_threshold"):
        Settings(eot_text_threshold=1.5)
    assert (
        RuleParams.from_settings(Settings(eot_text_threshold=0.35)).endpointing.text_incomplete_threshold
        == 0.35
    )


def test_fused_waits_after_the_bots_name_alone(fused: RuleBasedPolicy) -> None:
    s = _waiting("presence", 0.95, 600)
    s.name_only = True  # "Presence, [pause] what time is it?"
    assert fused.step(turn(), s).floor is Floor.LISTEN
    s.caller_silence_ms = 2500
    assert fused.step(turn(), s).floor is Floor.SPEAK


def test_filler_words_alone_are_not_a_turn() -> None:
    assert is_filler("and the") and is_filler("as a") and is_filler("um")
    assert not is_filler("and the weather") and not is_filler("")
