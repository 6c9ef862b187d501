"""Comparing a draft with the report text it must stay within (findings -> impression).

Both texts are read into claims (:func:`pacs_ai.report.clinical_nlp.read_text`);
each claim of the draft must be supported by the evidence, which a careful
radiologist would check the same way:

* **presence and negation**: a concept the draft asserts must be asserted by
  the evidence, as itself or as a more specific concept (the draft may say
  "airspace opacity" for "consolidation", never "consolidation" for
  "opacity"); one the draft rules out must not be present in the evidence on
  that side, and must be ruled out there (itself or a broader concept: "the
  lungs are clear" rules out consolidation).  Umbrella statements ("no acute
  cardiopulmonary abnormality") may be negated unless the evidence has one of
  their concepts present and not stable or chronic; a diagnosis may be ruled
  out when the evidence rules out a finding it may follow from and asserts
  none ("no evidence of pneumonia" after "no focal consolidation");
* **diagnoses**: a diagnosis the vocabulary lets follow from a finding
  (pneumonia from consolidation or airspace opacity) is accepted only hedged
  ("may represent pneumonia") and on the finding's side;
* **laterality**: a side (left, right, bilateral) must be a side the evidence
  gives that concept; a bilateral finding must not become one-sided; side,
  zone and certainty must hold for one finding of the evidence together ("right
  upper lobe mass" and "possible mass on the left" do not make "left upper
  lobe mass"); a concept without a side in a sentence that names one side
  ("left 7th rib irregularity with pleural thickening") must not be a concept
  the evidence has on the other side only;
* **location**: a lung zone (upper, middle, lower; lobes, bases, apices) must be
  one the evidence gives (an evidence finding without one takes the one zone
  its sentence gives: "right basilar opacity, likely atelectasis");
* **severity**: a size or severity word must match the evidence's (trace and
  small are one step apart and both fine; small -> moderate or large is not);
* **certainty**: a definite statement needs a definite one in the evidence
  (possible -> definite is not allowed; the reverse is);
* **time**: new, worse, better, stable, chronic and acute must be what the
  evidence says (stable and chronic are compatible); a summary ("lung
  disease") and a sentence naming no concept ("new appearance of the chest")
  may not state a change (new, worse) the evidence does not have;
* **numbers**: a value with a unit must be one of the evidence's values at the
  printed precision, bound to the same concept (or a related one) and side.
* **phrases outside the vocabulary**: a side or size word qualifying what no
  concept names ("prosthetic left shoulder", "nipple ring on right", "large
  chronic changes") must be the side or size the findings give the phrase
  with the most words in common (two at least, or all of a shorter one);
  a concept asserted with the words of a phrase the findings rule out ("No
  XXXX infiltrates" -> "XXXX infiltrates") and of none they state it with is
  a negation; a hedged reading of a certain finding in the findings' own
  words ("rib deformities, possibly old fractures" -> "old fractures") stays
  hedged; a sentence naming no concept may not state what a findings
  sentence with all its words (two at least) rules out, or the reverse ("No
  displacement of the fissure" -> "Displacement of the fissure").

What the draft states and the evidence does not is reported as unsupported:
an impression adds nothing the findings lack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from pacs_ai.report.clinical_nlp import Claim, Mention, TextReading, content_words, read_text
from pacs_ai.report.text import DISPLAY_UNITS, NumberMention
from pacs_ai.report.violations import Check, Violation
from pacs_ai.report.vocabulary import ABNORMALITY, ACUTE_SUMMARY, Vocabulary, vocabulary

#: Severity levels that may stand for each other (trace ~ small).
SEVERITY_NEIGHBOURS = {1: {1, 2}, 2: {1, 2}, 3: {3}, 4: {4}}
#: Time words that may stand for each other.
TIME_COMPATIBLE = {
    "new": {"new", "acute"},
    "acute": {"acute", "new"},
    "worse": {"worse"},
    "better": {"better"},
    "stable": {"stable", "chronic"},
    "chronic": {"chronic", "stable"},
}
#: Time words that say something changed; summaries ("new lung disease") and sentences naming no concept
#: ("new appearance of the chest") are held to these.
CHANGE_TIMES = frozenset({"new", "worse"})
#: Evidence time words that support a statement of change.
CHANGED_EVIDENCE = frozenset({"new", "worse", "acute"})
#: The check a side, severity or time word of a phrase outside the vocabulary is reported under.
MENTION_CHECKS: dict[str, Check] = {"sides": "laterality", "severity": "severity", "time": "time"}
#: Time words that make an evidence finding not acute for "no acute ..." statements.
NOT_ACUTE_TIMES = frozenset({"stable", "chronic", "better"})


def _where(claim: Claim) -> str:
    return repr(claim.sentence)


def _describe(claims: Iterable[Claim]) -> str:
    parts = []
    for claim in claims:
        words = [claim.text]
        if claim.sides:
            words.insert(0, "/".join(sorted(claim.sides)))
        parts.append(" ".join(words) + (" (hedged)" if claim.uncertain else ""))
    return "; ".join(dict.fromkeys(parts)) or "nothing"


def _sides_compatible(draft: Claim, support: list[Claim]) -> bool:
    stated = {side for claim in support for side in claim.sides}
    if not draft.sides:
        return True
    if "both" in draft.sides:
        return "both" in stated or {"left", "right"} <= stated
    # One side: the evidence must have it on that side, and not only as a bilateral finding.
    return bool(draft.sides <= stated)


def _numbers_match(number: NumberMention, reference: NumberMention) -> bool:
    slack = 1e-9 * max(1.0, abs(number.value))
    tolerance = max(number.tolerance, reference.tolerance)
    return number.unit == reference.unit and abs(number.value - reference.value) <= tolerance + slack


def _fmt(number: NumberMention) -> str:
    return (
        f"{number.text}"
        if number.unit is None
        else f"{number.text} ({DISPLAY_UNITS.get(number.unit, number.unit)})"
    )


class Comparison:
    """The evidence's claims, indexed for checking the claims of drafts against them."""

    def __init__(self, evidence: TextReading, vocab: Vocabulary | None = None) -> None:
        self.vocab = vocab or vocabulary()
        self.evidence = evidence
        self.asserted = _inherit_sentence_zone(
            [_inherit_sentence_side(c) for c in evidence.claims if c.asserted]
        )
        self.negated = [c for c in evidence.claims if not c.present and not c.hypothetical]

    # -- what the evidence says about a concept -----------------------------------------------------------
    def _summary(self, name: str) -> bool:
        concept = self.vocab.concepts.get(name)
        return bool(concept and concept.summary)

    def _below(self, concept: str) -> frozenset[str]:
        return self.vocab.descendants(concept) | {concept}

    def support(self, draft: Claim) -> tuple[list[Claim], bool]:
        """Evidence asserting the draft's concept or a narrower one; True when only via a diagnosis rule."""
        below = self._below(draft.concept)
        direct = [c for c in self.asserted if c.concept in below]
        if direct:
            return direct, False
        # "fracture of the left clavicle" supports "left clavicle fracture": a broader concept whose
        # sentence has the words that make the draft's concept narrower.
        above = self.vocab.ancestors(draft.concept)
        spelled = [
            c
            for c in self.asserted
            if c.concept in above and _names_words(draft.concept, c.concept, c.sentence)
        ]
        if spelled:
            return spelled, False
        concept = self.vocab.concepts.get(draft.concept)
        sources: set[str] = set()
        for source in concept.may_follow_from if concept else ():
            sources |= self._below(source)
        return [c for c in self.asserted if c.concept in sources], True

    def ruled_out(self, draft: Claim) -> list[Claim]:
        """Evidence ruling out the draft's concept, a broader or a narrower one, on the draft's side.

        A narrower one counts: "no displaced rib fractures" lets an impression say "no displaced fractures".
        """
        above = self.vocab.ancestors(draft.concept) | self._below(draft.concept)
        return [
            c
            for c in self.negated
            if c.concept in above and (not c.side_set or not draft.side_set or draft.side_set <= c.side_set)
        ]

    def conflicting(self, draft: Claim) -> list[Claim]:
        """Evidence asserting (even hedged) what a draft rules out, or something narrower, on its side."""
        below = self._below(draft.concept)
        if draft.concept == ACUTE_SUMMARY or self._summary(draft.concept):
            # Hedged findings ("possible small effusions") are not held against "no acute abnormality".
            found = [
                c
                for c in self.asserted
                if c.concept in below and not (c.time & NOT_ACUTE_TIMES) and not c.uncertain
            ]
            if draft.concept == ABNORMALITY:
                found = [c for c in found if (self.vocab.concepts[c.concept].kind != "device")]
            return found
        return [
            c
            for c in self.asserted
            if c.concept in below and (not draft.side_set or not c.side_set or draft.side_set & c.side_set)
        ]

    # -- the checks ---------------------------------------------------------------------------------------
    def check_claim(self, draft: Claim) -> list[Violation]:
        if draft.hypothetical or draft.historical:
            return []
        if not draft.present:
            return self._check_negated(draft)
        return self._check_asserted(draft)

    def restates_negation(self, draft: Claim) -> bool:
        """The findings make the draft's negation themselves: the same concept ruled out with the same
        side, zone, size, time and certainty ("no masses or suspicious nodules" beside "calcified
        granulomas"; "the cardiomediastinal silhouette is normal" beside "aortic calcification").

        The findings then hold both the negation and whatever else they assert, so the draft's
        restating it does not contradict them.  A negation of wider scope than the findings' ("no
        effusion" where the findings say "no left effusion") is not a restatement.
        """
        return any(
            c.concept == draft.concept
            and c.normal == draft.normal
            and (c.sides, c.zones, c.severity, c.time, c.uncertain)
            == (draft.sides, draft.zones, draft.severity, draft.time, draft.uncertain)
            for c in self.negated
        )

    def _check_negated(self, draft: Claim) -> list[Violation]:
        conflict = [] if self.restates_negation(draft) else self.conflicting(draft)
        if conflict:
            return [
                Violation(
                    "negation",
                    f"{_where(draft)} rules out {draft.concept}; the findings have {_describe(conflict)}",
                )
            ]
        # A normal statement ("clear lungs") restates absences; only a contradiction counts against it.
        if draft.normal or self._summary(draft.concept) or self.ruled_out(draft):
            return []
        # A pertinent negative: "no evidence of pneumonia" where the findings rule out consolidation,
        # a finding pneumonia may follow from, and assert none of those findings on the draft's side.
        sources = (
            self.vocab.concepts[draft.concept].may_follow_from if draft.concept in self.vocab.concepts else ()
        )
        if any(self.ruled_out(replace(draft, concept=s)) for s in sources) and not any(
            self.conflicting(replace(draft, concept=s)) for s in sources
        ):
            return []
        return [
            Violation(
                "unsupported", f"{_where(draft)} rules out {draft.concept}, which the findings do not mention"
            )
        ]

    def _check_asserted(self, draft: Claim) -> list[Violation]:
        support, by_rule = self.support(draft)
        if self._summary(draft.concept) and not support:
            # "Abnormal chest" with nothing abnormal in the findings.
            return [
                Violation("unsupported", f"{_where(draft)} states {draft.concept}; the findings have none")
            ]
        if not support:
            against = self.ruled_out(draft)
            if against:
                return [
                    Violation(
                        "negation",
                        f"{_where(draft)} asserts {draft.concept}; the findings rule it out "
                        f"({'; '.join(dict.fromkeys(c.sentence for c in against))!r})",
                    )
                ]
            return [
                Violation(
                    "unsupported", f"{_where(draft)} asserts {draft.concept}, which the findings do not state"
                )
            ]
        violations: list[Violation] = []
        negated = self._negated_as_phrased(draft, support)
        if negated:
            violations.append(
                Violation(
                    "negation",
                    f"{_where(draft)} asserts {draft.text!r} as the findings rule it out "
                    f"({'; '.join(dict.fromkeys(c.sentence for c in negated))!r})",
                )
            )
        if by_rule and not draft.uncertain:
            violations.append(
                Violation(
                    "certainty",
                    f"{_where(draft)} states {draft.concept} as certain; the findings have "
                    f"{_describe(support)}, from which {draft.concept} may only be suggested (hedged)",
                )
            )
        if not _sides_compatible(draft, support):
            violations.append(
                Violation(
                    "laterality",
                    f"{draft.text!r} is placed on the {'/'.join(sorted(draft.sides))} in {_where(draft)}; "
                    f"the findings have {_describe(support)}",
                )
            )
        elif draft.dominant_side and {c.dominant_side for c in support} - {""} == {
            "left" if draft.dominant_side == "right" else "right"
        }:
            violations.append(
                Violation(
                    "laterality",
                    f"{_where(draft)} has the {draft.dominant_side} the worse side; "
                    f"the findings have {_describe(support)} worse on the other",
                )
            )
        elif _sentence_side_against(draft, support):
            violations.append(
                Violation(
                    "laterality",
                    f"{draft.text!r} is in a sentence about the {'/'.join(sorted(draft.sentence_sides))} "
                    f"({_where(draft)}); the findings have {_describe(support)}",
                )
            )
        elif _pooled_qualifiers_hold(draft, support) and not _one_claim_supports(draft, support):
            violations.append(
                Violation(
                    "laterality" if draft.sides else "location",
                    f"no one finding has {draft.text!r} as {_where(draft)} places it "
                    f"({'/'.join(sorted(draft.sides | draft.zones))}"
                    f"{'' if draft.uncertain else ', certain'}); the findings have {_describe(support)}",
                )
            )
        violations += self._check_qualifiers(draft, support)
        violations += self._check_numbers(draft, support)
        return violations

    def _negated_as_phrased(self, draft: Claim, support: list[Claim]) -> list[Claim]:
        """Findings ruling out the draft's concept with every word the draft qualifies it by, where no
        finding stating it has those words.

        "No XXXX infiltrates" (a masked "new" or "other") beside "persistent patchy infiltrate in the
        right middle lobe": the draft's "XXXX infiltrates" is the negated phrase, not the stated one.
        """
        if not draft.words or any(draft.words <= c.words for c in support):
            return []
        return [
            c for c in self.negated if c.concept == draft.concept and not c.normal and draft.words <= c.words
        ]

    def _hedged_reading(self, draft: Claim, support: list[Claim]) -> bool:
        """The findings state something certain and hedge, in the same sentence, the reading of it the
        draft states in the findings' own words ("Bilateral rib deformities are noted, possibly old
        fractures" -> "old fractures"; "foreign body which may represent a bullet fragment" -> "which a
        bullet fragment").  The certain finding then supports the draft's concept only through the hedged
        reading.  Summaries ("changes of chronic lung disease") are not held to it.
        """
        if self._summary(draft.concept):
            return False
        words = content_words(draft.text)
        same = [c for c in support if content_words(c.text) == words]
        certain = [c for c in support if not c.uncertain]
        sentences = {c.sentence for c in same}
        return bool(same) and all(c.uncertain for c in same) and all(c.sentence in sentences for c in certain)

    def _check_qualifiers(self, draft: Claim, support: list[Claim]) -> list[Violation]:
        violations = []
        zones = {z for c in support for z in c.zones}
        if draft.zones and not draft.zones <= zones:
            violations.append(
                Violation(
                    "location",
                    f"{_where(draft)} places {draft.concept} in the {'/'.join(sorted(draft.zones))} zone; "
                    f"the findings say {'/'.join(sorted(zones)) or 'no zone'}",
                )
            )
        levels = {level for c in support for level in c.severity}
        allowed = {n for level in levels for n in SEVERITY_NEIGHBOURS[level]}
        if draft.severity and not draft.severity <= allowed:
            violations.append(
                Violation(
                    "severity",
                    f"{_where(draft)} grades {draft.concept} {_levels(draft.severity)}; "
                    f"the findings say {_levels(frozenset(levels)) if levels else 'no size or severity'}",
                )
            )
        if not draft.uncertain and (
            all(c.uncertain for c in support) or self._hedged_reading(draft, support)
        ):
            violations.append(
                Violation(
                    "certainty",
                    f"{_where(draft)} states {draft.concept} as certain; the findings hedge it "
                    f"({_describe(support)})",
                )
            )
        times = {t for c in support for t in c.time}
        allowed_times = {n for t in times for n in TIME_COMPATIBLE[t]}
        # A summary ("chronic changes", "stable lung disease") may restate its findings' course loosely,
        # but not claim a change ("new lung disease") the findings do not state.
        stated = draft.time & CHANGE_TIMES if self._summary(draft.concept) else draft.time
        if stated and not stated <= allowed_times:
            violations.append(
                Violation(
                    "time",
                    f"{_where(draft)} calls {draft.concept} {'/'.join(sorted(stated))}; "
                    f"the findings say {'/'.join(sorted(times)) or 'nothing about its course'}",
                )
            )
        return violations

    def _check_numbers(self, draft: Claim, support: list[Claim]) -> list[Violation]:
        violations = []
        for number in draft.numbers:
            same_value = [
                (c, n) for c in self.evidence.claims for n in c.numbers if _numbers_match(number, n)
            ] + [(None, n) for n in self.evidence.loose_numbers if _numbers_match(number, n)]
            if not same_value:
                violations.append(
                    Violation(
                        "numbers", f"{number.text!r} in {_where(draft)} matches no value in the findings"
                    )
                )
                continue
            owned = [
                (c, n) for c, n in same_value if c is None or self.vocab.related(c.concept, draft.concept)
            ]
            if not owned:
                owners = ", ".join(sorted({c.concept for c, _ in same_value if c is not None}))
                violations.append(
                    Violation(
                        "numbers",
                        f"{number.text!r} is given for {draft.concept} in {_where(draft)}; "
                        f"in the findings it is the value of {owners}",
                    )
                )
                continue
            sides = draft.side_set
            if sides and not any(c is None or not c.side_set or c.side_set == sides for c, _ in owned):
                where = "; ".join(
                    f"{'/'.join(sorted(c.sides))} {c.concept}" for c, _ in owned if c is not None
                )
                violations.append(
                    Violation(
                        "laterality",
                        f"{number.text!r} is stated for the {'/'.join(sorted(draft.sides))} "
                        f"in {_where(draft)}; "
                        f"in the findings it is the value of the {where}",
                    )
                )
        return violations

    def check_mention(self, mention: Mention) -> list[Violation]:
        """A side or size word qualifying what no concept of the vocabulary names ("prosthetic left
        shoulder", "nipple ring on right", "stomach is right-sided", "large chronic changes") must be one
        the findings give the same words.

        The findings' words of that group whose phrases share the most words with the draft's are its
        match; the draft's side must be among theirs, its size level one of theirs or a neighbour (trace ~
        small).  Words the findings never put beside such a word leave it open.
        """
        if mention.in_concept or mention.ruled_out or not mention.words:
            return []
        overlap = [
            (len(mention.words & m.words), m)
            for m in self.evidence.mentions
            if m.group == mention.group and not m.ruled_out
        ]
        best = max((n for n, _ in overlap), default=0)
        # One shared word of several ("chronic appearance of the left lung" / "chronic appearing right
        # basilar markings") is no match; a phrase of one word must share it.
        if best < min(2, len(mention.words)):
            return []
        matched = [m for n, m in overlap if n == best]
        if mention.group == "sides":
            holds = mention.side_set <= frozenset().union(*(m.side_set for m in matched))
        elif mention.group == "time":
            holds = any(mention.value in TIME_COMPATIBLE[m.value] for m in matched)
        else:
            holds = any(int(mention.value) in SEVERITY_NEIGHBOURS[int(m.value)] for m in matched)
        if holds:
            return []
        what = mention.value if mention.group != "severity" else _levels(frozenset({int(mention.value)}))
        return [
            Violation(
                MENTION_CHECKS[mention.group],
                f"{what} in {mention.sentence!r}; the findings have "
                f"{'; '.join(dict.fromkeys(m.sentence for m in matched))!r}",
            )
        ]

    def check_bare_sentence(self, sentence: str) -> list[Violation]:
        """A sentence naming no concept of the vocabulary ("Displacement of the minor fissure") must not
        turn a findings sentence with all its words (two at least) from ruled out to stated or back.
        """
        words = content_words(sentence) - {"xxxx"}
        if len(words) < MIN_SHARED_WORDS:
            return []
        matched = [s for s, _ in self.evidence.sentences if words <= content_words(s)]
        if not matched:
            return []
        negated = _negated(sentence, words)
        if all(_negated(s, words) != negated for s in matched):
            return [
                Violation(
                    "negation",
                    f"{sentence!r} {'rules out' if negated else 'states'} what the findings "
                    f"{'state' if negated else 'rule out'} ({'; '.join(matched)!r})",
                )
            ]
        return []

    def check(self, draft_text: str) -> list[Violation]:
        """Every way ``draft_text`` goes beyond or against the evidence."""
        draft = read_text(draft_text)
        violations: list[Violation] = []
        for mention in draft.mentions:
            violations += self.check_mention(mention)
        for sentence, names_concept in draft.sentences:
            if not names_concept:
                violations += self.check_bare_sentence(sentence)
        for claim in draft.claims:
            violations += self.check_claim(claim)
        for number in draft.loose_numbers:
            violations += self.check_loose_number(number)
        violations += self.check_loose_times(draft.loose_times)
        # Without a unit, a number is a count the findings give too ("There are 2 right upper lobe
        # nodules"); which finding it counts is checked with that finding's claim (site, size, side).
        counts = {n.value for n in self.evidence.unitless}
        violations += [
            Violation("numbers", f"{n.text!r} has no unit (in {n.sentence!r})")
            for n in draft.unitless
            if n.value not in counts
        ]
        return list(dict.fromkeys(violations))

    def check_loose_times(self, times: Iterable[tuple[str, str]]) -> list[Violation]:
        """A change stated of no concept ("new appearance of the chest") needs something new or worse."""
        changed = any(c.time & CHANGED_EVIDENCE for c in self.asserted) or any(
            value in CHANGE_TIMES for value, _ in self.evidence.loose_times
        )
        if changed:
            return []
        return [
            Violation(
                "time", f"{sentence!r} states a change ({value}); the findings describe nothing new or worse"
            )
            for value, sentence in times
            if value in CHANGE_TIMES
        ]

    def check_loose_number(self, number: NumberMention) -> list[Violation]:
        references = [n for c in self.evidence.claims for n in c.numbers] + list(self.evidence.loose_numbers)
        if any(_numbers_match(number, n) for n in references):
            return []
        return [
            Violation("numbers", f"{number.text!r} in {number.sentence!r} matches no value in the findings")
        ]


