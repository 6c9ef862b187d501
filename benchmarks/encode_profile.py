"""How long SEG and SR encoding take for a realistic chest CT, and how much memory.

A synthetic 300-slice 512x512 series (headers only, as ``load_series``
delivers them) with two large lung-shaped segments is encoded with
``pacs_ai.encode``; wall-clock seconds for SEG, SR and the file writes, the
SEG/SR sizes, the Python-heap peak (tracemalloc) and the process peak RSS are
printed.  Run from the repository root::

    PYTHONPATH=. python benchmarks/encode_profile.py [--slices 300] [--size 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pacs_ai.encode import (  # noqa: E402
    EquipmentInfo,
    build_measurement_report,
    build_segmentation,
    derived_uid,
    write_dataset,
)
from tests.integration.synthetic_ct import (  # noqa: E402
    lung_labels,
    lung_result,
    make_ct_series,
    volume_from_headers,
)

T = TypeVar("T")


def timed(label: str, func: Callable[[], T], repeat: int) -> T:
    """Run ``func`` ``repeat`` times for wall-clock time, then once under tracemalloc for memory.

    tracemalloc slows allocation-heavy code several-fold, so it is kept out of the timed runs.
    """
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        seconds.append(time.perf_counter() - start)
    tracemalloc.start()
    value = func()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        f"{label:<6} best {min(seconds):6.2f} s   worst {max(seconds):6.2f} s   "
        f"python heap peak {peak / 2**20:7.1f} MiB"
    )
    return value


def peak_rss_mib() -> float:
    """High-water mark of the process RSS (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    headers = make_ct_series(args.slices, args.size, args.size, slice_spacing_mm=1.0, with_pixels=False)
    volume = volume_from_headers(headers)
    labels = lung_labels(volume.voxels.shape, fill=1.0)
    result = lung_result(volume, labels)
    equipment = EquipmentInfo()
    key = (headers[0].SeriesInstanceUID, "benchmark")
    print(f"peak RSS after building the synthetic input {peak_rss_mib():.0f} MiB")
    print(
        f"volume {labels.shape}, segment voxels: "
        + ", ".join(f"{n}: {(labels == n).sum():,}" for n in (1, 2))
    )

    seg = timed(
        "SEG",
        lambda: build_segmentation(
            volume,
            result,
            series_instance_uid=derived_uid(*key, "seg-series"),
            sop_instance_uid=derived_uid(*key, "seg-instance"),
            series_number=901,
            instance_number=1,
            equipment=equipment,
        ),
        args.repeat,
    )
    sr = timed(
        "SR",
        lambda: build_measurement_report(
            volume,
            result,
            seg,
            series_instance_uid=derived_uid(*key, "sr-series"),
            sop_instance_uid=derived_uid(*key, "sr-instance"),
            series_number=902,
            instance_number=1,
            equipment=equipment,
        ),
        args.repeat,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        timed("write", lambda: (write_dataset(seg, out / "seg.dcm"), write_dataset(sr, out / "sr.dcm")), 1)
        print(
            f"SEG {int(seg.NumberOfFrames)} frames, {(out / 'seg.dcm').stat().st_size / 2**20:.1f} MiB; "
            f"SR {(out / 'sr.dcm').stat().st_size / 2**20:.1f} MiB"
        )
    print(f"peak RSS of the process after encoding and writing {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
