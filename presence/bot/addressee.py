"""Is a caller's utterance for the bot, or side talk? Cheap text rules plus one level cue.

Name (or an ASR spelling / difflib ratio >= 0.8 of it) anywhere -> addressed, always; aliases that
are common words ("presents") count only where a name is called (first word, or last after a
comma). A vocative to someone else ("Mike, ...", "Hey Sam ...", "kids please ...", "..., honey?")
-> not addressed. One-to-one: addressed unless a vocative, or side_talk_level_db below the
caller's typical level ("off-axis": someone else in the room, away from the mic; the ASR's words
for such speech are often garbled, so the level alone decides), except that a second quiet
question or request in a row is answered (the caller may have stepped back from the mic). Multi-party: only a
question ("follow-up") or request ("request") within follow_up_s after the bot spoke (twice that
for the participant it last answered); otherwise "not addressed".
"""

from __future__ import annotations

import re
import statistics
from collections import deque
from dataclasses import dataclass
from difflib import SequenceMatcher


def _words(s: str) -> frozenset[str]:
    return frozenset(s.split())


VOCATIVE_TERMS = _words(
    "honey hon darling sweetie sweetheart babe kids kiddo children boys girls guys folks everyone "
    "everybody mom mommy mum mummy mama dad daddy papa grandma granny grandpa grandad nana"
)
TITLES = _words("mr mrs ms dr miss aunt auntie uncle grandma grandpa cousin dear")
# Common first names that are not also common words (no "will", "mark", "bill", "grace", "may").
NAMES = _words(
    "sam mike anna tom lisa jake emma john james david michael chris alex ben dan daniel tim peter paul "
    "matt nick steve kevin brian jason josh ryan eric adam andrew luke sean jim joe tony bob rachel sarah "
    "sara laura kate katie emily lily molly sophie sophia olivia mia ella chloe amy jenny jess jessica "
    "hannah lucy anne julia maria mary linda karen susan helen claire megan liam noah ethan oliver harry "
    "charlie george henry leo lucas"
)
# Words that may stand before a comma at the start without addressing someone else: discourse
# markers, interjections, greetings, generic address terms the bot may be called by, pronouns,
# question words, numbers and sentence adverbs (plus any word ending in "-ly").
NOT_VOCATIVE = _words(
    "so well okay ok kay alright right yes yeah yep yup no nope nah sure fine good great cool nice "
    "perfect awesome excellent amazing brilliant wonderful fantastic interesting weird funny true "
    "correct wrong exactly agreed understood noted gotcha done ready please thanks thank cheers sorry "
    "pardon excuse wait stop listen look see hey hi hello yo oi morning evening afternoon bye goodbye "
    "oh ah aha hmm hm mm mhm um uh er erm wow oops ouch whoa yay huh eh gosh jeez damn man dude buddy "
    "mate friend sir madam ma'am and but or because since if when while unless though although plus "
    "also then now next first second third today tonight tomorrow yesterday later earlier again here "
    "there still instead anyway anyways anyhow however otherwise besides meanwhile moreover therefore "
    "thus hence overall regardless whatever indeed maybe perhaps sometimes often like i me my you your "
    "we us our it this that these those everything nothing something anything what why how where who "
    "which one two three four five six seven eight nine ten test testing on up in out fact sweet super "
    "question god lord jesus christ goodness heavens dear boy ugh meh yikes shoot darn dang whoops bingo "
    "yea aye nevermind yet afterwards"
)
_LEAD = _words("hey hi hello yo oi oh ok okay um uh")
# Second word that makes a leading name the subject ("mom is coming", "anna said") ...
_SUBJECT_VERBS = _words(
    "is was 's has had and or said says told wants wanted will would can could did does do should might "
    "may must isn't wasn't doesn't didn't won't can't couldn't just always never also likes loves thinks "
    "thought went goes got gets needs needed asked called"
)
_YOU = _words("you u ya your you're yours yourself you'll you've you'd")  # "mike could you": a vocative
_IMPERATIVE = _words("let's don't stop come go get take turn bring put keep grab open close")
_DISCOURSE = _words("so and but well also then now wait sorry actually okay ok oh um uh hey hi hello yeah")
QUESTION_WORDS = _words(
    "what when where who whom whose why how which can could would will is are am was were do does did "
    "should shall may might have has isn't aren't don't doesn't didn't won't wouldn't can't couldn't "
    "shouldn't what's where's who's how's when's why's which's"
)
_REQUEST_VERBS = _words(
    "please tell give show remind help explain repeat say read find book check call send set play "
    "continue describe recommend suggest translate list"
)
_REQUEST_PAIRS = frozenset("can you|could you|would you|will you|i'd like|i want|i need|let me".split("|"))
# Common words near "Presence" that are never taken for it, or (aliases) only where a name is called.
_COMMON = _words("present presented presenter preened pretence presents presets")  # difflib >= 0.8 or aliases
_SPELLINGS = [p.split(">") for p in "ence>ents ence>ense ence>ance ce>se se>sce s>z ph>f ck>k".split()]
# "precipice" 0.59, "residents" 0.59, "pressure" 0.62 for "presence": words worth whisper's look
LOOKALIKE_RATIO = 0.55
_KNOWN = {"presence": ("presets",)}
_FILLER = re.compile(r"[hmuaoe]{1,6}")  # hmm, uhm, ahh, ooh, mmhmm
_NOT_SUBJ_NOUN = _words("are were for from of to in on")
_NOT_NAME = NOT_VOCATIVE | QUESTION_WORDS | _REQUEST_VERBS | _DISCOURSE
_TOKEN = re.compile(r"([^\W_][\w'-]*)[\s\"')\]]*([,;:!]?)")


