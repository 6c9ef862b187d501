"""Impression suggestions from the site's signed reports: import, index, retrieve, and draft statistics.

A real SQLite index (schema by Alembic), real files in each import format, the
``pacs-ai`` command line in a subprocess, and the retrieval drafter reading the
index through its registered name.
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import Job, JobState, Patient, Series, Study, utcnow
from pacs_ai.index.reports import ReportDraft, ReportStatus, SignedReport
from pacs_ai.report.draft import draft_impression
from pacs_ai.report.drafters import DrafterConfig, get_drafter
from pacs_ai.report.signed_reports import import_reports, read_past_reports
from tests.integration.test_cli import pacs_ai_in_process as run_cli

PAST_REPORTS = [
    (
        "The heart is normal in size. The lungs are clear. No pneumothorax.",
        "No acute cardiopulmonary disease.",
    ),
    ("Heart size normal. Lungs are clear. No pleural effusion.", "No acute cardiopulmonary abnormality."),
    ("Small right pleural effusion. No pneumothorax. Heart size is normal.", "Small right pleural effusion."),
    ("Moderate left pleural effusion with adjacent atelectasis.", "Moderate left pleural effusion."),
    ("Right lower lobe consolidation. No pleural effusion.", "Right lower lobe pneumonia."),
]


def pacs_ai(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacs-ai ARGS`` on ``data_dir``, in this process (the verbs are under test, not the process)."""
    return run_cli(*args, PACS_AI_DATA_DIR=str(data_dir), COLUMNS="200")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    upgrade_schema(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    return tmp_path


def write_files(directory: Path) -> dict[str, Path]:
    csv_path = directory / "reports.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "findings", "impression", "modality"])
        for number, (findings, impression) in enumerate(PAST_REPORTS[:3]):
            writer.writerow([f"csv-{number}", findings, impression, "CR"])
        writer.writerow(["csv-bad", "Lungs are clear.", "", "CR"])
    jsonl_path = directory / "reports.jsonl"
    lines = [
        json.dumps(
            {"id": "jsonl-0", "report": f"FINDINGS: {PAST_REPORTS[3][0]} IMPRESSION: {PAST_REPORTS[3][1]}"}
        ),
        "{not json",
        json.dumps({"id": "csv-0", "findings": "duplicate id", "impression": "skipped"}),
    ]
    jsonl_path.write_text("\n".join(lines) + "\n")
    findings, impression = PAST_REPORTS[4]
    form = base64.b64encode(f"FINDINGS: {findings}\nIMPRESSION: {impression}".encode()).decode()
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {
                    "resourceType": "DiagnosticReport",
                    "id": "fhir-0",
                    "status": "final",
                    "code": {"text": "XR chest"},
                    "conclusion": impression,
                    "presentedForm": [{"contentType": "text/plain", "data": form}],
                }
            }
        ],
    }
    fhir_path = directory / "bundle.json"
    fhir_path.write_text(json.dumps(bundle))
    return {"csv": csv_path, "jsonl": jsonl_path, "fhir": fhir_path}


def test_past_reports_are_imported_and_suggest_impressions(data_dir: Path, tmp_path: Path) -> None:
    files = write_files(tmp_path)
    result = pacs_ai(data_dir, "reports", "import", str(files["csv"]), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["imported"], summary["duplicates"]) == (3, 0)
    assert summary["problems"] == [{"where": "line 5", "reason": summary["problems"][0]["reason"]}]
    assert "no impression" in summary["problems"][0]["reason"]

    summary = json.loads(pacs_ai(data_dir, "reports", "import", str(files["jsonl"]), "--json").stdout)
    assert (summary["imported"], summary["duplicates"]) == (1, 1)
    assert summary["problems"][0]["where"] == "line 2" and "not JSON" in summary["problems"][0]["reason"]
    summary = json.loads(pacs_ai(data_dir, "reports", "import", str(files["fhir"]), "--json").stdout)
    assert summary == {"imported": 1, "duplicates": 0, "problems": []}
    bad = pacs_ai(data_dir, "reports", "import", str(tmp_path / "missing.csv"))
    assert bad.returncode == 1 and "is not a file" in bad.stdout

    url = f"sqlite:///{data_dir / 'index.sqlite3'}"
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        again = import_reports(session, read_past_reports(files["csv"]))
        assert (again.imported, again.duplicates) == (0, 3)
        rows = session.scalars(select(SignedReport).order_by(SignedReport.id)).all()
        assert [r.external_id for r in rows] == ["csv-0", "csv-1", "csv-2", "jsonl-0", "fhir-0"]
        assert rows[3].findings_text == PAST_REPORTS[3][0] and rows[4].impression_text == PAST_REPORTS[4][1]
    engine.dispose()

    config = DrafterConfig(backend="retrieval", params={"database_url": url, "neighbours": 5})
    drafter = get_drafter(config.backend, config.params)
    # Adapted to the current findings: the similar report's effusion was on the right.
    draft = draft_impression("Small left pleural effusion. No pneumothorax.", config, drafter=drafter)
    assert (draft.backend, draft.fallback_reason) == ("retrieval", None)
    assert draft.impression == "Small left pleural effusion." and draft.guardrails.passed
    normal = draft_impression("The heart is normal in size. The lungs are clear.", config, drafter=drafter)
    assert normal.impression in ("No acute cardiopulmonary disease.", "No acute cardiopulmonary abnormality.")
    # "Right lower lobe pneumonia" was signed for a consolidation; a suggestion hedges or drops it.
    hedged = draft_impression("Right lower lobe consolidation. No pleural effusion.", config, drafter=drafter)
    assert hedged.guardrails.passed and hedged.impression != "Right lower lobe pneumonia."


