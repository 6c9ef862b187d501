"""The scheduler wakes when a series' quiet period ends, not at its next regular pass.

A real index (SQLite), a real spool and the listener's own store path; the scheduler's regular
interval is ten minutes, so only the wake-up at the quiet period's end can route the series.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Instance, Job, RoutingState, Series
from pacs_ai.receive.headers import STATUS_SUCCESS
from pacs_ai.receive.store import StoreHandler
from pacs_ai.route.scheduler import MIN_PASS_GAP_SECONDS, QUIET_MARGIN_SECONDS, Scheduler
from tests.integration.synthetic_ct import make_ct_series, write_series
from tests.integration.test_storage_uploads import _store, any_ct_index
from tests.service import REPO_ROOT
from workers.factory import create_app
from workers.task_queue import CeleryTaskQueue

QUIET_SECONDS = 1.0
INTERVAL_SECONDS = 600.0


def test_a_series_is_routed_when_its_quiet_period_ends(tmp_path: Path) -> None:
    settings, sessions = any_ct_index(
        tmp_path, quiet_period_seconds=QUIET_SECONDS, scheduler_interval_seconds=INTERVAL_SECONDS
    )
    app = create_app(settings)
    scheduler = Scheduler(app.settings, sessions, CeleryTaskQueue(app))

    # Nothing received: the regular interval.
    scheduler.run_once()
    assert scheduler.seconds_until_next_pass() == INTERVAL_SECONDS

    sources = write_series(make_ct_series(3, 16, 16), tmp_path / "sources")
    assert [status for status, _ in _store(StoreHandler(settings), sources, tmp_path / "in")] == [
        STATUS_SUCCESS
    ] * 3
    scheduler.run_once()  # sees the series still receiving
    with session_scope(sessions) as session:
        assert session.scalars(select(Series.routing_state)).one() == RoutingState.RECEIVING
        latest = session.scalar(select(func.max(Instance.received_at)))
    assert latest is not None
    quiet_at = latest + timedelta(seconds=QUIET_SECONDS)
    # The wait ends just after the quiet period (never sooner than the shortest gap between passes).
    wait = scheduler.seconds_until_next_pass(now=latest + timedelta(seconds=0.25))
    assert abs(wait - (0.75 + QUIET_MARGIN_SECONDS)) < 1e-6
    assert scheduler.seconds_until_next_pass(now=quiet_at) == MIN_PASS_GAP_SECONDS

    time.sleep(scheduler.seconds_until_next_pass())
    scheduler.run_once()
    with session_scope(sessions) as session:
        assert session.scalars(select(Series.routing_state)).one() == RoutingState.ROUTED
        opened = session.scalars(select(Job.created_at)).one()
    assert opened >= quiet_at
    # Nothing is waiting any more: back to the regular interval.
    assert scheduler.seconds_until_next_pass() == INTERVAL_SECONDS


_LOAD_ANALYZERS = """
import sys
from pathlib import Path

from tests.integration.test_storage_uploads import any_ct_index
from pacs_ai.route.scheduler import Scheduler
from workers.factory import create_app
from workers.task_queue import CeleryTaskQueue

settings, sessions = any_ct_index(Path(sys.argv[1]))
app = create_app(settings)
scheduler = Scheduler(app.settings, sessions, CeleryTaskQueue(app))
before = "pacs_ai.analyze.lung" in sys.modules
names = scheduler.load_analyzers()
print(before, "pacs_ai.analyze.lung" in sys.modules, ",".join(names))
"""


def test_the_analyzers_the_profiles_name_are_loaded_before_the_first_series(tmp_path: Path) -> None:
    """The service loads them at start (``Scheduler.load_analyzers``): the first series routed after a
    start no longer waits for SciPy's import.  A fresh interpreter, so nothing is loaded already."""
    loaded = subprocess.run(
        [sys.executable, "-c", _LOAD_ANALYZERS, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert loaded.stdout.split() == ["False", "True", "ct-chest-lung"]
