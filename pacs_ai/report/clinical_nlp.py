"""Reading report text with medspaCy: what each sentence claims about each concept.

A report sentence is read into :class:`Claim` records, one per concept it
names: present or ruled out, certain or hedged, historical or hypothetical
(medspaCy's ConText, with its default rules and the radiology rules of
``data/radiology_context.yaml``), and the words near the concept that qualify
it: side (left, right, both), lung zone (upper, middle, lower), size or
severity (an ordinal level), time (new, worse, better, stable, chronic, acute)
and the numbers with units bound to it.  Concepts come from the vocabulary
(:mod:`pacs_ai.report.vocabulary`) through medspaCy's target matcher;
statements that rule concepts out without naming them ("the lungs are clear",
"heart size is normal") are read as the negation of those concepts.

Everything runs on ``spacy.blank("en")`` with spaCy's rule-based
sentencizer: no model is downloaded or loaded.  The pipeline is built once
per process (:func:`pipeline`); building it takes about a second.

Qualifiers are read in a window around the concept: from the previous
boundary (a comma, "and", "or", "with", another concept) to the next one, so
"small right pleural effusion and large left pneumothorax" gives the effusion
"small, right" and the pneumothorax "large, left".
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

from pacs_ai.report.text import NumberMention, find_numbers
from pacs_ai.report.vocabulary import plural_forms, vocabulary

if TYPE_CHECKING:
    from medspacy.context import ConTextRule
    from medspacy.target_matcher import TargetRule
    from spacy.language import Language
    from spacy.matcher import PhraseMatcher
    from spacy.tokens import Doc, Span

CONTEXT_FILE = "radiology_context.yaml"
#: Label prefix of the target rules for normal statements ("NORMAL:3" is the fourth statement).
NORMAL_LABEL = "NORMAL:"
#: Tokens that end the window in which a concept's qualifiers are read.
WINDOW_BOUNDARIES = frozenset(
    {",", ";", ":", "and", "or", "with", "but", "which", "without", "while", "whereas", "nor", "."}
)
#: "2." or "2)" opening a numbered item of a list, anywhere in the text ("1. No effusion. 2. Stable.").
_LIST_MARKER = re.compile(r"\d{1,2}[.)](?:\s|$)")
#: A comma-separated tail this short and naming no concept still qualifies the concept before it.
TRAILING_QUALIFIER_TOKENS = 3
#: Report sections the sectionizer recognises (title words -> section).
SECTION_TITLES = {
    "findings": ("findings", "finding", "report", "description"),
    "impression": ("impression", "impressions", "conclusion", "conclusions", "opinion", "summary"),
    "indication": ("indication", "indications", "clinical history", "history", "reason for exam"),
    "comparison": ("comparison", "comparisons"),
    "technique": ("technique", "examination", "exam"),
}


@dataclass(frozen=True)
class Claim:
    """What one mention of a concept in a report says."""

    concept: str
    #: The words as written.
    text: str
    sentence: str
    present: bool
    uncertain: bool = False
    historical: bool = False
    hypothetical: bool = False
    #: "left", "right", "both"; empty when no side word qualifies it.
    sides: frozenset[str] = frozenset()
    #: "upper", "middle", "lower".
    zones: frozenset[str] = frozenset()
    #: Ordinal size/severity levels (1 trace ... 4 large); empty when none is stated.
    severity: frozenset[int] = frozenset()
    #: "new", "worse", "better", "stable", "chronic", "acute".
    time: frozenset[str] = frozenset()
    numbers: tuple[NumberMention, ...] = ()
    #: Side words anywhere in the sentence ("left", "right", "both").
    sentence_sides: frozenset[str] = frozenset()
    #: Read from a normal statement ("the lungs are clear"), not from the concept's own name.
    normal: bool = False
    #: Offset in the text.
    start: int = 0

    @property
    def asserted(self) -> bool:
        """Present now: not negated, not only history, not a hypothesis."""
        return self.present and not self.historical and not self.hypothetical

    @property
    def side_set(self) -> frozenset[str]:
        """The sides as left/right ("both" is both)."""
        if "both" in self.sides:
            return frozenset({"left", "right"})
        return self.sides


@dataclass(frozen=True)
class TextReading:
    """Every claim of a text, and the numbers no concept in their sentence takes."""

    claims: tuple[Claim, ...]
    loose_numbers: tuple[NumberMention, ...]
    #: Numbers written without a unit (list markers such as "2." before a sentence are not numbers).
    unitless: tuple[NumberMention, ...] = ()


@cache
def context_data() -> dict[str, Any]:
    """ConText rules, normal statements and qualifier words of ``data/radiology_context.yaml``."""
    text = resources.files("pacs_ai.report").joinpath("data", CONTEXT_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


# medspaCy and spaCy are imported where the pipeline is built (once per process), not with this
# module: importing medspaCy takes seconds (PyRuSH, QuickUMLS), and the command line and the
# workers import the guardrails without always reading text.


def _target_rules() -> list[TargetRule]:
    from medspacy.target_matcher import TargetRule

    rules = []
    for concept in vocabulary().concepts.values():
        forms = dict.fromkeys(form for synonym in concept.synonyms for form in plural_forms(synonym))
        rules += [TargetRule(form, concept.name) for form in forms]
    for index, statement in enumerate(context_data()["normal_statements"]):
        rules.append(
            TargetRule(f"normal statement {index}", f"{NORMAL_LABEL}{index}", pattern=statement["pattern"])
        )
    return rules


def _context_rules() -> list[ConTextRule]:
    from medspacy.context import ConTextRule

    rules = []
    for category, by_direction in context_data()["context_rules"].items():
        for direction, literals in by_direction.items():
            rules += [ConTextRule(str(literal), category, direction=direction) for literal in literals]
    return rules


def _qualifier_matcher(nlp: Language) -> PhraseMatcher:
    from spacy.matcher import PhraseMatcher

    matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
    data = context_data()
    for group in ("sides", "zones", "severity", "time"):
        for value, phrases in data[group].items():
            matcher.add(f"{group}:{value}", [nlp.make_doc(str(p)) for p in phrases])
    return matcher


@cache
def pipeline() -> Language:
    """spaCy blank English + sentencizer + medspaCy target matcher, ConText and sectionizer (built once)."""
    import medspacy  # noqa: F401  (registers the medspacy_* pipeline factories)
    import spacy
    from medspacy.context import ConText, ConTextRule
    from medspacy.section_detection import Sectionizer, SectionRule
    from medspacy.target_matcher import TargetMatcher

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    matcher: TargetMatcher = nlp.add_pipe("medspacy_target_matcher")  # type: ignore[assignment]
    matcher.add(_target_rules())
    context: ConText = nlp.add_pipe("medspacy_context", config={"rules": None})  # type: ignore[assignment]
    dropped = set(context_data().get("dropped_default_rules") or [])
    defaults = ConTextRule.from_json(context.DEFAULT_RULES_FILEPATH)
    context.add([rule for rule in defaults if rule.literal not in dropped] + _context_rules())
    sectionizer: Sectionizer = nlp.add_pipe("medspacy_sectionizer", config={"rules": None})  # type: ignore[assignment]
    # Literal titles: "FINDINGS:" is the tokens "findings" ":" whatever its case.
    sectionizer.add(
        [SectionRule(f"{title}:", section) for section, titles in SECTION_TITLES.items() for title in titles]
    )
    return nlp


def _parse(text: str) -> Doc:
    """``text`` through the pipeline.

    medspaCy's matchers each hold a spaCy Matcher that warns on every call while it has no token
    patterns (the sectionizer's and ConText's literal rules use the phrase matcher): nothing is wrong.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\[W036\] The component 'matcher'", category=UserWarning)
        return pipeline()(text)