#: Words a sentence naming no concept must share with a findings sentence to be compared with it.
MIN_SHARED_WORDS = 2
_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|nor|neither)\b", re.IGNORECASE)
#: A negation closing what it rules out: "... not seen", "... is absent", "... has resolved".
_CLOSING_NEGATION = re.compile(
    r"^\W*(?:(?:is|are|was|were|has|have)\s+)?(?:not\b|absent\b|no longer\b|resolved\b)", re.IGNORECASE
)


def _negated(sentence: str, words: frozenset[str]) -> bool:
    """Whether ``sentence`` rules out what ``words`` name: a negation before the first of them ("No
    displacement of the fissure") or a closing one after the last ("... projectile not seen").  A
    negation of other words ("Right shoulder: negative for fracture") does not count.
    """
    spots = [m for m in re.finditer(r"[a-z]+", sentence.lower()) if content_words(m.group()) & words]
    if not spots:
        return False
    return bool(
        _NEGATION.search(sentence[: spots[0].start()])
        or _CLOSING_NEGATION.search(sentence[spots[-1].end() :])
    )


def _inherit_sentence_side(claim: Claim) -> Claim:
    """An unsided evidence claim takes the one side its sentence names.

    "Blunting of the right costophrenic angle, possibly a small effusion": the effusion is on the right.
    """
    if claim.sides or len(claim.sentence_sides) != 1:
        return claim
    return replace(claim, sides=claim.sentence_sides)