def default_aliases(name: str) -> tuple[str, ...]:
    """ASR spellings of a one-word name: plural, and one spelling swap at a time."""
    n = name.lower()
    out = {n + "s", *_KNOWN.get(n, ())}
    for a, b in _SPELLINGS:
        for m in re.finditer(re.escape(a), n):
            out.add(n[: m.start()] + b + n[m.end() :])
    out.discard(n)
    return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class AddresseeOptions:
    bot_name: str = "Presence"
    aliases: tuple[str, ...] = ()  # extra spellings, on top of default_aliases(bot_name)
    follow_up_s: float = 6.0  # multi-party: a question this soon after the bot spoke is for it
    side_talk_level_db: float = 5.0  # one-to-one: this much below the typical level is off-axis


@dataclass(frozen=True, slots=True)
class AddresseeInput:
    text: str
    participant: str
    level_dbfs: float | None
    now: float
    bot_last_spoke_at: float | None  # end of the bot's last speech (bot clock, s); None: never
    bot_last_answered: str | None  # participant the bot last replied to
    participants: int  # humans in the room
    # The utterance began with the bot's name alone ("Presence, ..."), as the streaming ASR's
    # partials showed: its final text may have blurred that ("presents to what time is it").
    began_with_name: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    addressed: bool
    reason: str  # name | follow-up | request | one-to-one | vocative:<word> | off-axis | not addressed


def _tokenize(text: str) -> tuple[list[str], list[bool]]:
    """Words (original case) and, per word, whether a , ; : or ! follows it."""
    pairs = _TOKEN.findall(text.replace("\u2019", "'"))
    return [w.rstrip("'-") for w, _ in pairs], [bool(p) for _, p in pairs]


def _lower(text: str) -> list[str]:
    return [w.lower() for w in _tokenize(text)[0]]


def _lead(low: list[str], skip: frozenset[str]) -> int:
    i = 0
    while i < min(2, len(low) - 1) and low[i] in skip:
        i += 1
    return i


def _namelike(w: str) -> bool:
    return w.isalpha() and w not in _NOT_NAME and not w.endswith("ly") and not _FILLER.fullmatch(w)


def _segment_vocative(raw: list[str], low: list[str], rest: list[str], hey: bool) -> bool:
    """A leading segment before a comma: "Mike", "Kids", "Aunt Mary", "Sorry honey", "Sam Jones"."""
    if low[-1] in VOCATIVE_TERMS or low[-1] in NAMES:
        return len(low) == 1 or low[0] in TITLES or low[0] in ("my", "you", "thanks", "sorry", "oh")
    # Any other word must be a name (not "So", "Coffee, please", "Paris, is it nice?"): after a
    # greeting with a capital ("Hey Zoltan, ..."), or with "you" or a request in the rest.
    if not (hey and raw[-1][:1].isupper()) and not (
        len(rest) >= 2 and (rest[0] in _REQUEST_VERBS or rest[0] in _IMPERATIVE or _YOU.intersection(rest))
    ):
        return False
    if len(low) == 1:
        return _namelike(low[0])
    return (low[0] in TITLES and _namelike(low[1])) or (low[0] in NAMES and raw[1][:1].isupper())


