"""Guardrails reject what the evidence does not support, with the reason; failing drafts fall back."""

from __future__ import annotations

import pytest
from test_report_evidence import chest_ct_header, chest_ct_job

from pacs_ai.report.consistency import check_against_findings
from pacs_ai.report.draft import UNVERIFIED_HEADER, draft_impression, draft_report
from pacs_ai.report.drafters import DrafterConfig, DraftText
from pacs_ai.report.drafters.openai_backend import check_endpoint_is_local
from pacs_ai.report.drafters.template import TemplateDrafter
from pacs_ai.report.evidence import evidence_from_findings
from pacs_ai.report.guardrails import check_draft, check_form, check_text
from pacs_ai.report.prompts import parse_report, report_prompt


@pytest.fixture
def evidence():
    return evidence_from_findings(chest_ct_header(), chest_ct_job())


def reasons(text, evidence):
    return [(v.check, v.message) for v in check_text(text, evidence).violations]


def test_the_template_draft_passes(evidence):
    draft = TemplateDrafter().draft_report(evidence)
    assert check_draft(draft.findings, draft.impression, evidence).passed


def test_a_wrong_number_is_rejected(evidence):
    [(check, message)] = reasons("Right lung volume 2600 mL.", evidence)
    assert check == "numbers"
    assert "'2600 mL' matches no value" in message and "Right lung Volume 2512 mL" in message


def test_a_number_at_its_printed_precision_and_in_other_units_passes(evidence):
    assert reasons("Right lung volume 2512 mL, about 2.5 L; mean lung density -862 HU.", evidence) == []


def test_a_number_without_unit_or_with_another_unit_is_rejected(evidence):
    assert reasons("Right lung volume 2512.", evidence) == [
        ("numbers", "'2512' has no unit (in 'Right lung volume 2512.')")
    ]
    [(check, message)] = reasons("Right lung volume 2512 HU.", evidence)
    assert check == "numbers" and "has unit HU, the evidence has that value in mL" in message


def test_a_value_on_the_wrong_side_is_rejected(evidence):
    [(check, message)] = reasons("Left lung volume 2512 mL.", evidence)
    assert check == "laterality"
    assert "stated for the left but is the value of Right lung Volume" in message


def test_a_finding_on_the_wrong_side_is_rejected(evidence):
    [(check, message)] = reasons("AI-detected, unverified: right pneumothorax.", evidence)
    assert check == "laterality" and "evidence has it on the left" in message


def test_a_present_finding_negated_is_rejected(evidence):
    [(check, message)] = reasons("No pneumothorax.", evidence)
    assert check == "negation" and "negates pneumothorax; the evidence has it present" in message


def test_an_absent_finding_asserted_is_rejected(evidence):
    [(check, message)] = reasons("Small pleural effusion.", evidence)
    assert check == "negation" and "asserts pleural effusion; the evidence has it absent" in message
    # A hedge is an assertion too.
    assert reasons("Pleural effusion cannot be excluded.", evidence)[0][0] == "negation"


def test_findings_the_evidence_does_not_speak_about_are_rejected(evidence):
    [(check, message)] = reasons("Small nodule in the right upper lobe.", evidence)
    assert (check, message.endswith("asserts nodule, which no analyzer reported")) == ("unsupported", True)
    [(check, message)] = reasons("No consolidation.", evidence)
    assert (check, message.endswith("rules out consolidation, which no analyzer assessed")) == (
        "unsupported",
        True,
    )


def test_emphysema_follows_the_laa_band():
    mild = evidence_from_findings(None, chest_ct_job(laa_whole=6.7))
    assert reasons("Mild emphysema.", mild) == []
    normal = evidence_from_findings(
        None, {**chest_ct_job(laa_whole=3.0), "measurements": chest_ct_job(laa_whole=3.0)["measurements"][8:]}
    )
    assert reasons("Mild emphysema.", normal)[0][0] == "negation"


class FixedAnswerDrafter:
    """A backend whose model always writes the same text (what a language model may write)."""

    name = "fixed"
    model_id = "fixed-answer"

    def __init__(self, findings: str, impression: str) -> None:
        self.text = DraftText(findings, impression)

    def draft_report(self, evidence, images=()):
        return self.text

    def draft_impression(self, findings_text, context=None):
        return self.text.impression


def test_a_draft_that_fails_falls_back_to_the_template_with_the_reason(evidence):
    bad = FixedAnswerDrafter("Right lung volume 2600 mL.", "No pneumothorax.")
    draft = draft_report(evidence, drafter=bad)
    assert (draft.backend, draft.requested_backend, draft.model_id) == ("template", "fixed", None)
    assert draft.guardrails.passed
    assert draft.rejected == bad.text
    assert "fixed draft failed the guardrails: numbers: '2600 mL'" in draft.fallback_reason
    assert "negation: 'No pneumothorax.'" in draft.fallback_reason
    assert draft.text.startswith(UNVERIFIED_HEADER)
    assert "replaced by the template draft" in draft.text and draft.to_dict()["fallback_reason"]


