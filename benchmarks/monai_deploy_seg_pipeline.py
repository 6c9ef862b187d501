"""DICOM series -> volume -> SEG: pacs-ai vs the MONAI Deploy App SDK's operators, same run, same files.

Input: the 300-slice 512x512 chest phantom (:mod:`pacs_ai.synthetic.phantom`, 0.7 mm pixels, 1 mm
slices; written once to ``--root`` and reused) and its exact lung label map (right 1, left 2), so
that no analyzer or model time enters the comparison: every variant loads the series, then takes
that same label map (``np.load``, timed apart and not counted) and encodes it as a BINARY DICOM
SEG that references the source images.

Variants, each run in a fresh process (its peak RSS is its own; see ``benchmarks/_common.py``):

``pacs-ai``
    ``pacs_ai.analyze.volume.load_series`` (headers without Pixel Data + decoded int16 volume),
    ``pacs_ai.encode.build_segmentation`` and ``pacs_ai.encode.write_dataset`` (atomic write with
    fsync, as a job does).
``sdk-app``
    A real Holoscan ``Application`` of the SDK's operators: ``DICOMDataLoaderOperator`` ->
    ``DICOMSeriesSelectorOperator`` (rule: Modality CT) -> ``DICOMSeriesToVolumeOperator`` ->
    a one-line operator emitting the label map as an SDK ``Image`` ->
    ``DICOMSegmentationWriterOperator`` (``save_as`` without fsync, then a read-back, as the SDK
    does).  Per-operator seconds come from timing each operator's ``compute``.
``sdk-direct``
    The same operators' underlying methods called directly, without the Holoscan scheduler, as the
    SDK's own module tests do: ``load_data_to_studies``, ``filter``, ``convert_to_image``,
    ``process_images`` (-> ``create_dicom_seg``).

Every variant reports three stages, each in wall-clock and CPU seconds: ``load`` (files to
volume), ``seg_build`` (label map to SEG dataset) and ``seg_write`` (SEG to disk).  For the SDK the
writer operator does build and write in one method; its ``save_as`` and its read-back of the file
are timed by wrapping them (:func:`sdk_write_timed`), and ``seg_build`` is the rest of that method.

What bounds the ratio (measured 2026-11-24 on 2 shared cores): both sides build the SEG with the
same highdicom call (source headers, label map, ``omit_empty_frames``) and write it with pydicom,
about 0.26 s build and 0.19-0.22 s write for the 454 frames, equal on both sides.  pacs-ai's load
takes 0.26-0.28 s, the SDK's 0.53-1.08 s depending on the run, which gave 1.29x-2.32x overall in
two runs of the same day.  With the SDK's load at 0.53 s, 2x would need pacs-ai's load, build and
write together in about 0.5 s, barely more than the SEG encoding alone takes in highdicom and
pydicom.  Passing ``plane_positions`` makes highdicom's build slower (it then matches every plane
against the sources and recomputes their positions), a (frames, rows, columns, segments) boolean
array instead of the label map takes over 1 s, and reading the slices' pixels in two threads
saved no wall time in a fresh process while it cost CPU.

Before the measured run each process runs the same pipeline once on a small 8-slice phantom, so
imports, decoder plugins and lazy initialisation are paid outside the measurement; the RSS
baseline is taken after that warm-up and before the big series is touched.  "Peak over baseline"
is therefore the variant's working memory for this series (volume, label map, SEG, temporaries),
compared with the int16 volume (300*512*512*2 bytes = 150 MiB).  The files are read once
beforehand, so every variant reads from the page cache.  Besides wall-clock seconds each process
reports its CPU seconds (user + system) for the measured run: the 2 cores are shared with other
work, which stretches wall time much more than CPU time, so the CPU ratio is the steadier one.
Holoscan 4.6 (``holoscan-cu13``) runs on this CPU-only machine: it logs that no CUDA driver was
found and continues "with support for CPU data only".

Set-up of the SDK (a side venv that sees the project venv's packages; nothing in the project venv
changes)::

    python3.11 -m venv /work/bench-venv
    echo "import site; site.addsitedir('/work/main/.venv/lib/python3.11/site-packages')" \\
        > /work/bench-venv/lib/python3.11/site-packages/_pacs_ai_venv.pth
    /work/bench-venv/bin/pip install monai-deploy-app-sdk==4.0.0
    /work/bench-venv/bin/pip install --no-deps --ignore-installed monai==1.6.1

Run from the repository root (about 1.5 to 2.5 minutes on 2 shared cores with the default 3
processes per variant)::

    /work/bench-venv/bin/python benchmarks/monai_deploy_seg_pipeline.py
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import (  # noqa: E402
    SDK_INSTALL,
    cpu_seconds,
    current_rss_mib,
    ensure_phantom,
    peak_rss_mib,
    report,
    reset_peak_rss,
    run_interleaved,
    sdk_available,
    sdk_version,
    spread,
    warm_page_cache,
)

VARIANTS = ("pacs-ai", "sdk-app", "sdk-direct")
#: Stages every variant reports, in wall (``stage``) and CPU (``stage_cpu``) seconds.
STAGES = ("load", "seg_build", "seg_write")
#: The SDK's series selection rule used by its example apps, reduced to what the phantom needs.
CT_SELECTION_RULES = '{"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT"}}]}'
#: Small series run first in every process so that one-time costs stay out of the measurement.
WARM_UP_SLICES, WARM_UP_SIZE, WARM_UP_SPACING = 8, 256, 0.8


class Stages:
    """Wall-clock and CPU seconds (this process, all threads) per named stage of one run."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to stage ``name`` (stages may repeat)."""
        wall, cpu = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - cpu

    def split(self, whole: str, part: str, rest: str) -> None:
        """Stage ``rest`` = ``whole`` - ``part`` (``part`` was measured inside ``whole``)."""
        for table in (self.wall, self.cpu):
            table[rest] = table.pop(whole) - table.get(part, 0.0)

    def facts(self) -> dict[str, float]:
        """``{stage: wall seconds, stage_cpu: CPU seconds}`` for the result line."""
        return {**self.wall, **{f"{name}_cpu": seconds for name, seconds in self.cpu.items()}}


