"""The contract between the pipeline and an analyzer.

An analyzer receives a :class:`~pacs_ai.analyze.volume.Volume` (voxels in a
known geometry plus the source headers) and returns an :class:`AnalysisResult`:
a label map aligned voxel for voxel with the volume, a description of each
label, and measurements.  The encoders (``pacs_ai.encode``) turn that result
into DICOM SEG and SR without knowing which analyzer produced it, so a new
analyzer is one module plus a registration in ``pacs_ai.analyze.registry``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from pacs_ai.analyze.volume import Volume


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning), as in DICOM."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentSpec:
    """One label of the label map, described the way DICOM SEG needs it.

    ``number`` is the value of the label in :attr:`AnalysisResult.labels`
    (1..N, contiguous) and becomes the SEG Segment Number.
    """

    number: int
    label: str
    category: Code
    type: Code
    #: CIELab colour as DICOM stores it (0..65535 each); optional.
    recommended_display_cielab: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class MeasurementSpec:
    """A numeric measurement with a UCUM unit.

    ``segment_number`` ties the measurement to a segment (a TID 1411 volumetric
    group referencing that SEG segment); ``None`` means a measurement over the
    whole region named by ``finding_site`` (a TID 1501 group).
    """

    name: Code
    value: float
    unit: Code
    segment_number: int | None
    finding_site: Code
    #: e.g. SCT 373098007 "Mean"; None when the name says it all.
    derivation: Code | None = None


@dataclass(frozen=True)
class FindingSpec:
    """A classification output: a finding, its probability, and whether it counts as present.

    Encoded in the SR as a qualitative evaluation (present / absent) with the
    probability as a measurement, both attributed to the algorithm.
    """

    finding: Code
    #: Model output for the finding, 0..1.
    probability: float
    #: The probability at or above which the finding is reported as present.
    threshold: float
    finding_site: Code | None = None

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class DetectionSpec:
    """A finding a detection model located with a box (e.g. a lung nodule).

    The box is in patient coordinates (DICOM LPS, millimetres), so it does not
    depend on how the model resampled or reoriented its input; the encoders
    place it on the source images from the volume's geometry.  Encoded in the
    measurement SR as one TID 1500 measurement group per detection, with its
    own tracking UID, its location, its size and the model's score.
    """

    finding: Code
    #: Model confidence for this box, 0..1.
    score: float
    #: Opposite corners of the box, (x, y, z) in mm, LPS; each min <= max.
    box_min_mm: tuple[float, float, float]
    box_max_mm: tuple[float, float, float]
    #: Where the box lies: the profile's site, else the lung on the side of the body's midline the box
    #: centre is on (SCT 3341006 "Right lung" / 44029006 "Left lung"); None when neither is known.
    finding_site: Code | None = None
    #: The score at or above which the box was reported (the profile's threshold for its class).
    threshold: float | None = None
    #: The location in words for reports ("right lung"); empty when only the coordinates are known.
    location: str = ""

    @property
    def diameter_mm(self) -> float:
        """The box's largest extent along the patient axes: the size a report gives for a nodule."""
        return max(self.size_mm)

    @property
    def center_mm(self) -> tuple[float, float, float]:
        lo, hi = self.box_min_mm, self.box_max_mm
        return ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2)

    @property
    def size_mm(self) -> tuple[float, float, float]:
        lo, hi = self.box_min_mm, self.box_max_mm
        return (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])


@dataclass(frozen=True)
class AlgorithmInfo:
    """Algorithm Identification (name, version, family) for SEG, SR and logs."""

    name: str
    version: str
    family: Code
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class AnalysisResult:
    """What an analyzer found.

    ``labels`` has the same shape as ``Volume.voxels`` (slices, rows, columns),
    dtype uint8, 0 meaning background and each other value a segment number;
    ``None`` for analyzers that do not segment (classifiers), in which case no
    SEG is produced and ``segments`` is empty.
    """

    algorithm: AlgorithmInfo
    labels: np.ndarray | None
    segments: list[SegmentSpec]
    measurements: list[MeasurementSpec]
    findings: list[FindingSpec] = field(default_factory=list)
    #: Boxes from detection models, in patient coordinates.
    detections: list[DetectionSpec] = field(default_factory=list)
    #: Detection classes the model found none of, which the profile asks a report to say so for
    #: (``report_absent``); empty otherwise, so a silent model is never read as a negative finding.
    not_detected: list[Code] = field(default_factory=list)
    #: Free-text notes for the job record (not for the DICOM objects).
    notes: list[str] = field(default_factory=list)
    #: What produced the result, for the result series' titles (a model's own name, e.g. "Spleen CT
    #: segmentation"); empty for the built-in lung analyzer's fixed titles.
    title: str = ""


class AnalysisRefused(Exception):
    """The input is not suitable for this analyzer; the reason is recorded on the job.

    Raised for conditions that retrying will not fix (gantry tilt, too few
    slices, wrong body part), as opposed to an internal error.
    """


class InvalidParameters(ValueError):
    """A profile gives an analyzer parameters it cannot use; the job fails without retries.

    Raised by analyzers while reading their ``params``: the profile must be
    fixed, so retrying the same job would only fail the same way.
    """


class AnalysisFailed(Exception):
    """The analyzer itself failed in a way retrying will not fix (model error, out of memory).

    The job fails at once with the reason; the worker process goes on serving.
    """


class Analyzer(Protocol):
    """A registered analyzer. Implementations must be deterministic for a given input."""

    name: str
    version: str

    def load(self, paths: Sequence[Path], params: dict[str, Any]) -> Volume:
        """Read the series' files into the input this analyzer works on (a volume or one radiograph)."""
        ...

    def analyze(self, volume: Volume, params: dict[str, Any]) -> AnalysisResult:
        """Analyze one volume with the profile's parameters."""
        ...
