"""Floor control: who has the floor, decided once per micro-turn, with a per-frame hold reflex.

``RuleBasedPolicy`` ends the caller's turn in one of two ways. ``policy=rules`` (the old
baseline) waits for a silence threshold, longer when the words so far end on "and", "the",
"to"... ``policy=fused`` (the default) fuses that word cue with the audio end-of-turn detector
(``TurnDetector``) and, where the local LLM can judge the words, the text detector
(``TextTurnDetector``) through ``EndpointingOptions``: early when they say "finished", late
when any says "unfinished", never later than ``max_delay_ms`` of silence. Both share the
rest: a barge-in when the caller keeps talking over the bot (with a real word, or for long),
backchannel words that never stop the bot, and a resume after a false interruption. A held bot
is silent at once (so a real barge-in stops it within a frame of the onset) but keeps its
place, so a "mm-hm" costs a short pause, not the reply; speech over the bot that sounds meant
for someone else (``FloorState.side_talk``) keeps it held and never takes the floor from it.
``on_evidence`` lets a detector answer that lands between two micro-turns take the turn at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from presence.config import Settings
from presence.seams import Action, Floor, FloorPolicy, FloorState, MicroTurn

RESULT = "result"  # Action.reason of a turn taken to speak a background result
_WORD = re.compile(r"[a-z']+(?:-[a-z']+)?")
# A turn rarely ends on these: the caller is pausing mid-sentence ("I want to book a table for").
CONTINUATION_WORDS = frozenset(
    "a an the and or but so because if that which who to of for with in on at from by about as "
    "than then my your our their his her its is are was were be been am will would can could "
    "should um uh er like".split()
)


@dataclass(frozen=True, slots=True)
class EndpointingOptions:
    """When the caller's turn is over, from the silence, the words and the detector.

    Like LiveKit's endpointing delays: the silence needed is ``min_delay_ms`` when the detector
    is confident (``p >= complete_threshold``) and the words look finished, ``max_delay_ms``
    when either says "unfinished" (``p < incomplete_threshold``, a continuation word, or the
    text detector's ``text_p < text_incomplete_threshold``), and ``delay_ms`` otherwise (no
    detector answer yet, an unsure one, or the text detector still thinking).
    """

    min_delay_ms: float = 200
    delay_ms: float = 800
    max_delay_ms: float = 2500
    complete_threshold: float = 0.7
    incomplete_threshold: float = 0.5
    text_incomplete_threshold: float = 0.4

    def needed_silence_ms(self, state: FloorState) -> float:
        p, text_p = state.eot_probability, state.text_eot_probability
        unfinished_words = (
            state.name_only
            or sounds_unfinished(state.partial_text)
            or (text_p is not None and text_p < self.text_incomplete_threshold)
        )
        # Either cue's "unfinished" waits long. Words that read as finished do not overrule
        # the audio: "I was thinking about the weekend," is a sentence, its intonation is not.
        if unfinished_words or (p is not None and p < self.incomplete_threshold):
            return self.max_delay_ms
        if p is not None and p >= self.complete_threshold and not state.text_eot_pending:
            return self.min_delay_ms
        return self.delay_ms

    @classmethod
    def from_settings(cls, s: Settings) -> EndpointingOptions:
        return cls(
            min_delay_ms=s.eot_min_delay_ms,
            delay_ms=s.eot_delay_ms,
            max_delay_ms=s.eot_max_delay_ms,
            complete_threshold=s.eot_complete_threshold,
            incomplete_threshold=s.eot_incomplete_threshold,
            text_incomplete_threshold=s.eot_text_threshold,
        )


@dataclass(frozen=True, slots=True)
class InterruptionOptions:
    """What the caller's speech over the bot does (LiveKit's interruption options, plus a hold).

    Overlapping speech for ``hold_onset_ms`` pauses the bot at once, keeping its place. The bot
    yields once the overlap reaches ``barge_in_ms`` with two content words in it (``content_words``), or ``max_ms`` with
    anything; ``backchannel_words`` ("okay", "mm-hm") are never real. A held bot resumes after
    ``resume_silence_ms`` of silence.
    """

    hold_onset_ms: float = 60
    barge_in_ms: float = 500
    # One of these is enough to yield (with barge_in_ms of speech), and a hold never resumes on
    # it: "Wait," then a breath is a request to stop, and on a phone line the ASR often garbles
    # the word after it (G.711: "wait and ah" for "Wait, stop."), so two content words came late.
    stop_words: frozenset[str] = frozenset({"wait", "stop", "hold", "sorry", "excuse", "pardon"})
    max_ms: float = 1500
    resume_silence_ms: float = 300
    backchannel_words: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_settings(cls, s: Settings) -> InterruptionOptions:
        return cls(
            hold_onset_ms=s.hold_onset_ms,
            barge_in_ms=s.barge_in_ms,
            max_ms=s.barge_in_max_ms,
            resume_silence_ms=s.resume_silence_ms,
            backchannel_words=frozenset(w.lower() for w in s.backchannel_words),
        )


@dataclass(frozen=True, slots=True)
class RuleParams:
    eot_silence_ms: float = 300
    eot_incomplete_ms: float = 800
    min_turn_speech_ms: float = 200
    interruption: InterruptionOptions = field(default_factory=InterruptionOptions)
    bot_backchannels: bool = True
    backchannel_after_ms: float = 3000
    backchannel_gap_ms: float = 4000  # never backchannel more often than this
    backchannel_text: str = "Uh-huh."
    # None: the silence-only rule (eot_silence_ms / eot_incomplete_ms); else the fused rule.
    endpointing: EndpointingOptions | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> RuleParams:
        return cls(
            endpointing=EndpointingOptions.from_settings(s) if s.policy != "rules" else None,
            eot_silence_ms=s.eot_silence_ms,
            eot_incomplete_ms=s.eot_incomplete_ms,
            min_turn_speech_ms=s.min_turn_speech_ms,
            interruption=InterruptionOptions.from_settings(s),
            bot_backchannels=s.bot_backchannels,
            backchannel_after_ms=s.backchannel_after_ms,
            backchannel_text=s.backchannel_text,
        )


def sounds_unfinished(text: str) -> bool:
    """True when the words so far end on a word that a finished sentence rarely ends on."""
    words = _WORD.findall(text.lower())
    return bool(words) and words[-1] in CONTINUATION_WORDS


def content_words(text: str, backchannel_words: frozenset[str]) -> int:
    """Words that carry meaning: not backchannels, not words a sentence goes on from, not
    single letters. Piper's "Mm-hm." reaches the streaming ASR as "and i'm" or "the m m"."""
    return sum(
        1
        for w in _WORD.findall(text.lower())
        if len(w) > 1 and w not in CONTINUATION_WORDS and w not in backchannel_words
    )