def lung_segments() -> tuple[Any, list[Any]]:
    """Algorithm and segment descriptions of the lung analyzer (used by every variant)."""
    from pacs_ai.analyze.base import AlgorithmInfo, SegmentSpec
    from pacs_ai.analyze.lung import (
        DCM_MORPHOLOGICAL_OPERATIONS,
        LEFT_LUNG_CIELAB,
        RIGHT_LUNG_CIELAB,
        SCT_ANATOMICAL_STRUCTURE,
        SCT_LEFT_LUNG,
        SCT_RIGHT_LUNG,
    )

    algorithm = AlgorithmInfo(
        name="benchmark lung labels", version="1.0", family=DCM_MORPHOLOGICAL_OPERATIONS
    )
    segments = [
        SegmentSpec(1, "Right lung", SCT_ANATOMICAL_STRUCTURE, SCT_RIGHT_LUNG, RIGHT_LUNG_CIELAB),
        SegmentSpec(2, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, LEFT_LUNG_CIELAB),
    ]
    return algorithm, segments


# --------------------------------------------------------------------------------------------- pacs-ai


def run_pacs_ai(folder: Path, labels_path: Path, out_dir: Path) -> dict[str, Any]:
    from pacs_ai.analyze.base import AnalysisResult
    from pacs_ai.analyze.volume import load_series
    from pacs_ai.encode import EquipmentInfo, build_segmentation, derived_uid, write_dataset

    algorithm, segments = lung_segments()
    stages = Stages()
    with stages.measure("load"):
        volume = load_series(sorted(folder.glob("*.dcm")))
    with stages.measure("labels"):
        labels = np.load(labels_path)
        result = AnalysisResult(algorithm=algorithm, labels=labels, segments=segments, measurements=[])
    key = (volume.headers[0].SeriesInstanceUID, "benchmark")
    with stages.measure("seg_build"):
        seg = build_segmentation(
            volume,
            result,
            series_instance_uid=derived_uid(*key, "seg-series"),
            sop_instance_uid=derived_uid(*key, "seg-instance"),
            series_number=901,
            instance_number=1,
            equipment=EquipmentInfo(),
        )
    with stages.measure("seg_write"):
        written = write_dataset(seg, out_dir / "seg.dcm")
    return {
        **stages.facts(),
        "frames": int(seg.NumberOfFrames),
        "seg_bytes": written.stat().st_size,
        "shape": list(volume.voxels.shape),
        "dtype": str(volume.voxels.dtype),
        "checksum": int(volume.voxels.sum(dtype=np.int64)),
    }


