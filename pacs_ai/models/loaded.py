"""A model ready to run: network on its device plus the transforms around it.

Both kinds of model (:mod:`~pacs_ai.models.bundle`, :mod:`~pacs_ai.models.torchscript`)
load into a :class:`LoadedModel`, so the engine runs them the same way:
``preprocessing`` (a MONAI dictionary transform on ``{image_key: image}``),
the ``inferer`` with the network, then ``postprocessing`` on the same
dictionary with the prediction under ``"pred"`` -- exactly the order a
bundle's own evaluator uses, minus file reading and writing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

from pacs_ai.models.boxes import BoxLayout
from pacs_ai.models.store import RegisteredModel

PRED_KEY = "pred"


@dataclass(frozen=True)
class InfererOverrides:
    """Sliding-window settings from a profile; ``None`` keeps the model's own."""

    roi_size: tuple[int, ...] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None

    @property
    def empty(self) -> bool:
        return self.roi_size is None and self.overlap is None and self.sw_batch_size is None


@dataclass
class LoadedModel:
    registered: RegisteredModel
    network: torch.nn.Module
    device: torch.device
    spatial_dims: int
    task: str
    #: Key of the image in the transforms' dictionary (the bundle's LoadImaged keys).
    image_key: str
    #: Whether the image is handed over with a channel axis (LoadImaged(ensure_channel_first=True)).
    channel_first_input: bool
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None
    inferer: Inferer
    postprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None
    #: Output channel (or label value) -> name, from the bundle metadata or the descriptor.
    channel_names: dict[int, str] = field(default_factory=dict)
    #: Spatial shape (MONAI order) of the synthetic input for smoke tests.
    smoke_shape: tuple[int, ...] = ()
    #: (low, high) of the synthetic input's values.
    smoke_range: tuple[float, float] = (0.0, 1.0)
    #: Approximate memory held by the model (parameters and buffers), bytes.
    size_bytes: int = 0
    #: Channels the network takes (metadata ``num_channels``): a grey image is handed over with
    #: this many copies in a last axis, as ``LoadImage`` gives a colour image.  1 for most models.
    input_channels: int = 1
    #: What the model is, for titles: the bundle metadata's ``name`` (else the registry name).
    title: str = ""
    #: Detection models: where the output's boxes are and in which convention.
    box_layout: BoxLayout | None = None

    @property
    def name(self) -> str:
        return self.registered.name

    @property
    def version(self) -> str:
        return self.registered.manifest.version

    def inferer_for(self, overrides: InfererOverrides | None) -> Inferer:
        """The model's inferer, or a sliding-window inferer with the profile's overrides applied."""
        if overrides is None or overrides.empty:
            return self.inferer
        base = self.inferer
        if isinstance(base, SlidingWindowInferer):
            return SlidingWindowInferer(
                roi_size=overrides.roi_size or base.roi_size,
                sw_batch_size=overrides.sw_batch_size or base.sw_batch_size,
                overlap=base.overlap if overrides.overlap is None else overrides.overlap,
                mode=base.mode,
                sigma_scale=base.sigma_scale,
                padding_mode=base.padding_mode,
                cval=base.cval,
            )
        if overrides.roi_size is None:
            raise ValueError(
                f"model {self.name} uses {type(base).__name__}, not a sliding window; give roi_size "
                "to run it with a sliding window (overlap and sw_batch_size alone do not apply)"
            )
        return SlidingWindowInferer(
            roi_size=overrides.roi_size,
            sw_batch_size=overrides.sw_batch_size or 1,
            overlap=0.25 if overrides.overlap is None else overrides.overlap,
        )

    def predict(
        self, image: MetaTensor, overrides: InfererOverrides | None = None, *, amp: bool = True
    ) -> Any:
        """Run the whole pipeline on one image (as ``LoadImage`` gives it); the postprocessed prediction.

        Segmentation: channel-first array on the input grid; classification: a
        vector; detection: the postprocessed dictionary of numpy arrays (boxes,
        labels, scores under the bundle's keys).  A failing transform raises
        :class:`TransformFailed` naming the transform, its keys and the cause.
        """
        inferer = self.inferer_for(overrides)
        data: dict[str, Any] = {self.image_key: image}
        if self.preprocessing is not None:
            data = run_transforms(self.preprocessing, data, "preprocessing")
        prepared = data[self.image_key]
        plain = prepared.as_tensor() if isinstance(prepared, MetaTensor) else torch.as_tensor(prepared)
        batch = plain.unsqueeze(0).to(self.device)
        if self.task == "detection":
            return self._detect(inferer, batch, prepared, amp)
        with torch.no_grad(), _autocast(self.device, amp):
            output = inferer(batch, self.network)
        if isinstance(output, (tuple, list)):  # deep-supervision style networks: the first head
            output = output[0]
        if isinstance(output, dict):
            output = output.get(PRED_KEY, next(iter(output.values())))
        prediction = torch.as_tensor(output)[0].detach().float()
        if isinstance(prepared, MetaTensor) and prediction.ndim == prepared.ndim:
            prediction = MetaTensor(prediction, meta=prepared.meta)
        data[PRED_KEY] = prediction
        if self.postprocessing is not None:
            data = run_transforms(self.postprocessing, data, "postprocessing")
        result = data[PRED_KEY]
        if isinstance(result, torch.Tensor):
            return np.asarray(result.detach().cpu().float().numpy())
        return np.asarray(result, dtype=np.float32)

    def _detect(self, inferer: Any, batch: torch.Tensor, prepared: Any, amp: bool) -> dict[str, np.ndarray]:
        """Detection: the detector's boxes, through the bundle's postprocessing with the prepared image.

        The postprocessing gets the boxes together with the prepared image under
        the image key (as the bundle's own saver hands them over), so its
        ``AffineBoxToWorldCoordinated`` reads the affine the network's input had.
        """
        with torch.no_grad(), _autocast(self.device, amp):
            outputs = inferer(batch, self.network)
        found = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in outputs[0].items()}
        data: dict[str, Any] = {**found, self.image_key: prepared}
        if self.postprocessing is not None:
            data = run_transforms(self.postprocessing, data, "postprocessing")
        data.pop(self.image_key, None)
        return {
            str(k): np.asarray(v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in data.items()
        }


class TransformFailed(RuntimeError):
    """A transform of a model's pipeline failed; the message names it, its keys and the real cause."""


def root_cause(exc: BaseException) -> BaseException:
    """The innermost cause under MONAI's ``RuntimeError("applying transform ...")`` wrappers."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def run_transforms(
    pipeline: Callable[[dict[str, Any]], dict[str, Any]], data: dict[str, Any], stage: str
) -> Any:
    """Apply a Compose one transform at a time, so a failure names the transform (not ``<object at 0x..>``).

    Same result as calling the Compose (each step is ``monai.transforms.apply_transform``,
    as Compose does); a lazy Compose is called as a whole.
    """
    from monai.transforms import Compose, apply_transform

    steps = pipeline.flatten().transforms if isinstance(pipeline, Compose) and not pipeline.lazy else None
    if steps is None:
        try:
            return pipeline(data)
        except Exception as exc:
            cause = root_cause(exc)
            raise TransformFailed(f"{stage} failed: {type(cause).__name__}: {cause}") from exc
    for step in steps:
        try:
            data = apply_transform(step, data)  # type: ignore[assignment]  # one dict in, one dict out
        except Exception as exc:
            cause = root_cause(exc)
            keys = getattr(step, "keys", None)
            named = f" on key(s) {', '.join(map(str, keys))}" if keys else ""
            raise TransformFailed(
                f"{stage} transform {type(step).__name__}{named} failed: {type(cause).__name__}: {cause}"
            ) from exc
    return data


@contextlib.contextmanager
def _autocast(device: torch.device, amp: bool) -> Iterator[None]:
    """Mixed precision on CUDA only (CPU autocast is slower for most models and changes results)."""
    if amp and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            yield
    else:
        yield


def module_size_bytes(network: torch.nn.Module) -> int:
    """Parameters plus buffers, the memory a warm model keeps."""
    tensors = list(network.parameters()) + list(network.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def simple_or_sliding(roi_size: list[int] | None, overlap: float, sw_batch_size: int) -> Inferer:
    if roi_size is None:
        return SimpleInferer()
    return SlidingWindowInferer(roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size)
