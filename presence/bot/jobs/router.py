"""Which background jobs a caller's words ask for: a small rule-based tool router.

``RuleToolRouter().route("look up the opening hours and calculate 17 times 23")`` gives
``[("search", {"query": "the opening hours", "k": 3}, True),
("code", {"code": "import math\\nprint(17 * 23)"}, True)]``.

Rules, in the order a sentence is cut up:

* trigger phrases mark where a request starts: search ("look up", "search for", "find out",
  "what do the docs say about" ...), think ("think about", "explain ... in depth", "what's your
  deep view on" ...) and code ("calculate", "compute", "work out", "run this code" ...); each
  request's argument runs to the next trigger, less connectives ("and", "then", "also");
* spoken or typed arithmetic anywhere ("seventeen times twenty three", "17 * 23", "the square
  root of 2", "15 percent of 80") becomes a ``code`` job printing a checked Python expression;
* "never mind", "forget it", "cancel that" ... is a cancel request (:func:`is_cancel_request`),
  not a job.

Any object with ``route(text) -> list[(kind, args, urgent)]`` can replace it (:class:`ToolRouter`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Protocol

from presence.bot.numbers import NUMBER_WORDS, SCALES, UNITS, parse_words

Route = tuple[str, dict[str, Any], bool]  # (kind, args, urgent)


class ToolRouter(Protocol):
    def route(self, text: str) -> list[Route]: ...


# ---------------------------------------------------------------------- cancel requests
_CANCEL_RE = re.compile(
    r"\b(?:never\s*mind|nevermind|forget (?:it|that|about (?:it|that))|cancel (?:that|it|this|"
    r"the (?:search|job|jobs|calculation|lookup|request))|stop (?:searching|looking|that|it|"
    r"the (?:search|job|jobs|calculation))|don'?t (?:bother|worry about it)|scratch that|no need)\b"
)
_FILLER = frozenset(
    "oh ok okay actually please sorry just then it's its fine that's thats alright all right no "
    "yes yeah well um uh hmm you know i we anyway".split()
)


def is_cancel_request(text: str) -> bool:
    """True for "never mind", "forget it, thanks", "oh, cancel that please" ...

    Only when the cancel phrase is (nearly) all that was said: "never mind the docs, what's
    17 times 23" is a new request, not a cancellation.
    """
    low = " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())
    match = _CANCEL_RE.search(low)
    if match is None:
        return False
    rest = [w for w in (low[: match.start()] + " " + low[match.end() :]).split() if w not in _FILLER]
    rest = [w for w in rest if w not in ("thanks", "thank", "you", "the", "search", "question", "job")]
    return len(rest) <= 2


# ---------------------------------------------------------------------- spoken math
# (item type, value): the phrases that say it. Matched longest first: "to the power of" before "to".
_SAID = {
    ("op", "**"): "raised to the power of | to the power of | to the power | raised to | ^ | **",
    ("op", "*"): "multiplied by | times | x | *",
    ("op", "/"): "divided by | over | /",
    ("op", "+"): "plus | +",
    ("op", "-"): "minus | -",
    ("op", "%"): "mod | modulo",
    ("neg", "-"): "negative",
    ("pct_of", "/100*"): "percent of | % of",
    ("pct", "/100"): "percent | %",
    ("post", "**2"): "squared",
    ("post", "**3"): "cubed",
    ("fact", ""): "factorial",
    ("func", "sqrt"): "the square root of | square root of | square root | sqrt | root of",
    ("func", "cbrt"): "the cube root of | cube root of",
    ("func", "factorial"): "the factorial of | factorial of",
    ("func", "abs"): "the absolute value of | absolute value of",
    ("lp", "("): "(",
    ("rp", ")"): ")",
}
_PHRASES: list[tuple[tuple[str, ...], str, str]] = sorted(
    ((tuple(p.split()), kind, value) for (kind, value), said in _SAID.items() for p in said.split(" | ")),
    key=lambda p: -len(p[0]),
)
# How each function is written; cube root as a power so any Python 3 can run it.
_FUNCS = {
    "sqrt": ("math.sqrt(", ")"),
    "cbrt": ("(", ")**(1/3)"),
    "factorial": ("math.factorial(", ")"),
    "abs": ("abs(", ")"),
}
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|\*\*|[-+*/^()%]|[a-z]+(?:'[a-z]+)?")


@dataclass(frozen=True, slots=True)
class _Tok:
    text: str
    start: int
    end: int


@dataclass(slots=True)
class _Item:
    type: str  # num, op, neg, pct, pct_of, post, fact, func, lp, rp, word
    value: str
    start: int  # character span in the normalized text
    end: int


@dataclass(frozen=True, slots=True)
class MathSpan:
    expression: str  # a checked Python expression, e.g. "17 * 23" or "math.sqrt(2)"
    start: int  # character span of the spoken math in the text it was found in
    end: int

    @property
    def code(self) -> str:
        return f"import math\nprint({self.expression})"


def _normalize_math(text: str) -> str:
    """Lowercase; same length as ``text`` so that spans map back (only 1:1 replacements)."""
    low = text.lower() if len(text.lower()) == len(text) else text
    low = low.translate(str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-", "—": " "}))
    low = re.sub(r"(?<=\d),(?=\d{3}\b)", " ", low)  # 1,000 -> "1 000", joined again below
    low = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", low)  # twenty-three
    return re.sub(r"(?<=\d)x(?=\d)", "*", low)  # 17x23


def _tokens(low: str) -> list[_Tok]:
    toks = [_Tok(m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(low)]
    merged: list[_Tok] = []
    for tok in toks:  # "1 000" (from "1,000") back into one number
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and tok.text.isdigit()
            and len(tok.text) == 3
            and prev.text.replace(".", "").isdigit()
            and low[prev.end : tok.start] == " "
            and "." not in prev.text
            and tok.start > 0
            and low[tok.start - 1] == " "
        ):
            merged[-1] = _Tok(prev.text + tok.text, prev.start, tok.end)
            continue
        merged.append(tok)
    return merged


def _items(toks: list[_Tok]) -> list[_Item]:
    items: list[_Item] = []
    words = [t.text for t in toks]
    i = 0
    while i < len(toks):
        w = words[i]
        if re.fullmatch(r"\d+(?:\.\d+)?", w):
            literal, j = w, i + 1
            if j < len(words) and words[j] in SCALES:  # "2 thousand"
                scale = SCALES[words[j]]
                literal, j = (str(int(w) * scale) if w.isdigit() else repr(float(w) * scale)), j + 1
            if literal.isdigit():
                literal = str(int(literal))  # "007" is no Python literal
            items.append(_Item("num", literal, toks[i].start, toks[j - 1].end))
            i = j
            continue
        if w in NUMBER_WORDS or (w == "a" and i + 1 < len(words) and words[i + 1] in SCALES):
            parsed = parse_words(words, i)
            if parsed is not None:
                literal, j = parsed
                items.append(_Item("num", literal, toks[i].start, toks[j - 1].end))
                i = j
                continue
        for phrase, kind, value in _PHRASES:
            n = len(phrase)
            if tuple(words[i : i + n]) == phrase:
                items.append(_Item(kind, value, toks[i].start, toks[i + n - 1].end))
                i += n
                break
        else:
            if w == "point" and i + 1 < len(words) and words[i + 1] in UNITS:  # "point five"
                parsed = parse_words(words, i + 1)
                if parsed is not None and "." not in parsed[0]:
                    items.append(_Item("num", f"0.{parsed[0]}", toks[i].start, toks[parsed[1] - 1].end))
                    i = parsed[1]
                    continue
            items.append(_Item("word", w, toks[i].start, toks[i].end))
            i += 1
    return items


_STARTS = frozenset({"num", "func", "lp", "neg", "op"})
_ENDS = frozenset({"num", "post", "pct", "rp", "fact"})
_OPERATIVE = frozenset({"op", "func", "post", "pct", "pct_of", "fact", "neg"})


def _build(run: list[_Item]) -> str | None:
    out: list[str] = []
    closes: list[tuple[int, str]] = []  # (paren depth, closing text) of functions awaiting an atom
    depth = 0

    def close_atoms() -> None:
        nonlocal depth
        while closes and closes[-1][0] == depth + 1:
            out.append(closes.pop()[1])

    for item in run:
        if item.type == "num":
            out.append(item.value)
            close_atoms()
        elif item.type in ("op", "neg"):
            out.append(f" {item.value} " if item.type == "op" and out else item.value)
        elif item.type in ("pct", "pct_of", "post"):
            out.append(item.value)
        elif item.type == "fact":
            if not out or not re.fullmatch(r"\d+", out[-1]):
                return None
            out[-1] = f"math.factorial({out[-1]})"
        elif item.type == "func":
            opening, closing = _FUNCS[item.value]
            out.append(opening)
            closes.append((depth + 1, closing))
        elif item.type == "lp":
            out.append("(")
            depth += 1
        elif item.type == "rp":
            out.append(")")
            depth -= 1
            close_atoms()
    if closes or depth:
        return None
    return "".join(out).strip()


_ALLOWED_CALLS = frozenset({"math.sqrt", "math.factorial", "abs"})


def _safe(expression: str) -> bool:
    """Only numbers, arithmetic and the few math calls we write: nothing else reaches the sandbox."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if ast.unparse(node.func) not in _ALLOWED_CALLS or node.keywords or len(node.args) != 1:
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                return False
        elif isinstance(node, ast.Attribute | ast.Name):
            continue  # only as a call's function (checked above)
        elif not isinstance(
            node,
            ast.Expression
            | ast.BinOp
            | ast.UnaryOp
            | ast.Load
            | ast.Add
            | ast.Sub
            | ast.Mult
            | ast.Div
            | ast.FloorDiv
            | ast.Mod
            | ast.Pow
            | ast.USub
            | ast.UAdd,
        ):
            return False
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return names <= {"math", "abs"}


