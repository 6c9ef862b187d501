"""Warming a worker up before it takes real work: a small job of its own (so it sits in jobs/).

The first job a fresh worker process runs pays one-off costs: imports of the
pixel decoders and image libraries, highdicom loading its tables of the DICOM
standard, first-use caches in pydicom and SciPy.  Measured on a 300-slice CT,
that added about 1.3 s to the first study's turnaround.  Running one small
synthetic job through the same code path (phantom -> volume -> analyzer ->
SEG and SR -> files) at worker start moves that cost out of the first study.
Celery's prefork pool forks its children after this runs, so they inherit the
warm state.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from pacs_ai.analyze.base import AnalysisRefused
from pacs_ai.analyze.registry import available_analyzers, get_analyzer
from pacs_ai.analyze.volume import load_series
from pacs_ai.encode import EquipmentInfo, write_dataset
from pacs_ai.encode.results import build_results
from pacs_ai.synthetic.phantom import write_chest_phantom

log = logging.getLogger(__name__)

#: The built-in analyzer the synthetic job runs (it needs no weights).
WARM_UP_ANALYZER = "ct-chest-lung"


def warm_up() -> float:
    """Run one small synthetic job end to end in a temporary directory; returns seconds taken.

    Best effort: a failure is logged and the worker starts anyway (cold).
    """
    started = time.perf_counter()
    if WARM_UP_ANALYZER not in available_analyzers():
        return 0.0
    try:
        with tempfile.TemporaryDirectory(prefix="pacs-ai-warm-up-") as tmp:
            phantom = write_chest_phantom(
                Path(tmp) / "ct",
                slices=24,
                size=128,
                pixel_spacing_mm=3.0,
                slice_spacing_mm=12.0,
                patient_name="Warm^Up",
            )
            volume = load_series(phantom.paths)
            result = get_analyzer(WARM_UP_ANALYZER).analyze(volume, {})
            for kind, dataset in build_results(volume, result, key="warm-up", equipment=EquipmentInfo()):
                write_dataset(dataset, Path(tmp) / f"{kind}.dcm", fsync=False)
    except (AnalysisRefused, OSError, ValueError) as exc:
        log.warning("worker warm-up did not complete (%s); the first job will start cold", exc)
    elapsed = time.perf_counter() - started
    log.info("worker warmed up in %.2f s", elapsed)
    return elapsed
