"""Guardrails: pure checks that a draft states nothing the evidence does not support.

Applied to every draft whatever wrote it (:func:`check_draft`).  Each check
returns :class:`Violation` records whose message says exactly what is wrong
and what the evidence holds, so the reason a draft was replaced by the
template draft can be shown to the radiologist:

* **numbers** (:func:`check_numbers`): every number carries a unit and equals
  a value of the evidence (measurement, probability or threshold as a
  percentage, patient age, a threshold named in a measurement's name) within
  the precision it is printed with (half a unit in its last digit), after
  unit conversion (2.5 L = 2500 mL); a unit of another kind fails.  A number
  whose clause names a measurement before it ("Perc15 -869 HU", "probability
  91%"; :func:`reference_names`) must be the value of THAT measurement, on the
  side the sentence states, not any value of its unit: a value moved from one
  measurement to another ("Left lung: ..., Perc15 -857 HU" where -857 HU is the
  left lung's mean lung density) fails;
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
from pacs_ai.report.drafters.template import format_value, measurement_label, percent
from pacs_ai.report.evidence import Evidence, Measurement
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
    #: What a draft may call it (lower case, :func:`reference_names`); empty: nothing names it.
    names: frozenset[str] = frozenset()
    #: Where it is, for messages ("left lung", "pneumothorax"); None when nowhere in particular.
    where: str | None = None
    #: The value as messages print it (as the template drafter prints it); empty: :func:`_fmt`.
    shown: str = ""


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


#: A code is a name drafts may use when it has letters ("LAA950", "PERC15"), not a bare number (SNOMED).
_NAME_CODE = re.compile(r"[A-Za-z][A-Za-z0-9.]{2,}")
#: What names a finding's numbers: its probability (a detection's "score") and its threshold, a box's size.
PROBABILITY_NAMES = frozenset({"probability", "score"})
THRESHOLD_NAMES = frozenset({"threshold"})
SIZE_NAMES = frozenset({"size"})
AGE_NAMES = frozenset({"age"})


def reference_names(m: Measurement) -> frozenset[str]:
    """What a draft may call a measurement, in lower case: derived from the measurement, not listed.

    Its short name as the drafts and prompts print it (:func:`measurement_label`:
    "volume", "mean lung density", "%LAA-950", "Perc15"), its recorded name
    ("Attenuation Coefficient", "15th percentile of lung density"), with its
    derivation ("mean attenuation coefficient"), its code where the code is a
    word (the lung analyzer's "LAA950", "PERC15"), those without the "%" sign
    or hyphen ("LAA-950", "LAA950") and the initials of a short name of three
    or more words ("MLD").
    """
    label = measurement_label(m)
    names = {label, m.name}
    if m.derivation:
        names.add(f"{m.derivation} {m.name}")
    if m.code and _NAME_CODE.fullmatch(m.code):
        names.add(m.code)
    for name in list(names):
        names.add(name.lstrip("%"))
        if " " not in name:  # a one-word name with a hyphen is also written without it ("LAA950")
            names.add(name.lstrip("%").replace("-", ""))
    words = label.split()
    if len(words) >= 3 and all(w.isalpha() for w in words):
        names.add("".join(w[0] for w in words))
    return frozenset(n.strip().lower() for n in names if re.search(r"[A-Za-z]", n))


def _where(m: Measurement) -> str | None:
    """The site of a measurement as messages say it ("left lung"; the lungs as a whole: "both lungs")."""
    if not m.site:
        return None
    if m.side == "both" and m.site.strip().lower() in ("lung", "lungs"):
        return "both lungs"
    return m.site.lower()


def reference_values(evidence: Evidence) -> list[Reference]:
    """Every number the evidence holds, in canonical units (see :mod:`pacs_ai.report.text`)."""
    refs: list[Reference] = []
    for m in evidence.measurements:
        unit, factor = canonical_unit(m.unit)
        site = f"{m.site} " if m.site else ""
        refs.append(
            Reference(
                m.value * factor,
                unit,
                f"{site}{m.name}".strip(),
                m.side,
                reference_names(m),
                _where(m),
                format_value(m.value, m.unit),
            )
        )
        # Thresholds named in a measurement's name ("... below -950 HU") may be quoted.
        refs += [
            Reference(n.value, n.unit, f"threshold in {m.name!r}")
            for n in find_numbers(m.name)
            if n.unit is not None
        ]
    for f in evidence.findings:
        name = f.name.lower()
        if f.probability is not None:
            label, shown = f"probability of {f.name}", percent(f.probability)
            refs.append(Reference(100.0 * f.probability, "%", label, f.side, PROBABILITY_NAMES, name, shown))
        if f.threshold is not None:
            label, shown = f"threshold of {f.name}", percent(f.threshold)
            refs.append(Reference(100.0 * f.threshold, "%", label, f.side, THRESHOLD_NAMES, name, shown))
        if f.size_mm is not None:  # a detected box's size
            where = f" ({f.site})" if f.site else ""
            label, shown = f"size of {f.name}{where}", format_value(f.size_mm, "mm")
            refs.append(
                Reference(f.size_mm, "mm", label, f.side, SIZE_NAMES, f"{name}{where.lower()}", shown)
            )
    if evidence.context.patient_age_years is not None:
        refs.append(
            Reference(float(evidence.context.patient_age_years), "year", "patient age", None, AGE_NAMES)
        )
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


def _name_patterns(refs: Iterable[Reference]) -> dict[str, re.Pattern[str]]:
    """A pattern per name of ``refs``: the name as a whole word (a "%" or "-" inside belongs to it)."""
    names = {name for r in refs for name in r.names}
    return {
        name: re.compile(rf"(?<![\w%-]){re.escape(name)}(?![\w%-])", re.IGNORECASE) for name in sorted(names)
    }


def _named(lead: str, patterns: dict[str, re.Pattern[str]]) -> tuple[str, str] | None:
    """(name, as written) of the measurement name nearest the end of ``lead``, the longest there."""
    best: tuple[int, int, str, str] | None = None
    for name, pattern in patterns.items():
        for match in pattern.finditer(lead):
            key = (match.end(), match.end() - match.start(), name, match.group())
            if best is None or key[:2] > best[:2]:
                best = key
    return (best[2], best[3]) if best else None


def _side_fits(stated: str | None, side: str | None) -> bool:
    return stated is None or side is None or stated == side


def _listed(refs: list[Reference], places: bool = False) -> str:
    """Values for a message: "-869 HU", or "-869 HU (left lung), -934 HU (right lung)" from several places."""
    places = places or len({r.where for r in refs}) > 1
    return ", ".join(
        (r.shown or _fmt(r.value, r.unit)) + (f" ({r.where})" if places and r.where else "") for r in refs
    )


def check_named_number(
    n: NumberMention, refs: list[Reference], patterns: dict[str, re.Pattern[str]]
) -> Violation | None:
    """A number whose clause names a measurement before it must be that measurement's value.

    The name is the one nearest the number in the words of its clause before
    it (:attr:`NumberMention.lead`); the value must match a measurement of that
    name and of the number's unit at its printed precision, on the side the
    sentence states (:attr:`NumberMention.side`) when it states one.  A name
    none of whose measurements has the number's unit binds nothing (the unit
    check speaks), nor does a value stated for a side that has none of it but
    another side has (:func:`check_laterality` says so).
    """
    found = _named(n.lead, patterns)
    if found is None or n.unit is None:
        return None
    name, written = found
    named = [r for r in refs if name in r.names and r.unit == n.unit]
    on_side = [r for r in named if _side_fits(n.side, r.side)]
    if not named or _candidates(n, on_side):
        return None
    by_value = _candidates(n, refs)
    if by_value and not any(_side_fits(n.side, r.side) for r in by_value):
        return None  # the value of another side: a laterality violation
    places = {r.where for r in on_side}
    if on_side and len(places) == 1 and None not in places:
        place = str(places.pop())
        target = f"{written} of {place}" if place.startswith("both") else f"{written} of the {place}"
    elif n.side is not None:
        target = f"{written} of {'both sides' if n.side == 'both' else f'the {n.side} side'}"
    else:
        target = written
    if on_side:
        return Violation("numbers", f"{n.text!r} is given for {target}; the evidence has {_listed(on_side)}")
    return Violation(
        "numbers",
        f"{n.text!r} is given for {target}; the evidence has {written} only elsewhere: "
        f"{_listed(named, places=True)}",
    )


def check_numbers(text: str, evidence: Evidence) -> list[Violation]:
    """Every number has a unit and is a value of the evidence at its printed precision.

    A number whose clause names a measurement must be the value of that
    measurement (:func:`check_named_number`).
    """
    refs = reference_values(evidence)
    patterns = _name_patterns(refs)
    violations = []
    counts = {c.start for c in count_statements(text, evidence)}  # checked by check_detections
    for n in find_numbers(text, _extra_units(evidence)):
        if n.unit is None and n.start in counts:
            continue
        if n.unit is None:
            violations.append(Violation("numbers", f"{n.text!r} has no unit (in {n.sentence!r})"))
            continue
        if _candidates(n, refs):
            named = check_named_number(n, refs, patterns)
            if named is not None:
                violations.append(named)
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
