"""Streamed reply text cut into pieces for TTS: the first one early, the rest by sentence."""

from __future__ import annotations

from presence.bot.reply import pop_speakable


def feed(text: str) -> list[str]:
    """Pieces as a streamed reply would produce them, one word at a time."""
    pieces: list[str] = []
    buffer = ""
    for word in text.split(" "):
        buffer += ("" if not buffer and not pieces else " ") + word
        new, buffer = pop_speakable(buffer, first=not pieces)
        pieces += new
    return pieces + ([buffer.strip()] if buffer.strip() else [])


def test_sentences_always_cut() -> None:
    assert feed("The capital of France is Paris. It is lovely.") == [
        "The capital of France is Paris.",
        "It is lovely.",
    ]
    assert pop_speakable("Version 3.5 is", first=False) == ([], "Version 3.5 is")


def test_the_first_piece_is_a_clause_or_a_phrase_of_a_long_sentence() -> None:
    assert feed("Sure, let me check that for you.") == ["Sure, let me check that for you."]
    assert feed("Well, as it happens, I can.") == ["Well, as it happens,", "I can."]
    assert feed("I think it would be helpful if you learned how to speak French. Bye.") == [
        "I think it would be helpful",
        "if you learned how to speak French.",
        "Bye.",
    ]
    # short sentences stay whole; only the first piece is cut early
    assert feed("There are seven days in a week.") == ["There are seven days in a week."]
    assert feed("Okay. I think it would be helpful if you learned French.") == [
        "Okay.",
        "I think it would be helpful if you learned French.",
    ]
    # whole words only ("iffy" is not "if"), and no cut before prepositions or "that"
    assert feed("The answer you want is iffy at best.") == ["The answer you want is iffy at best."]
    assert feed("Sure, let me check that for you.") == ["Sure, let me check that for you."]