# ------------------------------------------------------------------------------------------ MONAI Deploy


def sdk_segment_descriptions() -> list[Any]:
    from monai.deploy.operators.dicom_seg_writer_operator import SegmentDescription

    from pacs_ai.encode.coding import to_pydicom_code

    algorithm, segments = lung_segments()
    return [
        SegmentDescription(
            segment_label=spec.label,
            segmented_property_category=to_pydicom_code(spec.category),
            segmented_property_type=to_pydicom_code(spec.type),
            algorithm_name=algorithm.name,
            algorithm_family=to_pydicom_code(algorithm.family),
            algorithm_version=algorithm.version,
        )
        for spec in segments
    ]


@contextlib.contextmanager
def sdk_write_timed(stages: Stages) -> Iterator[None]:
    """Time the SDK writer's ``save_as`` and its read-back of the file as stage ``seg_write``.

    ``DICOMSegmentationWriterOperator.create_dicom_seg`` builds the SEG with highdicom, then calls
    ``seg.save_as(path)`` and ``self._read_from_dcm(path)``; both are wrapped for the duration of the
    ``with`` block (benchmark instrumentation only), so the rest of the method is the SEG build.
    """
    import highdicom as hd
    from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator

    save_as = hd.seg.Segmentation.save_as
    read_back = DICOMSegmentationWriterOperator._read_from_dcm

    def timed_save_as(self: Any, *args: Any, **kwargs: Any) -> None:
        with stages.measure("seg_write"):
            save_as(self, *args, **kwargs)

    def timed_read_back(self: Any, file_path: str) -> Any:
        with stages.measure("seg_write"):
            return read_back(self, file_path)

    hd.seg.Segmentation.save_as = timed_save_as  # type: ignore[method-assign]
    DICOMSegmentationWriterOperator._read_from_dcm = timed_read_back  # type: ignore[method-assign]
    try:
        yield
    finally:
        del hd.seg.Segmentation.save_as  # back to the inherited pydicom Dataset.save_as
        DICOMSegmentationWriterOperator._read_from_dcm = read_back  # type: ignore[method-assign]


def written_seg(out_dir: Path) -> tuple[int, int]:
    """Frames and bytes of the one SEG file the SDK wrote (its file name is a random UID)."""
    import pydicom

    (path,) = out_dir.glob("*.dcm")
    return int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames), path.stat().st_size


def volume_facts(voxels: np.ndarray) -> dict[str, Any]:
    return {
        "shape": list(voxels.shape),
        "dtype": str(voxels.dtype),
        "checksum": int(voxels.sum(dtype=np.int64)),
    }


def run_sdk_direct(folder: Path, labels_path: Path, out_dir: Path) -> dict[str, Any]:
    from monai.deploy.core import Fragment
    from monai.deploy.core.domain.image import Image
    from monai.deploy.operators import (
        DICOMDataLoaderOperator,
        DICOMSegmentationWriterOperator,
        DICOMSeriesSelectorOperator,
        DICOMSeriesToVolumeOperator,
    )

    fragment = Fragment()
    loader = DICOMDataLoaderOperator(fragment, name="loader", input_folder=folder)
    selector = DICOMSeriesSelectorOperator(fragment, name="selector", rules=CT_SELECTION_RULES)
    to_volume = DICOMSeriesToVolumeOperator(fragment, name="to_volume")
    writer = DICOMSegmentationWriterOperator(
        fragment, segment_descriptions=sdk_segment_descriptions(), output_folder=out_dir, name="seg_writer"
    )
    stages = Stages()
    with stages.measure("load"):
        studies = loader.load_data_to_studies(folder)
        selected = selector.filter(selector._load_rules(), studies)
        image = to_volume.convert_to_image(selected)
    with stages.measure("labels"):
        labels = Image(np.load(labels_path))
    with stages.measure("seg"), sdk_write_timed(stages):
        writer.process_images(labels, selected, out_dir)
    stages.split("seg", "seg_write", rest="seg_build")
    frames, size = written_seg(out_dir)
    return {
        **stages.facts(),
        "frames": frames,
        "seg_bytes": size,
        **volume_facts(image.asnumpy()),
    }


