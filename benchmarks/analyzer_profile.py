"""How long loading and lung analysis take for a realistic chest CT, and how much memory.

A chest phantom (default 300 slices of 512x512, 0.7 mm pixels, 1 mm slices)
is written to a temporary directory under /tmp, then ``load_series`` and the
``ct-chest-lung`` analyzer run on it.  Printed per step: wall-clock seconds,
the Python-heap peak (tracemalloc; numpy and scipy arrays are included) and
the growth of the process peak RSS; plus the int16 volume size for scale and
the measured vs. true lung volumes.  Run from the repository root::

    PYTHONPATH=. python benchmarks/analyzer_profile.py [--slices 300] [--size 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measured(label: str, func: Callable[[], T]) -> T:
    """Run ``func`` once; print seconds, tracemalloc peak and peak-RSS growth."""
    rss_before = peak_rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    value = func()
    seconds = time.perf_counter() - start
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"{label:<14} {seconds:7.2f} s   heap peak {heap_peak / 2**20:8.1f} MiB   "
        f"peak RSS +{peak_rss_mb() - rss_before:7.1f} MiB (now {peak_rss_mb():.0f} MiB)"
    )
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pixel-spacing", type=float, default=0.7)
    parser.add_argument("--slice-spacing", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads (the target is 2 cores)")
    args = parser.parse_args(argv)
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(args.threads))

    # Imported after the thread settings so that they take effect.
    from pacs_ai.analyze.registry import get_analyzer
    from pacs_ai.analyze.volume import load_series
    from pacs_ai.synthetic.phantom import write_chest_phantom

    with tempfile.TemporaryDirectory(prefix="pacs-ai-bench-", dir="/tmp") as tmp:
        truth = measured(
            "write phantom",
            lambda: write_chest_phantom(
                Path(tmp),
                slices=args.slices,
                size=args.size,
                pixel_spacing_mm=args.pixel_spacing,
                slice_spacing_mm=args.slice_spacing,
            ),
        )
        volume_mb = args.slices * args.size * args.size * 2 / 2**20
        print(f"{args.slices} slices of {args.size}x{args.size}: int16 volume {volume_mb:.0f} MiB")
        volume = measured("load_series", lambda: load_series(truth.paths))
        analyzer = get_analyzer("ct-chest-lung")
        result = measured("analyze", lambda: analyzer.analyze(volume, {}))
    volumes = {m.segment_number: m.value for m in result.measurements if m.name.value == "118565006"}
    print(
        f"right lung {volumes[1]:.1f} mL (truth {truth.right_lung_ml:.1f}), "
        f"left lung {volumes[2]:.1f} mL (truth {truth.left_lung_ml:.1f})"
    )
    for note in result.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
