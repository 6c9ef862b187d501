"""Drafting with guardrails: what the pipeline and the worklist call.

:func:`draft_report` drafts a study's report with the profile's backend,
checks it (:func:`pacs_ai.report.guardrails.check_draft`) and, when the
backend fails or its draft breaks a guardrail, falls back to the template
draft; the reason is kept on the :class:`Draft` and printed in its text.
:func:`draft_impression` does the same for an impression from a findings
section.

Every :class:`Draft` is unverified AI output: its text starts with
:data:`UNVERIFIED_HEADER`, and nothing here can mark it otherwise; signing is
the radiologist's, outside this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pacs_ai.report.drafters import (
    Drafter,
    DrafterConfig,
    DrafterConfigError,
    DrafterError,
    DraftText,
    get_drafter,
)
from pacs_ai.report.drafters.template import TemplateDrafter
from pacs_ai.report.evidence import Evidence, StudyContext, evidence_from_findings_text
from pacs_ai.report.guardrails import GuardrailResult, Violation, check_draft

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

UNVERIFIED_HEADER = "UNVERIFIED AI DRAFT - not reviewed or signed by a radiologist; verify every statement."


@dataclass(frozen=True)
class Draft:
    """A drafted report (or impression) with how it was made and checked."""

    findings: str
    impression: str
    #: Backend whose text this is ("template" after a fallback).
    backend: str
    model_id: str | None
    #: Backend the profile asked for.
    requested_backend: str
    #: Guardrail outcome of the text kept (the template's after a fallback).
    guardrails: GuardrailResult
    #: Why the requested backend's draft was not kept; None when it was.
    fallback_reason: str | None = None
    #: The requested backend's text when it failed the guardrails, kept for review of the failure.
    rejected: DraftText | None = None
    #: "report" or "impression".
    kind: str = "report"

    @property
    def header(self) -> str:
        made_by = self.backend + (f" ({self.model_id})" if self.model_id else "")
        lines = [UNVERIFIED_HEADER, f"Drafted by pacs-ai, {made_by} backend."]
        if self.fallback_reason:
            replaced = f"The {self.requested_backend} draft was replaced by the template draft"
            lines.append(f"{replaced}: {self.fallback_reason}")
        return "\n".join(lines)

    @property
    def text(self) -> str:
        """The draft as shown: header, findings, impression."""
        return f"{self.header}\n\nFINDINGS:\n{self.findings}\n\nIMPRESSION:\n{self.impression}\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for storage (the worklist shows ``text`` and ``fallback_reason``)."""
        return {
            "kind": self.kind,
            "header": self.header,
            "findings": self.findings,
            "impression": self.impression,
            "text": self.text,
            "backend": self.backend,
            "model_id": self.model_id,
            "requested_backend": self.requested_backend,
            "guardrails_passed": self.guardrails.passed,
            "violations": [asdict(v) for v in self.guardrails.violations],
            "fallback_reason": self.fallback_reason,
            "rejected": asdict(self.rejected) if self.rejected else None,
        }


def _drafter(config: DrafterConfig, drafter: Drafter | None) -> Drafter:
    return drafter if drafter is not None else get_drafter(config.backend, config.params)


def _keep_template(
    requested: str,
    template: DraftText,
    evidence: Evidence,
    reason: str,
    kind: str,
    rejected: DraftText | None = None,
) -> Draft:
    guard = (
        check_draft(template.findings, template.impression, evidence)
        if kind == "report"
        else check_draft("", template.impression, evidence)
    )
    if not guard.passed:
        log.error("the template draft breaks its own guardrails (a bug): %s", guard.reason)
    log.warning("%s %s draft replaced by the template draft: %s", requested, kind, reason)
    return Draft(
        template.findings, template.impression, "template", None, requested, guard, reason, rejected, kind
    )


