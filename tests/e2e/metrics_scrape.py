"""Scraping a running service's /metrics and checking what one study moved (used by the e2e tests).

The check reads the exposition as Prometheus does (prometheus-client's parser) and
asserts exact counts where the study fixes them, so a counter that stays at zero,
or counts twice, fails.  The whole text must hold none of the study's identifying
values (names, IDs, UIDs, dates, descriptions), and no label value may look like
a UID or a date.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom
from prometheus_client.parser import text_string_to_metric_families

from tests.service import PacsAiService

#: A DICOM UID (four or more numeric components) or a DICOM date, in a label value.
_UID = re.compile(r"\d+(\.\d+){3,}")
_DATE = re.compile(r"(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])")

#: Stages every job records (pacs_ai.metrics.JOB_STAGES).
STAGES = ("fetch", "load", "analyze", "encode", "store", "record")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, sample_labels), v in scraped.items() if n == name and wanted <= sample_labels)


def identifying_values(paths: Sequence[Path], more: Iterable[str] = ()) -> set[str]:
    """What a study's files identify it by: names, IDs, UIDs, dates and descriptions (non-trivial ones)."""
    found = set(more)
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.add(str(ds.SOPInstanceUID))
        if path == paths[0]:
            for keyword in (
                "PatientName",
                "PatientID",
                "AccessionNumber",
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "StudyDate",
                "SeriesDate",
                "PatientBirthDate",
                "StudyDescription",
                "SeriesDescription",
                "InstitutionName",
            ):
                text = str(ds.get(keyword, "") or "")
                found.add(text)
                found.update(part for part in text.split("^") if part)
    return {text for text in found if len(text) >= 4}


def assert_no_phi(text: str, identifying: set[str]) -> None:
    """None of ``identifying`` anywhere in the text; no UID or date in any label value."""
    leaked = sorted(value for value in identifying if value in text)
    assert not leaked, f"/metrics shows identifying values: {leaked}"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, label_value in sample.labels.items():
                where = f"{sample.name}{{{name}={label_value!r}}}"
                assert not _UID.search(label_value), f"{where} looks like a UID"
                assert not _DATE.search(label_value), f"{where} looks like a date"


def check_study_metrics(
    service: PacsAiService,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    destination: str,
    deliveries: int,
) -> str:
    """Scrape the service after one study went through it and check the counters moved by that study.

    ``paths`` were sent on one or more associations from ``calling_ae``; one job ran
    and ``deliveries`` results reached ``destination``.  Returns the scraped text.
    """
    text = service.scrape()
    scraped = samples(text)
    count = len(paths)
    assert value(scraped, "pacs_ai_ingest_instances_total", calling_ae=calling_ae) == count, text
    file_bytes = sum(path.stat().st_size for path in paths)
    received = value(scraped, "pacs_ai_ingest_bytes_total", calling_ae=calling_ae)
    # The data sets as received: the files less their preamble and file meta.
    assert 0.95 * file_bytes <= received <= file_bytes, (received, file_bytes)
    assert value(scraped, "pacs_ai_dimse_responses_total", command="C-STORE", status="0x0000") == count
    assert value(scraped, "pacs_ai_store_seconds_count") == count
    assert value(scraped, "pacs_ai_associations_total", calling_ae=calling_ae) >= 1

    ((analyzer,),) = service.query("SELECT analyzer FROM jobs")
    assert value(scraped, "pacs_ai_jobs_total", analyzer=analyzer, outcome="succeeded") == 1, text
    for stage in STAGES:
        stage_count = value(scraped, "pacs_ai_job_stage_seconds_count", stage=stage, analyzer=analyzer)
        assert stage_count == 1, f"stage {stage} of {analyzer}: {stage_count} observations"
    models = {
        dict(labels)["model"]
        for name, labels in scraped
        if name == "pacs_ai_job_stage_seconds_count" and dict(labels).get("analyzer") == analyzer
    }
    assert len(models) == 1 and "unknown" not in models, models
    assert value(scraped, "pacs_ai_deliveries_total", destination=destination, state="sent") == deliveries
    assert value(scraped, "pacs_ai_job_failures_total") == 0
    ((draft_reports,),) = service.query("SELECT count(*) FROM results WHERE kind = 'SR-DRAFT'")
    drafted = value(scraped, "pacs_ai_report_drafts_total", outcome="drafted")
    assert drafted + value(scraped, "pacs_ai_report_drafts_total", outcome="fallback") == draft_reports

    # Sampled by the scheduler: present, and what the host has.
    assert value(scraped, "pacs_ai_disk_free_bytes", directory="data") > 0
    assert value(scraped, "pacs_ai_processes", role="listener") == 1
    assert ("pacs_ai_queue_depth", frozenset({("queue", "cpu")})) in scraped, text

    results = [uid for (uid,) in service.query("SELECT sop_instance_uid FROM results")]
    assert_no_phi(text, identifying_values(paths, results))
    return text