@cache
def _qualifiers() -> PhraseMatcher:
    return _qualifier_matcher(pipeline())


def _window(doc: Doc, ent: Span, ents: list[Span]) -> tuple[int, int]:
    """Token range around ``ent`` in which its qualifiers are read (see the module docstring)."""
    sentence = ent.sent
    start = ent.start
    while start > sentence.start and doc[start - 1].lower_ not in WINDOW_BOUNDARIES:
        start -= 1
    end = ent.end
    while end < sentence.end and doc[end].lower_ not in WINDOW_BOUNDARIES:
        end += 1
    # "..., unchanged." / "..., chronic": a short tail after a comma with no other concept qualifies this one.
    if end < sentence.end and doc[end].text == ",":
        tail = end + 1
        while tail < sentence.end and doc[tail].lower_ not in WINDOW_BOUNDARIES:
            tail += 1
        if tail - end - 1 <= TRAILING_QUALIFIER_TOKENS and not any(end < o.start < tail for o in ents):
            end = tail
    for other in ents:
        if other is ent or other.sent != sentence:
            continue
        if other.end <= ent.start:
            start = max(start, other.end)
        elif other.start >= ent.end:
            end = min(end, other.start)
    return start, end


def _qualify(matches: list[tuple[str, int, int]], start: int, end: int) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"sides": set(), "zones": set(), "severity": set(), "time": set()}
    for label, m_start, m_end in matches:
        if m_start >= start and m_end <= end:
            group, _, value = label.partition(":")
            found[group].add(value)
    # Side words inside a time phrase ("again seen on the right") stay side words; "left and right" is both.
    sides = found["sides"]
    if {"left", "right"} <= sides:
        sides -= {"left", "right"}
        sides.add("both")
    return found