def run_sdk_app(folder: Path, labels_path: Path, out_dir: Path) -> dict[str, Any]:
    from holoscan.conditions import CountCondition
    from monai.deploy.core import Application, Operator, OperatorSpec
    from monai.deploy.core.domain.image import Image
    from monai.deploy.operators import (
        DICOMDataLoaderOperator,
        DICOMSegmentationWriterOperator,
        DICOMSeriesSelectorOperator,
        DICOMSeriesToVolumeOperator,
    )

    stages = Stages()
    facts: dict[str, Any] = {}

    def timed(cls: type) -> type:
        """``cls`` with its ``compute`` timed as the stage named after the operator."""

        class Timed(cls):  # type: ignore[misc,valid-type]
            def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
                with stages.measure(self.name):
                    super().compute(op_input, op_output, context)

        Timed.__name__ = cls.__name__
        return Timed

    class LabelsOperator(Operator):
        """Stands in for the model: emits the fixed label map for the volume it receives."""

        def setup(self, spec: OperatorSpec) -> None:
            spec.input("image")
            spec.output("seg_image")

        def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
            image = op_input.receive("image")
            facts.update(volume_facts(image.asnumpy()))
            op_output.emit(Image(np.load(labels_path)), "seg_image")

    class SegApp(Application):
        def compose(self) -> None:
            loader = timed(DICOMDataLoaderOperator)(
                self, CountCondition(self, 1), input_folder=folder, name="loader"
            )
            selector = timed(DICOMSeriesSelectorOperator)(self, rules=CT_SELECTION_RULES, name="selector")
            to_volume = timed(DICOMSeriesToVolumeOperator)(self, name="to_volume")
            labels = timed(LabelsOperator)(self, name="labels")
            writer = timed(DICOMSegmentationWriterOperator)(
                self,
                segment_descriptions=sdk_segment_descriptions(),
                output_folder=out_dir,
                name="seg_writer",
            )
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(to_volume, labels, {("image", "image")})
            self.add_flow(labels, writer, {("seg_image", "seg_image")})
            self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})

    t0 = time.perf_counter()
    with sdk_write_timed(stages):
        SegApp().run()
    total = time.perf_counter() - t0
    frames, size = written_seg(out_dir)
    if not {"loader", "selector", "to_volume", "labels", "seg_writer"} <= set(stages.wall):
        raise RuntimeError(f"not every operator ran: {sorted(stages.wall)}")
    for table in (stages.wall, stages.cpu):
        table["load"] = table.pop("loader") + table.pop("selector") + table.pop("to_volume")
    stages.split("seg_writer", "seg_write", rest="seg_build")
    return {
        **stages.facts(),
        "app_run": total,
        "frames": frames,
        "seg_bytes": size,
        **facts,
    }


RUNNERS = {"pacs-ai": run_pacs_ai, "sdk-app": run_sdk_app, "sdk-direct": run_sdk_direct}


