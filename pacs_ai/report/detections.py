"""A detector's findings in drafts: the template's sentences and the guardrail that counts them.

A detection model (``lung_nodule_ct_detection``) reports located boxes; the
evidence (:mod:`pacs_ai.report.evidence`) holds each box as a present
:class:`~pacs_ai.report.evidence.Finding` of kind ``"detection"`` with its
score, its size (the box's largest extent, mm) and its site ("right lung"),
and, only where the profile asks (``report_absent``), a class the model found
none of as an absent one.

* :func:`pacs_ai.report.drafters.template.detection_lines` words them for the template drafter: "2 pulmonary
  nodules detected by Lung nodule CT detection, largest 12.0 mm in the right
  lung." and one sentence per nodule with its site, size and score; with
  nothing found and the profile asking, "No pulmonary nodules detected by ...".
* :func:`check_detections` is the guardrail that a draft neither invents nor
  drops a detection: a count stated for a detected term ("3 nodules", "two
  pulmonary nodules") must be the number of boxes, and a draft that states no
  such count must give every box's size.  Sizes, scores and sides are checked
  as every other value (:mod:`pacs_ai.report.guardrails`), and a nodule the
  evidence does not have is an unsupported or negated finding there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pacs_ai.report.evidence import Evidence, Finding
from pacs_ai.report.text import find_mentions, find_numbers
from pacs_ai.report.violations import Violation
from pacs_ai.report.vocabulary import plural_forms, term_patterns

#: Count words a draft may use instead of digits.
NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        (
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        )
    )
}
#: A count before a finding term, with at most two words between ("3 small pulmonary nodules").
_COUNT_BEFORE = re.compile(
    r"(?<![\w.,\-])(?P<count>\d+|" + "|".join(NUMBER_WORDS) + r")\s+(?:[A-Za-z][A-Za-z-]*\s+){0,2}$",
    re.IGNORECASE,
)
#: How far before a term a count is looked for (characters).
_COUNT_REACH = 60


@dataclass(frozen=True)
class CountStatement:
    """A number a draft states of a detected finding ("3 pulmonary nodules")."""

    term: str
    value: int
    #: Offset of the count in the text (as :class:`~pacs_ai.report.text.NumberMention` ``start``).
    start: int
    sentence: str


def detected_by_term(evidence: Evidence) -> dict[str, list[Finding]]:
    """Detection findings by term: each term a detector assessed, with its boxes (empty: none found)."""
    terms: dict[str, list[Finding]] = {}
    for f in evidence.findings:
        if f.kind == "detection":
            terms.setdefault(f.term, [])
            if f.present:
                terms[f.term].append(f)
    return terms


def count_statements(text: str, evidence: Evidence) -> list[CountStatement]:
    """Counts a draft states of the terms a detector assessed (a number with a unit is a size, no count)."""
    terms = detected_by_term(evidence)
    if not terms:
        return []
    with_unit = {n.start for n in find_numbers(text) if n.unit is not None}
    counts = []
    for mention in find_mentions(text, term_patterns(set(terms))):
        if mention.term not in terms or mention.negated:
            continue
        reach = max(0, mention.start - _COUNT_REACH)
        match = _COUNT_BEFORE.search(text, reach, mention.start)
        if match is None or match.start("count") in with_unit:
            continue
        word = match.group("count").lower()
        value = int(word) if word.isdigit() else NUMBER_WORDS[word]
        counts.append(CountStatement(mention.term, value, match.start("count"), mention.sentence))
    return counts


def check_detections(text: str, evidence: Evidence) -> list[Violation]:
    """A draft states as many boxes of each detected term as the detector found, and drops none."""
    terms = detected_by_term(evidence)
    if not terms:
        return []
    counts = count_statements(text, evidence)
    violations = []
    for count in counts:
        found = terms[count.term]
        if count.value != len(found):
            violations.append(
                Violation(
                    "detections",
                    f"{count.sentence!r} states {count.value} {_noun(count.term, count.value)}; "
                    f"the evidence has {len(found)}{_by(terms[count.term])}",
                )
            )
    sizes = [n for n in find_numbers(text) if n.unit == "mm"]
    for term, found in terms.items():
        if not found or any(c.term == term for c in counts):  # a wrong count is reported above
            continue
        # No count: each box must be there with its size (each size stated accounts for one box).
        left = sorted(f.size_mm for f in found if f.size_mm is not None)
        for size in sizes:
            match = next((s for s in left if abs(s - size.value) <= size.tolerance + 1e-9), None)
            if match is not None:
                left.remove(match)
        if left or len(found) > sum(1 for f in found if f.size_mm is not None):
            accounted = len(found) - len(left)
            violations.append(
                Violation(
                    "detections",
                    f"the draft accounts for {accounted} of the {len(found)} {plural(term)} detected"
                    f"{_by(found, ' ')}: state their number or each one's size",
                )
            )
    return violations


def _by(found: list[Finding], joiner: str = ", ") -> str:
    models = sorted({f.model for f in found if f.model})
    return f"{joiner}by {', '.join(models)}" if models else ""


def _noun(term: str, count: int) -> str:
    return term if count == 1 else plural(term)


def plural(term: str) -> str:
    forms = plural_forms(term)
    return forms[-1]


def detection_noun(f: Finding, count: int) -> str:
    """ "pulmonary nodule(s)" for nodules, else the finding's own name in lower case."""
    name = "pulmonary nodule" if f.term == "nodule" else f.name.replace("_", " ").lower()
    return plural(name) if count != 1 else name
