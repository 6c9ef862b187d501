"""A report draft as a FHIR R4 DiagnosticReport, and sending it to a FHIR server.

The resource is built as plain JSON (what goes on the wire) and checked
against the R4B model of ``fhir.resources`` (DiagnosticReport is the same in
R4 and R4B), so a structural mistake fails here and not at the receiving
server.

What it says:

* ``status``: ``partial`` for an AI draft, ``final`` once a radiologist signed it;
* ``code``: LOINC 18748-4 "Diagnostic imaging study", category RAD;
* ``subject``: the patient by identifier only (Patient ID, with the issuer as
  the identifier's assigner); no name, the receiver links it to its own record;
* ``imagingStudy``: the study by its Study Instance UID (``urn:dicom:uid`` /
  ``urn:oid:...``), as are the report's own identifiers (the SR's SOP Instance UID);
* ``conclusion`` is the impression; ``presentedForm`` the whole text
  (findings and impression) as UTF-8 plain text;
* ``performer``: the drafting model (as a display name: no Device resource
  exists on the receiver) and, when signed, the radiologist, who is also
  ``resultsInterpreter``;
* ``meta.security`` AIAST ("artificial intelligence asserted", HL7 v3
  ObservationValue) on every version, since the text started as AI output, and
  ``meta.tag`` ``unverified`` / ``verified`` in pacs-ai's code system.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import httpx
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from pacs_ai.encode.report_sr import ReportText

__all__ = [
    "DICOM_UID_SYSTEM",
    "VERIFICATION_TAG_SYSTEM",
    "FhirDeliveryError",
    "ReportFacts",
    "build_diagnostic_report",
    "post_diagnostic_report",
]

log = logging.getLogger(__name__)

#: FHIR's identifier system for DICOM UIDs (values are ``urn:oid:<uid>``).
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: pacs-ai's code system for whether a person verified the report.
VERIFICATION_TAG_SYSTEM = "urn:pacs-ai:report-verification"
_LOINC = "http://loinc.org"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
_PATIENT_ID_SYSTEM = "urn:pacs-ai:dicom-patient-id"


@dataclass(frozen=True)
class ReportFacts:
    """What a DiagnosticReport says about one report version, in the index's terms."""

    #: Logical id of the resource, e.g. ``"pacs-ai-report-12"`` ([A-Za-z0-9\\-\\.]{1,64}).
    resource_id: str
    status: Literal["partial", "final"]
    study_instance_uid: str
    #: SOP Instance UID of the SR that carries this version.
    sr_instance_uid: str | None
    patient_id: str | None
    patient_id_issuer: str | None
    accession_number: str | None
    #: StudyDate (YYYYMMDD) as received, for effectiveDateTime.
    study_date: str | None
    text: ReportText
    #: ``"<backend> <model id>"`` of the drafter.
    drafted_by: str
    issued: datetime
    #: Display name of the radiologist who signed (``final`` only).
    signed_by: str | None = None
    #: Login of the radiologist who signed.
    signed_by_login: str | None = None