def _inherit_sentence_zone(claims: list[Claim]) -> list[Claim]:
    """An evidence claim without a zone takes the one zone the other claims of its sentence give.

    "Persistent right basilar opacity, likely atelectasis": the atelectasis is basilar too.
    """
    zones: dict[str, set[str]] = {}
    for claim in claims:
        zones.setdefault(claim.sentence, set()).update(claim.zones)
    return [
        replace(c, zones=frozenset(zones[c.sentence])) if not c.zones and len(zones[c.sentence]) == 1 else c
        for c in claims
    ]


def _sentence_side_against(draft: Claim, support: list[Claim]) -> bool:
    """An unsided draft claim in a sentence naming one side, where the findings have it only on the other.

    "Irregularity of the posterior left 7th rib with underlying pleural thickening" against findings
    with the pleural thickening on the right.  Evidence without a side, or on both sides, never counts
    against it: the side word may belong to another word of the sentence.
    """
    if draft.sides or len(draft.sentence_sides) != 1 or "both" in draft.sentence_sides:
        return False
    return all(c.side_set for c in support) and not any(draft.sentence_sides & c.side_set for c in support)


def _pooled_qualifiers_hold(draft: Claim, support: list[Claim]) -> bool:
    """Zone and certainty hold over all findings together (else those checks report the draft)."""
    zones_hold = not draft.zones or draft.zones <= {z for c in support for z in c.zones}
    return zones_hold and (draft.uncertain or not all(c.uncertain for c in support))


