"""Layers point one way: the Celery worker runs without the web package.

Checked in a fresh interpreter, since this test process may already have
imported ``pacs_ai.worklist`` for other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
import workers.app, workers.factory, workers.heartbeat, workers.tasks
import pacs_ai.report.pipeline, pacs_ai.report.records
print(json.dumps(sorted(name for name in sys.modules if name.startswith(("pacs_ai", "workers")))))
"""


def test_the_worker_never_imports_the_web_package():
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "workers.tasks" in loaded and "pacs_ai.report.records" in loaded  # the probe did import them
    assert [name for name in loaded if name.startswith("pacs_ai.worklist")] == []


def test_no_worker_or_report_source_names_the_web_package():
    sources = [*ROOT.joinpath("workers").glob("*.py"), *ROOT.joinpath("pacs_ai", "report").rglob("*.py")]
    offenders = [
        str(path.relative_to(ROOT))
        for path in sources
        if "from pacs_ai.worklist" in path.read_text() or "import pacs_ai.worklist" in path.read_text()
    ]
    assert offenders == []
