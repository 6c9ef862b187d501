"""Running registered models: device choice, warm-model cache, GPU lock and error translation.

One :class:`ModelEngine` per worker process (:func:`engine_for`) keeps models
loaded between jobs (:class:`~pacs_ai.models.cache.ModelCache`), runs one
model at a time per GPU (:func:`~pacs_ai.models.device.device_lock`) and turns
what can go wrong inside a model into
:class:`~pacs_ai.analyze.base.AnalysisFailed` with the model's name and the
stage that failed, so the job fails with that reason and the worker goes on.
Celery's ``SoftTimeLimitExceeded`` is let through untouched: the task's time
limit, not the model, decides what happens then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from celery.exceptions import SoftTimeLimitExceeded

from pacs_ai.analyze.base import AnalysisFailed, AnalysisRefused, InvalidParameters
from pacs_ai.models import ModelError
from pacs_ai.models.cache import ModelCache
from pacs_ai.models.device import choose_device, device_lock
from pacs_ai.models.geometry import labels_to_volume, volume_to_metatensor
from pacs_ai.models.loaded import InfererOverrides, LoadedModel
from pacs_ai.models.store import ModelStore, RegisteredModel, UnknownModelError, file_problems

if TYPE_CHECKING:
    from pacs_ai.analyze.volume import Volume
    from pacs_ai.config import Settings

#: Messages of allocation failures that torch raises as a plain RuntimeError.
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


@dataclass(frozen=True)
class Prediction:
    """A model's output on one volume."""

    model: LoadedModel
    #: Segmentation: uint8 (slice, row, column) label map aligned with the volume.
    labels: np.ndarray | None
    #: Classification: one value per output channel (after the model's activation).
    probabilities: np.ndarray | None
    seconds: float
    #: Detection: the bundle's postprocessed output (boxes, labels, scores under its own keys).
    boxes: dict[str, np.ndarray] | None = None


def load_registered(registered: RegisteredModel, device: torch.device) -> LoadedModel:
    """Check the files against the manifest, then load the model onto ``device``."""
    problems = file_problems(registered)
    if problems:
        raise ModelError("; ".join(problems))
    if registered.manifest.kind == "bundle":
        from pacs_ai.models.bundle import load_bundle

        return load_bundle(registered, device)
    from pacs_ai.models.torchscript import load_torchscript

    return load_torchscript(registered, device)


class ModelEngine:
    """Loads and runs registered models in this process."""

    def __init__(
        self, models_dir: Path, lock_dir: Path, *, device: str = "auto", cache_mb: int = 2048
    ) -> None:
        self.store = ModelStore(models_dir)
        self.lock_dir = lock_dir
        self.device = choose_device(device)
        self.cache: ModelCache[LoadedModel] = ModelCache(cache_mb * 2**20, lambda m: m.size_bytes)

    def model(self, name: str) -> LoadedModel:
        """The loaded model (warm if it ran before); :class:`UnknownModelError` or :class:`ModelError`."""
        registered = self.store.get(name)
        return self.cache.get(
            (registered.name, registered.manifest_sha256), lambda: load_registered(registered, self.device)
        )

    def run(
        self,
        name: str,
        volume: Volume,
        overrides: InfererOverrides | None = None,
        *,
        amp: bool = True,
    ) -> Prediction:
        """Run model ``name`` on ``volume``.

        Raises :class:`UnknownModelError` for a name that is not registered and
        :class:`AnalysisFailed` for everything that goes wrong while loading or
        running the model (out of memory included).
        """
        stage = "loading"
        started = time.perf_counter()
        try:
            with device_lock(self.device, self.lock_dir):
                model = self.model(name)
                stage = "preparing the input"
                image = volume_to_metatensor(
                    volume,
                    model.spatial_dims,
                    channel_first=model.channel_first_input,
                    channels=model.input_channels,
                )
                stage = "inference"
                output = model.predict(image, overrides, amp=amp)
        except SoftTimeLimitExceeded:
            raise
        except (AnalysisFailed, AnalysisRefused, InvalidParameters, UnknownModelError):
            raise
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            raise _out_of_memory(name, stage, self.device, exc) from exc
        except ModelError as exc:
            raise AnalysisFailed(f"model {name}: {exc}") from exc
        except Exception as exc:
            if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES):
                raise _out_of_memory(name, stage, self.device, exc) from exc
            raise AnalysisFailed(f"model {name}: {stage} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        if model.task == "detection":
            return Prediction(model, None, None, seconds, boxes=output)
        if model.task == "segmentation":
            try:
                labels = labels_to_volume(output, model.spatial_dims, volume.voxels.shape)
            except ValueError as exc:
                raise AnalysisFailed(f"model {name}: unusable segmentation output: {exc}") from exc
            return Prediction(model, labels, None, seconds)
        return Prediction(model, None, np.asarray(output, dtype=np.float64).ravel(), seconds)


def _out_of_memory(name: str, stage: str, device: torch.device, exc: BaseException) -> AnalysisFailed:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return AnalysisFailed(
        f"model {name}: out of memory on {device} during {stage} ({reason}); "
        "use a smaller roi_size or sw_batch_size in the profile, or a device with more memory"
    )


_ENGINES: dict[tuple[str, str, str, int], ModelEngine] = {}


def loaded_model_names() -> list[str]:
    """Names of the models this process keeps loaded (for the worker's heartbeat in the index)."""
    return sorted({name for engine in _ENGINES.values() for name, _ in engine.cache.keys()})  # noqa: SIM118 - a method


def engine_for(settings: Settings) -> ModelEngine:
    """This process's engine for ``settings``.

    Kept per process on purpose: the point is that a worker's models stay
    loaded from one job to the next.
    """
    key = (
        str(settings.effective_models_dir),
        str(settings.data_dir),
        settings.inference_device,
        settings.model_cache_mb,
    )
    engine = _ENGINES.get(key)
    if engine is None:
        engine = ModelEngine(
            settings.effective_models_dir,
            settings.data_dir / "run",
            device=settings.inference_device,
            cache_mb=settings.model_cache_mb,
        )
        _ENGINES[key] = engine
    return engine
