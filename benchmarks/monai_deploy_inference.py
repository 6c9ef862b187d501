"""Sliding-window inference of one MONAI bundle on CPU: pacs-ai's engine vs the MONAI Deploy App SDK.

The bundle is written by this script (``--root``/``bundle-*``), laid out as the Model Zoo's
``spleen_ct_segmentation`` is and with its network and transforms: a 3D ``UNet`` (channels
16-256, 2 residual units, batch norm; random weights, seed 0) behind ``Orientationd`` RAS,
``Spacingd`` 1.5x1.5x2 mm, ``ScaleIntensityRanged``, a ``SlidingWindowInferer`` (96^3 windows,
4 per batch) and ``Activationsd`` softmax, ``Invertd`` and ``AsDiscreted`` argmax.  The one change
from the Model Zoo config is the window overlap, 0.25 (MONAI's default) instead of 0.5, so that a
run fits the time budget on 2 shared cores; ``--overlap 0.5`` restores it.

Input: the 300-slice 512x512 chest phantom (0.7 mm pixels, 1 mm slices) of
:mod:`pacs_ai.synthetic.phantom`, i.e. 78.6 M voxels, 239x239x150 after resampling.

Variants, each in a fresh process, each warmed up on a small 8-slice series first (imports,
model load and cache, MONAI's lazy initialisation):

``pacs-ai``
    ``pacs_ai.models.engine.ModelEngine`` with the bundle registered in a temporary model store
    (``ModelStore.add``), ``engine.run(name, volume)`` on the ``Volume`` from ``load_series``:
    the production path of the ``monai-bundle`` analyzer, model kept warm between jobs.
``sdk-app``
    A Holoscan ``Application``: ``DICOMDataLoaderOperator`` -> ``DICOMSeriesSelectorOperator``
    -> ``DICOMSeriesToVolumeOperator`` -> ``MonaiBundleInferenceOperator`` (the directory bundle
    via ``bundle_path``) -> a sink that keeps the label map.  Only the inference operator's
    ``compute`` is timed.  That ``compute`` reloads the model from the bundle on every call (SDK
    4.0 with a directory bundle and no model in the ``AppContext``); the reload is timed apart and
    reported both ways.

Figures: seconds of the whole bundle run (pre-processing, sliding window, post-processing
including ``Invertd`` back to 512x512x300, conversion to a (slice, row, column) uint8 label map),
seconds of the sliding window alone (the inferer call), voxels/s of both (input voxels for the
whole run, resampled voxels for the window), CPU seconds (user + system) of the bundle run, and
the ratio pacs-ai / SDK of each.  The 2 cores are shared with other work, which stretches wall
time far more than CPU time, so the CPU ratio is the steadier one.  The two label maps are
compared voxel by voxel.  torch uses ``--threads`` threads in both.

Set-up of the SDK: see ``benchmarks/monai_deploy_seg_pipeline.py`` or ``benchmarks/_common.py``
(``SDK_INSTALL``).  Run from the repository root (2.5 to 5 minutes on 2 shared cores with the
defaults)::

    /work/bench-venv/bin/python benchmarks/monai_deploy_inference.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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

VARIANTS = ("pacs-ai", "sdk-app")
MODEL_NAME = "bench-unet"
PIXDIM = (1.5, 1.5, 2.0)
ROI_SIZE = (96, 96, 96)
CT_SELECTION_RULES = '{"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT"}}]}'
WARM_UP_SLICES, WARM_UP_SIZE, WARM_UP_SPACING = 8, 256, 0.8


# ------------------------------------------------------------------------------------------- the bundle


def write_bundle(root: Path, *, overlap: float, sw_batch_size: int) -> Path:
    """A spleen_ct_segmentation-shaped bundle with random weights; rewritten only when the config changes."""
    import torch
    from monai.networks.nets import UNet

    network_def = {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    }
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(PIXDIM), "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(ROI_SIZE),
            "sw_batch_size": sw_batch_size,
            "overlap": overlap,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "meta_key_postfix": "meta_dict",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "resample": False},
            ],
        },
    }
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "name": "pacs-ai benchmark UNet",
        "task": "segmentation",
        "description": "spleen_ct_segmentation-shaped bundle with random weights, for benchmarks only",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": list(ROI_SIZE),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": list(ROI_SIZE),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "structure"},
                }
            },
        },
    }
    bundle = root / f"bundle-unet-overlap{overlap}-batch{sw_batch_size}"
    config_path = bundle / "configs" / "inference.json"
    if config_path.is_file() and json.loads(config_path.read_text()) == inference:
        return bundle
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "models").mkdir(exist_ok=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in network_def.items() if k != "_target_"})
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    config_path.write_text(json.dumps(inference, indent=2))  # last: marks the bundle complete
    return bundle


# ------------------------------------------------------------------------------------------------ timing


class TimedCall:
    """Wraps a callable and adds the seconds of each call to ``seconds``.

    With ``voxels``, the spatial size of the first argument (an inferer's batch) is recorded too.
    """

    def __init__(
        self, inner: Callable[..., Any], seconds: list[float], voxels: list[int] | None = None
    ) -> None:
        self.inner = inner
        self.seconds = seconds
        self.voxels = voxels

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.voxels is not None:
            batch = args[0] if args else kwargs["inputs"]
            self.voxels.append(int(np.prod(batch.shape[2:])))
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)


def label_facts(labels: np.ndarray, save_to: Path) -> dict[str, Any]:
    np.save(save_to, labels)
    return {
        "shape": list(labels.shape),
        "dtype": str(labels.dtype),
        "label_counts": np.bincount(labels.ravel(), minlength=2).tolist(),
    }


# ------------------------------------------------------------------------------------------------ pacs-ai


def run_pacs_ai(
    bundle: Path, folder: Path, warm_folder: Path, work: Path, labels_out: Path
) -> dict[str, Any]:
    from pacs_ai.analyze.volume import load_series
    from pacs_ai.models.engine import ModelEngine

    engine = ModelEngine(work / "models", work / "run", device="cpu")
    engine.store.add(bundle, MODEL_NAME)
    engine.run(MODEL_NAME, load_series(sorted(warm_folder.glob("*.dcm"))))  # loads and caches the model
    window: list[float] = []
    window_voxels: list[int] = []
    model = engine.model(MODEL_NAME)  # the cached LoadedModel the next run uses
    model.inferer = TimedCall(model.inferer, window, window_voxels)

    volume = load_series(sorted(folder.glob("*.dcm")))
    reset_peak_rss()
    baseline = current_rss_mib()
    cpu_start, start = cpu_seconds(), time.perf_counter()
    prediction = engine.run(MODEL_NAME, volume)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = peak_rss_mib()
    assert prediction.labels is not None
    return {
        "run": seconds,
        "cpu": cpu,
        "window": sum(window),
        "window_voxels": sum(window_voxels),
        "model_load": 0.0,
        "peak_over_baseline_mib": peak - baseline,
        "input_voxels": int(volume.voxels.size),
        **label_facts(prediction.labels, labels_out),
    }


# ----------------------------------------------------------------------------------- MONAI Deploy App SDK


def run_sdk_app(
    bundle: Path, folder: Path, warm_folder: Path, work: Path, labels_out: Path
) -> dict[str, Any]:
    from holoscan.conditions import CountCondition
    from monai.deploy.core import AppContext, Application, Image, IOType, Operator, OperatorSpec
    from monai.deploy.operators import (
        DICOMDataLoaderOperator,
        DICOMSeriesSelectorOperator,
        DICOMSeriesToVolumeOperator,
        MonaiBundleInferenceOperator,
    )
    from monai.deploy.operators import monai_bundle_inference_operator as bundle_module
    from monai.deploy.operators.monai_bundle_inference_operator import IOMapping

    record: dict[str, list[float]] = {"compute": [], "cpu": [], "window": [], "model_load": []}
    window_voxels: list[int] = []
    kept: dict[str, Any] = {}
    # The operator reloads the network from the bundle inside every compute; time that apart.
    bundle_module._load_model_from_directory_bundle = TimedCall(
        bundle_module._load_model_from_directory_bundle, record["model_load"]
    )

    class TimedBundleInference(MonaiBundleInferenceOperator):
        def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
            cpu_start, start = cpu_seconds(), time.perf_counter()
            super().compute(op_input, op_output, context)
            record["compute"].append(time.perf_counter() - start)
            record["cpu"].append(cpu_seconds() - cpu_start)

        def predict(self, data: Any, *args: Any, **kwargs: Any) -> Any:
            window_voxels.append(int(np.prod(data.shape[2:])))
            start = time.perf_counter()
            try:
                return super().predict(data, *args, **kwargs)
            finally:
                record["window"].append(time.perf_counter() - start)

    class Sink(Operator):
        def setup(self, spec: OperatorSpec) -> None:
            spec.input("pred")

        def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
            image = op_input.receive("pred")
            kept["labels"] = image.asnumpy()

    class InferenceApp(Application):
        def __init__(self, series: Path) -> None:
            self.series = series
            super().__init__()

        def compose(self) -> None:
            app_context = AppContext({"model": str(work / "no-model-path")})  # the bundle comes by path
            loader = DICOMDataLoaderOperator(
                self, CountCondition(self, 1), input_folder=self.series, name="loader"
            )
            selector = DICOMSeriesSelectorOperator(self, rules=CT_SELECTION_RULES, name="selector")
            to_volume = DICOMSeriesToVolumeOperator(self, name="to_volume")
            inference = TimedBundleInference(
                self,
                app_context=app_context,
                input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
                output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
                bundle_path=bundle,
                name="bundle_inference",
            )
            sink = Sink(self, name="sink")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(to_volume, inference, {("image", "image")})
            self.add_flow(inference, sink, {("pred", "pred")})

    InferenceApp(warm_folder).run()
    for values in record.values():
        values.clear()
    window_voxels.clear()
    kept.clear()
    # The peak below includes the loader's copy of the series (the SDK keeps the datasets with
    # their pixel data alive while the app runs), so it is reported for information only.
    reset_peak_rss()
    baseline = current_rss_mib()
    InferenceApp(folder).run()
    peak = peak_rss_mib()
    if len(record["compute"]) != 1 or "labels" not in kept:
        raise RuntimeError(f"the inference operator ran {len(record['compute'])} times; expected once")
    labels = kept["labels"]
    return {
        "run": record["compute"][0],
        "cpu": record["cpu"][0],
        "window": sum(record["window"]),
        "window_voxels": sum(window_voxels),
        "model_load": sum(record["model_load"]),
        "peak_over_baseline_mib": peak - baseline,
        "input_voxels": int(labels.size),
        **label_facts(np.ascontiguousarray(labels), labels_out),
    }


RUNNERS = {"pacs-ai": run_pacs_ai, "sdk-app": run_sdk_app}


def child(variant: str, threads: int, bundle: Path, folder: Path, warm_folder: Path, labels_out: Path) -> int:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-infer-", dir="/tmp") as tmp:
        result = RUNNERS[variant](bundle, folder, warm_folder, Path(tmp), labels_out)
    result.update(variant=variant, torch_threads=torch.get_num_threads())
    report(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/pacs-ai-bench"), help="phantom/bundle cache")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (Model Zoo: 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="torch/BLAS threads per process")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-args", nargs=4, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.threads, *args.child_args)

    if "sdk-app" in args.variants and not sdk_available():
        print(f"monai.deploy is not importable by {sys.executable}; set up the SDK with:\n{SDK_INSTALL}")
        return 2
    paths, _ = ensure_phantom(args.root, slices=args.slices, size=args.size)
    warm_paths, _ = ensure_phantom(
        args.root, slices=WARM_UP_SLICES, size=WARM_UP_SIZE, pixel_spacing_mm=WARM_UP_SPACING
    )
    warm_page_cache(paths + warm_paths)
    bundle = write_bundle(args.root, overlap=args.overlap, sw_batch_size=args.sw_batch_size)
    print(
        f"bundle {bundle}: UNet 16-256 (random weights), windows {ROI_SIZE} x{args.sw_batch_size}, "
        f"overlap {args.overlap}, spacing {PIXDIM} mm; input {len(paths)}x{args.size}x{args.size} CT; "
        f"{args.repeats} fresh process(es) per variant, {args.threads} threads; "
        + (f"MONAI Deploy App SDK {sdk_version()}" if sdk_available() else "SDK not installed")
    )
    with tempfile.TemporaryDirectory(prefix="bench-infer-labels-", dir="/tmp") as tmp:
        labels_paths = {v: Path(tmp) / f"{v}.npy" for v in args.variants}
        folders = [str(bundle), str(paths[0].parent), str(warm_paths[0].parent)]
        results = run_interleaved(
            Path(__file__),
            args.variants,
            args.repeats,
            lambda variant: [
                "--threads",
                str(args.threads),
                "--child",
                variant,
                "--child-args",
                *folders,
                str(labels_paths[variant]),
            ],
            threads=args.threads,
        )
        label_maps = {v: np.load(p) for v, p in labels_paths.items()}

    first = label_maps[args.variants[0]]
    for variant, labels in label_maps.items():
        if labels.shape != first.shape:
            raise RuntimeError(f"{variant} label map has shape {labels.shape}, not {first.shape}")
        agreement = float((labels == first).mean())
        print(
            f"\n{variant}: label map {labels.shape} {labels.dtype}, "
            f"counts {np.bincount(labels.ravel()).tolist()}, "
            f"{agreement:.6%} of voxels equal to {args.variants[0]}'s"
        )

    reference = results[args.variants[0]][0]
    for variant, runs in results.items():
        for run in runs:
            for fact in ("input_voxels", "window_voxels"):
                if run[fact] != reference[fact]:
                    raise RuntimeError(f"{variant} disagrees on {fact}: {run[fact]} vs {reference[fact]}")
    voxels, window_voxels = reference["input_voxels"], reference["window_voxels"]
    print(
        f"\n{voxels / 1e6:.1f} M input voxels; {window_voxels / 1e6:.2f} M voxels after resampling "
        "go through the sliding window. Median (min-max) over the processes:"
    )
    print(
        f"  {'variant':<8} {'bundle run s':>18} {'CPU s':>18} {'input Mvoxel/s':>18} {'window s':>18} "
        f"{'window Mvoxel/s':>18} {'model reload s':>18}"
    )
    for variant, runs in results.items():
        print(
            f"  {variant:<8} {spread([r['run'] for r in runs]):>18} {spread([r['cpu'] for r in runs]):>18} "
            f"{spread([voxels / r['run'] / 1e6 for r in runs]):>18} "
            f"{spread([r['window'] for r in runs]):>18} "
            f"{spread([window_voxels / r['window'] / 1e6 for r in runs]):>18} "
            f"{spread([r['model_load'] for r in runs]):>18}"
        )
    print("  (CPU: user+system seconds of the process over the bundle run, all threads)")
    if set(results) == set(VARIANTS):
        ours, theirs = results["pacs-ai"], results["sdk-app"]
        for label, key, subtract in (
            ("whole bundle run, wall", "run", False),
            ("whole bundle run, CPU", "cpu", False),
            ("bundle run without the SDK's model reload, wall", "run", True),
            ("sliding window alone, wall", "window", False),
        ):
            ours_s = statistics.median(r[key] for r in ours)
            theirs_s = statistics.median(r[key] - (r["model_load"] if subtract else 0.0) for r in theirs)
            print(
                f"  pacs-ai / SDK throughput (voxels/s), {label}: {theirs_s / ours_s:.2f}x (ratio of medians)"
            )
        for variant, runs in results.items():
            peaks = [r["peak_over_baseline_mib"] for r in runs]
            print(
                f"  {variant} peak RSS over baseline during the run: "
                f"{statistics.median(peaks):.0f} MiB (median)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