def _uid_identifier(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _person_display(dicom_name: str) -> str:
    """``"Doe^Jane"`` as ``"Jane Doe"``; other forms unchanged."""
    parts = dicom_name.split("^")
    if len(parts) >= 2 and parts[0] and parts[1]:
        return f"{parts[1]} {parts[0]}"
    return dicom_name.replace("^", " ").strip()


def _effective(study_date: str | None) -> str | None:
    if study_date and len(study_date) == 8 and study_date.isdigit():
        return f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    return None


def _plain_text(text: ReportText) -> str:
    return f"FINDINGS:\n{text.findings.strip()}\n\nIMPRESSION:\n{text.impression.strip()}\n"


def _narrative(facts: ReportFacts) -> str:
    state = "AI draft, not verified by a physician" if facts.status == "partial" else "Signed report"
    paragraphs = [f"<p><b>{html.escape(state)}</b></p>"]
    for heading, body in (("Findings", facts.text.findings), ("Impression", facts.text.impression)):
        lines = "<br/>".join(html.escape(line) for line in body.strip().splitlines())
        paragraphs.append(f"<p><b>{heading}:</b><br/>{lines}</p>")
    return '<div xmlns="http://www.w3.org/1999/xhtml">' + "".join(paragraphs) + "</div>"


def build_diagnostic_report(facts: ReportFacts) -> dict[str, Any]:
    """The DiagnosticReport of ``facts`` as FHIR R4 JSON (a dict), validated.

    Raises
    ------
    ValueError
        If the result does not validate (e.g. a malformed id), or ``final``
        is asked for without the radiologist.
    """
    if facts.status == "final" and not facts.signed_by:
        raise ValueError("a final DiagnosticReport needs the radiologist who signed it (signed_by)")
    if facts.issued.tzinfo is None:
        raise ValueError("ReportFacts.issued must be timezone-aware (FHIR instants carry a zone)")
    verified = facts.status == "final"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": facts.resource_id,
        "meta": {
            "security": [
                {
                    "system": _V3_OBSERVATION_VALUE,
                    "code": "AIAST",
                    "display": "Artificial Intelligence asserted",
                }
            ],
            "tag": [
                {
                    "system": VERIFICATION_TAG_SYSTEM,
                    "code": "verified" if verified else "unverified",
                    "display": "Verified by a physician"
                    if verified
                    else "AI draft, not verified by a physician",
                }
            ],
        },
        "text": {"status": "generated", "div": _narrative(facts)},
        "status": facts.status,
        "category": [{"coding": [{"system": _V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {
            "coding": [{"system": _LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
            "text": "Diagnostic imaging report",
        },
        "imagingStudy": [{"type": "ImagingStudy", "identifier": _uid_identifier(facts.study_instance_uid)}],
        "issued": facts.issued.isoformat(),
        "performer": [{"type": "Device", "display": f"pacs-ai {facts.drafted_by} (AI draft)"}],
        "conclusion": facts.text.impression.strip(),
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "language": "en",
                "data": base64.b64encode(_plain_text(facts.text).encode("utf-8")).decode("ascii"),
                "title": "Diagnostic imaging report" + ("" if verified else " (AI draft, unverified)"),
                "creation": facts.issued.isoformat(),
            }
        ],
    }
    identifiers: list[dict[str, Any]] = []
    if facts.sr_instance_uid:
        identifiers.append(_uid_identifier(facts.sr_instance_uid))
    if facts.accession_number:
        identifiers.append(
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "value": facts.accession_number,
            }
        )
    if identifiers:
        report["identifier"] = identifiers
    if facts.patient_id:
        patient: dict[str, Any] = {"system": _PATIENT_ID_SYSTEM, "value": facts.patient_id}
        if facts.patient_id_issuer:
            patient["assigner"] = {"display": facts.patient_id_issuer}
        report["subject"] = {"type": "Patient", "identifier": patient}
    effective = _effective(facts.study_date)
    if effective:
        report["effectiveDateTime"] = effective
    if verified:
        radiologist: dict[str, Any] = {
            "type": "Practitioner",
            "display": _person_display(str(facts.signed_by)),
        }
        if facts.signed_by_login:
            radiologist["identifier"] = {"system": "urn:pacs-ai:user", "value": facts.signed_by_login}
        report["performer"].insert(0, radiologist)
        report["resultsInterpreter"] = [radiologist]
    try:
        DiagnosticReport.model_validate(report)
    except Exception as exc:  # pydantic's ValidationError, re-raised with context
        raise ValueError(f"DiagnosticReport {facts.resource_id} does not validate as FHIR R4: {exc}") from exc
    return report


class FhirDeliveryError(RuntimeError):
    """The FHIR server did not accept the report after all attempts."""


def post_diagnostic_report(
    report: dict[str, Any],
    endpoint: str,
    *,
    timeout_seconds: float = 10.0,
    retries: int = 3,
    backoff_seconds: float = 1.0,
    bearer_token: str | None = None,
    client: httpx.Client | None = None,
) -> str | None:
    """POST ``report`` to ``<endpoint>/DiagnosticReport``; returns the Location the server gave, if any.

    Network errors and 5xx/429 answers are retried (``retries`` times, with
    exponential backoff); a 4xx answer is final, since resending the same
    resource cannot change it.  The request carries ``If-None-Exist`` on the
    SR identifier, so a retry after a lost response does not create a second
    resource on servers that support conditional create.
    """
    url = endpoint.rstrip("/") + "/DiagnosticReport"
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if bearer_token:
        headers["Authorization"] = f"Bearer {bearer_token}"
    for identifier in report.get("identifier", []):
        if identifier.get("system") == DICOM_UID_SYSTEM:
            headers["If-None-Exist"] = f"identifier={DICOM_UID_SYSTEM}|{identifier['value']}"
            break
    own_client = client is None
    http = client or httpx.Client(timeout=timeout_seconds)
    last_problem = "no attempt made"
    try:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff_seconds * 2 ** (attempt - 1))
            try:
                response = http.post(url, json=report, headers=headers, timeout=timeout_seconds)
            except httpx.HTTPError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
                log.warning("FHIR POST to %s failed (attempt %d): %s", url, attempt + 1, last_problem)
                continue
            if response.status_code < 300:
                return response.headers.get("Location")
            last_problem = f"HTTP {response.status_code}: {response.text[:500]}"
            if response.status_code < 500 and response.status_code != 429:
                break
            log.warning("FHIR POST to %s failed (attempt %d): %s", url, attempt + 1, last_problem)
    finally:
        if own_client:
            http.close()
    raise FhirDeliveryError(
        f"FHIR server {endpoint} did not accept DiagnosticReport {report.get('id')}: {last_problem}"
    )
