"""Helpers shared by the MONAI Deploy App SDK comparisons (``monai_deploy_*.py``).

* :func:`ensure_phantom` - the 300-slice 512x512 chest phantom of
  :mod:`pacs_ai.synthetic.phantom`, written once under ``/tmp`` and reused,
  with its exact label map saved beside it (so no analyzer time enters a
  benchmark);
* :func:`run_child` - one benchmark variant in a fresh Python process, so that
  its peak RSS belongs to that variant alone (numpy, pydicom and torch
  allocate outside the Python heap, so tracemalloc would miss most of it);
  :func:`reset_peak_rss` and :func:`peak_rss_mib` measure the peak of one
  step inside that process;
* :data:`SDK_INSTALL` - how the SDK is installed next to (not into) the
  project's virtual environment.

Both benchmarks run with the interpreter of that side environment, which sees
the project's own packages (torch, MONAI, pydicom, highdicom, pacs-ai) through
a ``.pth`` file, so both sides of a comparison use the very same library
versions.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Verbatim commands that set up ``/work/bench-venv`` (checked on 2 CPU cores, no GPU, Python 3.11.7).
#: Installing the SDK into the project venv would pull holoscan-cu13, cupy-cuda13x, cuda-python and
#: tritonclient into it; torch itself is not touched (the SDK does not depend on it) but the side
#: environment keeps the project venv exactly as it is.  The second ``pip install`` puts a copy of the
#: same MONAI release into the side environment because ``monai`` is a regular package: the SDK's
#: ``monai/deploy`` must sit inside the same ``monai`` directory to be importable.
SDK_INSTALL = """\
python3.11 -m venv /work/bench-venv
echo "import site; site.addsitedir('/work/main/.venv/lib/python3.11/site-packages')" \\
    > /work/bench-venv/lib/python3.11/site-packages/_pacs_ai_venv.pth
/work/bench-venv/bin/pip install monai-deploy-app-sdk==4.0.0
/work/bench-venv/bin/pip install --no-deps --ignore-installed monai==1.6.1   # = the project's MONAI
"""

#: Marker of the line a child process prints its measurements on.
RESULT_PREFIX = "BENCH-RESULT "
#: Holoscan warns (and may crash in deep call stacks) below this main-thread stack size.
HOLOSCAN_STACK_BYTES = 32 * 2**20


def sdk_available() -> bool:
    """True when ``monai.deploy`` (the MONAI Deploy App SDK) can be imported by this interpreter."""
    import importlib.util

    try:
        return importlib.util.find_spec("monai.deploy") is not None
    except ModuleNotFoundError:
        return False


def sdk_version() -> str:
    from importlib.metadata import version

    return version("monai-deploy-app-sdk")


def ensure_phantom(
    root: Path, *, slices: int, size: int, pixel_spacing_mm: float = 0.7, slice_spacing_mm: float = 1.0
) -> tuple[list[Path], Path]:
    """The files of a chest phantom and the path of its label map (uint8 ``.npy``, 1 right, 2 left lung).

    Written to ``root/phantom-{slices}x{size}/`` on first use and reused afterwards; the label map
    lives beside the folder, not in it, because the SDK's loader reads every file in the folder.
    """
    folder = root / f"phantom-{slices}x{size}-{pixel_spacing_mm}mm-{slice_spacing_mm}mm"
    labels_path = folder.with_name(folder.name + ".labels.npy")
    paths = sorted(folder.glob("*.dcm"))
    if len(paths) != slices or not labels_path.exists():
        from pacs_ai.synthetic.phantom import write_chest_phantom

        print(f"writing a {slices}x{size}x{size} chest phantom to {folder} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.dcm"):
            stale.unlink()
        truth = write_chest_phantom(
            folder,
            slices=slices,
            size=size,
            pixel_spacing_mm=pixel_spacing_mm,
            slice_spacing_mm=slice_spacing_mm,
        )
        np.save(labels_path, truth.labels.astype(np.uint8))
        paths = sorted(folder.glob("*.dcm"))
    return paths, labels_path


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file once so that no variant pays for the first read from disk."""
    for path in paths:
        path.read_bytes()


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Make the peak RSS (VmHWM) start again from the current RSS (Linux >= 4.0, ``clear_refs`` 5).

    Without this, the peak would include whatever importing torch/holoscan or a warm-up run
    touched, which ``ru_maxrss`` can never forget.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mib() -> float:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss`."""
    return _status_mib("VmHWM")


def current_rss_mib() -> float:
    """Resident set size of this process now."""
    return _status_mib("VmRSS")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads.

    Printed beside wall-clock seconds because the machine's 2 cores are shared with other work:
    when they are busy, wall time grows but the CPU time a variant needs barely changes.
    """
    times = os.times()
    return times.user + times.system


def report(values: dict[str, object]) -> None:
    """Print a child's measurements on one line for :func:`run_child`."""
    print(RESULT_PREFIX + json.dumps(values), flush=True)


def _raise_stack_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = HOLOSCAN_STACK_BYTES if hard == resource.RLIM_INFINITY else min(HOLOSCAN_STACK_BYTES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))


def run_child(script: Path, args: Sequence[str], *, threads: int, timeout: float = 600) -> dict[str, object]:
    """Run ``script args`` with this interpreter in a fresh process and return what it :func:`report`-ed.

    The thread count of BLAS/OpenMP/torch is fixed through the environment so that every variant
    gets the same share of the (shared, 2-core) machine.
    """
    env = dict(os.environ)
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[variable] = str(threads)
    env.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    completed = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_raise_stack_limit,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"{script.name} {' '.join(args)} failed (exit {completed.returncode}):\n"
            f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def run_interleaved(
    script: Path,
    variants: Sequence[str],
    repeats: int,
    child_args: Callable[[str], list[str]],
    *,
    threads: int,
) -> dict[str, list[dict[str, Any]]]:
    """Each variant's measurements over ``repeats`` fresh processes (:func:`run_child`), by variant.

    The variants take turns (A, B, A, B, ...) so that drift in the machine's load
    hits every variant alike; ``child_args(variant)`` gives a child's arguments.
    """
    results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
    for repeat in range(repeats):
        for variant in variants:
            start = time.perf_counter()
            results[variant].append(run_child(script, child_args(variant), threads=threads))
            print(
                f"  run {repeat + 1} {variant:<10} done in {time.perf_counter() - start:5.1f} s", flush=True
            )
    return results


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of the runs."""
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"