def find_math(text: str) -> list[MathSpan]:
    """Every stretch of spoken or typed arithmetic in ``text``, as checked Python expressions."""
    low = _normalize_math(text)
    items = _items(_tokens(low))
    spans: list[MathSpan] = []
    i = 0
    while i < len(items):
        if items[i].type == "word":
            i += 1
            continue
        j = i
        while j < len(items) and items[j].type != "word":
            j += 1
        run = items[i:j]
        i = j
        while run and (run[0].type not in _STARTS or (run[0].type == "op" and run[0].value != "-")):
            run = run[1:]
        while run and run[-1].type not in _ENDS:
            run = run[:-1]
        if not any(it.type == "num" for it in run) or not any(it.type in _OPERATIVE for it in run):
            continue
        expression = _build(run)
        if expression and _safe(expression):
            spans.append(MathSpan(expression, run[0].start, run[-1].end))
    return spans


# ---------------------------------------------------------------------- intents
_LEAD = r"(?:^|(?<=[,.;:!?])\s*|\b(?:please|you|and|then|also|to|me|now|just|quickly|first|so|ok|okay|hey|can|could|would|will|go)\s+)"
_DOCS = r"(?:docs|documents|documentation|manual|faq|knowledge base|notes|handbook|guide|files)"
_SEARCH = [
    rf"what do(?:es)? (?:the |your |our )?{_DOCS} say (?:about|on|regarding)",
    rf"(?:search|check|look in|look through) (?:the |your |our )?{_DOCS} (?:for|about|on)",
    rf"(?:search|check|look in|look through) (?:the |your |our )?{_DOCS}",
    r"search (?:for|about)",
    r"search",
    r"look up",
    r"lookup",
    r"look for",
    r"look into",
    r"find out(?: about)?",
    r"find(?: me)?",
    r"google",
]
_THINK = [
    r"what(?:'s| is) your (?:deep |considered |honest |real |overall )?(?:view|take|opinion|thinking|thoughts) (?:on|about)",
    r"(?:give me |do )?(?:a )?deep dive (?:into|on)",
    r"think (?:hard |carefully |deeply )?(?:about|through|over)",
    r"explain in (?:depth|detail)",
    r"explain",  # a think job only with "in depth"/"in detail"/"thoroughly" in its argument
    r"reflect on",
    r"ponder",
]
_CODE = [
    r"run (?:this |the |some |my )?(?:python )?code",
    r"execute (?:this |the |some |my )?(?:python )?code",
    r"run this",
    r"calculate",
    r"compute",
    r"work out",
    r"figure out",
    r"evaluate",
]
_TRIGGER_RE = re.compile(
    "|".join(
        f"{_LEAD}(?P<{kind}{n}>{pattern})\\b"
        for kind, patterns in (("search", _SEARCH), ("think", _THINK), ("code", _CODE))
        for n, pattern in enumerate(patterns)
    )
)
_IN_DEPTH_RE = re.compile(r"\b(?:in (?:depth|detail)|thoroughly|carefully|deeply)\b")
_CONNECTIVE_TAIL_RE = re.compile(
    r"(?:[\s,.;:!?]|\b(?:and|then|also|and then|and also|too|as well|please|for me|for us|thanks|thank you|"
    r"in the (?:docs|documents|documentation)|right now|now|quickly|can you|could you|would you)\b)+$",
    re.IGNORECASE,
)
_MATH_LEAD_RE = re.compile(
    r"(?:\band|\bthen|\balso|,|\b(?P<verb>calculate|compute|work out|figure out|evaluate))$"
)
_QUERY_HEAD_RE = re.compile(r"^(?:[\s,:]|\b(?:for|about|on|up|me|us|please|out|what)\b)+", re.IGNORECASE)
_CONNECTIVE_HEAD_RE = re.compile(r"^(?:[\s,:;]|\b(?:and|then|also|please|that|this)\b)+", re.IGNORECASE)