def _subject(nxt: str, after: str) -> bool:
    """Does ``nxt`` make the word before it the subject ("mom is", "dad needs", "tom called")?"""
    if after in _YOU:  # "mike could you ..."
        return False
    return nxt in _SUBJECT_VERBS or (len(nxt) > 3 and nxt.endswith(("s", "ed")) and nxt not in _NOT_NAME)


def find_vocative(text: str) -> str | None:
    """The term addressing someone at the start (or end) of ``text``, lowercased; None if none."""
    raw, brk = _tokenize(text)
    low = [w.lower() for w in raw]
    n = len(low)
    if not n:
        return None
    i = _lead(low, _LEAD)
    seg = 1 if brk[i] else 2 if i + 1 < n and brk[i + 1] else 0
    if seg and _segment_vocative(raw[i : i + seg], low[i : i + seg], low[i + seg :], i > 0):
        return low[i + seg - 1]  # "Mike, ...", "Hey Sam, ..."
    w = low[i]
    nxt, after = [*low[i + 1 : i + 3], "", ""][:2]
    if (w in VOCATIVE_TERMS or w in NAMES) and not _subject(nxt, after):
        return w  # "kids please ...", "mike could you ..."
    if i and raw[i][:1].isupper() and raw[i] != "I" and _namelike(w):
        return w  # "Hey Sam can you ..."
    if n >= 3 and brk[n - 2] and (low[-1] in VOCATIVE_TERMS or low[-1] in NAMES):
        return low[-1]  # "..., honey?"
    return None


def is_question(text: str) -> bool:
    low = _lower(text)
    return text.rstrip().endswith("?") or (bool(low) and low[_lead(low, _DISCOURSE)] in QUESTION_WORDS)


def is_request(text: str) -> bool:
    low = _lower(text)
    i = _lead(low, _DISCOURSE)
    return bool(low) and (
        "please" in low or low[i] in _REQUEST_VERBS or " ".join(low[i : i + 2]) in _REQUEST_PAIRS
    )


