"""Reading report text: sentences, finding mentions with negation and side, numbers with units.

Pure functions over strings, shared by the guardrails (which read drafts) and
the findings-to-impression task (which reads a findings section as evidence).

Negation follows NegEx (Chapman et al., J Biomed Inform 2001): a finding is
negated when a negation trigger ("no", "without", "negative for", ...) stands
before it in the same sentence with no scope terminator ("but", "however",
"which", ...) in between and at most :data:`NEGATION_SCOPE_WORDS` words away, or
a post-trigger ("... is not seen", "... has resolved") follows it closely.
Pseudo-negations ("no change", "cannot be excluded") are masked first, so
"pneumothorax cannot be excluded" counts as an assertion, which is the safe
reading for a guardrail.  Known limits: no coordination parsing beyond the
terminators, no double negation; what the rules cannot read they read as an
assertion, so errors make the guardrails stricter, not looser.

Numbers must carry a unit (see :data:`UNITS`); a number glued to letters
("Perc15", "LAA-950", "15th", "T4") is part of a name, not a value.
Probabilities are written as percentages.  Each number keeps the side it is
stated for and the words of its clause before it (:attr:`NumberMention.lead`),
where the guardrails look for the measurement it is given for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Words after a negation trigger that it still covers (NegEx uses 5; one more lets lists like
#: "no focal consolidation, pleural effusion or pneumothorax" be covered to their end).
NEGATION_SCOPE_WORDS = 6
#: A side word at most this many words before a finding term is its side ("right lower lobe opacity").
SIDE_WORDS_BEFORE = 3
#: ... or at most this many words after it ("effusion at the right base").
SIDE_WORDS_AFTER = 3
#: A side word at most this many words after a number governs it ("7.5 mm nodule in the left lung").
SIDE_WORDS_AFTER_NUMBER = 6
#: Where the phrase after a number ends: punctuation, a conjunction or a clause word.
_CLAUSE_END = re.compile(
    r"[,;:()]|\b(?:and|or|but|however|although|though|whereas|while|compared|versus|vs)\b", re.IGNORECASE
)
#: A post-negation trigger at most this many words after the term negates it.
POST_NEGATION_WORDS = 4

_FLAGS = re.IGNORECASE

PSEUDO_NEGATIONS = re.compile(
    r"\b(?:no\s+(?:significant\s+|interval\s+|appreciable\s+)?(?:change|increase|decrease)"
    r"|not\s+only|not\s+(?:certainly|necessarily)"
    r"|can\s*not\s+(?:be\s+)?(?:excluded|ruled\s+out|exclude)|cannot\s+rule\s+out"
    r"|not\s+(?:be\s+|been\s+)?(?:excluded|ruled\s+out)|without\s+change)\b",
    _FLAGS,
)
PRE_NEGATIONS = re.compile(
    r"\b(?:(?:no|without)\s+(?:(?:radiographic|definite|convincing)\s+)?(?:evidence|signs?)\s+(?:of|for)"
    r"|no|not|without|nor|neither|absence\s+of|absent|negative\s+for|free\s+of|clear\s+of"
    r"|rules?\s+out|ruled\s+out|resolution\s+of|resolved)\b",
    _FLAGS,
)
POST_NEGATIONS = re.compile(
    r"\b(?:(?:is|are|was|were|has|have)\s+)?(?:been\s+)?(?:"
    r"not\s+(?:seen|identified|detected|present|visible|demonstrated|evident|appreciated|noted)"
    r"|absent|resolved|excluded|ruled\s+out|no\s+longer\s+(?:seen|present|visible))\b",
    _FLAGS,
)
TERMINATORS = re.compile(
    r"\b(?:but|however|although|though|except|apart\s+from|aside\s+from|yet|which|whereas|while"
    r"|and\s+(?:there|the|a|an)|otherwise)\b|[;]",
    _FLAGS,
)
SIDE_WORDS = re.compile(
    r"(?<![\w-])(?P<side>left|right|bilateral(?:ly)?|both|bibasilar|bibasal|biapical|total|combined)"
    r"(?:[\s-]sided)?(?![\w])",
    _FLAGS,
)
_WORD = re.compile(r"\w+")


def side_of(word: str) -> str:
    """ "left", "right" or "both" for a side word ("Bilateral", "right-sided", "total" -> both)."""
    word = word.lower().split("-")[0].split()[0]
    return word if word in ("left", "right") else "both"


def side_in_name(name: str | None) -> str | None:
    """The side a site or finding name states ("Left lung" -> left, "Lung" -> None)."""
    if not name:
        return None
    sides = {side_of(m.group("side")) for m in SIDE_WORDS.finditer(name)}
    return sides.pop() if len(sides) == 1 else ("both" if sides else None)


@dataclass(frozen=True)
class Sentence:
    text: str
    start: int


def sentences(text: str) -> list[Sentence]:
    """Sentences with their offsets: split after ".", "!" or "?" before white space, and at line breaks."""
    result: list[Sentence] = []
    position = 0
    for separator in re.finditer(r"(?<=[.!?])\s+|\n+", text):
        if text[position : separator.start()].strip():
            result.append(Sentence(text[position : separator.start()], position))
        position = separator.end()
    if text[position:].strip():
        result.append(Sentence(text[position:], position))
    return result


def _mask(text: str, pattern: re.Pattern[str]) -> str:
    """``text`` with the matches of ``pattern`` replaced by spaces (offsets are kept)."""
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


def _words_between(text: str, start: int, end: int) -> int:
    return len(_WORD.findall(text[start:end]))


@dataclass(frozen=True)
class Mention:
    """A finding term as it occurs in a sentence."""

    term: str
    #: The words as written.
    text: str
    negated: bool
    #: "left", "right", "both" or None when no side word is close.
    side: str | None
    sentence: str
    #: Offset in the whole text.
    start: int


def _is_negated(masked: str, start: int, end: int) -> bool:
    for trigger in PRE_NEGATIONS.finditer(masked, 0, start):
        between = masked[trigger.end() : start]
        if (
            not TERMINATORS.search(between)
            and _words_between(masked, trigger.end(), start) <= NEGATION_SCOPE_WORDS
        ):
            return True
    after = masked[end:]
    window_end = len(after)
    for index, word in enumerate(_WORD.finditer(after)):
        if index == POST_NEGATION_WORDS + 1:
            window_end = word.start()
            break
    window = after[:window_end]
    terminator = TERMINATORS.search(window)
    if terminator:
        window = window[: terminator.start()]
    # A post-trigger may follow a few words after the term ("pneumothorax on the left is not seen").
    return POST_NEGATIONS.search(window) is not None


def _side_near(masked: str, start: int, end: int, others: list[tuple[int, int]]) -> str | None:
    best: tuple[int, str] | None = None
    for match in SIDE_WORDS.finditer(masked):
        if match.end() <= start:
            gap, span = _words_between(masked, match.end(), start), (match.end(), start)
            limit = SIDE_WORDS_BEFORE
        elif match.start() >= end:
            gap, span = _words_between(masked, end, match.start()), (end, match.start())
            limit = SIDE_WORDS_AFTER
        else:
            continue
        crosses = TERMINATORS.search(masked, span[0], span[1]) or any(
            span[0] <= o_start < span[1] for o_start, _ in others
        )
        if gap <= limit and not crosses and (best is None or gap < best[0]):
            best = (gap, side_of(match.group("side")))
    return best[1] if best else None


def find_mentions(text: str, patterns: Mapping[str, re.Pattern[str]]) -> list[Mention]:
    """Every finding term of ``patterns`` in ``text``, longest match first, with negation and side."""
    mentions: list[Mention] = []
    for sentence in sentences(text):
        masked = _mask(sentence.text, PSEUDO_NEGATIONS)
        found: list[tuple[int, int, str]] = []
        for term, pattern in patterns.items():
            found += [(m.start(), m.end(), term) for m in pattern.finditer(masked)]
        # Longest first; a shorter match inside a longer one ("effusion" in "pleural effusion") is dropped.
        found.sort(key=lambda item: (-(item[1] - item[0]), item[0]))
        kept: list[tuple[int, int, str]] = []
        for start, end, term in found:
            if all(end <= k_start or start >= k_end for k_start, k_end, _ in kept):
                kept.append((start, end, term))
        kept.sort()
        spans = [(s, e) for s, e, _ in kept]
        for start, end, term in kept:
            others = [span for span in spans if span != (start, end)]
            mentions.append(
                Mention(
                    term=term,
                    text=sentence.text[start:end],
                    negated=_is_negated(masked, start, end),
                    side=_side_near(masked, start, end, others),
                    sentence=sentence.text.strip(),
                    start=sentence.start + start,
                )
            )
    return mentions


# ------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------

#: (pattern, canonical unit, factor to the canonical unit).  Longer spellings first.
UNITS: tuple[tuple[str, str, float], ...] = (
    (r"-?years?-old|years?\s+old|years?|y/o|yo", "year", 1.0),
    (r"millilit(?:re|er)s?|mL|ml|cc|cm3|cm³|cm\^3", "mL", 1.0),
    (r"lit(?:re|er)s?|L", "mL", 1000.0),
    (r"Hounsfield\s+units?|HU", "HU", 1.0),
    (r"%|percent|per\s+cent", "%", 1.0),
    (r"mm2|mm²|square\s+millimet(?:re|er)s?", "mm2", 1.0),
    (r"cm2|cm²", "mm2", 100.0),
    (r"mm|millimet(?:re|er)s?", "mm", 1.0),
    (r"cm|centimet(?:re|er)s?", "mm", 10.0),
)
#: UCUM codes of measurement units (as the analyzers record them) to the canonical unit and factor.
UCUM_UNITS: dict[str, tuple[str, float]] = {
    "mL": ("mL", 1.0),
    "ml": ("mL", 1.0),
    "L": ("mL", 1000.0),
    "cm3": ("mL", 1.0),
    "mm3": ("mL", 0.001),
    "[hnsf'U]": ("HU", 1.0),
    "%": ("%", 1.0),
    "mm": ("mm", 1.0),
    "cm": ("mm", 10.0),
    "mm2": ("mm2", 1.0),
    "cm2": ("mm2", 100.0),
    "a": ("year", 1.0),
}
#: How a canonical unit is printed in a draft.
DISPLAY_UNITS = {"mL": "mL", "HU": "HU", "%": "%", "mm": "mm", "mm2": "mm2", "year": "years"}

_NUMBER = r"(?<![\w.,\-−])(?P<sign>[-−](?=\d))?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?"
#: Numbered list markers at the start of a line ("1. ", "2) ") are not values.
_LIST_MARKER = re.compile(r"(?m)^[ \t]*\d{1,2}[.)](?=\s)")


def canonical_unit(ucum: str) -> tuple[str, float]:
    """(canonical unit, factor) of a UCUM unit code; an unknown code is its own canonical unit."""
    return UCUM_UNITS.get(ucum, (ucum, 1.0))


@dataclass(frozen=True)
class NumberMention:
    """A number in text with its unit, converted to the canonical unit."""

    text: str
    #: Value in the canonical unit.
    value: float
    #: Canonical unit, or None when the number has no unit.
    unit: str | None
    #: Half a unit in the last printed digit, in the canonical unit: what the printed precision claims.
    tolerance: float
    #: Side the number is stated for ("left", "right", "both") or None: the side word of the phrase
    #: after it in its clause ("7.5 mm in the left lung"), else the nearest one before it.
    side: str | None
    sentence: str
    start: int
    #: The words of its clause before it: from the previous number, comma, colon or semicolon of its
    #: sentence (or the sentence's start) up to the number ("Left lung: volume 411 mL, Perc15 -869 HU"
    #: gives " Perc15 " for -869 HU).  The guardrails read the measurement it names here.
    lead: str = ""


#: What ends the clause before a number (besides the previous number): a comma, colon or semicolon.
_LEAD_BOUNDARY = re.compile(r"[,;:]")


def _lead(sentence: str, number: re.Match[str], previous_end: int) -> str:
    """The words between the clause start (previous number or :data:`_LEAD_BOUNDARY`) and ``number``."""
    start = previous_end
    for boundary in _LEAD_BOUNDARY.finditer(sentence, previous_end, number.start()):
        start = boundary.end()
    return sentence[start : number.start()]


def _number_side(
    sentence: str, number: re.Match[str], numbers: list[re.Match[str]], claimed: set[int]
) -> str | None:
    """The side a number is stated for: the side of the phrase that governs it.

    A side word just after the number in its clause governs it ("12.0 mm in the
    right lung", "a 7.5 mm nodule in the left upper lobe") and is then no longer
    available to a later number; otherwise the nearest side word before it that
    no earlier number governs ("Left lung: 7.5 mm", "right lung nodule measures
    12.0 mm").  A clause ends at punctuation, a conjunction or the next number,
    so "12.0 mm in the right lung and 7.5 mm in the left lung" binds each value
    to its own lung.
    """
    later = [n.start() for n in numbers if n.start() >= number.end()]
    end = min([len(sentence), *later])
    boundary = _CLAUSE_END.search(sentence, number.end(), end)
    if boundary is not None:
        end = boundary.start()
    for word in SIDE_WORDS.finditer(sentence, number.end(), end):
        if _words_between(sentence, number.end(), word.start()) <= SIDE_WORDS_AFTER_NUMBER:
            claimed.add(word.start())
            return side_of(word.group("side"))
        break
    before = [m for m in SIDE_WORDS.finditer(sentence, 0, number.start()) if m.start() not in claimed]
    return side_of(before[-1].group("side")) if before else None


def _number_pattern(extra_units: Iterable[str]) -> tuple[re.Pattern[str], list[tuple[str, float]]]:
    units = list(UNITS) + [
        (re.escape(unit), unit, 1.0) for unit in sorted(set(extra_units), key=len, reverse=True)
    ]
    groups = "|".join(f"(?P<u{index}>{pattern})" for index, (pattern, _, _) in enumerate(units))
    pattern = re.compile(_NUMBER + rf"(?:[ \t]?(?:{groups})(?![\w%]))?(?![\w])", _FLAGS)
    return pattern, [(canonical, factor) for _, canonical, factor in units]


def find_numbers(text: str, extra_units: Iterable[str] = ()) -> list[NumberMention]:
    """Every number in ``text`` with its unit (if any) and the side it is stated for.

    ``extra_units`` are further unit strings to recognise literally (units of
    the evidence that :data:`UNITS` does not know).
    """
    pattern, canon = _number_pattern(extra_units)
    result: list[NumberMention] = []
    for sentence in sentences(_mask(text, _LIST_MARKER)):
        numbers = list(pattern.finditer(sentence.text))
        claimed: set[int] = set()  # side words a number after them governs ("7.5 mm in the left lung")
        previous_end = 0
        for match in numbers:
            digits = match.group("int").replace(",", "")
            fraction = match.group("frac") or ""
            value = float(f"{digits}.{fraction}" if fraction else digits)
            if match.group("sign"):
                value = -value
            unit, factor = None, 1.0
            for index, (canonical, unit_factor) in enumerate(canon):
                if match.group(f"u{index}") is not None:
                    unit, factor = canonical, unit_factor
                    break
            side = _number_side(sentence.text, match, numbers, claimed)
            result.append(
                NumberMention(
                    text=match.group(0),
                    value=value * factor,
                    unit=unit,
                    tolerance=0.5 * 10.0 ** (-len(fraction)) * factor,
                    side=side,
                    sentence=sentence.text.strip(),
                    start=sentence.start + match.start(),
                    lead=_lead(sentence.text, match, previous_end),
                )
            )
            previous_end = match.end()
    return result
