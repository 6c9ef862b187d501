"""Which device runs a model, and one model execution per GPU at a time."""

from __future__ import annotations

import contextlib
import fcntl
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_name(preference: str, cuda_device_count: int) -> str:
    """The torch device name for a ``settings.inference_device`` value (pure; unit-tested).

    ``auto``: ``cuda:0`` when CUDA devices are visible, else ``cpu``;
    ``cpu``; ``cuda`` or ``cuda:N``: that device, an error when it does not exist.
    """
    if not DEVICE_PATTERN.match(preference):
        raise ValueError(f"inference_device must be auto, cpu, cuda or cuda:N, got {preference!r}")
    if preference == "auto":
        return "cuda:0" if cuda_device_count > 0 else "cpu"
    if preference == "cpu":
        return "cpu"
    index = int(preference.split(":", 1)[1]) if ":" in preference else 0
    if index >= cuda_device_count:
        raise ValueError(
            f"inference_device is {preference!r} but this process sees {cuda_device_count} CUDA device(s) "
            "(check CUDA_VISIBLE_DEVICES and the driver, or use 'auto')"
        )
    return f"cuda:{index}"


def choose_device(preference: str = "auto") -> torch.device:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(device_name(preference, count))


def _lock_id(device: torch.device) -> str:
    """A name for the physical GPU, the same in every process whatever its CUDA_VISIBLE_DEVICES."""
    import torch

    index = device.index or 0
    with contextlib.suppress(Exception):  # uuid is missing on old drivers/torch builds
        return f"gpu-{torch.cuda.get_device_properties(index).uuid}"
    return f"gpu-{index}"


@contextlib.contextmanager
def device_lock(device: torch.device, lock_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``lock_dir/gpu-<uuid>.lock`` while a model runs on ``device``.

    Two worker processes on one GPU would each need room for activations at
    once; taking turns avoids out-of-memory failures.  CPU runs take no lock.
    The lock goes with the process (the kernel releases it if the worker dies).
    """
    if device.type != "cuda":
        yield
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{_lock_id(device)}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
