"""The ``template`` drafter: deterministic sentences from the evidence, no model weights.

It is the default backend and the fallback of every other one, so it must
pass the guardrails for any evidence: it prints only evidence values, at the
precision :func:`format_value` documents, always with their unit, and names
findings exactly as present or absent as the evidence has them.

Wording:

* measurements grouped by site (right lung, left lung, both lungs, then other
  sites), lung volume in mL, mean lung density and Perc15 in HU, %LAA-950 in %;
* %LAA-950 of both lungs (else of each lung) worded by the bands of
  :mod:`pacs_ai.report.quantitative`, with the note that bands depend on the protocol;
* classification findings with their probability and threshold as
  percentages, present ones marked "AI-detected, unverified";
* a detector's boxes (:func:`detection_lines`): their number, the largest
  with its site, then one sentence per box with its site, size and score;
  "No ... detected by <model>" only where the profile asks for it;
* segments the analyzers delineated, by name.

:func:`impression_from_findings_text` is the template's findings-to-impression
method: it keeps the first sentences of a findings section that assert an
acute-looking finding and otherwise writes :data:`NORMAL_IMPRESSION`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from pacs_ai.report.detections import detected_by_term, detection_noun
from pacs_ai.report.drafters import DraftText, parse_params
from pacs_ai.report.evidence import Evidence, Finding, Measurement, StudyContext
from pacs_ai.report.quantitative import is_laa950, laa950_band
from pacs_ai.report.text import DISPLAY_UNITS, canonical_unit, find_mentions, sentences
from pacs_ai.report.vocabulary import term_patterns

if TYPE_CHECKING:
    from PIL.Image import Image

#: The impression for a findings section that asserts nothing abnormal.
NORMAL_IMPRESSION = "No acute cardiopulmonary abnormality."
#: Findings and impression of a study whose analyzers ran and gave nothing to state (a detector with no
#: box above its threshold, its profile not asking to report absence): true, and no negative finding.
ANALYSIS_RAN_NOTHING_REPORTED = "AI analysis ran on this study and reported no findings."
#: Findings described with these words are chronic or known and usually stay out of an impression.
_CHRONIC_WORDS = re.compile(
    r"\b(?:stable|unchanged|chronic|old|healed|calcified|granulom\w*|scar\w*|degenerative|prior|again)\b",
    re.IGNORECASE,
)
#: At most this many findings sentences go into an extractive impression.
MAX_IMPRESSION_SENTENCES = 2
_SEX_WORDS = {"M": "male", "F": "female", "O": "patient of other sex"}
#: Order of sites in the findings: right lung, left lung, both lungs, then others alphabetically.
_SIDE_ORDER = {"right": 0, "left": 1, "both": 2}


class TemplateParams(BaseModel):
    """The template backend takes no parameters yet; unknown keys are an error so typos show."""

    model_config = ConfigDict(extra="forbid")


def format_value(value: float, unit: str) -> str:
    """A measurement for a draft, in its canonical unit (see :data:`pacs_ai.report.text.UCUM_UNITS`).

    Precision: volumes 0 decimals from 100 mL (1 below), HU 0 decimals, % 1
    decimal, mm 1 decimal, other units 0 decimals from 100, 1 from 10, 2 from
    1, 3 below.  The guardrails accept exactly this precision (half a unit in
    the last printed digit), so rounding here is never a guardrail failure.
    """
    canonical, factor = canonical_unit(unit)
    value *= factor
    if canonical == "HU":
        decimals = 0
    elif canonical in ("%", "mm"):
        decimals = 1
    elif canonical == "mL":
        decimals = 0 if abs(value) >= 100 else 1
    else:
        magnitude = abs(value)
        decimals = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    text = f"{value:.{decimals}f}"
    if re.fullmatch(r"-0(?:\.0+)?", text):
        text = text[1:]
    shown = DISPLAY_UNITS.get(canonical, canonical)
    return f"{text}%" if shown == "%" else f"{text} {shown}"


def percent(probability: float) -> str:
    """A probability (0..1) as a whole percentage."""
    return f"{100.0 * probability:.0f}%"


def measurement_label(m: Measurement) -> str:
    """Short name of a measurement: "volume", "mean lung density", "%LAA-950", "Perc15", else its name."""
    code = (m.code or "").upper()
    name = m.name.lower()
    lung_site = (m.site or "").lower().endswith("lung") or (m.site or "").lower() == "lungs"
    if is_laa950(m.code, m.name):
        return "%LAA-950"
    if code.startswith("LAA") and code[3:].replace("P", "").isdigit():
        return f"%LAA-{code[3:].replace('P', '.')}"
    if code.startswith("PERC") and code[4:].replace("P", "").isdigit():
        return f"Perc{code[4:].replace('P', '.')}"
    if name == "attenuation coefficient" and (m.derivation or "").lower() == "mean":
        return "mean lung density" if lung_site else "mean attenuation"
    if m.derivation and m.derivation.lower() not in name:
        return f"{m.derivation.lower()} {name}"
    return name


def _site_title(site: str | None, side: str | None) -> str:
    if not site:
        return "Whole study"
    if side == "both" and site.strip().lower() in ("lung", "lungs"):
        return "Both lungs"
    return site[0].upper() + site[1:]


def _site_key(m: Measurement) -> tuple[int, str]:
    return (_SIDE_ORDER.get(m.side or "", 3), (m.site or "").lower())


def context_sentence(context: StudyContext) -> str | None:
    """ "Examination: CT, CHEST. Patient: female, age band sixties." or None when nothing is known.

    Only the allow-listed facts of the context (:class:`StudyContext`); the
    procedure code is left to the prompt (:func:`pacs_ai.report.prompts.evidence_facts`):
    its digits are no value a draft may state.
    """
    parts = []
    kind = ", ".join(p for p in (context.modality, context.body_part) if p)
    if kind:
        parts.append(f"Examination: {kind}.")
    who = []
    if context.patient_sex:
        who.append(_SEX_WORDS[context.patient_sex])
    if context.age_band:
        who.append(f"age band {context.age_band}")
    if who:
        parts.append(f"Patient: {', '.join(who)}.")
    return " ".join(parts) or None


def _laa_sentence(evidence: Evidence) -> tuple[str, str] | None:
    """(findings sentence, impression sentence) wording the %LAA-950 band, or None without %LAA-950."""
    laa = [m for m in evidence.measurements if is_laa950(m.code, m.name)]
    if not laa:
        return None
    whole = [m for m in laa if m.side == "both"] or laa
    worst = max(whole, key=lambda m: m.value)
    band = laa950_band(worst.value)
    where = _site_title(worst.site, worst.side).lower() if worst.site else "the lungs"
    value = format_value(worst.value, worst.unit)
    caveat = "bands depend on the CT protocol (kernel, slice thickness, inspiration)"
    findings = f"Densitometry: %LAA-950 of {where} {value}, {band.wording}; {caveat}."
    if band.name == "normal":
        impression = f"Quantitative lung densitometry: %LAA-950 {value}, {band.wording}."
    else:
        impression = (
            f"{band.name.capitalize()} emphysema-like low attenuation on quantitative CT (%LAA-950 {value})."
        )
    return findings, impression


def _finding_name(f: Finding) -> str:
    name = f.name.replace("_", " ")
    name = name[0].upper() + name[1:] if name else name
    return f"{name} ({f.site.lower()})" if f.site and f.site.lower() not in name.lower() else name


def _finding_sentence(f: Finding) -> str:
    numbers = []
    if f.probability is not None:
        numbers.append(f"probability {percent(f.probability)}")
    if f.threshold is not None:
        numbers.append(f"threshold {percent(f.threshold)}")
    detail = f" ({', '.join(numbers)})" if numbers else ""
    if f.present:
        return f"{_finding_name(f)}: AI-detected, unverified{detail}."
    return f"{_finding_name(f)}: not detected by AI{detail}."


def detection_lines(evidence: Evidence) -> tuple[list[str], list[str]]:
    """(findings sentences, impression sentences) for a detector's boxes, per finding term.

    "2 pulmonary nodules detected by <model> (AI-detected, unverified),
    largest 12.0 mm in the right lung." then "Right lung: pulmonary nodule
    12.0 mm, score 87%." per box, largest first; the impression gives the
    number and the largest.  A term the detector found nothing of (recorded
    only where the profile asks) gives "No pulmonary nodules detected by <model>.".
    """
    findings: list[str] = []
    impression: list[str] = []
    for term, found in detected_by_term(evidence).items():
        sample = next(f for f in evidence.findings if f.kind == "detection" and f.term == term)
        by = f" by {sample.model}" if sample.model else ""
        if not found:
            line = f"No {detection_noun(sample, 0)} detected{by}."
            findings.append(line)
            impression.append(line)
            continue
        found = sorted(found, key=lambda f: -(f.size_mm or 0.0))
        largest = found[0]
        size = format_value(largest.size_mm, "mm") if largest.size_mm is not None else None
        noun = detection_noun(largest, len(found))
        summary = f"{len(found)} {noun} detected{by} (AI-detected, unverified)"
        where = f" in the {largest.site}" if largest.site else ""
        findings.append(f"{summary}, largest {size}{where}." if size else f"{summary}.")
        for f in found:
            details = [format_value(f.size_mm, "mm")] if f.size_mm is not None else []
            if f.probability is not None:
                details.append(f"score {percent(f.probability)}")
            # No "not" here: "Location not determined: pulmonary nodule" reads as a negated nodule.
            site = f.site[0].upper() + f.site[1:] if f.site else "Side undetermined"
            findings.append(f"{site}: {detection_noun(f, 1)} {', '.join(details)}.")
        where = f" ({largest.site})" if largest.site else ""
        impression.append(
            f"AI-detected, unverified: {len(found)} {noun}" + (f", largest {size}{where}." if size else ".")
        )
    return findings, impression


def template_findings(evidence: Evidence) -> str:
    """The findings section: context, measurements by site, densitometry band, findings, segments, prior."""
    lines: list[str] = []
    context = context_sentence(evidence.context)
    if context:
        lines.append(context)
    context_lines = len(lines)
    by_site: dict[str | None, list[Measurement]] = {}
    for m in sorted(evidence.measurements, key=_site_key):
        by_site.setdefault(m.site, []).append(m)
    for site, items in by_site.items():
        values = ", ".join(f"{measurement_label(m)} {format_value(m.value, m.unit)}" for m in items)
        lines.append(f"{_site_title(site, items[0].side)}: {values}.")
    laa = _laa_sentence(evidence)
    if laa:
        lines.append(laa[0])
    lines += [_finding_sentence(f) for f in evidence.findings if f.kind != "detection"]
    lines += detection_lines(evidence)[0]
    if evidence.segments:
        names = ", ".join(dict.fromkeys(s.label for s in evidence.segments))
        lines.append(f"Segmentations (DICOM SEG): {names}.")
    if len(lines) == context_lines and evidence.analyzers:
        # The analyzers ran and gave nothing to state (a detector with no box above its threshold whose
        # profile does not ask to report absence): say so, without turning it into a negative finding.
        # The model is not named: its title ("Lung nodule CT detection") would read as a nodule.
        lines.append(ANALYSIS_RAN_NOTHING_REPORTED)
    if evidence.prior_report:
        lines.append("Prior report: supplied; comparison is left to the radiologist.")
    if not lines:
        lines.append("No analyzer results are available for this study.")
    return "\n".join(lines)


def template_impression(evidence: Evidence) -> str:
    """The impression: AI-detected findings first, then the densitometry band, then total lung volume."""
    lines = []
    for f in evidence.findings:
        if f.present and f.kind != "detection":
            probability = f", probability {percent(f.probability)}" if f.probability is not None else ""
            lines.append(f"AI-detected, unverified: {_finding_name(f)}{probability}.")
    lines += detection_lines(evidence)[1]
    laa = _laa_sentence(evidence)
    if laa:
        lines.append(laa[1])
    total = [
        m
        for m in evidence.measurements
        if m.side == "both" and m.name.lower() == "volume" and canonical_unit(m.unit)[0] == "mL"
    ]
    if total:
        lines.append(f"Total lung volume {format_value(total[0].value, total[0].unit)}.")
    if not lines:
        assessed = ", ".join(f.name for f in evidence.findings)
        if assessed:
            lines.append(f"No AI-detected abnormality among the findings assessed ({assessed}).")
        elif evidence.measurements or evidence.segments:
            lines.append("Quantitative results only; see findings.")
        elif evidence.analyzers:
            lines.append(ANALYSIS_RAN_NOTHING_REPORTED)
        else:
            lines.append("No AI results to summarise.")
    return "\n".join(lines)


def _carries_to_impression(sentence: str, patterns: Mapping[str, re.Pattern[str]]) -> bool:
    if _CHRONIC_WORDS.search(sentence):
        return False
    return any(not m.negated for m in find_mentions(sentence, patterns))


def impression_from_findings_text(findings_text: str) -> str:
    """Extractive impression: the first sentences asserting a finding, else :data:`NORMAL_IMPRESSION`.

    A sentence is carried over when it asserts (does not negate) a finding
    term of the vocabulary and does not describe a chronic or unchanged
    finding (:data:`_CHRONIC_WORDS`); at most :data:`MAX_IMPRESSION_SENTENCES`.
    These two rules were chosen on the training part of the IU X-ray split
    (``benchmarks/impressions.py``), never on the held-out part.
    """
    patterns = term_patterns()
    kept = [s.text.strip() for s in sentences(findings_text) if _carries_to_impression(s.text, patterns)]
    kept = [s if s.endswith((".", "!", "?")) else s + "." for s in kept[:MAX_IMPRESSION_SENTENCES]]
    return " ".join(kept) if kept else NORMAL_IMPRESSION


class TemplateDrafter:
    """Deterministic drafts from the evidence; see the module docstring."""

    name = "template"

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> TemplateDrafter:
        parse_params(TemplateParams, params, "template")
        return cls()

    @property
    def model_id(self) -> str | None:
        return None

    def draft_report(self, evidence: Evidence, images: Sequence[Image] = ()) -> DraftText:
        return DraftText(findings=template_findings(evidence), impression=template_impression(evidence))

    def draft_impression(self, findings_text: str, context: StudyContext | None = None) -> str:
        return impression_from_findings_text(findings_text)
