"""Numbers in speech, both ways: the number words a caller said to a value, and a value to words
a voice reads well.

The one parser of spoken numbers (the rule responder's arithmetic and the job router's spoken
math use it) and the one reader of numbers (job results, the rule responder's answers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
TENS = {
    w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())
}
SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
NUMBER_WORDS = UNITS.keys() | TENS.keys() | SCALES.keys()
EXACT_DIGITS = 15  # whole numbers up to this many digits are said in full


# ---------------------------------------------------------------------- words -> value
def parse_words(words: Sequence[str], i: int = 0) -> tuple[str, int] | None:
    """Parse "three hundred and twenty one point five" from ``words[i]``: (literal, next index)."""
    j, total, current, seen = i, 0, 0, False
    if words[j] == "a" and j + 1 < len(words) and words[j + 1] in SCALES:
        current, j, seen = 1, j + 1, True
    while j < len(words):
        w = words[j]
        if w in UNITS or w in TENS:
            value = UNITS.get(w, TENS.get(w, 0))
            # "twenty three" adds up; "three twenty" or "five five" is not one number
            if seen and current % 100 and not (current % 100 in TENS.values() and value < 10):
                break
            current += value
        elif w in SCALES and seen:
            scale = SCALES[w]
            if scale == 100:
                current = max(current, 1) * 100
            else:
                total += max(current, 1) * scale
                current = 0
        elif (
            w == "and"
            and seen
            and (current >= 100 or total)
            and current % 100 == 0
            and j + 1 < len(words)
            and (words[j + 1] in UNITS or words[j + 1] in TENS)
        ):
            pass  # "one hundred and five"
        else:
            break
        seen = True
        j += 1
    if not seen:
        return None
    literal = str(total + current)
    if j + 1 < len(words) and words[j] == "point":  # "two point five"
        digits = []
        k = j + 1
        while k < len(words) and ((words[k] in UNITS and UNITS[words[k]] < 10) or words[k].isdigit()):
            digits.append(str(UNITS[words[k]]) if words[k] in UNITS else words[k])
            k += 1
        if digits:
            literal, j = f"{literal}.{''.join(digits)}", k
    return literal, j


def parse_number(text: str) -> float | None:
    """'12', '-3.5', 'seven', 'twenty-three', 'a hundred and five' -> the value; else None."""
    text = text.strip().lower()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        return float(text)
    words = [w for w in re.split(r"[-\s]+", text) if w]
    parsed = parse_words(words) if words else None
    return float(parsed[0]) if parsed is not None and parsed[1] == len(words) else None


# ---------------------------------------------------------------------- value -> words
def say_number(value: float | str) -> str:
    """A number as a voice should say it: '391', 'minus 4', '3.5', 'about 1.414'; a huge one as
    'about 7.887 times ten to the power of 374, a number with 375 digits' (never 'infinity' for
    a finite number). A string is what a program printed ('5.0', '1e+300', an integer of any
    size): read exactly, never through a float. ValueError when it is no number."""
    try:
        d = Decimal(value.strip() if isinstance(value, str) else repr(value))
    except (InvalidOperation, ValueError):
        raise ValueError(f"not a number: {value!r:.40}") from None
    if d.is_nan():
        return "not a number"
    sign = "minus " if d < 0 else ""  # "-4" is read inconsistently by TTS voices
    d = d.copy_abs()
    if d.is_infinite():
        return sign + "infinity"
    if d == d.to_integral_value():
        if d.adjusted() < EXACT_DIGITS:
            return sign + f"{d:.0f}"
        return f"{_scientific(d, sign)}, a number with {d.adjusted() + 1} digits"
    if d.adjusted() >= EXACT_DIGITS or d < Decimal("1e-4"):
        return _scientific(d, sign)
    shown = f"{d:.4g}" if d < 1000 else f"{d:.2f}"
    shown = shown.rstrip("0").rstrip(".") if "." in shown else shown
    return f"{'' if Decimal(shown) == d else 'about '}{sign}{shown}"


def _scientific(d: Decimal, sign: str) -> str:
    """'about 7.887 times ten to the power of 374'; 'ten to the power of minus 20'."""
    mantissa, exponent = f"{d:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    about = "" if Decimal(f"{mantissa}e{exponent}") == d else "about "
    times = "" if mantissa == "1" else f"{mantissa} times "
    return f"{about}{sign}{times}ten to the power of {say_number(int(exponent))}"


__all__ = ["NUMBER_WORDS", "SCALES", "TENS", "UNITS", "parse_number", "parse_words", "say_number"]
