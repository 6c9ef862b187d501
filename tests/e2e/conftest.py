"""Fixtures for end-to-end tests: a chest CT phantom, Orthanc as the PACS, pacs-ai itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from tests.peers import OrthancServer, chromium
from tests.service import PacsAiService

#: Both ways pacs-ai is deployed: embedded defaults, and PostgreSQL + Redis servers.
BACKENDS = ["embedded", "servers"]

#: For tests about the analysis results (SEG and SR) only: no AI draft report is written or sent.
NO_DRAFT_REPORTS = {"PACS_AI_REPORT_DRAFTS_ENABLED": "false"}
#: For tests that never open the worklist web app: ``serve`` starts one process fewer (a web
#: process's start-up and exit cost a second or two of a core on the shared CI machine).
NO_WORKLIST = {"PACS_AI_WORKLIST_ENABLED": "false"}


@pytest.fixture(scope="session")
def chest_phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomTruth:
    """A 60-slice chest CT phantom with known lung volumes (shared, read-only)."""
    return write_chest_phantom(
        tmp_path_factory.mktemp("phantom"), slices=60, size=256, pixel_spacing_mm=1.5, slice_spacing_mm=5.0
    )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile (:func:`tests.peers.chromium`): a selenium driver."""
    with chromium(tmp_path / "chromium-profile") as driver:
        yield driver


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    with OrthancServer(aet="ORTHANC") as server:
        yield server


def orthanc_destination(orthanc: OrthancServer) -> dict[str, dict[str, object]]:
    return {
        "pacs": {
            "ae_title": orthanc.aet,
            "host": orthanc.host,
            "port": orthanc.dicom_port,
            "max_retries": 3,
            "retry_backoff_seconds": 1.0,
        }
    }


@pytest.fixture
def service_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """Start pacs-ai services; each is stopped at the end of the test, logs shown on failure."""
    started: list[PacsAiService] = []

    def start(**kwargs: object) -> PacsAiService:
        service = PacsAiService(tmp_path / f"pacs-ai-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"---- pacs-ai logs ({service.data_dir})\n{service.stderr_tail()}\n{service.logs()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