def _longest(matches: Iterable[tuple[int, int, int]], vocab: Any) -> list[tuple[str, int, int]]:
    """Phrase matches, less those inside a longer one of their group ("no change in" over "no change")."""
    spans = sorted(((vocab.strings[m], s, e) for m, s, e in matches), key=lambda x: (x[1], -(x[2] - x[1])))
    kept: list[tuple[str, int, int]] = []
    for label, start, end in spans:
        group = label.partition(":")[0]
        if any(k[0].partition(":")[0] == group and k[1] <= start and end <= k[2] for k in kept):
            continue
        kept.append((label, start, end))
    return kept


def read_text(text: str) -> TextReading:
    """Every :class:`Claim` of ``text`` (findings or impression), and the numbers bound to no concept."""
    nlp = pipeline()
    doc = _parse(text)
    ents = list(doc.ents)
    matches = _longest(_qualifiers()(doc), nlp.vocab)
    found = find_numbers(text)
    numbers = [n for n in found if n.unit is not None]
    unitless = tuple(n for n in found if n.unit is None and not _LIST_MARKER.match(text, n.start))
    statements = context_data()["normal_statements"]
    claims: list[Claim] = []
    bound: set[int] = set()
    for ent in ents:
        start, end = _window(doc, ent, ents)
        qualifiers = _qualify(matches, start, end)
        char_start, char_end = doc[start:end].start_char, doc[start:end].end_char
        mine = [n for n in numbers if char_start <= n.start < char_end]
        bound |= {id(n) for n in mine}
        in_sentence = _qualify(matches, ent.sent.start, ent.sent.end)["sides"]
        common: dict[str, Any] = {
            "sentence_sides": frozenset(in_sentence),
            "text": ent.text,
            "sentence": ent.sent.text.strip(),
            "uncertain": bool(ent._.is_uncertain),
            "historical": bool(ent._.is_historical),
            "hypothetical": bool(ent._.is_hypothetical or ent._.is_family),
            "start": ent.start_char,
        }
        if ent.label_.startswith(NORMAL_LABEL):
            # A normal statement rules its concepts out whatever trigger words its own text holds
            # ("lungs are without focal consolidation").
            negated_concepts = statements[int(ent.label_[len(NORMAL_LABEL) :])]["negates"]
            claims += [
                Claim(concept=concept, present=False, normal=True, **common) for concept in negated_concepts
            ]
            continue
        claims.append(
            Claim(
                concept=ent.label_,
                present=not ent._.is_negated,
                sides=frozenset(qualifiers["sides"]),
                zones=frozenset(qualifiers["zones"]),
                severity=frozenset(int(level) for level in qualifiers["severity"]),
                time=frozenset(qualifiers["time"]),
                numbers=tuple(mine),
                **common,
            )
        )
    loose = tuple(n for n in numbers if id(n) not in bound)
    return TextReading(tuple(claims), loose, unitless)


def split_sections(text: str) -> dict[str, str]:
    """The sections of a whole report by title ("FINDINGS:", "IMPRESSION:", ...), via medspaCy's sectionizer.

    Text before the first title is under "" (a report without titles is all "").
    """
    doc = _parse(text)
    sections: dict[str, str] = {}
    for section in doc._.sections:
        body = doc[section.body_start : section.body_end].text.strip()
        name = section.category or ""
        if body:
            sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
    return sections
