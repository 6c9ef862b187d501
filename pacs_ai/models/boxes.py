"""A detection bundle's boxes, in its own output convention, to boxes in DICOM patient coordinates (LPS, mm).

What a detection bundle outputs is read from the bundle, not assumed: the
keys from its ``detector`` (``target_box_key``, ``target_label_key``,
``pred_score_key``), the box layout from the last ``ConvertBoxModed`` of its
postprocessing (``cccwhd`` for ``lung_nodule_ct_detection``; ``xyzxyz``
without one) and the coordinate space from its ``AffineBoxToWorldCoordinated``:
with ``affine_lps_to_ras: true`` the image affine (RAS, as ``LoadImage``
gives it and as :func:`~pacs_ai.models.geometry.volume_to_metatensor`
builds it) is turned back to LPS before the boxes are mapped, so the boxes
come out in LPS world coordinates, which are DICOM patient coordinates;
without it they come out in RAS (x and y negated here).  A postprocessing
that leaves boxes in voxel indices is refused at load time: only the bundle
knows the grid its boxes refer to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pacs_ai.models import ModelError


@dataclass(frozen=True)
class BoxLayout:
    """Where a detection bundle puts its boxes and in which convention."""

    box_key: str = "box"
    label_key: str = "label"
    score_key: str = "label_scores"
    #: MONAI box mode of the output (``xyzxyz``, ``cccwhd``, ``xxyyzz``).
    mode: str = "xyzxyz"
    space: Literal["LPS", "RAS"] = "LPS"


@dataclass(frozen=True)
class PatientBox:
    """One detected box: class index, score and its corners in LPS mm (min <= max per axis)."""

    label: int
    score: float
    box_min_mm: tuple[float, float, float]
    box_max_mm: tuple[float, float, float]


def layout_of(detector: Any, postprocessing: Any) -> BoxLayout:
    """The :class:`BoxLayout` of a bundle from its instantiated detector and postprocessing Compose."""
    from monai.apps.detection.transforms.dictionary import AffineBoxToWorldCoordinated, ConvertBoxModed

    steps = list(postprocessing.flatten().transforms) if postprocessing is not None else []
    world = [s for s in steps if isinstance(s, AffineBoxToWorldCoordinated)]
    if not world:
        raise ModelError(
            "the detection bundle's postprocessing leaves boxes in voxel indices; it needs "
            "AffineBoxToWorldCoordinated so the boxes can be placed on the patient"
        )
    mode = "xyzxyz"
    after_world = steps[steps.index(world[-1]) :]
    for step in after_world:
        if isinstance(step, ConvertBoxModed):
            mode = _mode_name(step.converter.dst_mode)
    lps = bool(getattr(world[-1], "affine_lps_to_ras", False))
    return BoxLayout(
        box_key=str(getattr(detector, "target_box_key", "box")),
        label_key=str(getattr(detector, "target_label_key", "label")),
        score_key=str(getattr(detector, "pred_score_key", "label_scores")),
        mode=mode,
        space="LPS" if lps else "RAS",
    )


def _mode_name(mode: Any) -> str:
    from monai.data.box_utils import get_boxmode

    return str(get_boxmode(mode).get_name(3))


def patient_boxes(output: dict[str, np.ndarray], layout: BoxLayout) -> list[PatientBox]:
    """The boxes of one postprocessed detection output in LPS mm, highest score first."""
    import torch
    from monai.data.box_utils import convert_box_mode

    if layout.box_key not in output:
        raise ModelError(f"the detection output has no {layout.box_key!r} (keys: {sorted(output)})")
    boxes = np.asarray(output[layout.box_key], dtype=np.float64).reshape(-1, 6)
    count = boxes.shape[0]
    scores = np.asarray(output.get(layout.score_key, np.ones(count)), dtype=np.float64).reshape(-1)
    labels = np.asarray(output.get(layout.label_key, np.zeros(count)), dtype=np.int64).reshape(-1)
    if scores.shape[0] != count or labels.shape[0] != count:
        raise ModelError(f"{count} boxes but {scores.shape[0]} scores and {labels.shape[0]} labels")
    if count == 0:
        return []
    corners = np.asarray(convert_box_mode(torch.as_tensor(boxes), src_mode=layout.mode, dst_mode="xyzxyz"))
    low, high = corners[:, :3].copy(), corners[:, 3:].copy()
    if layout.space == "RAS":
        flip = np.array([-1.0, -1.0, 1.0])
        low, high = low * flip, high * flip
    low, high = np.minimum(low, high), np.maximum(low, high)
    found = [
        PatientBox(
            label=int(labels[i]),
            score=float(np.clip(scores[i], 0.0, 1.0)),
            box_min_mm=(float(low[i, 0]), float(low[i, 1]), float(low[i, 2])),
            box_max_mm=(float(high[i, 0]), float(high[i, 1]), float(high[i, 2])),
        )
        for i in range(count)
    ]
    return sorted(found, key=lambda b: -b.score)
