"""Prompts for language-model drafters, and reading their answers back.

The prompt lists the evidence as facts, each value already formatted the way
the guardrails accept it (:func:`pacs_ai.report.drafters.template.format_value`),
and tells the model the rules the guardrails enforce, so a well-behaved model
passes them.  The answer must have a ``FINDINGS:`` and an ``IMPRESSION:``
section; anything else is a :class:`~pacs_ai.report.drafters.DrafterError`.
"""

from __future__ import annotations

import re

from pacs_ai.report.detections import detected_by_term, detection_noun
from pacs_ai.report.drafters import DrafterError, DraftText
from pacs_ai.report.drafters.template import (
    ANALYSIS_RAN_NOTHING_REPORTED,
    context_sentence,
    format_value,
    measurement_label,
    percent,
)
from pacs_ai.report.evidence import Evidence, StudyContext

RULES = (
    "Rules: use only the facts listed. Copy every number exactly as written, always with its unit; "
    "write probabilities as percentages. Do not mention any finding, disease or anatomy finding that is "
    "not listed, not even to rule it out. Keep left and right exactly as listed. "
    "Call AI-detected findings 'AI-detected, unverified'."
)
REPORT_INSTRUCTION = (
    "You are drafting a radiology report for a radiologist to review. " + RULES + "\n"
    "Answer in exactly this form:\nFINDINGS:\n<findings sentences>\nIMPRESSION:\n<impression sentences>"
)
IMPRESSION_INSTRUCTION = (
    "You are a radiologist writing the impression of a chest radiograph report from its findings. "
    "Summarise the clinically relevant findings in one to three short sentences; if the findings are "
    "normal, say so briefly. Do not add findings that are not in the findings text and keep left and right "
    "and any negation as written. Copy numbers exactly with their units.\n"
    "Answer with the impression text only."
)


def evidence_facts(evidence: Evidence) -> str:
    """The evidence as a list of facts, one per line, values formatted as the guardrails accept them."""
    lines = []
    context = context_sentence(evidence.context)
    if context:
        lines.append(f"- {context}")
    if evidence.context.procedure_code:
        lines.append(f"- Procedure code: {evidence.context.procedure_code} (for context; do not copy it)")
    context_lines = len(lines)
    for m in evidence.measurements:
        site = f"{m.site}: " if m.site else ""
        lines.append(f"- {site}{measurement_label(m)} {format_value(m.value, m.unit)}")
    for f in evidence.findings:
        state = "AI-detected (present)" if f.present else "not detected (absent)"
        numbers = [f"size {format_value(f.size_mm, 'mm')}"] if f.size_mm is not None else []
        if f.probability is not None:
            numbers.append(f"{'score' if f.kind == 'detection' else 'probability'} {percent(f.probability)}")
        if f.threshold is not None:
            numbers.append(f"threshold {percent(f.threshold)}")
        site = f", site {f.site}" if f.site else ""
        lines.append(f"- Finding {f.name}{site}: {state}{' (' + ', '.join(numbers) + ')' if numbers else ''}")
    for found in detected_by_term(evidence).values():  # a detector's boxes: how many to state
        if found:
            by = f" by {found[0].model}" if found[0].model else ""
            noun = detection_noun(found[0], len(found))
            lines.append(f"- {len(found)} {noun} detected{by}: state this number or every one of them")
    for s in evidence.segments:
        lines.append(f"- Segmented: {s.label}")
    if len(lines) == context_lines and evidence.analyzers:
        lines.append(f"- {ANALYSIS_RAN_NOTHING_REPORTED} (state no finding, present or absent)")
    if evidence.prior_report:
        lines.append(f"- Prior report (for context only, do not copy its numbers): {evidence.prior_report}")
    return "\n".join(lines) if lines else "- No analyzer results."


def report_prompt(evidence: Evidence, instruction: str | None = None) -> str:
    """The whole prompt for a report draft: instruction, then the facts."""
    return f"{instruction or REPORT_INSTRUCTION}\n\nFacts:\n{evidence_facts(evidence)}\n"


def impression_prompt(
    findings_text: str, context: StudyContext | None = None, instruction: str | None = None
) -> str:
    """The prompt for the findings-to-impression task."""
    described = context_sentence(context) if context else None
    head = f"{described}\n" if described else ""
    findings = findings_text.strip()
    return f"{instruction or IMPRESSION_INSTRUCTION}\n\n{head}FINDINGS:\n{findings}\n\nIMPRESSION:\n"


_SECTIONS = re.compile(r"FINDINGS\s*:\s*(?P<findings>.*?)\s*IMPRESSION\s*:\s*(?P<impression>.*)", re.S | re.I)


def parse_report(answer: str) -> DraftText:
    """FINDINGS and IMPRESSION of a model's answer; :class:`DrafterError` when either is missing."""
    match = _SECTIONS.search(answer)
    if not match or not match.group("findings").strip() or not match.group("impression").strip():
        shown = answer.strip().replace("\n", " ")
        shown = shown[:200] + ("..." if len(shown) > 200 else "")
        raise DrafterError(f"the model's answer has no FINDINGS and IMPRESSION sections: {shown!r}")
    return DraftText(findings=match.group("findings").strip(), impression=match.group("impression").strip())


def parse_impression(answer: str) -> str:
    """The impression of a model's answer ("IMPRESSION:" label dropped); :class:`DrafterError` if empty."""
    text = re.sub(r"^\s*IMPRESSION\s*:\s*", "", answer.strip(), flags=re.I).strip()
    if not text:
        raise DrafterError("the model's answer is empty")
    return text
