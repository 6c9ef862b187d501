"""Jobs that cannot succeed fail once, visibly, with the reason; they are not retried."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pacs_ai.synthetic.phantom import PhantomTruth
from tests.peers import storescu, wait_for

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
    service = service_factory(profiles_dir=profiles)

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
