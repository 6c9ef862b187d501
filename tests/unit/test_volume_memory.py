"""Volume memory is reused only when no array of the previous volume is alive."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_ai.analyze import volume_memory
from pacs_ai.analyze.volume_memory import VolumeMemory

needs_populate = pytest.mark.skipif(volume_memory._POPULATE is None, reason="MAP_POPULATE is Linux only")


def shares_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.shares_memory(a, b))


@needs_populate
def test_a_free_mapping_is_reused_for_a_volume_that_fits() -> None:
    memory = VolumeMemory()
    first = memory.empty((4, 8, 8), np.int16)
    address = first.__array_interface__["data"][0]
    del first
    second = memory.empty((2, 8, 8), np.float32)  # same bytes, another type and shape
    assert second.__array_interface__["data"][0] == address
    assert second.shape == (2, 8, 8) and second.dtype == np.float32 and second.flags.c_contiguous


@needs_populate
@pytest.mark.parametrize("kept", ["the array", "a view of a slice", "a reshaped copy of the view chain"])
def test_a_mapping_still_in_use_is_never_handed_out_again(kept: str) -> None:
    memory = VolumeMemory()
    volume = memory.empty((4, 8, 8), np.int16)
    volume[:] = 7
    alive = {
        "the array": volume,
        "a view of a slice": volume[2],
        "a reshaped copy of the view chain": volume.reshape(-1)[10:].reshape(-1, 2),
    }[kept]
    del volume
    other = memory.empty((4, 8, 8), np.int16)
    other[:] = 0
    assert not shares_memory(alive, other)
    assert (alive == 7).all()


@needs_populate
def test_a_larger_volume_gets_a_new_mapping_which_is_then_kept() -> None:
    memory = VolumeMemory()
    memory.reserve(1024)
    assert memory.reserved_bytes == 1024
    big = memory.empty((4, 32, 32), np.int16)
    assert memory.reserved_bytes == big.nbytes
    del big
    memory.reserve(1024)  # a free mapping at least as large is kept: nothing new
    assert memory.reserved_bytes == 4 * 32 * 32 * 2


def test_empty_arrays_and_no_reserve_need_no_mapping() -> None:
    memory = VolumeMemory()
    memory.reserve(0)
    assert memory.reserved_bytes == 0
    assert memory.empty((0, 8, 8), np.int16).shape == (0, 8, 8)
    assert memory.reserved_bytes == 0


@needs_populate
def test_the_part_of_a_reserve_a_volume_does_not_need_is_given_back() -> None:
    memory = VolumeMemory()
    memory.reserve(64 * 2**20)
    before = _resident_mb()
    volume = memory.empty((16, 512, 512), np.int16)  # 8 MB of the 64
    after = _resident_mb()
    assert before - after > 40, f"resident {before:.0f} MB before, {after:.0f} MB after"
    volume[:] = 1  # the part in use stays usable
    assert memory.reserved_bytes == 64 * 2**20


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * volume_memory.mmap.PAGESIZE / 2**20