class AddresseeTracker:
    """Per-call addressee state: the participants' typical speech levels."""

    def __init__(self, options: AddresseeOptions | None = None) -> None:
        self.options = options or AddresseeOptions()
        self._name = name = self.options.bot_name.lower().split() or ["presence"]
        aliases = {a.lower() for a in self.options.aliases}
        aliases |= set(default_aliases(name[0])) if len(name) == 1 else set()
        self._strong = frozenset(aliases - _COMMON)
        self._weak = frozenset(aliases & _COMMON)
        self._fuzzy: dict[str, bool] = {}
        self._levels: dict[str, deque[float]] = {}
        self._summoned: tuple[str, float] | None = None  # (participant, when) of a name-only turn
        self._quiet_before: dict[str, bool] = {}  # the participant's last turn was off-axis

    def reset(self) -> None:
        self._levels.clear()
        self._summoned = None
        self._quiet_before = {}

    def is_summons(self, text: str) -> bool:
        """The words only call the bot ("Presence," / "hey Presence"): more is coming."""
        words = [w.lower() for w in _tokenize(text)[0]]
        rest = [w for w in words if w not in _LEAD and not self._is_name(w) and not self._sounds_like_name(w)]
        return bool(words) and not rest and self.names_bot(text)

    def observe_level(self, participant: str, level_dbfs: float) -> None:
        self._levels.setdefault(participant, deque(maxlen=9)).append(level_dbfs)

    def typical_level(self, participant: str) -> float | None:
        levels = self._levels.get(participant)
        return statistics.median(levels) if levels else None

    def _is_name(self, w: str) -> bool:
        w = w[:-2] if w.endswith("'s") else w
        if w in self._strong or (len(self._name) == 1 and w == self._name[0]):
            return True
        n = self._name[0]
        if len(self._name) != 1 or w in _COMMON or len(w) < 4 or w[0] != n[0] or abs(len(w) - len(n)) > 2:
            return False
        if w not in self._fuzzy:  # cached per call: difflib is the one non-trivial cost here
            if len(self._fuzzy) > 4096:
                self._fuzzy.clear()
            self._fuzzy[w] = SequenceMatcher(None, w, n).ratio() >= 0.8
        return self._fuzzy[w]

    def _sounds_like_name(self, w: str) -> bool:
        """A common word the ASR makes of the name ("presents", "present"): the name only where
        a name is called."""
        if w in self._weak:
            return True
        return (
            len(self._name) == 1 and w in _COMMON and SequenceMatcher(None, w, self._name[0]).ratio() >= 0.8
        )

    def names_bot(self, text: str) -> bool:
        raw, brk = _tokenize(text)
        low = [w.lower() for w in raw]
        k = len(self._name)
        if k > 1 and any(low[j : j + k] == self._name for j in range(len(low) - k + 1)):
            return True
        if any(self._is_name(w) for w in low):
            return True
        i = _lead(low, _LEAD)  # a common-word alias only where a name is called: "presents, what ..."
        if len(low) == i + 1 and self._sounds_like_name(low[i]):
            return True  # the name alone, heard as a sound-alike ("present" before a pause)
        nxt, after = [*low[i + 1 : i + 3], "", ""][:2]
        first = low[i : i + 1] if not _subject(nxt, after) and nxt not in _NOT_SUBJ_NOUN else []
        # "present" (not an alias) counts first only before a question or request to the bot.
        if first and first[0] not in self._weak and nxt not in QUESTION_WORDS | _REQUEST_VERBS:
            first = []
        return any(self._sounds_like_name(w) for w in first + (low[-1:] if len(low) >= 2 and brk[-2] else []))

    def may_name_bot(self, text: str) -> bool:
        """One of the first words could be the name misheard ("present precipice it's what time
        is it", "residents to what is your name"): worth a second look by a better ASR when the
        words did not name the bot. Cheap to over-ask: only text judged unaddressed comes here."""
        low = _lower(text)
        i = _lead(low, _LEAD)
        n = self._name[0]
        return any(
            self._sounds_like_name(w)
            or (w not in _NOT_NAME and SequenceMatcher(None, w, n).ratio() >= LOOKALIKE_RATIO)
            for w in low[i : i + 2]
        )

    def step(self, u: AddresseeInput) -> Verdict:
        verdict = self._decide(u)
        if verdict.addressed and u.level_dbfs is not None:
            self.observe_level(u.participant, u.level_dbfs)
        return verdict

    def _off_axis(self, participant: str, level_dbfs: float | None) -> bool:
        typical = self.typical_level(participant)
        return (
            level_dbfs is not None
            and typical is not None
            and level_dbfs < typical - self.options.side_talk_level_db
        )

    def side_talk(
        self, text: str, participant: str, level_dbfs: float | None, before: str | None = None
    ) -> str | None:
        """Why speech still going on over the bot sounds meant for someone else ("vocative:sam",
        "off-axis"), or None. It is judged from partial words and the level so far, so the bot
        can keep its place instead of giving the floor to it; the bot's name always wins.
        ``before`` is this utterance's previous verdict: a vocative heard once holds, because
        the ASR's next partial often rewrites it ("emma", then "em up in you grab my charger")."""
        if text and self.names_bot(text):
            return None
        vocative = find_vocative(text) if text else None
        if vocative is not None:
            return f"vocative:{vocative}"
        if before is not None and before.startswith("vocative:"):
            return before
        return "off-axis" if self._off_axis(participant, level_dbfs) else None

    def _decide(self, u: AddresseeInput) -> Verdict:
        o = self.options
        summoned, self._summoned = self._summoned, None
        if u.began_with_name or self.names_bot(u.text):
            if self.is_summons(u.text):
                self._summoned = (u.participant, u.now)
            return Verdict(True, "name")
        if summoned is not None and summoned[0] == u.participant and u.now - summoned[1] <= o.follow_up_s:
            return Verdict(True, "after-name")  # "Presence, [pause] what time is it?"
        vocative = find_vocative(u.text)
        if vocative is not None:
            return Verdict(False, f"vocative:{vocative}")
        if u.participants <= 1:
            quiet = self._off_axis(u.participant, u.level_dbfs)
            asking = is_question(u.text) or is_request(u.text)
            again, self._quiet_before = self._quiet_before.get(u.participant, False), {u.participant: quiet}
            if quiet and not (asking and again):
                return Verdict(False, "off-axis")  # someone else in the room, away from the mic
            return Verdict(True, "one-to-one")
        window = o.follow_up_s * (2.0 if u.participant == u.bot_last_answered else 1.0)
        if u.bot_last_spoke_at is not None and u.now - u.bot_last_spoke_at <= window:
            if is_question(u.text):
                return Verdict(True, "follow-up")
            if is_request(u.text):
                return Verdict(True, "request")
        return Verdict(False, "not addressed")