def _study_with_job(session) -> tuple[int, int]:
    patient = Patient(patient_id="P1", issuer="", patient_name="Test^Patient")
    session.add(patient)
    session.flush()
    study = Study(
        study_instance_uid="1.2.826.0.1.3680043.8.498.99.1", patient_fk=patient.id, first_received_at=utcnow()
    )
    session.add(study)
    session.flush()
    series = Series(
        series_instance_uid="1.2.826.0.1.3680043.8.498.99.2",
        study_fk=study.id,
        modality="CR",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        instance_count=1,
    )
    session.add(series)
    session.flush()
    job = Job(
        idempotency_key="stats-test",
        series_fk=series.id,
        profile="cxr",
        analyzer="none",
        analyzer_version="1",
        version=1,
        params={},
        destinations=[],
        priority_rules=[],
        state=JobState.SUCCEEDED,
        attempts=1,
        instance_count=1,
    )
    session.add(job)
    session.flush()
    return study.id, job.id


def test_drafts_stats_per_drafter_and_model(data_dir: Path) -> None:
    url = f"sqlite:///{data_dir / 'index.sqlite3'}"
    engine = make_engine(url)
    outcomes = [
        # (requested, backend, model, status, edited, signed impression, fallback)
        (
            "retrieval",
            "retrieval",
            "tfidf-5-reports",
            ReportStatus.ACCEPTED,
            False,
            "No acute disease.",
            None,
        ),
        (
            "retrieval",
            "retrieval",
            "tfidf-5-reports",
            ReportStatus.ACCEPTED,
            True,
            "No acute disease seen.",
            None,
        ),
        ("retrieval", "retrieval", "tfidf-5-reports", ReportStatus.REJECTED, False, None, None),
        ("openai", "template", "template", ReportStatus.ACCEPTED, False, "No acute disease.", "numbers: ..."),
        ("openai", "openai", "medgemma-27b", ReportStatus.DRAFT, False, None, None),
    ]
    with session_scope(make_session_factory(engine)) as session:
        study_id, job_id = _study_with_job(session)
        for version, (requested, backend, model, status, edited, signed, fallback) in enumerate(outcomes, 1):
            session.add(
                ReportDraft(
                    study_fk=study_id,
                    job_fk=job_id,
                    job_ids=[job_id],
                    version=version,
                    status=status,
                    findings_text="The lungs are clear.",
                    impression_text="No acute disease.",
                    backend=backend,
                    model=model,
                    guardrail={"passed": True, "requested_backend": requested},
                    fallback_reason=fallback,
                    signed_findings_text="The lungs are clear." if signed else None,
                    signed_impression_text=signed,
                    edited=edited,
                )
            )
        session.add(
            SignedReport(
                source="import", external_id="x", findings_text="Lungs clear.", impression_text="Normal."
            )
        )
    result = pacs_ai(data_dir, "drafts", "stats", "--json")
    assert result.returncode == 0, result.stderr
    rows = {(r["drafter"], r["model"]): r for r in json.loads(result.stdout)}
    retrieval = rows[("retrieval", "tfidf-5-reports")]
    assert (
        retrieval["drafts"],
        retrieval["signed_unchanged"],
        retrieval["signed_edited"],
        retrieval["rejected"],
    ) == (
        3,
        1,
        1,
        1,
    )
    assert retrieval["share_signed_unchanged"] == pytest.approx(1 / 3, abs=1e-3)
    assert retrieval["edit_distance_median"] == 2.5 and retrieval["guardrail_fallbacks"] == 0
    fallback = rows[("openai", "template")]
    assert (fallback["guardrail_fallbacks"], fallback["share_guardrail_fallbacks"]) == (1, 1.0)
    assert rows[("openai", "medgemma-27b")]["open"] == 1
    table = pacs_ai(data_dir, "drafts", "stats")
    assert table.returncode == 0 and "retrieval" in table.stdout

    # Signed worklist drafts are indexed as signed reports when the retrieval drafter reads them.
    drafter = get_drafter("retrieval", {"database_url": url})
    assert len(drafter.index()) == 1 + 3
    with session_scope(make_session_factory(engine)) as session:
        sources = sorted(session.scalars(select(SignedReport.external_id)))
    assert sources == ["draft:1", "draft:2", "draft:4", "x"]
    engine.dispose()
