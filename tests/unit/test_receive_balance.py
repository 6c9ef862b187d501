"""Association counts shared by listener processes (pacs_ai.receive.balance)."""

from __future__ import annotations

import multiprocessing

import pytest

from pacs_ai.receive.balance import AssociationLoads, ListenerLoad


def test_a_process_is_least_busy_only_when_no_other_serves_fewer() -> None:
    loads = AssociationLoads(2)
    first, second = loads.slot(0), loads.slot(1)
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
    crashed = loads.slot(2)
    crashed.started()
    crashed.started()
    assert loads.counts() == [0, 0, 2]
    loads.slot(2)  # what the supervisor does when it starts the process again
    assert loads.counts() == [0, 0, 0]


def _open_two_associations(slot: ListenerLoad) -> None:
    slot.started()
    slot.started()


def test_a_listener_process_counts_in_memory_shared_with_the_supervisor() -> None:
    loads = AssociationLoads(2)
    child = multiprocessing.get_context("spawn").Process(target=_open_two_associations, args=(loads.slot(1),))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert loads.counts() == [0, 2]


def test_no_listener_processes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one listener process"):
        AssociationLoads(0)
