"""The analyzer ``monai-bundle``: run a registered model (MONAI bundle or TorchScript) on a series.

Profile step::

    analyzers:
      - name: monai-bundle
        queue: gpu
        params:
          model: lung-unet              # registered model name (pacs-ai models list)
          roi_size: [64, 64, 64]        # optional overrides of the model's sliding window
          overlap: 0.25
          sw_batch_size: 2
          segments:                     # segmentation: label value -> SEG segment
            "1": {label: "Right lung", category: [SCT, "123037004", "Anatomical Structure"],
                  type: [SCT, "3341006", "Right lung"], color: [128, 174, 128]}
          findings:                     # classification: output channel -> finding
            "0": {finding: [SCT, "36118008", "Pneumothorax"], threshold: 0.5}

Codes are ``[scheme, value, meaning]``.  Every label value the model outputs
must be mapped in ``segments`` (otherwise the job fails with the YAML to add);
segments are numbered 1..N in the order of their label values, as DICOM SEG
requires.  Segmentations are measured (volume in mL for 3D, area in mm2 for
2D); classifications become findings (probability, threshold, present/absent).

3D models read the series with :func:`~pacs_ai.analyze.volume.load_series`,
2D models with :func:`~pacs_ai.analyze.radiograph.load_radiograph`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pacs_ai.analyze.base import (
    AlgorithmInfo,
    AnalysisRefused,
    AnalysisResult,
    Code,
    FindingSpec,
    InvalidParameters,
    MeasurementSpec,
    SegmentSpec,
)

if TYPE_CHECKING:
    from pacs_ai.analyze.volume import Volume
    from pacs_ai.config import Settings
    from pacs_ai.models.engine import ModelEngine, Prediction
    from pacs_ai.models.store import RegisteredModel

#: CID 7162 Algorithm Family.
DCM_ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
SCT_VOLUME = Code("118565006", "SCT", "Volume")
SCT_AREA = Code("42798000", "SCT", "Area")
UCUM_ML = Code("mL", "UCUM", "mL")
UCUM_MM2 = Code("mm2", "UCUM", "mm2")

CodeTriple = tuple[str, str, str]


def _code(triple: CodeTriple) -> Code:
    scheme, value, meaning = triple
    return Code(value=value, scheme=scheme, meaning=meaning)


class SegmentParam(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1, max_length=64)
    category: CodeTriple
    type: CodeTriple
    #: sRGB display colour, 0..255 each.
    color: tuple[int, int, int] | None = None

    @field_validator("color")
    @classmethod
    def _in_range(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and not all(0 <= c <= 255 for c in value):
            raise ValueError(f"color is sRGB with 0..255 per component, got {list(value)}")
        return value


class FindingParam(BaseModel):
    model_config = ConfigDict(extra="forbid")
    finding: CodeTriple
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    finding_site: CodeTriple | None = None


class MonaiBundleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    roi_size: list[int] | None = None
    overlap: float | None = Field(default=None, ge=0.0, lt=1.0)
    sw_batch_size: int | None = Field(default=None, ge=1)
    #: Mixed precision on CUDA; turn off for models that misbehave in float16.
    amp: bool = True
    segments: dict[int, SegmentParam] = Field(default_factory=dict)
    findings: dict[int, FindingParam] = Field(default_factory=dict)

    @field_validator("roi_size")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) not in (2, 3) or any(v <= 0 for v in value)):
            raise ValueError(f"roi_size needs 2 or 3 positive sizes, got {value}")
        return value

    @field_validator("segments")
    @classmethod
    def _label_values(cls, value: dict[int, SegmentParam]) -> dict[int, SegmentParam]:
        wrong = sorted(k for k in value if not 1 <= k <= 255)
        if wrong:
            raise ValueError(f"segment keys are label values 1..255 (0 is background), got {wrong}")
        return value

    @field_validator("findings")
    @classmethod
    def _channels(cls, value: dict[int, FindingParam]) -> dict[int, FindingParam]:
        if any(k < 0 for k in value):
            raise ValueError("finding keys are output channel indices 0, 1, ...")
        return value

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> MonaiBundleParams:
        try:
            return cls.model_validate(params or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidParameters(f"monai-bundle parameters: {problems}") from exc


def _segments_template(labels: Sequence[int], names: dict[int, str]) -> str:
    lines = ["    segments:"]
    for value in labels:
        name = names.get(value, f"label {value}")
        lines.append(
            f'      "{value}": {{label: "{name}", category: [SCT, "123037004", "Anatomical Structure"], '
            f'type: [SCT, "<code>", "{name}"]}}'
        )
    return "\n".join(lines)


def _findings_template(names: dict[int, str], count: int) -> str:
    lines = ["    findings:"]
    for channel in range(count):
        name = names.get(channel, f"output {channel}")
        lines.append(f'      "{channel}": {{finding: [SCT, "<code>", "{name}"], threshold: 0.5}}')
    return "\n".join(lines)


def _cielab(color: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    if color is None:
        return None
    import highdicom as hd

    value = hd.color.CIELabColor.from_rgb(*color).value
    return (int(value[0]), int(value[1]), int(value[2]))


class MonaiBundleAnalyzer:
    """Runs a hospital-supplied model from the registry (see the module docstring)."""

    name = "monai-bundle"
    version = "1.0.0"

    def __init__(self, settings: Settings | None = None) -> None:
        # The registry factory takes no arguments; a worker then uses its process settings
        # (the service hands them to its children in PACS_AI_SETTINGS_JSON).
        self._settings = settings

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from pacs_ai.config import load_settings

            self._settings = load_settings()
        return self._settings

    def _engine(self) -> ModelEngine:
        from pacs_ai.models.engine import engine_for

        return engine_for(self.settings)

    def _registered(self, name: str) -> RegisteredModel:
        from pacs_ai.models import ModelError
        from pacs_ai.models.store import ModelStore, UnknownModelError

        try:
            return ModelStore(self.settings.effective_models_dir).get(name)
        except UnknownModelError as exc:
            raise InvalidParameters(f"monai-bundle: {exc}") from exc
        except ModelError as exc:
            raise InvalidParameters(f"monai-bundle: model {name!r} is unusable: {exc}") from exc

    def load(self, paths: Sequence[Path], params: dict[str, Any]) -> Volume:
        """The series as the model needs it: a volume for 3D models, one radiograph for 2D ones."""
        p = MonaiBundleParams.parse(params)
        registered = self._registered(p.model)
        if registered.manifest.spatial_dims == 2:
            from pacs_ai.analyze.radiograph import load_radiograph

            return load_radiograph(paths)
        from pacs_ai.analyze.volume import load_series

        return load_series(paths)

    def analyze(self, volume: Volume, params: dict[str, Any]) -> AnalysisResult:
        from pacs_ai.models.loaded import InfererOverrides
        from pacs_ai.models.store import UnknownModelError

        p = MonaiBundleParams.parse(params)
        registered = self._registered(p.model)
        manifest = registered.manifest
        if manifest.spatial_dims == 2 and volume.voxels.shape[0] != 1:
            raise AnalysisRefused(
                f"model {p.model} is a 2D model but the series has {volume.voxels.shape[0]} slices"
            )
        if p.roi_size is not None and len(p.roi_size) != manifest.spatial_dims:
            raise InvalidParameters(
                f"roi_size {p.roi_size} has {len(p.roi_size)} sizes but model {p.model} is "
                f"{manifest.spatial_dims}D"
            )
        if manifest.task == "segmentation" and not p.segments:
            raise InvalidParameters(
                f"model {p.model} segments; map its label values to codes in the profile's params, e.g.\n"
                + _segments_template([], {})
            )
        if manifest.task == "classification" and not p.findings:
            raise InvalidParameters(
                f"model {p.model} classifies; map its output channels to findings in the profile's params, "
                "e.g.\n" + _findings_template({}, 1)
            )
        overrides = InfererOverrides(
            roi_size=tuple(p.roi_size) if p.roi_size else None,
            overlap=p.overlap,
            sw_batch_size=p.sw_batch_size,
        )
        try:
            prediction = self._engine().run(p.model, volume, overrides, amp=p.amp)
        except UnknownModelError as exc:  # removed between the check above and the run
            raise InvalidParameters(f"monai-bundle: {exc}") from exc
        algorithm = self._algorithm(p, prediction)
        notes = [
            f"model {p.model} {manifest.version} ran on {prediction.model.device} in "
            f"{prediction.seconds:.2f} s"
        ]
        if prediction.labels is not None:
            return self._segmentation(p, volume, prediction, algorithm, notes)
        return self._classification(p, prediction, algorithm, notes)

    def _algorithm(self, p: MonaiBundleParams, prediction: Prediction) -> AlgorithmInfo:
        from monai.inferers import SlidingWindowInferer

        model = prediction.model
        parameters = {
            "model": model.name,
            "kind": model.registered.manifest.kind,
            "manifest_sha256": model.registered.manifest_sha256[:16],
            "device": str(model.device),
        }
        inferer = model.inferer
        if isinstance(inferer, SlidingWindowInferer) or p.roi_size is not None:
            roi = p.roi_size or list(getattr(inferer, "roi_size", []))
            parameters["roi_size"] = "x".join(str(int(v)) for v in roi)
            overlap = p.overlap if p.overlap is not None else getattr(inferer, "overlap", 0.25)
            parameters["overlap"] = f"{float(np.ravel(overlap)[0]):g}"
            batch = p.sw_batch_size or getattr(inferer, "sw_batch_size", 1)
            parameters["sw_batch_size"] = str(batch)
        return AlgorithmInfo(
            name=model.name, version=model.version, family=DCM_ARTIFICIAL_INTELLIGENCE, parameters=parameters
        )

    def _segmentation(
        self,
        p: MonaiBundleParams,
        volume: Volume,
        prediction: Prediction,
        algorithm: AlgorithmInfo,
        notes: list[str],
    ) -> AnalysisResult:
        labels = prediction.labels
        assert labels is not None
        counts = np.zeros(256, dtype=np.int64)
        for plane in labels:  # per slice: bincount casts to int64
            counts += np.bincount(plane.ravel(), minlength=256)
        present = [int(v) for v in np.flatnonzero(counts[1:]) + 1]
        missing = [v for v in present if v not in p.segments]
        if missing:
            names = prediction.model.channel_names
            raise InvalidParameters(
                f"model {p.model} produced label value(s) {missing} "
                f"({', '.join(names.get(v, '?') for v in missing)}) that the profile does not map to codes; "
                "add them to params.segments, e.g.\n" + _segments_template(missing, names)
            )
        lookup = np.zeros(256, dtype=np.uint8)
        segments: list[SegmentSpec] = []
        measurements: list[MeasurementSpec] = []
        two_d = prediction.model.spatial_dims == 2
        _, dy, dx = volume.spacing_mm
        for number, value in enumerate(sorted(p.segments), start=1):
            spec = p.segments[value]
            lookup[value] = number
            segment = SegmentSpec(
                number=number,
                label=spec.label,
                category=_code(spec.category),
                type=_code(spec.type),
                recommended_display_cielab=_cielab(spec.color),
            )
            segments.append(segment)
            voxels = int(counts[value])
            if two_d:
                measurement = MeasurementSpec(SCT_AREA, voxels * dy * dx, UCUM_MM2, number, segment.type)
            else:
                measurement = MeasurementSpec(
                    SCT_VOLUME, voxels * volume.voxel_volume_ml, UCUM_ML, number, segment.type
                )
            measurements.append(measurement)
        remapped = lookup[labels]
        return AnalysisResult(
            algorithm=algorithm, labels=remapped, segments=segments, measurements=measurements, notes=notes
        )

    def _classification(
        self, p: MonaiBundleParams, prediction: Prediction, algorithm: AlgorithmInfo, notes: list[str]
    ) -> AnalysisResult:
        probabilities = prediction.probabilities
        assert probabilities is not None
        beyond = sorted(c for c in p.findings if c >= probabilities.size)
        if beyond:
            raise InvalidParameters(
                f"model {p.model} has {probabilities.size} output(s) but params.findings names channel(s) "
                f"{beyond}; channels are:\n"
                + _findings_template(prediction.model.channel_names, probabilities.size)
            )
        findings = [
            FindingSpec(
                finding=_code(spec.finding),
                probability=float(np.clip(probabilities[channel], 0.0, 1.0)),
                threshold=spec.threshold,
                finding_site=_code(spec.finding_site) if spec.finding_site else None,
            )
            for channel, spec in sorted(p.findings.items())
        ]
        return AnalysisResult(
            algorithm=algorithm, labels=None, segments=[], measurements=[], findings=findings, notes=notes
        )
