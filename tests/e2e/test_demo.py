"""``pacs-ai demo`` against a running ``pacs-ai serve``, from another shell (issue 23, items 3 and 4).

The demo's shell is given only the data directory: the listener's port and AE
title and the destination come from the service's recorded settings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import orthanc_destination
from tests.peers import OrthancServer

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_prints_where_results_went_and_what_they_measured(
    orthanc: OrthancServer, service_factory: Any
) -> None:
    service = service_factory(
        destinations=orthanc_destination(orthanc), extra_env={"PACS_AI_WORKLIST_ENABLED": "false"}
    )
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith("PACS_AI_")}
    env["PACS_AI_DATA_DIR"] = str(service.data_dir)
    demo = subprocess.run(
        [sys.executable, "-m", "pacs_ai.cli.main", "demo", "--timeout", "300"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert re.search(r"SEG \S+: kept at .*; sent to: pacs sent", out), out
    assert re.search(r"SR \S+: kept at .*; sent to: pacs sent", out), out
    truth = re.search(r"written with (\d+) mL right and (\d+) mL left lung", out)
    assert truth, out
    right_truth, left_truth = float(truth.group(1)), float(truth.group(2))
    measured = out.split("what they measured", 1)[1]
    volumes = [float(v) for v in re.findall(r"[Vv]olume.*?: ([\d.]+) (?:mL|ml|cm3)", measured)]
    assert any(v == pytest.approx(right_truth, rel=0.05) for v in volumes), out
    assert any(v == pytest.approx(left_truth, rel=0.05) for v in volumes), out
    assert re.search(r"(?i)(density|Attenuation).*: -[\d.]+ HU", measured), out
    assert re.search(r"low attenuation area.*: [\d.]+ %", measured), out
