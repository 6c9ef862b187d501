"""Whether the listener can still take associations: its processes' slots and file descriptors.

Each listener process writes its counts to a small JSON file in
``data_dir/run`` every :data:`PUBLISH_SECONDS` (:func:`publish_listener_state`),
and ``pacs-ai status`` reads them (:func:`listener_capacity_problems`), so
status reports unhealthy, with the reason, when the association or
negotiation slots are all taken or a process is running out of descriptors.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from pathlib import Path

from pacs_ai.config import Settings

#: How often a listener process writes its state file, in seconds.
PUBLISH_SECONDS = 2.0
#: A state file older than this is from a process that no longer writes it.
STALE_SECONDS = 30.0
#: Share of the descriptor limit in use from which status reports a problem.
DESCRIPTORS_HIGH = 0.9


def listener_state_file(settings: Settings, pid: int) -> Path:
    """Where listener process ``pid`` publishes its counts."""
    return settings.data_dir / "run" / f"listener-{pid}.json"


def open_descriptors() -> tuple[int, int]:
    """(descriptors open, soft limit) of this process."""
    return len(os.listdir("/proc/self/fd")), resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def publish_listener_state(path: Path, state: dict[str, int]) -> None:
    """Replace ``path`` with ``state`` (and the time), atomically; an error only loses this update."""
    descriptors, descriptor_limit = open_descriptors()
    record = {**state, "descriptors": descriptors, "descriptor_limit": descriptor_limit, "at": time.time()}
    temporary = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temporary, path)


def listener_capacity_problems(settings: Settings, listener_pids: list[int]) -> list[str]:
    """Why the listener processes ``listener_pids`` cannot take (many) more associations; [] if they can."""
    problems = []
    states = {}
    for pid in listener_pids:
        try:
            state = json.loads(listener_state_file(settings, pid).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not written yet (a process just started)
        if time.time() - float(state.get("at", 0)) <= STALE_SECONDS:
            states[pid] = state
    associations = sum(int(state.get("associations", 0)) for state in states.values())
    if states and associations >= settings.maximum_associations:
        problems.append(
            f"the listener's association slots are all taken ({associations} of maximum_associations="
            f"{settings.maximum_associations}): new senders are rejected"
        )
    for pid, state in sorted(states.items()):
        negotiating = int(state.get("negotiating", 0))
        if negotiating >= settings.maximum_negotiating_connections:
            problems.append(
                f"listener pid {pid}: {negotiating} connections negotiating, the maximum "
                "(maximum_negotiating_connections): new connections are closed unanswered"
            )
        descriptors, limit = int(state.get("descriptors", 0)), int(state.get("descriptor_limit", 0))
        if limit and descriptors >= DESCRIPTORS_HIGH * limit:
            problems.append(
                f"listener pid {pid} has {descriptors} of its {limit} file descriptors open: "
                "it will soon refuse every instance (raise the limit, `ulimit -n`, or look for a leak)"
            )
    return problems
