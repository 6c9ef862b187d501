"""Loading a TorchScript model described by a YAML descriptor (:mod:`pacs_ai.models.descriptor`).

The descriptor is turned into the same MONAI pieces a bundle provides, so the
engine runs both kinds alike:

* preprocessing: ``Orientationd`` (``input.orientation``), ``Spacingd``
  (``input.spacing_mm``), ``Resized`` (``input.resize``),
  ``ScaleIntensityRanged`` (``input.intensity``) and ``RepeatChanneld`` for
  multi-channel inputs, in that order, on the channel-first image in MONAI's
  layout (x = column, y = row, z = slice, reoriented only with ``input.orientation``);
* inferer: segmentation with a sliding window of ``inference.roi_size``
  (default ``input.spatial_shape``) unless the image is resized to the network
  size; classification with a plain forward pass;
* postprocessing: the activation, ``Invertd`` back onto the input grid
  (segmentation), then argmax (several channels) or a 0.5 threshold (one channel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pacs_ai.models import ModelError
from pacs_ai.models.descriptor import TorchScriptDescriptor, read_descriptor
from pacs_ai.models.loaded import PRED_KEY, LoadedModel, module_size_bytes
from pacs_ai.models.store import DESCRIPTOR_FILE, TORCHSCRIPT_FILE, RegisteredModel

IMAGE_KEY = "image"


def build_transforms(descriptor: TorchScriptDescriptor) -> tuple[object, object]:
    """(preprocessing, postprocessing) Compose objects for a descriptor."""
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        Invertd,
        Orientationd,
        RepeatChanneld,
        Resized,
        ScaleIntensityRanged,
        Spacingd,
    )

    spec = descriptor.input
    linear = "bilinear"  # Spacingd/Resized use "bilinear" for 3D too (trilinear in torch terms)
    steps: list[Callable[..., Any]] = []
    if spec.orientation is not None:
        steps.append(Orientationd(keys=IMAGE_KEY, axcodes=spec.orientation.upper()))
    if spec.spacing_mm is not None:
        steps.append(Spacingd(keys=IMAGE_KEY, pixdim=spec.spacing_mm, mode=linear))
    if spec.resize is not None:
        steps.append(
            Resized(
                keys=IMAGE_KEY,
                spatial_size=spec.resize,
                mode="bilinear" if len(spec.resize) == 2 else "trilinear",
            )
        )
    if spec.intensity is not None:
        i = spec.intensity
        steps.append(
            ScaleIntensityRanged(
                keys=IMAGE_KEY, a_min=i.a_min, a_max=i.a_max, b_min=i.b_min, b_max=i.b_max, clip=i.clip
            )
        )
    if spec.channels > 1:
        steps.append(RepeatChanneld(keys=IMAGE_KEY, repeats=spec.channels))
    preprocessing = Compose(steps)

    activation = descriptor.output.activation
    post: list[Callable[..., Any]] = []
    if activation != "none":
        post.append(
            Activationsd(keys=PRED_KEY, softmax=activation == "softmax", sigmoid=activation == "sigmoid")
        )
    if descriptor.task == "segmentation":
        if spec.spacing_mm is not None or spec.resize is not None or spec.orientation is not None:
            post.append(
                Invertd(keys=PRED_KEY, transform=preprocessing, orig_keys=IMAGE_KEY, nearest_interp=False)
            )
        channels = len(descriptor.output.channels)
        if channels == 1:
            post.append(AsDiscreted(keys=PRED_KEY, threshold=0.5))
        else:
            post.append(AsDiscreted(keys=PRED_KEY, argmax=True))
    return preprocessing, Compose(post)


def load_torchscript(registered: RegisteredModel, device: torch.device) -> LoadedModel:
    """Load a registered TorchScript model on ``device``."""
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    descriptor = read_descriptor(registered.files_dir / DESCRIPTOR_FILE)
    path = registered.files_dir / TORCHSCRIPT_FILE
    try:
        network = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ModelError(f"{path}: not a loadable TorchScript file: {exc}") from exc
    network.eval()
    preprocessing, postprocessing = build_transforms(descriptor)
    if descriptor.task == "segmentation" and descriptor.input.resize is None:
        inferer: object = SlidingWindowInferer(
            roi_size=descriptor.roi_size,
            overlap=descriptor.inference.overlap,
            sw_batch_size=descriptor.inference.sw_batch_size,
        )
    else:
        inferer = SimpleInferer()
    return LoadedModel(
        registered=registered,
        network=network,
        device=device,
        spatial_dims=descriptor.spatial_dims,
        task=descriptor.task,
        image_key=IMAGE_KEY,
        channel_first_input=True,
        preprocessing=preprocessing,  # type: ignore[arg-type]
        inferer=inferer,  # type: ignore[arg-type]
        postprocessing=postprocessing,  # type: ignore[arg-type]
        channel_names={int(k): v for k, v in descriptor.output.channels.items()},
        smoke_shape=tuple(descriptor.input.spatial_shape),
        smoke_range=(
            (descriptor.input.intensity.a_min, descriptor.input.intensity.a_max)
            if descriptor.input.intensity
            else (0.0, 1.0)
        ),
        size_bytes=module_size_bytes(network),
    )
