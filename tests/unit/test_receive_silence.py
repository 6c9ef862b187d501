"""The listener's idle watch: an association is cancelled only after its peer stayed silent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from pacs_ai.receive.server import SilenceWatch

Association = Callable[[SilenceWatch], Coroutine[Any, Any, None]]


def _watch(association: Association) -> tuple[bool, float]:
    """Run ``association`` under a watch; (whether the watch expired, seconds until it ended)."""

    async def run() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def watched() -> None:
            await association(watch)

        task = loop.create_task(watched())
        watch = SilenceWatch(loop, task)  # made before the task first runs
        with contextlib.suppress(asyncio.CancelledError):
            await task
        watch.stop()
        return watch.expired, loop.time() - started

    return asyncio.run(run())


def _armed(times: int, every: float, deadline: float, then_wait: float) -> Association:
    async def association(watch: SilenceWatch) -> None:
        for _ in range(times):
            watch.arm(deadline)
            await asyncio.sleep(every)
        await asyncio.sleep(then_wait)

    return association


def test_a_peer_that_keeps_sending_is_never_cut_off() -> None:
    # Ten re-armings 0.05 s apart outlast the 0.2 s deadline more than twice.
    expired, elapsed = _watch(_armed(10, 0.05, 0.2, 0.0))
    assert not expired
    assert elapsed >= 0.5


def test_a_silent_peer_is_cut_off_after_the_deadline_not_before() -> None:
    expired, elapsed = _watch(_armed(4, 0.05, 0.2, 5.0))
    assert expired
    # Last armed at about 0.15 s, so cut off at about 0.35 s: not at the first deadline
    # (0.2 s), and long before the 5 s wait would have ended.
    assert 0.3 <= elapsed < 2.0


def test_a_shorter_deadline_replaces_a_longer_one() -> None:
    async def association(watch: SilenceWatch) -> None:
        watch.arm(30.0)
        watch.arm(0.1)
        await asyncio.sleep(5.0)

    expired, elapsed = _watch(association)
    assert expired
    assert elapsed < 2.0


def test_a_disarmed_watch_never_cuts_off() -> None:
    async def association(watch: SilenceWatch) -> None:
        watch.arm(0.05)
        watch.arm(None)  # our own work (storing) is not the peer's silence
        await asyncio.sleep(0.3)

    expired, elapsed = _watch(association)
    assert not expired
    assert elapsed >= 0.3
