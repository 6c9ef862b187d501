"""The receiver's upload threads run at a lower priority than the rest of it (``storage_upload_nice``)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from pacs_ai.receive.uploader import lower_thread_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def _priority_in_a_thread(steps: int) -> int:
    seen: list[int] = []

    def lowered() -> None:
        lower_thread_priority(steps)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    return seen[0]


def test_only_the_upload_thread_runs_lower() -> None:
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert _priority_in_a_thread(5) == min(19, caller + 5)
    assert _priority_in_a_thread(0) == caller  # 0: the listener's priority
    assert _priority_in_a_thread(19) == 19  # never past the lowest
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller  # the caller keeps its own