def test_a_draft_that_passes_is_kept(evidence):
    good = FixedAnswerDrafter(
        "Right lung volume 2512 mL. Left pneumothorax, AI-detected, unverified (probability 91%).",
        "AI-detected, unverified: left pneumothorax. Mild emphysema-like low attenuation (%LAA-950 6.7%).",
    )
    draft = draft_report(evidence, drafter=good)
    assert (draft.backend, draft.model_id, draft.fallback_reason) == ("fixed", "fixed-answer", None)
    assert draft.text.startswith(UNVERIFIED_HEADER) and "fixed (fixed-answer) backend" in draft.text


def test_a_draft_that_echoes_its_prompt_is_refused_though_its_facts_pass(evidence):
    """What transformers serve returned for a tiny Qwen2.5-VL: image tokens, the prompt, then noise."""
    prompt = report_prompt(evidence)
    echoed = "<|vision_start|><|image_pad|><|vision_end|>" + prompt + "U\ufffd riOjra\x00"
    text = parse_report(echoed)
    assert text.findings == "<findings sentences>"  # the facts list lands in the impression
    assert check_text(f"{text.findings}\n{text.impression}", evidence).passed  # every fact is true
    draft = draft_report(evidence, drafter=FixedAnswerDrafter(text.findings, text.impression))
    assert draft.backend == "template" and draft.rejected == text
    for part in ("unreadable", "model tokens or placeholders: '<findings sentences>'", "repeats the prompt"):
        assert part in draft.fallback_reason
    # Each form check on its own; report prose with "<" for "less than" is not markup.
    only = [check_form(t) for t in ("Facts:\n- Lung", "use only the facts listed.", "Nodule <|im_end|>")]
    assert [[v.check for v in found] for found in only] == [["format"]] * 3
    assert check_form("Left pneumothorax, < 5 mm apart from the pleura.\nNo effusion.") == []


def test_backend_configuration_errors_fall_back_with_the_reason(evidence, tmp_path):
    draft = draft_report(evidence, DrafterConfig(backend="openai", params={"model": "m"}))
    assert draft.backend == "template" and "openai drafter is disabled" in draft.fallback_reason
    draft = draft_report(
        evidence, DrafterConfig(backend="transformers", params={"model_dir": "google/medgemma-4b-it"})
    )
    assert "is not a directory" in draft.fallback_reason and "never downloads" in draft.fallback_reason
    draft = draft_report(evidence, DrafterConfig(backend="nope"))
    assert "unknown drafter backend 'nope'" in draft.fallback_reason


def test_public_endpoints_are_refused_before_anything_is_sent(evidence):
    from pacs_ai.report.drafters import DrafterConfigError

    with pytest.raises(DrafterConfigError, match="public address"):
        check_endpoint_is_local("http://8.8.8.8/v1")
    assert check_endpoint_is_local("http://127.0.0.1:8000/v1") == ["127.0.0.1"]
    assert check_endpoint_is_local("http://10.1.2.3/v1") == ["10.1.2.3"]
    params = {"base_url": "http://8.8.8.8/v1", "model": "m", "timeout_seconds": 0.1, "max_retries": 0}
    draft = draft_report(evidence, DrafterConfig(backend="openai", params=params))
    assert "must not leave the hospital network" in draft.fallback_reason


def test_impression_guardrails_read_the_findings_as_evidence():
    findings = "No pneumothorax. Small left pleural effusion. Heart size is normal."
    bad = draft_impression(
        findings, drafter=FixedAnswerDrafter("", "Right pleural effusion and pneumothorax.")
    )
    assert bad.backend == "template" and bad.kind == "impression"
    assert "laterality" in bad.fallback_reason and "negation" in bad.fallback_reason
    assert bad.impression == "Small left pleural effusion."
    good = draft_impression(findings, drafter=FixedAnswerDrafter("", "Small left pleural effusion."))
    assert good.backend == "fixed" and good.guardrails.passed


def test_a_count_the_findings_give_may_be_repeated_without_a_unit():
    """IU X-ray: "There are 2 right upper lobe lung nodules ..." copied into the impression is faithful."""
    findings = "There are 2 right upper lobe lung nodules, the largest measuring approximately 12 mm."
    assert check_against_findings(findings, findings) == []
    [wrong] = check_against_findings("There are 3 right upper lobe lung nodules.", findings)
    assert (wrong.check, wrong.message) == (
        "numbers",
        "'3' has no unit (in 'There are 3 right upper lobe lung nodules.')",
    )
    [elsewhere] = check_against_findings("2 left upper lobe lung nodules.", findings)
    assert elsewhere.check == "laterality"
