"""Model cache effect: a worker's first study with a model vs its second, model load timed apart.

A worker keeps loaded models warm (``pacs_ai.models.engine.ModelEngine``, cache bounded by a memory
budget), so only its first study with a model pays for reading and building the network.  This
script measures that in one fresh process per repeat, on the production path of the
``monai-bundle`` analyzer:

1. the bundle of ``benchmarks/monai_deploy_inference.py`` (a ``spleen_ct_segmentation``-shaped
   3D UNet, random weights) is registered in a temporary model store;
2. ``engine.model(name)`` loads it (network, weights, the bundle's transforms): *model load*;
3. ``engine.run`` on a first chest phantom study: *first study* (the model is cached now, but
   torch and MONAI still initialise lazily on their first call);
4. ``engine.run`` on a second study of the same size (the series loaded again into a new volume,
   so that both runs do the same work): *second study*, served from the cache.

Printed: model load, first and second study seconds (median of the repeats), the second study's
latency against the first one's with and without the load (``second / (load + first)`` is what
a worker without a cache would pay on every study), and the engine's cache hit.  ``--device``
picks ``cpu``, ``cuda`` or ``auto`` (CUDA when torch sees a GPU); ``benchmarks/cuda.py`` runs this
on CUDA and CPU in the same run.

    python benchmarks/model_cache.py --slices 120 --size 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import ensure_phantom, report, run_interleaved, warm_page_cache  # noqa: E402
from benchmarks.monai_deploy_inference import MODEL_NAME, write_bundle  # noqa: E402

#: Pixel spacing of the phantom: size x spacing must cover the 200 mm the phantom's chest needs.
PIXEL_SPACING_MM = 1.4


def measure(bundle: Path, series: Path, device: str) -> dict[str, Any]:
    """Load, first study, second study in this process (see the module docstring)."""
    import torch

    from pacs_ai.analyze.volume import load_series
    from pacs_ai.models.engine import ModelEngine

    volumes = [load_series(sorted(series.glob("*.dcm"))) for _ in range(2)]
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir="/tmp") as tmp:
        engine = ModelEngine(Path(tmp) / "models", Path(tmp) / "run", device=device)
        engine.store.add(bundle, MODEL_NAME)

        def timed(action: Any) -> float:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            action()
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        load = timed(lambda: engine.model(MODEL_NAME))
        loaded = engine.model(MODEL_NAME)
        first_run = timed(lambda: engine.run(MODEL_NAME, volumes[0]))
        second_run = timed(lambda: engine.run(MODEL_NAME, volumes[1]))
        cached = engine.model(MODEL_NAME) is loaded
    return {
        "device": str(engine.device),
        "load": load,
        "first": first_run,
        "second": second_run,
        "cached": cached,
        "voxels": [int(v.voxels.size) for v in volumes],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over the repeats and the ratios the docstring describes."""
    load = statistics.median(r["load"] for r in runs)
    first = statistics.median(r["first"] for r in runs)
    second = statistics.median(r["second"] for r in runs)
    return {
        "load": load,
        "first": first,
        "second": second,
        "second_vs_first_with_load": second / (load + first),
        "second_vs_first_without_load": second / first,
    }


def print_summary(device: str, runs: list[dict[str, Any]]) -> dict[str, float]:
    figures = summarise(runs)
    print(
        f"{device}: model load {figures['load']:.2f} s; first study {figures['first']:.2f} s "
        f"(+ load: {figures['load'] + figures['first']:.2f} s); second study {figures['second']:.2f} s "
        f"from the cache ({'hit' if all(r['cached'] for r in runs) else 'MISS'})\n"
        f"  second / (load + first) = {figures['second_vs_first_with_load']:.2f}x   "
        f"second / first (load excluded) = {figures['second_vs_first_without_load']:.2f}x   "
        f"(median of {len(runs)} fresh process(es); {runs[0]['voxels'][0]:,} voxels per study)"
    )
    return figures


def run(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    """``args.repeats`` fresh processes measuring on ``device``."""
    paths, _ = ensure_phantom(
        args.root, slices=args.slices, size=args.size, pixel_spacing_mm=PIXEL_SPACING_MM
    )
    warm_page_cache(paths)
    bundle = write_bundle(args.root, overlap=args.overlap, sw_batch_size=args.sw_batch_size)
    child_args = [str(bundle), str(paths[0].parent)]
    return run_interleaved(
        Path(__file__),
        [device],
        args.repeats,
        lambda _: ["--child", device, "--threads", str(args.threads), "--child-args", *child_args],
        threads=args.threads,
    )[device]


def parser() -> argparse.ArgumentParser:
    parsed = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parsed.add_argument("--root", type=Path, default=Path("/tmp/pacs-ai-bench"), help="phantom/bundle cache")
    parsed.add_argument("--slices", type=int, default=120)
    parsed.add_argument("--size", type=int, default=256)
    parsed.add_argument("--overlap", type=float, default=0.25)
    parsed.add_argument("--sw-batch-size", type=int, default=4)
    parsed.add_argument("--repeats", type=int, default=3, help="fresh processes")
    parsed.add_argument("--threads", type=int, default=2, help="torch/BLAS threads")
    parsed.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parsed.add_argument("--child", help=argparse.SUPPRESS)
    parsed.add_argument("--child-args", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parsed


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        report(measure(*args.child_args, device=args.child))
        return 0
    runs = run(args, args.device)
    print_summary(runs[0]["device"], runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
