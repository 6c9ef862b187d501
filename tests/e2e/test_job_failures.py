"""Failures are visible and recorded: jobs that cannot succeed, and a PACS that is down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pacs_ai.synthetic.phantom import PhantomTruth
from tests.e2e.conftest import NO_DRAFT_REPORTS, NO_WORKLIST
from tests.e2e.metrics_scrape import samples, value
from tests.e2e.test_chest_ct_roundtrip import fetch_results
from tests.peers import OrthancServer, free_port, storescu, wait_for

pytestmark = pytest.mark.e2e

MISCONFIGURED_PROFILE = """
name: chest-with-a-typo
match: {modality: [CT], min_instances: 20}
analyzers:
  - name: ct-chest-lung
    params: {treshold: -400}
destinations: []
"""


def test_bad_profile_parameters_fail_the_job_once_with_the_reason(
    chest_phantom: PhantomTruth, service_factory: Any, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "typo.yaml").write_text(MISCONFIGURED_PROFILE)
    service = service_factory(profiles_dir=profiles, extra_env=NO_WORKLIST)

    sent = storescu("127.0.0.1", service.port, service.ae_title, chest_phantom.paths)
    assert sent.returncode == 0, sent.stderr

    ((state, attempts, error),) = wait_for(
        lambda: service.query("SELECT state, attempts, error FROM jobs WHERE state = 'FAILED'"),
        timeout=60,
        description="the job to fail",
    )
    assert attempts == 1
    assert error.startswith("profile chest-with-a-typo:") and "treshold" in error
    failed = service.cli("jobs", "list", "--state", "failed", "--json")
    assert failed.returncode == 0 and "treshold" in failed.stdout
    # Prometheus counts the failure by its class, never by its text.
    text = service.scrape()
    scraped = samples(text)
    assert value(scraped, "pacs_ai_jobs_total", outcome="failed") == 1
    assert value(scraped, "pacs_ai_job_failures_total", reason="profile") == 1
    assert "treshold" not in text and "chest-with-a-typo" not in text


def test_results_wait_for_a_pacs_that_is_down_and_are_delivered_when_it_returns(
    chest_phantom: PhantomTruth, service_factory: Any, tmp_path: Path
) -> None:
    pacs_port = free_port()  # nothing listens here yet
    destination = {
        "pacs": {
            "ae_title": "ORTHANC",
            "host": "127.0.0.1",
            "port": pacs_port,
            "max_retries": 20,
            "retry_backoff_seconds": 1.0,
        }
    }
    service = service_factory(destinations=destination, extra_env={**NO_DRAFT_REPORTS, **NO_WORKLIST})
    sent = storescu("127.0.0.1", service.port, service.ae_title, chest_phantom.paths)
    assert sent.returncode == 0, sent.stderr

    failures = wait_for(
        lambda: service.query("SELECT state, attempts, last_error FROM deliveries WHERE attempts >= 1"),
        timeout=90,
        description="failed delivery attempts to be recorded",
    )
    assert all(state == "PENDING" and "could not be reached" in error for state, _, error in failures)

    with OrthancServer(aet="ORTHANC", extra_config={"DicomPort": pacs_port}) as pacs:
        fetch_results(pacs, chest_phantom.study_uid, tmp_path)
        wait_for(
            lambda: [s for (s,) in service.query("SELECT state FROM deliveries")] == ["SENT", "SENT"],
            timeout=30,
            description="deliveries recorded as sent",
        )
        attempts = [n for (n,) in service.query("SELECT attempts FROM deliveries")]
        assert all(n >= 2 for n in attempts), attempts
        scraped = samples(service.scrape())
        assert value(scraped, "pacs_ai_deliveries_total", destination="pacs", state="sent") == 2
        retried = value(scraped, "pacs_ai_deliveries_total", destination="pacs", state="retrying")
        assert retried == sum(attempts) - 2
        audit = [a for (a,) in service.query("SELECT action FROM audit_events WHERE action LIKE 'result.%'")]
        assert "result.send_failed" in audit and audit.count("result.sent") == 2