def draft_report(
    evidence: Evidence,
    config: DrafterConfig | None = None,
    *,
    images: Sequence[Image] = (),
    drafter: Drafter | None = None,
) -> Draft:
    """Draft a study's report with ``config``'s backend, checked by the guardrails, template on failure.

    ``images``: key images for multimodal backends
    (:func:`pacs_ai.report.images.render_key_images`).  ``drafter``: an
    already built backend (keeps a loaded model across studies); by default
    one is built from ``config``.  Never raises for a backend failure: the
    template draft is returned with the reason.
    """
    config = config or DrafterConfig()
    template = TemplateDrafter()
    fallback_text = template.draft_report(evidence)
    if config.backend == "template" and drafter is None:
        guard = check_draft(fallback_text.findings, fallback_text.impression, evidence)
        if not guard.passed:
            log.error("the template draft breaks its own guardrails (a bug): %s", guard.reason)
        return Draft(fallback_text.findings, fallback_text.impression, "template", None, "template", guard)
    requested = drafter.name if drafter is not None else config.backend
    try:
        backend = _drafter(config, drafter)
        text = backend.draft_report(evidence, images)
    except (DrafterError, DrafterConfigError) as exc:
        return _keep_template(
            requested, fallback_text, evidence, f"{requested} backend failed: {exc}", "report"
        )
    except Exception as exc:  # a backend bug must not cost the radiologist the draft
        log.exception("%s drafter crashed", requested)
        return _keep_template(
            requested,
            fallback_text,
            evidence,
            f"{requested} backend error: {type(exc).__name__}: {exc}",
            "report",
        )
    guard = check_draft(text.findings, text.impression, evidence)
    if not guard.passed:
        reason = f"{requested} draft failed the guardrails: {guard.reason}"
        return _keep_template(requested, fallback_text, evidence, reason, "report", rejected=text)
    return Draft(text.findings, text.impression, backend.name, backend.model_id, requested, guard)


def draft_impression(
    findings_text: str,
    config: DrafterConfig | None = None,
    *,
    context: StudyContext | None = None,
    drafter: Drafter | None = None,
) -> Draft:
    """An impression for ``findings_text`` with ``config``'s backend, checked against the findings.

    The guardrails read the findings text as the evidence
    (:func:`pacs_ai.report.evidence.evidence_from_findings_text`): the
    impression may not negate what it asserts, assert what it negates, switch
    sides, or bring numbers or findings it does not have.
    """
    if not findings_text.strip():
        raise ValueError("findings text is empty; there is nothing to draft an impression from")
    config = config or DrafterConfig()
    evidence = evidence_from_findings_text(findings_text, context)
    fallback = DraftText(findings_text, TemplateDrafter().draft_impression(findings_text, context))
    if config.backend == "template" and drafter is None:
        guard = check_draft("", fallback.impression, evidence)
        return Draft(
            findings_text, fallback.impression, "template", None, "template", guard, kind="impression"
        )
    requested = drafter.name if drafter is not None else config.backend
    try:
        backend = _drafter(config, drafter)
        impression = backend.draft_impression(findings_text, context)
    except (DrafterError, DrafterConfigError) as exc:
        return _keep_template(
            requested, fallback, evidence, f"{requested} backend failed: {exc}", "impression"
        )
    except Exception as exc:
        log.exception("%s drafter crashed", requested)
        reason = f"{requested} backend error: {type(exc).__name__}: {exc}"
        return _keep_template(requested, fallback, evidence, reason, "impression")
    guard = check_draft("", impression, evidence)
    if not guard.passed:
        reason = f"{requested} impression failed the guardrails: {guard.reason}"
        return _keep_template(
            requested, fallback, evidence, reason, "impression", rejected=DraftText(findings_text, impression)
        )
    return Draft(
        findings_text, impression, backend.name, backend.model_id, requested, guard, kind="impression"
    )


__all__ = ["UNVERIFIED_HEADER", "Draft", "Violation", "draft_impression", "draft_report"]
