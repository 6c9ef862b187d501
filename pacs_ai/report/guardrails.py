"""Guardrails: pure checks that a draft states nothing the evidence does not support.

Applied to every draft whatever wrote it (:func:`check_draft`).  Each check
returns :class:`Violation` records whose message says exactly what is wrong
and what the evidence holds, so the reason a draft was replaced by the
template draft can be shown to the radiologist:

* **numbers** (:func:`check_numbers`): every number carries a unit and equals
  a value of the evidence (measurement, probability or threshold as a
  percentage, patient age, a threshold named in a measurement's name) within
  the precision it is printed with (half a unit in its last digit), after
  unit conversion (2.5 L = 2500 mL); a unit of another kind fails;
* **laterality** (:func:`check_laterality`): a value stated for one side must
  be that side's measurement; a finding placed on a side must be on that side
  in the evidence;
* **negation** (:func:`check_negation`): a finding the evidence reports
  present must not be negated, one it reports absent must not be asserted;
* **unsupported** (:func:`check_unsupported`): a finding term the evidence
  does not speak about must neither be asserted nor ruled out;
* **format** (:func:`check_form`): prose only, no garbled characters, model
  tokens, placeholders or echoed prompt (a prompt's facts pass every check
  above);
* **detections** (:func:`pacs_ai.report.detections.check_detections`): a
  count of a detected finding ("3 pulmonary nodules") is the number of boxes
  the detector found, and a draft stating no count gives each box's size, so
  no nodule is invented or dropped.

Which findings the evidence speaks about (:func:`finding_statuses`): its
findings, segments whose names are chest finding terms, and emphysema when a
%LAA-950 measurement is in one of the emphysema bands
(:mod:`pacs_ai.report.quantitative`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pacs_ai.report.consistency import check_against_findings
from pacs_ai.report.detections import check_detections, count_statements
from pacs_ai.report.evidence import Evidence
from pacs_ai.report.prompts import IMPRESSION_INSTRUCTION, REPORT_INSTRUCTION
from pacs_ai.report.quantitative import is_laa950, laa950_band
from pacs_ai.report.text import (
    DISPLAY_UNITS,
    Mention,
    NumberMention,
    canonical_unit,
    find_mentions,
    find_numbers,
)
from pacs_ai.report.violations import GuardrailResult, Violation
from pacs_ai.report.vocabulary import CHEST_TERMS, term_for_name, term_patterns

__all__ = ["GuardrailResult", "Violation", "check_draft", "check_form", "check_text"]


@dataclass(frozen=True)
class Reference:
    """A number the evidence holds, in a canonical unit."""

    value: float
    unit: str
    label: str
    side: str | None = None


@dataclass(frozen=True)
class FindingStatus:
    term: str
    present: bool
    #: Sides the evidence places the finding on ("left"/"right"); empty when unknown or unsided.
    sides: frozenset[str]
    #: What the evidence says, for messages.
    description: str


def _fmt(value: float, unit: str) -> str:
    text = f"{value:.1f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.0f}"
    return f"{text} {DISPLAY_UNITS.get(unit, unit)}"


def reference_values(evidence: Evidence) -> list[Reference]:
    """Every number the evidence holds, in canonical units (see :mod:`pacs_ai.report.text`)."""
    refs: list[Reference] = []
    for m in evidence.measurements:
        unit, factor = canonical_unit(m.unit)
        site = f"{m.site} " if m.site else ""
        refs.append(Reference(m.value * factor, unit, f"{site}{m.name}".strip(), m.side))
        # Thresholds named in a measurement's name ("... below -950 HU") may be quoted.
        refs += [
            Reference(n.value, n.unit, f"threshold in {m.name!r}")
            for n in find_numbers(m.name)
            if n.unit is not None
        ]
    for f in evidence.findings:
        if f.probability is not None:
            refs.append(Reference(100.0 * f.probability, "%", f"probability of {f.name}", f.side))
        if f.threshold is not None:
            refs.append(Reference(100.0 * f.threshold, "%", f"threshold of {f.name}", f.side))
        if f.size_mm is not None:  # a detected box's size
            where = f" ({f.site})" if f.site else ""
            refs.append(Reference(f.size_mm, "mm", f"size of {f.name}{where}", f.side))
    if evidence.context.patient_age_years is not None:
        refs.append(Reference(float(evidence.context.patient_age_years), "year", "patient age"))
    return refs


def finding_statuses(evidence: Evidence) -> dict[str, FindingStatus]:
    """What the evidence says about each finding term (see the module docstring)."""
    grouped: dict[str, list[tuple[bool, str | None, str]]] = {}
    for f in evidence.findings:
        if f.probability is not None:
            detail = (
                f"{f.name} {'present' if f.present else 'absent'} (probability {100 * f.probability:.0f}%)"
            )
        else:
            detail = f"{f.name} {'present' if f.present else 'absent'}"
        if f.side:
            detail += f", {f.side}"
        grouped.setdefault(f.term, []).append((f.present, f.side, detail))
    for s in evidence.segments:
        for name in (s.label, s.type):
            term = term_for_name(name) if name else None
            if term in CHEST_TERMS:
                grouped.setdefault(term, []).append((True, None, f"segment {s.label!r}"))
    for m in evidence.measurements:
        if is_laa950(m.code, m.name):
            band = laa950_band(m.value)
            where = f"{m.site} " if m.site else ""
            grouped.setdefault("emphysema", []).append(
                (band.name != "normal", None, f"{where}%LAA-950 {m.value:.1f}% ({band.name} band)")
            )
    statuses = {}
    for term, entries in grouped.items():
        present = any(p for p, _, _ in entries)
        sides: set[str] = set()
        for p, side, _ in entries:
            if p and side:
                sides |= {"left", "right"} if side == "both" else {side}
        if any(p and side is None for p, side, _ in entries):
            sides = set()  # present somewhere unsided: the side is open
        described = "; ".join(d for _, _, d in entries)
        statuses[term] = FindingStatus(term, present, frozenset(sides), described)
    return statuses


def _mentions(text: str, evidence: Evidence) -> list[Mention]:
    extra = {f.term for f in evidence.findings if f.term not in CHEST_TERMS}
    return find_mentions(text, term_patterns(extra))


def _extra_units(evidence: Evidence) -> set[str]:
    return {canonical_unit(m.unit)[0] for m in evidence.measurements}


def _candidates(number: NumberMention, refs: Iterable[Reference]) -> list[Reference]:
    slack = 1e-9 * max(1.0, abs(number.value))
    return [
        r for r in refs if r.unit == number.unit and abs(r.value - number.value) <= number.tolerance + slack
    ]


def check_numbers(text: str, evidence: Evidence) -> list[Violation]:
    """Every number has a unit and is a value of the evidence at its printed precision."""
    refs = reference_values(evidence)
    violations = []
    counts = {c.start for c in count_statements(text, evidence)}  # checked by check_detections
    for n in find_numbers(text, _extra_units(evidence)):
        if n.unit is None and n.start in counts:
            continue
        if n.unit is None:
            violations.append(Violation("numbers", f"{n.text!r} has no unit (in {n.sentence!r})"))
            continue
        if _candidates(n, refs):
            continue
        other_units = sorted(
            {r.unit for r in refs if abs(r.value - n.value) <= n.tolerance + 1e-9} - {n.unit}
        )
        if other_units:
            shown = ", ".join(DISPLAY_UNITS.get(u, u) for u in other_units)
            unit = DISPLAY_UNITS.get(n.unit, n.unit)
            message = f"{n.text!r} has unit {unit}, the evidence has that value in {shown}"
        else:
            same = [r for r in refs if r.unit == n.unit]
            closest = min(same, key=lambda r: abs(r.value - n.value), default=None)
            hint = f"; closest: {closest.label} {_fmt(closest.value, closest.unit)}" if closest else ""
            message = f"{n.text!r} matches no value in the evidence{hint}"
        violations.append(Violation("numbers", message))
    return violations


def check_laterality(text: str, evidence: Evidence) -> list[Violation]:
    """Values and findings are stated for the side the evidence has them on."""
    violations = []
    refs = reference_values(evidence)
    for n in find_numbers(text, _extra_units(evidence)):
        candidates = _candidates(n, refs)
        if n.side is None or not candidates or any(c.side is None or c.side == n.side for c in candidates):
            continue
        owners = ", ".join(sorted({c.label for c in candidates}))
        violations.append(
            Violation(
                "laterality",
                f"{n.text!r} is stated for the {_side_words(n.side)} but is the value of {owners}",
            )
        )
    statuses = finding_statuses(evidence)
    for mention in _mentions(text, evidence):
        status = statuses.get(mention.term)
        if (
            mention.negated
            or mention.side is None
            or status is None
            or not status.present
            or not status.sides
        ):
            continue
        stated = {"left", "right"} if mention.side == "both" else {mention.side}
        if not stated <= status.sides:
            violations.append(
                Violation(
                    "laterality",
                    f"{mention.text!r} is placed on the {_side_words(mention.side)} in {mention.sentence!r}; "
                    f"the evidence has it on the {_side_words(*sorted(status.sides))}",
                )
            )
    return violations


def _side_words(*sides: str) -> str:
    if set(sides) in ({"both"}, {"left", "right"}):
        return "both sides"
    return sides[0]


def check_negation(text: str, evidence: Evidence) -> list[Violation]:
    """No finding the evidence has present is negated; none it has absent is asserted."""
    statuses = finding_statuses(evidence)
    violations = []
    mentions = _mentions(text, evidence)
    # "streaky opacity without confluent opacity": a qualifier negated next to the same finding asserted.
    asserted_in = {(m.sentence, m.term) for m in mentions if not m.negated}
    for mention in mentions:
        status = statuses.get(mention.term)
        if status is None:
            continue
        if mention.negated and status.present and (mention.sentence, mention.term) not in asserted_in:
            violations.append(
                Violation(
                    "negation",
                    f"{mention.sentence!r} negates {mention.term}; "
                    f"the evidence has it present ({status.description})",
                )
            )
        elif not mention.negated and not status.present:
            violations.append(
                Violation(
                    "negation",
                    f"{mention.sentence!r} asserts {mention.term}; "
                    f"the evidence has it absent ({status.description})",
                )
            )
    return violations


def check_unsupported(text: str, evidence: Evidence) -> list[Violation]:
    """No finding term the evidence does not speak about is asserted or ruled out."""
    statuses = finding_statuses(evidence)
    violations = []
    for mention in _mentions(text, evidence):
        if mention.term in statuses:
            continue
        verb = "rules out" if mention.negated else "asserts"
        if evidence.source == "analyzers":
            why = f"which no analyzer {'assessed' if mention.negated else 'reported'}"
        else:
            why = f"which the {evidence.source} does not mention"
        violations.append(Violation("unsupported", f"{mention.sentence!r} {verb} {mention.term}, {why}"))
    return violations


def check_text(text: str, evidence: Evidence) -> GuardrailResult:
    """All content checks on one text against the evidence.

    Evidence read from a findings section (:attr:`Evidence.text`) is compared
    claim by claim (:func:`pacs_ai.report.consistency.check_against_findings`:
    presence and negation, laterality, location, severity, certainty, time,
    numbers); analyzer evidence by its values and findings (numbers,
    laterality, negation, unsupported findings).
    """
    if evidence.text is not None:
        return GuardrailResult(tuple(check_against_findings(text, evidence.text)))
    violations = (
        check_numbers(text, evidence)
        + check_laterality(text, evidence)
        + check_negation(text, evidence)
        + check_unsupported(text, evidence)
        + check_detections(text, evidence)
    )
    return GuardrailResult(tuple(violations))


#: Characters no report has: control characters and U+FFFD (bytes a model decoded into nothing readable).
_UNREADABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
#: Model control tokens (``<|image_pad|>``, ``<start_of_image>``) and the prompt's placeholders.
_MARKUP = re.compile(r"<\|[^<>|\n]{1,40}\|>|<[A-Za-z][A-Za-z_ ]{0,40}>")
#: What only the prompt says: its facts heading and the way it lists findings.
_PROMPT_MARKERS = re.compile(r"(?im)^\s*facts\s*:|AI-detected \(present\)|not detected \(absent\)")
#: The instructions' sentences (of four words or more), which a draft that echoes its prompt repeats.
_INSTRUCTION_SENTENCES = tuple(
    sentence.strip().lower()
    for instruction in (REPORT_INSTRUCTION, IMPRESSION_INSTRUCTION)
    for sentence in re.split(r"[.:;\n]", instruction)
    if len(sentence.split()) >= 4
)


def check_form(text: str) -> list[Violation]:
    """The draft is report prose: no garbled characters, model tokens, placeholders or echoed prompt.

    A model that echoes its prompt repeats the facts it was given, which pass
    every content check; a radiologist must still never receive the
    instructions, the facts list or ``<findings sentences>`` as a draft.
    """
    violations = []
    if _UNREADABLE.search(text):
        violations.append(Violation("format", "the draft has unreadable (control or undecodable) characters"))
    markup = sorted({m.group() for m in _MARKUP.finditer(text)})
    if markup:
        shown = ", ".join(repr(m) for m in markup[:3])
        violations.append(Violation("format", f"the draft has model tokens or placeholders: {shown}"))
    lowered = text.lower()
    if _PROMPT_MARKERS.search(text) or any(s in lowered for s in _INSTRUCTION_SENTENCES):
        violations.append(
            Violation("format", "the draft repeats the prompt (its instructions or facts list)")
        )
    return violations


def check_draft(findings: str, impression: str, evidence: Evidence) -> GuardrailResult:
    """The guardrails for a whole draft: both sections present, its form, and every content check on both."""
    violations: list[Violation] = []
    if not impression.strip():
        violations.append(Violation("format", "the draft has no impression"))
    violations += check_form(f"{findings}\n{impression}")
    violations += check_text(f"{findings}\n{impression}", evidence).violations
    return GuardrailResult(tuple(violations))
