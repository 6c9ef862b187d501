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
"small, right" and the pneumothorax "large, left".  A short comma-separated
head or tail naming no other concept still belongs to the concept ("mild,
age-indeterminate wedge deformity"; "..., unchanged"), and concepts joined by
a slash share their window ("bibasilar atelectasis/airspace disease").  Time
words outside every concept's window ("new appearance of the chest", "stable
postoperative changes") are kept as the text's loose times.  Sentences end at
".", "!", "?" and at ".." or "..." (IU X-ray reports write "abnormality.. ").
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
#: Words just before a time word (within LOOSE_TIME_NEGATION_TOKENS) that rule it out ("no new ...").
LOOSE_TIME_NEGATIONS = frozenset({"no", "not", "without", "nothing", "none", "neither", "nor"})
LOOSE_TIME_NEGATION_TOKENS = 3
#: Time phrases that date something rather than say it changed ("related to recent pregnancy",
#: "improved since the prior study").
WHEN_NOT_WHAT = frozenset({"recent", "recently", "since the prior"})
#: Words that make a sentence a condition or a question rather than a statement about the patient.
CONDITIONAL_WORDS = frozenset({"if", "whether", "?"})
#: One side said to be the worse of the two: "right greater than left", "left worse than right".
_DOMINANT_SIDE = re.compile(
    r"\b(left|right)(?:[- ]sided)?\s+(?:greater|worse|more|larger)\s+than\s+(?:the\s+)?(left|right)\b",
    re.IGNORECASE,
)
#: "2." or "2)" opening a numbered item of a list, anywhere in the text ("1. No effusion. 2. Stable.").
_LIST_MARKER = re.compile(r"\d{1,2}[.)](?:\s|$)")
#: A comma-separated tail this short and naming no concept still qualifies the concept before it.
TRAILING_QUALIFIER_TOKENS = 3
#: Words that name nothing: left out of the words a concept's or side's phrase is compared by.
FUNCTION_WORDS = frozenset(
    re.split(
        r"\s+",
        "a an the of in on at to is are was were be been being there this that these those it its as by for "
        "from no not without any seen noted identified present demonstrated visualized evidence may might "
        "could can will would should which has have had also represent representing possible possibly "
        "probable probably likely suggest suggesting suggestive consistent compatible",
    )
)
#: A side pair ("left and right", "right or left"): both sides, whichever comes first.
_SIDE_PAIR_WORDS = frozenset({"and", "or", "&"})
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
    #: "left" or "right" when the sentence says one side is the worse ("right greater than left").
    dominant_side: str = ""
    #: Offset in the text.
    start: int = 0
    #: The other words of its phrase (window), lower case, singular, function words and its own words
    #: left out ("No XXXX infiltrates" -> {"xxxx"}): what tells this mention from others of its concept.
    words: frozenset[str] = frozenset()

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
class Mention:
    """A side or severity word and the words of its phrase ("prosthetic right shoulder", "nipple ring on
    left", "mild chronic changes")."""

    #: "sides", "severity" or "time".
    group: str
    #: "left", "right" or "both"; a severity level "1" ... "4"; a time value ("new", "stable", ...).
    value: str
    #: Content words of its phrase (see :func:`content_words`), the qualifier word left out.
    words: frozenset[str]
    sentence: str
    #: Inside the window of a concept of the vocabulary (then that concept's own checks cover it).
    in_concept: bool
    #: A time word ruled out ("no new ...") or in a condition or question: it states no course.
    ruled_out: bool = False

    @property
    def side_set(self) -> frozenset[str]:
        return frozenset({"left", "right"}) if self.value == "both" else frozenset({self.value})


@dataclass(frozen=True)
class TextReading:
    """Every claim of a text, and the numbers no concept in their sentence takes."""

    claims: tuple[Claim, ...]
    loose_numbers: tuple[NumberMention, ...]
    #: Numbers written without a unit (list markers such as "2." before a sentence are not numbers).
    unitless: tuple[NumberMention, ...] = ()
    #: Time words qualifying no concept ("new appearance of the chest", "stable postoperative changes"):
    #: (time value, sentence), less those ruled out ("no new ...") or in a conditional sentence.
    loose_times: tuple[tuple[str, str], ...] = ()
    #: Every side, severity and time word with its phrase (:func:`_mentions`).
    mentions: tuple[Mention, ...] = ()
    #: Every sentence, with whether it names a concept of the vocabulary (or makes a normal statement).
    sentences: tuple[tuple[str, bool], ...] = ()


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
        rules += [
            TargetRule(f"{concept.name} pattern {index}", concept.name, pattern=pattern)
            for index, pattern in enumerate(concept.patterns)
        ]
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
    from spacy.pipeline import Sentencizer

    nlp = spacy.blank("en")
    # ".." and "..." end a sentence as "." does ("No acute abnormality.. Small effusion."): spaCy keeps
    # them as one token, which its default punctuation list does not have.
    nlp.add_pipe("sentencizer", config={"punct_chars": [*Sentencizer.default_punct_chars, "..", "..."]})
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
    # "Mild, age-indeterminate wedge deformity": a short head before a comma with no other concept
    # qualifies this one (coordinate adjectives), as a short tail does below.
    if start > sentence.start and doc[start - 1].text == ",":
        head = start - 1
        while head > sentence.start and doc[head - 1].lower_ not in WINDOW_BOUNDARIES:
            head -= 1
        if start - 1 - head <= TRAILING_QUALIFIER_TOKENS and not any(head <= o.start < start for o in ents):
            start = head
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
    linked = _slash_linked(doc, ent, ents)
    if linked:
        # "atelectasis/airspace disease": either concept, qualified by the words around the pair.
        first, last = min(o.start for o in linked), max(o.end for o in linked)
        start = min(start, _window(doc, doc[first:last], [o for o in ents if o not in linked])[0])
        end = max(end, _window(doc, doc[first:last], [o for o in ents if o not in linked])[1])
    for other in ents:
        if other is ent or other.sent != sentence or other in linked:
            continue
        if other.end <= ent.start:
            start = max(start, other.end)
        elif other.start >= ent.end:
            end = min(end, other.start)
    return start, end


def _slash_linked(doc: Doc, ent: Span, ents: list[Span]) -> list[Span]:
    """The concepts joined to ``ent`` by slashes ("atelectasis/airspace disease"), ``ent`` included.

    Empty when there are none.
    """
    group = [ent]
    changed = True
    while changed:
        changed = False
        for other in ents:
            if other in group or other.sent != ent.sent:
                continue
            if any(
                (other.end + 1 == g.start and doc[other.end].text == "/")
                or (g.end + 1 == other.start and doc[g.end].text == "/")
                for g in group
            ):
                group.append(other)
                changed = True
    return group if len(group) > 1 else []


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


def content_words(text: str) -> frozenset[str]:
    """The words of ``text`` that name something: lower case, a plural "s" dropped, function words out.

    The de-identification's "XXXX" stays a word: it stands for one.
    """
    words = (w[:-1] if len(w) > 4 and w.endswith("s") else w for w in re.findall(r"[a-z]+", text.lower()))
    return frozenset(w for w in words if w not in FUNCTION_WORDS)


def _mentions(
    doc: Doc, matches: list[tuple[str, int, int]], windows: list[tuple[int, int]]
) -> tuple[Mention, ...]:
    """Each side, severity and time word with the words of its phrase: back to the previous boundary (or
    side or severity word) and on to the next one.  A time word reaches over "but" and other time words
    ("Heart size is upper limits of normal but stable": stable {heart, size, upper, limit, normal}); one
    ruled out ("no new ...") or in a condition or question is marked so.

    "Prosthetic right shoulder" gives right {prosthetic, shoulder}; "Clear right lung XXXX. In the left
    lower lobe ..." gives right {clear, lung, xxxx} and left {lower, lobe, ...}.  A side or size word may
    qualify a structure the vocabulary does not know (shoulder, nipple, quadrant, "chronic changes"); its
    phrase's words tell which.
    """
    found = []
    for group in ("sides", "severity", "time"):
        found += _group_mentions(doc, matches, windows, group)
    return tuple(found)


def _group_mentions(
    doc: Doc, matches: list[tuple[str, int, int]], windows: list[tuple[int, int]], group: str
) -> list[Mention]:
    sides = sorted(
        (s, e, label.partition(":")[2]) for label, s, e in matches if label.startswith(f"{group}:")
    )
    found = []
    boundaries = WINDOW_BOUNDARIES - {"but"} if group == "time" else WINDOW_BOUNDARIES
    for index, (start, end, side) in enumerate(sides):
        sentence = doc[start].sent
        before = start
        previous_end = sides[index - 1][1] if index and group != "time" else sentence.start
        while before > max(sentence.start, previous_end) and doc[before - 1].lower_ not in boundaries:
            before -= 1
        after = end
        next_start = sides[index + 1][0] if index + 1 < len(sides) and group != "time" else sentence.end
        while after < min(sentence.end, next_start) and doc[after].lower_ not in boundaries:
            after += 1
        if group == "sides" and _in_side_pair(doc, start, end, sides):
            continue
        # Qualifier words (new, chronic, large, ...) and the de-identification's "XXXX" tell no structure.
        qualifier_words = {doc[s:e].text.lower() for label, s, e in matches if not label.startswith("zones:")}
        words = content_words(f"{doc[before:start].text} {doc[end:after].text}") - qualifier_words - {"xxxx"}
        in_concept = any(w_start <= start and end <= w_end for w_start, w_end in windows)
        preceding = {t.lower_ for t in doc[max(sentence.start, start - LOOSE_TIME_NEGATION_TOKENS) : start]}
        ruled_out = group == "time" and bool(
            preceding & LOOSE_TIME_NEGATIONS
            or {t.lower_ for t in sentence} & CONDITIONAL_WORDS
            or doc[start:end].text.lower() in WHEN_NOT_WHAT
        )
        found.append(Mention(group, side, words, sentence.text.strip(), in_concept, ruled_out))
    return found


def _in_side_pair(doc: Doc, start: int, end: int, sides: list[tuple[int, int, str]]) -> bool:
    """Whether the side word at ``start:end`` is one of a pair naming both sides ("left and right")."""
    return any(
        (s == end + 1 and doc[end].lower_ in _SIDE_PAIR_WORDS)
        or (e + 1 == start and doc[start - 1].lower_ in _SIDE_PAIR_WORDS)
        for s, e, _ in sides
    )


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
        dominant = _DOMINANT_SIDE.search(ent.sent.text)
        common: dict[str, Any] = {
            "sentence_sides": frozenset(in_sentence),
            "dominant_side": (
                dominant.group(1).lower() if dominant and dominant.group(1) != dominant.group(2) else ""
            ),
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
        words = content_words(f"{doc[start : ent.start].text} {doc[ent.end : end].text}")
        claims.append(
            Claim(
                concept=ent.label_,
                words=words - content_words(ent.text),
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
    windows = [_window(doc, ent, ents) for ent in ents if not ent.label_.startswith(NORMAL_LABEL)]
    return TextReading(
        tuple(claims),
        loose,
        unitless,
        _loose_times(doc, ents, matches),
        _mentions(doc, matches, windows),
        tuple((sent.text.strip(), any(ent.sent == sent for ent in ents)) for sent in doc.sents),
    )


def _loose_times(
    doc: Doc, ents: list[Span], matches: list[tuple[str, int, int]]
) -> tuple[tuple[str, str], ...]:
    """Time words outside every concept's window: what a sentence says of the study as a whole.

    "New appearance of the chest" and "stable postoperative changes" name no concept of the vocabulary
    but still say whether something changed.  Ruled out ("no new ...", "without interval change" is a
    stable phrase of its own) or in a conditional sentence ("... to determine if this is a chronic
    appearance") they say nothing.
    """
    # A normal statement ("new normal chest") says nothing of a course: its time words stay loose.
    windows = [_window(doc, ent, ents) for ent in ents if not ent.label_.startswith(NORMAL_LABEL)]
    found = []
    for label, start, end in matches:
        group, _, value = label.partition(":")
        if group != "time" or any(w_start <= start and end <= w_end for w_start, w_end in windows):
            continue
        if doc[start:end].text.lower() in WHEN_NOT_WHAT:
            continue
        sentence = doc[start].sent
        before = {t.lower_ for t in doc[max(sentence.start, start - LOOSE_TIME_NEGATION_TOKENS) : start]}
        words = {t.lower_ for t in sentence}
        if before & LOOSE_TIME_NEGATIONS or words & CONDITIONAL_WORDS:
            continue
        found.append((value, sentence.text.strip()))
    return tuple(dict.fromkeys(found))


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