def _one_claim_supports(draft: Claim, support: list[Claim]) -> bool:
    """Whether one finding of the evidence has the draft's side, zone and certainty together.

    Pooled over all findings, "right upper lobe mass" and "possible mass on the left" would let a
    draft say "left upper lobe mass".  An evidence claim without a side or zone leaves that open.
    """
    if not draft.sides and not draft.zones:
        return True
    if "both" in draft.sides:
        # Bilateral may be pooled from a left and a right finding; any sided finding may be one of them.
        return any(
            (not c.zones or draft.zones <= c.zones) and (draft.uncertain or not c.uncertain) for c in support
        )
    return any(
        (not c.sides or _sides_compatible(draft, [c]))
        and (not c.zones or draft.zones <= c.zones)
        and (draft.uncertain or not c.uncertain)
        for c in support
    )


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 4 and word.endswith("s") else word


def _names_words(narrow: str, broad: str, sentence: str) -> bool:
    """Whether ``sentence`` has every word of ``narrow``'s name that ``broad``'s name lacks."""
    extra = {_stem(w) for w in narrow.split()} - {_stem(w) for w in broad.split()}
    words = {_stem(w) for w in re.findall(r"[a-z]+", sentence.lower())}
    return bool(extra) and all(any(w.startswith(e[:5]) for w in words) for e in extra)


def _levels(levels: frozenset[int]) -> str:
    names = {1: "trace", 2: "small/mild", 3: "moderate", 4: "large/severe"}
    return "/".join(names[level] for level in sorted(levels))


def check_against_findings(draft_text: str, findings_text: str) -> list[Violation]:
    """Every way ``draft_text`` goes beyond or against ``findings_text`` (see the module docstring)."""
    return Comparison(read_text(findings_text)).check(draft_text)
