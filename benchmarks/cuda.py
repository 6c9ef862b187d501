"""The model benchmark on CUDA when torch sees a GPU, against the CPU in the same run; says so when not.

Runs ``benchmarks/model_cache.py`` (model load, first and second study through the
``monai-bundle`` engine) once with ``--device cuda`` and once with ``--device cpu``, and prints
the GPU/CPU ratio of the second (warm) study.  On a machine without a usable GPU it prints why
(no CUDA build of torch, or no device visible, e.g. ``CUDA_VISIBLE_DEVICES`` empty) and exits 0:
there is nothing to measure, which is not an error.

    python benchmarks/cuda.py --slices 300 --size 512
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.model_cache import parser, print_summary, run  # noqa: E402


def cuda_missing_reason() -> str | None:
    """Why CUDA cannot be measured here, or None when torch sees a GPU."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    reason = cuda_missing_reason()
    if reason is not None:
        print(f"no GPU benchmark on this machine: {reason}. The CPU figures: benchmarks/model_cache.py.")
        return 0
    import torch

    print(f"GPU: {torch.cuda.get_device_name(0)}")
    gpu = print_summary("cuda", run(args, "cuda"))
    cpu = print_summary("cpu", run(args, "cpu"))
    print(
        f"second (warm) study: cuda {gpu['second']:.2f} s vs cpu {cpu['second']:.2f} s "
        f"= {cpu['second'] / gpu['second']:.1f}x faster on the GPU"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
