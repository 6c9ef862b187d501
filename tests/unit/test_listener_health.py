"""pacs-ai status learns from the listener processes' state files when slots or descriptors run out."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pacs_ai.config import Settings
from pacs_ai.receive.health import listener_capacity_problems, listener_state_file, publish_listener_state
from pacs_ai.receive.security import open_listener_warning


def test_a_published_state_within_the_limits_is_no_problem(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    publish_listener_state(listener_state_file(settings, os.getpid()), {"associations": 3, "negotiating": 1})
    state = json.loads(listener_state_file(settings, os.getpid()).read_text())
    assert state["descriptors"] > 0 and state["descriptor_limit"] > state["descriptors"]
    assert listener_capacity_problems(settings, [os.getpid()]) == []


def test_slots_and_descriptors_running_out_are_problems(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, maximum_associations=4, maximum_negotiating_connections=8)
    for pid, associations, negotiating, descriptors in ((101, 2, 8, 10), (102, 2, 0, 950)):
        path = listener_state_file(settings, pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "associations": associations,
                    "negotiating": negotiating,
                    "descriptors": descriptors,
                    "descriptor_limit": 1024,
                    "at": time.time(),
                }
            )
        )
    problems = listener_capacity_problems(settings, [101, 102])
    assert len(problems) == 3
    assert "association slots are all taken (4 of maximum_associations=4)" in problems[0]
    assert "pid 101: 8 connections negotiating" in problems[1]
    assert "pid 102 has 950 of its 1024 file descriptors" in problems[2]
    stale = listener_state_file(settings, 102)
    stale.write_text(json.dumps({"associations": 9, "at": time.time() - 3600}))
    assert len(listener_capacity_problems(settings, [102])) == 0, "a stale file is not believed"


def test_an_open_listener_is_warned_about() -> None:
    assert open_listener_warning("0.0.0.0", []) is not None
    assert open_listener_warning("127.0.0.1", []) is None
    assert open_listener_warning("0.0.0.0", [{"ae_title": "CT"}]) is None  # type: ignore[list-item]
