"""The site's signed reports: indexing worklist sign-offs, importing past reports, reading them back.

Impression suggestions learn from what the site's radiologists signed
(:mod:`pacs_ai.report.drafters.retrieval`).  Two ways in, one table
(:class:`pacs_ai.index.reports.SignedReport`):

* every draft signed in the worklist (:func:`index_signed_drafts`, run before
  the reports are read, so nothing signed is missed whatever signed it);
* past reports from a file (:func:`read_past_reports`, ``pacs-ai reports
  import FILE``): CSV or JSON Lines with ``findings`` and ``impression``
  columns (or one ``report`` column with FINDINGS:/IMPRESSION: titles, split
  by medspaCy's sectionizer), optional ``id``, ``modality`` and ``signed_at``;
  or a FHIR Bundle of DiagnosticReport resources (``conclusion`` is the
  impression, a text/plain ``presentedForm`` the whole report).

A report without both a findings and an impression section is reported as a
problem with its line or entry number, never silently dropped; a report whose
``id`` was imported before is skipped as a duplicate.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai.index.reports import ReportDraft, ReportStatus, SignedReport
from pacs_ai.report.clinical_nlp import split_sections

#: File formats ``pacs-ai reports import`` reads.
FORMATS = ("csv", "jsonl", "fhir")


class ReportImportError(ValueError):
    """The file cannot be read at all (unknown format, not JSON where JSON is expected)."""


@dataclass(frozen=True)
class PastReport:
    """One signed report read from a file."""

    external_id: str
    findings: str
    impression: str
    modality: str | None = None
    signed_at: datetime | None = None


@dataclass(frozen=True)
class ImportProblem:
    """A record of the file that could not be imported, and why."""

    where: str
    reason: str


@dataclass
class ImportSummary:
    imported: int = 0
    duplicates: int = 0
    problems: list[ImportProblem] = field(default_factory=list)


def _text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _date(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _from_record(record: dict[str, Any], where: str) -> PastReport | ImportProblem:
    findings, impression = _text(record.get("findings")), _text(record.get("impression"))
    if not (findings and impression) and record.get("report"):
        sections = split_sections(str(record["report"]))
        findings = findings or _text(sections.get("findings"))
        impression = impression or _text(sections.get("impression"))
    if not findings or not impression:
        missing = " and ".join(n for n, v in (("findings", findings), ("impression", impression)) if not v)
        return ImportProblem(
            where,
            f"no {missing} (give columns findings and impression, or a report column "
            "with FINDINGS: and IMPRESSION: titles)",
        )
    external_id = (
        _text(record.get("id"))
        or "sha256:" + hashlib.sha256(f"{findings}\n{impression}".encode()).hexdigest()[:40]
    )
    modality = _text(record.get("modality")).upper() or None
    return PastReport(external_id[:128], findings, impression, modality, _date(record.get("signed_at")))


def _csv_records(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            yield {(k or "").strip().lower(): v for k, v in row.items()}, f"line {number}"


def _jsonl_records(path: Path) -> Iterator[tuple[dict[str, Any], str] | ImportProblem]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield ImportProblem(f"line {number}", f"not JSON: {exc.msg}")
                continue
            if not isinstance(record, dict):
                yield ImportProblem(f"line {number}", "not a JSON object")
                continue
            yield {str(k).lower(): v for k, v in record.items()}, f"line {number}"


def _attachment_text(attachment: dict[str, Any]) -> str:
    content_type = str(attachment.get("contentType") or "text/plain")
    if not content_type.startswith("text/plain") or not attachment.get("data"):
        return ""
    try:
        return base64.b64decode(attachment["data"]).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""


def _fhir_records(path: Path) -> Iterator[tuple[dict[str, Any], str] | ImportProblem]:
    from fhir.resources.bundle import Bundle
    from pydantic import ValidationError

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        bundle = Bundle.model_validate(document)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ReportImportError(f"{path} is not a FHIR Bundle: {str(exc).splitlines()[0]}") from exc
    for number, entry in enumerate(bundle.entry or [], start=1):
        resource = entry.resource
        if resource is None or resource.get_resource_type() != "DiagnosticReport":
            continue
        report = resource.model_dump(mode="json")
        text = "\n".join(_attachment_text(a) for a in report.get("presentedForm") or [])
        identifiers = report.get("identifier") or []
        record = {
            "id": report.get("id") or (identifiers[0].get("value") if identifiers else None),
            "impression": report.get("conclusion"),
            "report": text,
            "signed_at": report.get("issued") or report.get("effectiveDateTime"),
        }
        yield record, f"entry {number} (DiagnosticReport {record['id'] or 'without id'})"


def guess_format(path: Path) -> str:
    """csv, jsonl or fhir from the file name and its first character."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    with path.open(encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith("{") and '"resourceType"' in head and '"Bundle"' in head:
        return "fhir"
    if head.startswith("{"):
        return "jsonl"
    raise ReportImportError(f"cannot tell the format of {path}; give --format ({', '.join(FORMATS)})")


def read_past_reports(path: Path, file_format: str | None = None) -> Iterator[PastReport | ImportProblem]:
    """Every report of the file, or the problem with it (see the module docstring)."""
    if not path.is_file():
        raise ReportImportError(f"{path} is not a file")
    kind = file_format or guess_format(path)
    if kind not in FORMATS:
        raise ReportImportError(f"unknown format {kind!r}; known: {', '.join(FORMATS)}")
    readers = {"csv": _csv_records, "jsonl": _jsonl_records, "fhir": _fhir_records}
    for item in readers[kind](path):
        if isinstance(item, ImportProblem):
            yield item
        else:
            yield _from_record(*item)


def import_reports(session: Session, reports: Iterator[PastReport | ImportProblem]) -> ImportSummary:
    """Store the reports as signed reports (source "import"); repeated ids are counted, not stored twice."""
    summary = ImportSummary()
    known = set(session.scalars(select(SignedReport.external_id).where(SignedReport.source == "import")))
    for report in reports:
        if isinstance(report, ImportProblem):
            summary.problems.append(report)
            continue
        if report.external_id in known:
            summary.duplicates += 1
            continue
        known.add(report.external_id)
        session.add(
            SignedReport(
                source="import",
                external_id=report.external_id,
                findings_text=report.findings,
                impression_text=report.impression,
                modality=report.modality,
                signed_at=report.signed_at,
            )
        )
        summary.imported += 1
    return summary


def index_signed_drafts(session: Session) -> int:
    """Copy every signed worklist draft not yet indexed into the signed reports; returns how many."""
    indexed = select(SignedReport.report_draft_fk).where(SignedReport.report_draft_fk.is_not(None))
    drafts = session.scalars(
        select(ReportDraft).where(ReportDraft.status == ReportStatus.ACCEPTED, ReportDraft.id.not_in(indexed))
    ).all()
    for draft in drafts:
        findings, impression = _text(draft.signed_findings_text), _text(draft.signed_impression_text)
        if not findings or not impression:
            continue
        session.add(
            SignedReport(
                source="worklist",
                external_id=f"draft:{draft.id}",
                report_draft_fk=draft.id,
                findings_text=findings,
                impression_text=impression,
                modality=None,
                signed_at=draft.decided_at,
            )
        )
    return len(drafts)


def signed_corpus(session: Session) -> list[tuple[str, str]]:
    """(findings, impression) of every signed report, worklist sign-offs indexed first."""
    index_signed_drafts(session)
    session.flush()
    rows = session.execute(
        select(SignedReport.findings_text, SignedReport.impression_text).order_by(SignedReport.id)
    )
    return [(findings, impression) for findings, impression in rows]
