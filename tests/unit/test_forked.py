"""ForkedCall: a function run in a forked child, its failure reported with the reason."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pacs_ai.forked import ForkedCall, ForkedCallFailed


def test_the_child_sees_the_parents_memory_and_its_output_is_there_after_wait(tmp_path: Path) -> None:
    data = {"text": "inherited, not pickled"}
    target = tmp_path / "out.txt"
    with ForkedCall(lambda: target.write_text(data["text"]), name="writer") as child:
        child.wait()
    assert target.read_text() == "inherited, not pickled"


def test_an_exception_in_the_child_is_raised_in_the_parent_with_its_type_and_message() -> None:
    def fail() -> None:
        raise ValueError("no label map")

    with ForkedCall(fail, name="SR") as child, pytest.raises(ForkedCallFailed) as caught:
        child.wait()
    assert "SR (forked child) failed: ValueError: no label map" in str(caught.value)


def test_a_child_killed_by_a_signal_is_a_failure() -> None:
    with (
        ForkedCall(lambda: os.kill(os.getpid(), signal.SIGKILL), name="SR") as child,
        pytest.raises(ForkedCallFailed, match="killed by signal 9"),
    ):
        child.wait()


def test_leaving_the_block_early_kills_a_running_child(tmp_path: Path) -> None:
    marker = tmp_path / "finished"

    def slow() -> None:
        time.sleep(30)
        marker.touch()

    started = time.monotonic()
    with pytest.raises(RuntimeError), ForkedCall(slow, name="slow"):
        raise RuntimeError("the parent gives up (a time limit, an error of its own)")
    assert time.monotonic() - started < 10
    assert not marker.exists()