def _only_words_of(text: str, vocabulary: frozenset[str]) -> bool:
    words = _WORD.findall(text.lower())
    return bool(words) and all(w in vocabulary for w in words)


def is_filler(text: str) -> bool:
    """True when every word is one a sentence goes on from ("and the", "as a", "um"): what the
    streaming ASR makes of noise, never a turn of its own."""
    return _only_words_of(text, CONTINUATION_WORDS)


def is_backchannel(text: str, vocabulary: frozenset[str]) -> bool:
    """True when every word of a non-empty text is a backchannel word ("yeah", "mm-hm")."""
    return _only_words_of(text, vocabulary)


class RuleBasedPolicy:
    """``FloorPolicy`` by rules; ``name`` is "fused" when ``params.endpointing`` is set."""

    def __init__(self, params: RuleParams) -> None:
        self.p = params
        self.name = "fused" if params.endpointing is not None else "rules"

    async def decide(self, turn: MicroTurn, state: FloorState) -> Action:
        return self.step(turn, state)

    def close(self) -> None:
        pass

    def needed_silence_ms(self, state: FloorState) -> float:
        """The silence that ends the caller's turn, given what is known now."""
        p = self.p
        if p.endpointing is not None:
            return p.endpointing.needed_silence_ms(state)
        return p.eot_incomplete_ms if sounds_unfinished(state.partial_text) else p.eot_silence_ms

    def _turn_over(self, state: FloorState) -> bool:
        return (
            state.caller_spoke
            and state.caller_speech_ms >= self.p.min_turn_speech_ms
            and state.caller_silence_ms >= self.needed_silence_ms(state)
        )

    def on_evidence(self, state: FloorState) -> Action | None:
        # Between micro-turns (a detector answer landed, or the needed silence was reached):
        # only taking the caller's turn is decided here; everything else waits for step().
        if state.bot_speaking or state.result_waiting or not self._turn_over(state):
            return None
        return Action(Floor.SPEAK, reason="end of turn")

    def on_frame(self, vad_prob: float, state: FloorState) -> Action | None:
        # The reflex: a voice onset over the bot pauses it now; step() settles what it was.
        if (
            state.bot_speaking
            and not state.bot_held
            and state.overlap_speech_ms >= self.p.interruption.hold_onset_ms
        ):
            return Action(Floor.HOLD, reason="caller onset over bot")
        return None

    def step(self, turn: MicroTurn, state: FloorState) -> Action:
        p, bi = self.p, self.p.interruption
        if state.result_waiting and not state.bot_speaking:
            # A background result is woven in when nobody holds the floor; an urgent one may
            # talk over the caller, a routine one never does.
            if not state.caller_spoke:
                return Action(Floor.SPEAK, reason=RESULT)
            if state.result_urgent:
                return Action(Floor.INTERRUPT, reason="urgent result")
        if state.bot_speaking:
            # The hold already silenced the bot, so confirming can wait for the ASR's words:
            # "mm-hm" and "okay" resume, a real word or long speech takes the floor.
            overlap = state.speech_over_bot_ms
            words = state.partial_text.strip()
            # Two content words at least: a partial's first word is often misheard ("my" for
            # "Mike,"), and a backchannel often comes out as function words ("and i'm").
            asks_to_stop = any(w in bi.stop_words for w in _WORD.findall(words.lower()))
            real_words = asks_to_stop or content_words(words, bi.backchannel_words) >= 2
            if (overlap >= bi.max_ms or (overlap >= bi.barge_in_ms and real_words)) and not state.side_talk:
                return Action(Floor.YIELD, reason="barge-in")
            if state.bot_held:
                # Side talk ("Mike, close the door") keeps the bot held, never yielding, until it ends.
                if state.caller_silence_ms >= bi.resume_silence_ms:
                    # Short speech or backchannel words: resume. Long speech whose words the
                    # ASR has not delivered yet ("Wait, stop." then a pause): keep holding a
                    # little longer rather than talk over a real interruption.
                    gone_on = overlap < bi.barge_in_ms or words
                    if (gone_on and not asks_to_stop) or state.caller_silence_ms >= bi.max_ms:
                        return Action(Floor.RESUME, reason="short overlap: backchannel or noise")
                return Action(Floor.HOLD)
            return Action(Floor.CONTINUE)
        if self._turn_over(state):
            return Action(Floor.SPEAK, reason="end of turn")
        if (
            p.bot_backchannels
            and state.caller_speech_ms >= p.backchannel_after_ms
            and 200 <= state.caller_silence_ms < min(p.eot_silence_ms, self.needed_silence_ms(state))
            and turn.start - state.last_backchannel_at >= p.backchannel_gap_ms / 1000
        ):
            return Action(Floor.BACKCHANNEL, text=p.backchannel_text)
        return Action(Floor.LISTEN)


def build_policy(settings: Settings, call_id: str | None = None) -> FloorPolicy:
    """The floor policy of one call, chosen by ``settings.policy``."""
    if settings.policy in ("rules", "fused"):
        return RuleBasedPolicy(RuleParams.from_settings(settings))
    if settings.policy == "model":
        # torch is imported only when the learned policy is asked for.
        from presence.model.scheduler import build_model_policy

        return build_model_policy(settings, call_id)
    raise ValueError(f"unknown policy {settings.policy!r} (setting: policy)")