def child(variant: str, folder: Path, labels_path: Path, warm_folder: Path, warm_labels: Path) -> int:
    """One variant: warm-up on the small series, then the measured run; print the result line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    runner = RUNNERS[variant]
    with tempfile.TemporaryDirectory(prefix="bench-seg-", dir="/tmp") as tmp:
        for name in ("warm", "out"):
            (Path(tmp) / name).mkdir()
        runner(warm_folder, warm_labels, Path(tmp) / "warm")
        gc.collect()
        reset_peak_rss()
        baseline = current_rss_mib()
        cpu_start = cpu_seconds()
        result = runner(folder, labels_path, Path(tmp) / "out")
        cpu = cpu_seconds() - cpu_start
        peak = peak_rss_mib()
    result.update(
        variant=variant,
        cpu=cpu,
        rss_baseline_mib=baseline,
        rss_peak_mib=peak,
        peak_over_baseline_mib=peak - baseline,
    )
    report(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/pacs-ai-bench"), help="phantom cache folder")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads per process")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-args", nargs=4, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, *args.child_args)

    if any(v.startswith("sdk") for v in args.variants) and not sdk_available():
        print(f"monai.deploy is not importable by {sys.executable}; set up the SDK with:\n{SDK_INSTALL}")
        return 2
    paths, labels_path = ensure_phantom(args.root, slices=args.slices, size=args.size)
    warm_paths, warm_labels = ensure_phantom(
        args.root, slices=WARM_UP_SLICES, size=WARM_UP_SIZE, pixel_spacing_mm=WARM_UP_SPACING
    )
    warm_page_cache(paths + warm_paths)
    volume_mib = args.slices * args.size * args.size * 2 / 2**20
    print(
        f"{len(paths)} slices of {args.size}x{args.size} in {paths[0].parent}; "
        f"int16 volume {volume_mib:.0f} MiB; "
        f"{args.repeats} fresh process(es) per variant, {args.threads} threads; "
        + (f"MONAI Deploy App SDK {sdk_version()}" if sdk_available() else "SDK not installed")
    )
    child_args = [str(paths[0].parent), str(labels_path), str(warm_paths[0].parent), str(warm_labels)]
    results = run_interleaved(
        Path(__file__),
        args.variants,
        args.repeats,
        lambda variant: ["--child", variant, "--child-args", *child_args],
        threads=args.threads,
    )

    reference = results[args.variants[0]][0]
    for variant, runs in results.items():
        for run in runs:
            for fact in ("shape", "dtype", "checksum", "frames"):
                if run[fact] != reference[fact]:
                    raise RuntimeError(f"{variant} disagrees on {fact}: {run[fact]} vs {reference[fact]}")
    print(
        f"\nall variants: volume {reference['shape']} {reference['dtype']} with the same voxel sum; "
        f"SEG with {reference['frames']} frames (empty frames omitted)"
    )

    def total(run: dict[str, Any]) -> float:
        """Load + SEG build + write, without the label map's np.load."""
        return float(run["load"] + run["seg_build"] + run["seg_write"])

    print("\nmedian (min-max) over the processes; seconds")
    print(
        f"  {'variant':<11} {'load':>19} {'SEG build+write':>19} {'load+SEG wall':>19} "
        f"{'load+SEG CPU':>19}  peak RSS over baseline"
    )
    for variant, runs in results.items():
        seg = [total(r) - r["load"] for r in runs]
        peaks = [r["peak_over_baseline_mib"] for r in runs]
        print(
            f"  {variant:<11} {spread([r['load'] for r in runs]):>19} {spread(seg):>19} "
            f"{spread([total(r) for r in runs]):>19} {spread([r['cpu'] for r in runs]):>19}  "
            f"{statistics.median(peaks):5.0f} MiB = {statistics.median(peaks) / volume_mib:.2f}x volume "
            f"(max {max(peaks) / volume_mib:.2f}x; absolute peak "
            f"{statistics.median([r['rss_peak_mib'] for r in runs]):.0f} MiB)"
        )
        if variant == "sdk-app":
            print(f"  {'':<11} whole app.run() {spread([r['app_run'] for r in runs])} (with graph set-up)")
    print("  (CPU: user+system seconds of the process over the measured run, label np.load included)")

    print("\nper stage, median over the processes: wall / CPU seconds (ratio: SDK variant / pacs-ai)")
    print(f"  {'variant':<11}" + "".join(f" {stage:>26}" for stage in STAGES))
    for variant, runs in results.items():
        cells = []
        for stage in STAGES:
            wall = statistics.median(r[stage] for r in runs)
            cpu = statistics.median(r[f"{stage}_cpu"] for r in runs)
            ratio = ""
            if variant != "pacs-ai" and "pacs-ai" in results:
                ours_cpu = statistics.median(r[f"{stage}_cpu"] for r in results["pacs-ai"])
                ratio = f" ({cpu / ours_cpu:.2f}x)"
            cells.append(f"{wall:5.2f} / {cpu:5.2f}{ratio}")
        print(f"  {variant:<11}" + "".join(f" {cell:>26}" for cell in cells))
    print("  (pacs-ai's write includes its fsync of file and directory; the SDK's its read-back of the file)")
    if "pacs-ai" in results:
        ours = results["pacs-ai"]
        ours_peak = max(r["peak_over_baseline_mib"] for r in ours) / volume_mib
        for variant, theirs in results.items():
            if variant == "pacs-ai":
                continue
            wall = statistics.median(total(r) for r in theirs) / statistics.median(total(r) for r in ours)
            cpu = statistics.median(r["cpu"] for r in theirs) / statistics.median(r["cpu"] for r in ours)
            verdict = "meets" if wall >= 2 else "MISSES"
            print(
                f"  {variant} / pacs-ai, load+SEG: wall {wall:.2f}x ({verdict} the 2x target), "
                f"CPU {cpu:.2f}x (ratios of medians)"
            )
        verdict = "meets" if ours_peak <= 3 else "MISSES"
        print(
            f"  pacs-ai peak RSS over baseline: {ours_peak:.2f}x the volume "
            f"(worst run; {verdict} the 3x target)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
