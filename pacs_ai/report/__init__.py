"""Draft radiology reports from analyzer results, with guardrails.

The pieces, each in its own module:

* :mod:`pacs_ai.report.evidence`: what is known about a study (DICOM context,
  analyzer measurements, findings and segments, the prior report), built from
  the job findings the runner stores;
* :mod:`pacs_ai.report.drafters`: the drafter backends behind one interface
  (``template``, ``transformers``, ``openai``) and their registry;
* :mod:`pacs_ai.report.guardrails`: pure checks every draft must pass (numbers,
  laterality, negation, unsupported findings);
* :mod:`pacs_ai.report.draft`: the orchestration the pipeline and worklist
  call: :func:`~pacs_ai.report.draft.draft_report` and
  :func:`~pacs_ai.report.draft.draft_impression` draft with the configured
  backend, check, and fall back to the template draft with the reason.

Every draft is unverified AI output until a radiologist signs it, and says so
in its first line.
"""
