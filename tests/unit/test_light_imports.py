"""The processes that run no model import no model library.

``pacs-ai status``, ``--help`` and every other verb but ``worker`` (and
``models verify``), the worklist web app, the listener, the scheduler and the
sending of tasks load neither torch, MONAI, transformers nor SimpleITK: those
cost ~8 s of CPU per start-up.  They send Celery tasks by name
(:mod:`workers.celery_app`); only a worker imports the task bodies
(:mod:`workers.factory`, :mod:`workers.tasks`) and with them the models.

Checked in a fresh interpreter, since this test process may already have
imported the heavy libraries for other tests.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The libraries only a worker (or a verb that runs models) may import.
HEAVY = ("torch", "monai", "transformers", "SimpleITK")

#: Modules whose import must not bring in any of :data:`HEAVY`, in the order the probe imports them.
LIGHT = (
    "pacs_ai.cli.main",
    "pacs_ai.worklist",
    "pacs_ai.receive.listener",
    "pacs_ai.route.scheduler",
    "pacs_ai.dispatch.delivery",
    "pacs_ai.ops.jobs",
    "pacs_ai.ops.status",
    "workers.celery_app",
    "workers.task_queue",
    "pacs_ai.service",
)

_PROBE = """
import importlib, json, sys
heavy, light = json.loads(sys.argv[1])
first = {}
for module in light:
    importlib.import_module(module)
    for name in heavy:
        if name in sys.modules and name not in first:
            first[name] = module
print(json.dumps(first))
"""


def test_the_heavy_libraries_are_installed():
    """Otherwise their absence below would prove nothing."""
    assert [name for name in HEAVY if importlib.util.find_spec(name) is None] == []


def test_cli_web_app_listener_and_scheduler_import_no_model_library():
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([HEAVY, LIGHT])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # {library: the first module whose import brought it in}
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


_SUPERVISOR_PROBE = """
import json, sys
from pacs_ai.config import Settings
from pacs_ai.service import worker_specs
specs = worker_specs(Settings(worker_processes=1))
print(json.dumps([name for name in sys.argv[1:] if name in sys.modules]))
"""


def test_serve_plans_its_workers_without_torch_on_a_machine_without_an_nvidia_driver():
    """The supervisor counts GPUs with torch only where the NVIDIA driver lists some."""
    from pacs_ai.service import NVIDIA_DRIVER_GPUS

    if NVIDIA_DRIVER_GPUS.is_dir():
        return  # a GPU machine: torch is how the supervisor counts its devices
    done = subprocess.run(
        [sys.executable, "-c", _SUPERVISOR_PROBE, *HEAVY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
