"""Per-stage wall time of an analysis job outside the analyzer, with SimpleITK as the load peer.

A job loads a CT series (``load_series``), runs an analyzer, builds a DICOM SEG
(``build_segmentation``) and a TID 1500 SR (``build_measurement_report``) and
writes both (``write_dataset``: atomic, fsync).  This script times each of
those stages on a 300-slice 512x512 chest phantom and, in the same run and on
the same files, SimpleITK's ``ImageSeriesReader`` as the peer for the load
(the files are read once beforehand so both run from the page cache).  The
analyzer is run once for its result and timed for information only.

Run from the repository root::

    python benchmarks/job_stages.py [--dir /tmp/ph300] [--slices 300] [--repeat 5]

The phantom is generated into ``--dir`` if that holds no ``*.dcm`` files.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import highdicom as hd

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pacs_ai.analyze.registry import get_analyzer  # noqa: E402
from pacs_ai.analyze.volume import load_series  # noqa: E402
from pacs_ai.encode import (  # noqa: E402
    EquipmentInfo,
    build_measurement_report,
    build_segmentation,
    derived_uid,
    write_dataset,
)

T = TypeVar("T")


def timed(func: Callable[[], T], repeat: int) -> tuple[T, list[float]]:
    """Run ``func`` ``repeat`` times; return the last value and the wall-clock seconds of each run."""
    seconds = []
    value: T
    for _ in range(repeat):
        start = time.perf_counter()
        value = func()
        seconds.append(time.perf_counter() - start)
    return value, seconds


def row(label: str, seconds: list[float]) -> float:
    best, median = min(seconds), statistics.median(seconds)
    print(f"  {label:<28} best {best:6.3f} s   median {median:6.3f} s   worst {max(seconds):6.3f} s")
    return median


def ensure_phantom(folder: Path, slices: int) -> list[Path]:
    paths = sorted(folder.glob("*.dcm"))
    if not paths:
        from pacs_ai.synthetic.phantom import write_chest_phantom

        print(f"writing a {slices}-slice phantom to {folder} ...")
        folder.mkdir(parents=True, exist_ok=True)
        write_chest_phantom(folder, slices=slices, size=512, pixel_spacing_mm=0.7, slice_spacing_mm=1.0)
        paths = sorted(folder.glob("*.dcm"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ph300"), help="series folder (*.dcm)")
    parser.add_argument("--slices", type=int, default=300, help="slices of a generated phantom")
    parser.add_argument("--analyzer", default="ct-chest-lung")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    paths = ensure_phantom(args.dir, args.slices)
    for path in paths:  # into the page cache, so that neither reader pays for the first read
        path.read_bytes()
    print(f"{len(paths)} files in {args.dir}; {args.repeat} runs per stage (seconds)")

    medians: dict[str, float] = {}
    try:
        import SimpleITK as sitk

        def sitk_read() -> object:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(p) for p in paths])
            return reader.Execute()

        sitk_read()  # warm-up (library initialisation)
        _, seconds = timed(sitk_read, args.repeat)
        medians["sitk"] = row("SimpleITK series read (peer)", seconds)
    except ImportError:
        print("  SimpleITK not installed: no peer ratio")

    load_series(paths)  # warm-up (imports, decoder plugins)
    volume, seconds = timed(lambda: load_series(paths), args.repeat)
    medians["load"] = row("load_series", seconds)
    if "sitk" in medians:
        print(f"  {'load / SimpleITK':<28} {medians['load'] / medians['sitk']:.2f}x (medians)")

    start = time.perf_counter()
    result = get_analyzer(args.analyzer).analyze(volume, {})
    print(f"  {'analyzer (not counted)':<28} {time.perf_counter() - start:6.3f} s")

    equipment = EquipmentInfo()
    key = (volume.headers[0].SeriesInstanceUID, "job-stages")

    def seg_build() -> hd.seg.Segmentation:
        return build_segmentation(
            volume,
            result,
            series_instance_uid=derived_uid(*key, "seg-series"),
            sop_instance_uid=derived_uid(*key, "seg-instance"),
            series_number=901,
            instance_number=1,
            equipment=equipment,
        )

    seg, seconds = timed(seg_build, args.repeat)
    medians["seg"] = row("SEG build", seconds)

    def sr_build() -> hd.sr.Comprehensive3DSR:
        return build_measurement_report(
            volume,
            result,
            seg,
            series_instance_uid=derived_uid(*key, "sr-series"),
            sop_instance_uid=derived_uid(*key, "sr-instance"),
            series_number=902,
            instance_number=1,
            equipment=equipment,
        )

    sr, seconds = timed(sr_build, args.repeat)
    medians["sr"] = row("SR build", seconds)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # Fresh objects per run: writing resolves ambiguous VRs in place, which would flatter later runs.
        segs = [seg_build() for _ in range(args.repeat)]
        srs = [sr_build() for _ in range(args.repeat)]
        _, seconds = timed(lambda: write_dataset(segs.pop(), out / "seg.dcm"), args.repeat)
        medians["write_seg"] = row("SEG write (atomic, fsync)", seconds)
        _, seconds = timed(lambda: write_dataset(srs.pop(), out / "sr.dcm"), args.repeat)
        medians["write_sr"] = row("SR write (atomic, fsync)", seconds)
        print(
            f"  SEG {int(seg.NumberOfFrames)} frames, {(out / 'seg.dcm').stat().st_size / 2**20:.1f} MiB; "
            f"SR {(out / 'sr.dcm').stat().st_size / 2**10:.0f} KiB"
        )
        # Reference: pydicom's own writer into memory (no file, no fsync) on fresh objects.
        segs = [seg_build() for _ in range(args.repeat)]
        srs = [sr_build() for _ in range(args.repeat)]

        def pydicom_save() -> None:
            segs.pop().save_as(io.BytesIO(), enforce_file_format=True)
            srs.pop().save_as(io.BytesIO(), enforce_file_format=True)

        _, seconds = timed(pydicom_save, args.repeat)
        row("(ref) pydicom save_as SEG+SR", seconds)

    encode = medians["seg"] + medians["sr"] + medians["write_seg"] + medians["write_sr"]
    print(f"  {'SEG+SR build+write':<28} {encode:6.3f} s (sum of medians)")
    print(f"  {'load+SEG+SR build+write':<28} {medians['load'] + encode:6.3f} s (sum of medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
