"""Association counts shared by listener processes (pacs_ai.receive.balance)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pacs_ai.receive.balance import AssociationLoads, ListenerLoad


def test_a_process_is_least_busy_only_when_no_other_serves_fewer() -> None:
    loads = AssociationLoads(2)
    first, second = (ListenerLoad.attach(loads.descriptor, i) for i in (0, 1))
    assert first.is_least_busy() and second.is_least_busy()  # a tie: both may take it

    first.started()
    assert not first.is_least_busy()
    assert second.is_least_busy()

    second.started()
    second.started()
    assert first.is_least_busy() and not second.is_least_busy()

    second.ended()
    assert loads.counts() == [1, 1]
    assert first.serving == 1 and second.serving == 1


def test_a_restarted_process_gets_its_count_reset() -> None:
    loads = AssociationLoads(3)
    crashed = ListenerLoad.attach(loads.descriptor, 2)
    crashed.started()
    crashed.started()
    assert loads.counts() == [0, 0, 2]
    loads.reset(2)  # what the supervisor does when it starts the process again
    assert loads.counts() == [0, 0, 0]


_OPEN_TWO_ASSOCIATIONS = """
import sys
from pacs_ai.receive.balance import ListenerLoad
slot = ListenerLoad.attach(int(sys.argv[1]), 1)
slot.started()
slot.started()
"""


def test_a_listener_process_counts_in_memory_shared_with_the_supervisor() -> None:
    """A separate process that inherited the counts' descriptor writes where the supervisor reads."""
    loads = AssociationLoads(2)
    child = subprocess.run(
        [sys.executable, "-c", _OPEN_TWO_ASSOCIATIONS, str(loads.descriptor)],
        pass_fds=(loads.descriptor,),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert loads.counts() == [0, 2]


def test_no_listener_processes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one listener process"):
        AssociationLoads(0)