def _clean_tail(text: str) -> str:
    return _CONNECTIVE_TAIL_RE.sub("", text.strip()).strip()


class RuleToolRouter:
    """Keyword rules; cheap (tens of microseconds) so it can run on every final transcript."""

    def __init__(self, *, search_k: int = 3, think_max_tokens: int = 200, max_jobs: int = 3) -> None:
        self.search_k = search_k
        self.think_max_tokens = think_max_tokens
        self.max_jobs = max_jobs

    def route(self, text: str) -> list[Route]:
        if not text or not text.strip() or is_cancel_request(text):
            return []
        low = text.lower() if len(text.lower()) == len(text) else text
        triggers = []
        for match in _TRIGGER_RE.finditer(low):
            group = match.lastgroup or ""
            # the group is the trigger phrase proper, without its lead-in ("can you", "and")
            triggers.append((group.rstrip("0123456789"), match.start(group), match.end(group)))
        # From the last trigger back, as each one's argument runs to the next cut. A code verb
        # with nothing to compute ("look up how to calculate risk") is no cut: its words stay
        # in the request before it.
        found: list[list[Route]] = []
        stop = len(text)
        for kind, start, end in reversed(triggers):
            arg = text[end:stop]
            if kind == "search":
                found.append(self._search(arg))
            elif kind == "code":
                code = self._run_code(text[start:end], arg)
                if not code:
                    continue
                found.append(code)
            elif kind == "think":
                found.append(self._think(text[start:stop]))
            stop = start
        # Text before the first cut (or all of it): bare arithmetic is a code job.
        routes = [self._code(span.code) for span in find_math(text[:stop])]
        for routed in reversed(found):
            routes += routed
        return routes[: self.max_jobs]

    # ------------------------------------------------------------------ per kind
    def _code(self, code: str) -> Route:
        return ("code", {"code": code}, True)

    def _search(self, arg: str) -> list[Route]:
        out: list[Route] = []
        # "look up the hours and 17 times 23": arithmetic after a connective is its own job, and
        # so is arithmetic after a code verb whose lead-in was misheard ("they calculate 17 ...")
        for span in find_math(arg):
            before = arg[: span.start].rstrip()
            lead = _MATH_LEAD_RE.search(before.lower())
            if lead:
                out.append(self._code(span.code))
                arg = before[: lead.start()] if lead.group("verb") else before
                break
        query = _QUERY_HEAD_RE.sub("", _clean_tail(arg)).strip(" ?.!,")
        if query and re.search(r"\w", query):
            out.insert(0, ("search", {"query": query, "k": self.search_k}, True))
        return out

    def _run_code(self, trigger: str, arg: str) -> list[Route]:
        spans = find_math(arg)
        if spans:
            return [self._code(span.code) for span in spans]
        if "code" not in trigger.lower() and "run this" not in trigger.lower():
            return []  # "calculate the risk": nothing to compute
        source = _CONNECTIVE_HEAD_RE.sub("", arg.strip()).strip().lstrip(":").strip()
        if not source:
            return []
        try:
            compile(source, "<spoken>", "exec")  # spoken code must at least be Python
        except (SyntaxError, ValueError):
            return []
        return [self._code(source)]

    def _think(self, clause: str) -> list[Route]:
        clause = _clean_tail(clause)
        low = clause.lower()
        if low.startswith("explain") and not low.startswith("explain in"):
            if not _IN_DEPTH_RE.search(low):
                return []  # a plain "explain" is for the live responder
        if len(clause.split()) < 3:
            return []
        prompt = clause[0].upper() + clause[1:]
        if not prompt.endswith(("?", ".", "!")):
            prompt += "?" if low.startswith(("what", "how", "why", "should", "is", "do")) else "."
        args = {
            "prompt": prompt,
            "system": "You answer on a phone call. Give your considered view in two or three short "
            "spoken sentences, no lists, no markdown.",
            "max_tokens": self.think_max_tokens,
        }
        return [("think", args, False)]


__all__ = ["MathSpan", "Route", "RuleToolRouter", "ToolRouter", "find_math", "is_cancel_request"]
