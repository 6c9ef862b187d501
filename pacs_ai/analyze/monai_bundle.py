"""The analyzer ``monai-bundle``: run a registered model (MONAI bundle or TorchScript) on a series.

Profile step::

    analyzers:
      - name: monai-bundle
        queue: gpu
        params:
          model: wholebody              # registered model name (pacs-ai models list)
          keep: [spleen, liver, 6]      # optional: the labels to report (names or values); the rest
                                        # of the model's output is ignored
          segments:                     # optional overrides, label value -> any of these
            "1": {label: "Milt", color: [157, 108, 162]}
            "7": {label: "Aorta", category: [SCT, "123037004", "Anatomical Structure"],
                  type: [SCT, "15825003", "Aorta"]}
          findings:                     # classification channel / detection class -> finding
            "0": {finding: [SCT, "36118008", "Pneumothorax"], threshold: 0.5}
          roi_size: [96, 96, 96]        # optional overrides of the model's sliding window
          overlap: 0.25
          sw_batch_size: 2
          max_detections: 10            # detection: at most this many boxes, best first
          report_absent: false          # detection: with no box, the draft says "no nodules detected
                                        # by <model>" (off: a silent model is no negative finding)

Codes are ``[scheme, value, meaning]``.  Without overrides every label is
coded from the model's own label names (bundle ``metadata.json``
``channel_def``, descriptor ``output.channels``) through the shipped table
(:mod:`pacs_ai.models.labels`); a label the table does not know must be coded
in the profile or left out with ``keep``, and ``pacs-ai profiles validate``
says which (:func:`plan_labels` is that check, run again before inference so
a job never fails after a long inference for a profile problem).

Segmentations give one SEG segment per kept label the model actually found
(numbered 1..N in label order, as DICOM SEG requires) with its volume in mL
(3D) or area in mm2 (2D); labels it did not find are not reported.
Classifications become findings (probability, threshold, present/absent):
every output channel, or the ones ``findings`` lists when it is given.
Detections (``lung_nodule_ct_detection``) become
:class:`~pacs_ai.analyze.base.DetectionSpec` boxes in patient coordinates,
those scoring at or above the class's threshold (default 0.5), each located
on the patient's right or left of the body's midline on the slice through
its centre (:func:`box_side`; "right lung" / "left lung" for a chest
detector, unless the profile gives the class a ``finding_site``).  No lobe:
a detection job has no lobe segmentation to place a box in.

3D models read the series with :func:`~pacs_ai.analyze.volume.load_series`,
2D models with :func:`~pacs_ai.analyze.radiograph.load_radiograph`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pacs_ai.analyze.base import (
    AlgorithmInfo,
    AnalysisRefused,
    AnalysisResult,
    Code,
    DetectionSpec,
    FindingSpec,
    InvalidParameters,
    MeasurementSpec,
    SegmentSpec,
)
from pacs_ai.config import Settings, load_settings
from pacs_ai.models import ModelError
from pacs_ai.models.boxes import patient_boxes
from pacs_ai.models.labels import code_for, is_background, normalise
from pacs_ai.models.store import ModelStore, RegisteredModel, UnknownModelError, model_title, output_names

if TYPE_CHECKING:
    from pacs_ai.analyze.volume import Volume
    from pacs_ai.models.engine import ModelEngine, Prediction

#: CID 7162 Algorithm Family.
DCM_ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
SCT_VOLUME = Code("118565006", "SCT", "Volume")
SCT_AREA = Code("42798000", "SCT", "Area")
UCUM_ML = Code("mL", "UCUM", "mL")
UCUM_MM2 = Code("mm2", "UCUM", "mm2")

CodeTriple = tuple[str, str, str]

#: A code value: letters, digits and . - _ : only, so placeholders such as "<code>" are refused.
_CODE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_:]{0,63}$")


def _code(triple: CodeTriple) -> Code:
    scheme, value, meaning = triple
    return Code(value=value, scheme=scheme, meaning=meaning)


def _checked_code(triple: CodeTriple | None) -> CodeTriple | None:
    """Refuses placeholders and blanks: a code reaching a DICOM object must be a real one."""
    if triple is None:
        return None
    scheme, value, meaning = (str(part).strip() for part in triple)
    if not _CODE_VALUE.match(value) or not scheme or not meaning or "<" in meaning or "<" in scheme:
        raise ValueError(
            f"{list(triple)} is not a code: give [scheme, value, meaning] with a real code value "
            '(e.g. [SCT, "78961009", "Spleen"]), not a placeholder'
        )
    return (scheme, value, meaning)


class SegmentParam(BaseModel):
    """Overrides of one label's SEG segment; what is not given comes from the shipped table."""

    model_config = ConfigDict(extra="forbid")
    label: str | None = Field(default=None, min_length=1, max_length=64)
    category: CodeTriple | None = None
    type: CodeTriple | None = None
    #: sRGB display colour, 0..255 each.
    color: tuple[int, int, int] | None = None

    @field_validator("category", "type")
    @classmethod
    def _real_codes(cls, value: CodeTriple | None) -> CodeTriple | None:
        return _checked_code(value)

    @field_validator("color")
    @classmethod
    def _in_range(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and not all(0 <= c <= 255 for c in value):
            raise ValueError(f"color is sRGB with 0..255 per component, got {list(value)}")
        return value


class FindingParam(BaseModel):
    """A classification channel's or detection class's finding; the code defaults to the table's."""

    model_config = ConfigDict(extra="forbid")
    finding: CodeTriple | None = None
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    finding_site: CodeTriple | None = None

    @field_validator("finding", "finding_site")
    @classmethod
    def _real_codes(cls, value: CodeTriple | None) -> CodeTriple | None:
        return _checked_code(value)


class MonaiBundleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    roi_size: list[int] | None = None
    overlap: float | None = Field(default=None, ge=0.0, lt=1.0)
    sw_batch_size: int | None = Field(default=None, ge=1)
    #: Mixed precision on CUDA; turn off for models that misbehave in float16.
    amp: bool = True
    #: Labels (names or values) to report; None reports every label the model has.
    keep: list[str | int] | None = None
    segments: dict[int, SegmentParam] = Field(default_factory=dict)
    findings: dict[int, FindingParam] = Field(default_factory=dict)
    #: Detection: the most boxes reported, best first.
    max_detections: int = Field(default=10, ge=1, le=1000)
    #: Detection: when no box is kept, record that the model found none of its classes, so the draft
    #: says "no ... detected by <model>".  Off by default: a model's silence is not a negative finding.
    report_absent: bool = False

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


@dataclass(frozen=True)
class PlannedLabel:
    """One output label the profile reports, fully coded."""

    value: int
    name: str
    label: str
    category: CodeTriple | None
    type: CodeTriple
    color: tuple[int, int, int] | None = None
    threshold: float = 0.5
    finding_site: CodeTriple | None = None


def plan_labels(
    p: MonaiBundleParams, task: str, names: dict[int, str], title: str
) -> tuple[list[PlannedLabel], list[str]]:
    """The labels to report, coded (profile overrides, else the shipped table), and every problem found.

    ``names``: the model's label value (or channel) -> name; ``title``: the bundle
    metadata ``name`` (for table rows scoped to one model).  Used by
    ``profiles validate`` and again before inference.
    """
    problems: list[str] = []
    overrides: dict[int, Any] = dict(p.segments if task == "segmentation" else p.findings)
    other = p.findings if task == "segmentation" else p.segments
    if other:
        which = "findings" if task == "segmentation" else "segments"
        problems.append(f"params.{which} does not apply: model {p.model} is a {task} model")
    values = sorted(
        v for v, n in names.items() if not (task == "segmentation" and (v == 0 or is_background(n)))
    )
    if not names:  # a model without label names: the profile names and codes its outputs
        values = sorted(overrides)
    known = ", ".join(f"{v}={names[v]}" for v in values if v in names) or "none named"
    for unknown in sorted(set(overrides) - set(values)):
        problems.append(f"label {unknown} is not an output of model {p.model} (its labels: {known})")
    if names and task != "segmentation" and overrides and p.keep is None:
        # Classes (e.g. "no pneumothorax") are not all findings: the ones the profile lists are reported.
        values = [v for v in values if v in overrides]
    if p.keep is not None:
        by_name = {normalise(names[v]): v for v in values if v in names}
        chosen: set[int] = set()
        for entry in p.keep:
            value: int | None = entry if isinstance(entry, int) else by_name.get(normalise(entry))
            if value is None and isinstance(entry, str) and entry.isdigit():
                value = int(entry)
            if value is None or value not in values:
                problems.append(f"keep: {entry!r} is not a label of model {p.model} (its labels: {known})")
            else:
                chosen.add(value)
        values = [v for v in values if v in chosen]
    planned: list[PlannedLabel] = []
    for value in values:
        name = names.get(value, str(value))
        given = overrides.get(value)
        table = code_for(name, title)
        if task == "segmentation":
            category = (given.category if given else None) or (table.category if table else None)
            type_ = (given.type if given else None) or (table.type if table else None)
            label = (given.label if given else None) or (table.display_label if table else name)
            color = given.color if given else None
            threshold, site = 0.5, None
        else:
            category = None
            type_ = (given.finding if given else None) or (table.type if table else None)
            label, color = name, None
            threshold = given.threshold if given else 0.5
            site = given.finding_site if given else None
        if type_ is None or (task == "segmentation" and category is None):
            key = "segments" if task == "segmentation" else "findings"
            problems.append(
                f"label {value} ({name!r}) of model {p.model} has no code in the shipped table "
                f"(pacs_ai/models/label_codes.csv): code it in params.{key}, e.g.\n"
                + _override_example(key, value, name)
                + "\nor leave it out with params.keep"
            )
            continue
        planned.append(PlannedLabel(value, name, label[:64], category, type_, color, threshold, site))
    if not planned and not problems:
        problems.append(f"model {p.model}: no label is left to report (check params.keep)")
    return planned, problems


def _override_example(key: str, value: int, name: str) -> str:
    if key == "segments":
        return (
            f'    segments:\n      "{value}": {{label: "{name}", category: [SCT, "123037004", '
            f'"Anatomical Structure"], type: [SCHEME, VALUE, "{name}"]}}'
        )
    return f'    findings:\n      "{value}": {{finding: [SCHEME, VALUE, "{name}"], threshold: 0.5}}'


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
            self._settings = load_settings()
        return self._settings

    def _engine(self) -> ModelEngine:
        # Imported here, not at the top: the engine imports torch, which a worker that never runs a
        # model (and `pacs-ai profiles validate`) should not pay for.
        from pacs_ai.models.engine import engine_for

        return engine_for(self.settings)

    def _registered(self, name: str) -> RegisteredModel:
        try:
            return ModelStore(self.settings.effective_models_dir).get(name)
        except UnknownModelError as exc:
            raise InvalidParameters(f"monai-bundle: {exc}") from exc
        except ModelError as exc:
            raise InvalidParameters(f"monai-bundle: model {name!r} is unusable: {exc}") from exc

    def parameter_problems(self, params: dict[str, Any], settings: Settings) -> list[str]:
        """What is wrong with a profile step's ``params``, without loading the model (``profiles validate``).

        Unparseable parameters and placeholder codes, a model that is not
        registered, overrides or ``keep`` entries naming labels the model does
        not have, and labels that would have no code.
        """
        try:
            p = MonaiBundleParams.parse(params)
        except InvalidParameters as exc:
            return [str(exc)]
        try:
            registered = ModelStore(settings.effective_models_dir).get(p.model)
            names, title = output_names(registered), model_title(registered)
        except ModelError as exc:
            return [f"monai-bundle: {exc}"]
        if p.roi_size is not None and len(p.roi_size) != registered.manifest.spatial_dims:
            return [f"roi_size {p.roi_size}: model {p.model} is {registered.manifest.spatial_dims}D"]
        return plan_labels(p, registered.manifest.task, names, title)[1]

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
        from pacs_ai.models.loaded import InfererOverrides  # torch and MONAI: only when a model runs

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
        title = model_title(registered)
        planned, problems = plan_labels(p, manifest.task, output_names(registered), title)
        if problems:  # before inference: a profile problem never costs a model run
            raise InvalidParameters("; ".join(problems))
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
        if prediction.boxes is not None:
            result = self._detection(volume, p, prediction, planned, algorithm, notes)
        elif prediction.labels is not None:
            result = self._segmentation(volume, prediction, planned, algorithm, notes)
        else:
            result = self._classification(p, prediction, planned, algorithm, notes)
        result.title = title
        return result

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
        volume: Volume,
        prediction: Prediction,
        planned: list[PlannedLabel],
        algorithm: AlgorithmInfo,
        notes: list[str],
    ) -> AnalysisResult:
        """One segment per planned label the model found; other label values are ignored."""
        labels = prediction.labels
        assert labels is not None
        counts = np.zeros(256, dtype=np.int64)
        for plane in labels:  # per slice: bincount casts to int64
            counts += np.bincount(plane.ravel(), minlength=256)
        found = [spec for spec in planned if counts[spec.value] > 0]
        absent = [spec.name for spec in planned if counts[spec.value] == 0]
        if absent:
            listed = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
            notes.append(f"not found by the model (not reported): {listed}")
        lookup = np.zeros(256, dtype=np.uint8)
        segments: list[SegmentSpec] = []
        measurements: list[MeasurementSpec] = []
        two_d = prediction.model.spatial_dims == 2
        _, dy, dx = volume.spacing_mm
        for number, spec in enumerate(found, start=1):
            assert spec.category is not None
            lookup[spec.value] = number
            segment = SegmentSpec(
                number=number,
                label=spec.label,
                category=_code(spec.category),
                type=_code(spec.type),
                recommended_display_cielab=_cielab(spec.color),
            )
            segments.append(segment)
            voxels = int(counts[spec.value])
            if two_d:
                measurement = MeasurementSpec(SCT_AREA, voxels * dy * dx, UCUM_MM2, number, segment.type)
            else:
                measurement = MeasurementSpec(
                    SCT_VOLUME, voxels * volume.voxel_volume_ml, UCUM_ML, number, segment.type
                )
            measurements.append(measurement)
        if not found:
            notes.append("the model found none of the reported labels: no segmentation")
            return AnalysisResult(algorithm=algorithm, labels=None, segments=[], measurements=[], notes=notes)
        return AnalysisResult(
            algorithm=algorithm,
            labels=lookup[labels],
            segments=segments,
            measurements=measurements,
            notes=notes,
        )

    def _classification(
        self,
        p: MonaiBundleParams,
        prediction: Prediction,
        planned: list[PlannedLabel],
        algorithm: AlgorithmInfo,
        notes: list[str],
    ) -> AnalysisResult:
        probabilities = prediction.probabilities
        assert probabilities is not None
        beyond = sorted(spec.value for spec in planned if spec.value >= probabilities.size)
        if beyond:
            raise InvalidParameters(
                f"model {p.model} has {probabilities.size} output(s) but the profile reports channel(s) "
                f"{beyond}; its channels are 0..{probabilities.size - 1}"
            )
        findings = [
            FindingSpec(
                finding=_code(spec.type),
                probability=float(np.clip(probabilities[spec.value], 0.0, 1.0)),
                threshold=spec.threshold,
                finding_site=_code(spec.finding_site) if spec.finding_site else None,
            )
            for spec in planned
        ]
        return AnalysisResult(
            algorithm=algorithm, labels=None, segments=[], measurements=[], findings=findings, notes=notes
        )

    def _detection(
        self,
        volume: Volume,
        p: MonaiBundleParams,
        prediction: Prediction,
        planned: list[PlannedLabel],
        algorithm: AlgorithmInfo,
        notes: list[str],
    ) -> AnalysisResult:
        """Boxes scoring at or above their class's threshold, best first, at most ``max_detections``."""
        assert prediction.boxes is not None and prediction.model.box_layout is not None
        boxes = patient_boxes(prediction.boxes, prediction.model.box_layout)
        by_class = {spec.value: spec for spec in planned}
        kept = [b for b in boxes if b.label in by_class and b.score >= by_class[b.label].threshold]
        notes.append(f"{len(boxes)} box(es) from the model, {len(kept)} at or above the threshold")
        detections = []
        for box in kept[: p.max_detections]:
            spec = by_class[box.label]
            site, location = _code(spec.finding_site) if spec.finding_site else None, ""
            if site is None:
                centre = tuple((lo + hi) / 2 for lo, hi in zip(box.box_min_mm, box.box_max_mm, strict=True))
                side = box_side(volume, centre)
                if side is not None and _in_lung(spec, algorithm):
                    site = SCT_RIGHT_LUNG if side == "right" else SCT_LEFT_LUNG
                elif side is not None:
                    location = f"{side} side"
            if site is not None:
                location = site.meaning[0].lower() + site.meaning[1:]
            detections.append(
                DetectionSpec(
                    finding=_code(spec.type),
                    score=box.score,
                    box_min_mm=box.box_min_mm,
                    box_max_mm=box.box_max_mm,
                    finding_site=site,
                    threshold=spec.threshold,
                    location=location,
                )
            )
        not_detected = [_code(spec.type) for spec in planned] if p.report_absent and not detections else []
        return AnalysisResult(
            algorithm=algorithm,
            labels=None,
            segments=[],
            measurements=[],
            detections=detections,
            not_detected=not_detected,
            notes=notes,
        )


#: Sites of a box by the side of the midline its centre is on (the lung analyzer's codes).
SCT_RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
SCT_LEFT_LUNG = Code("44029006", "SCT", "Left lung")
#: Voxels above this (HU) are the body when the midline is looked for; air and lung are below.
BODY_HU = -500.0
#: A box centre closer than this to the midline (mm) is on neither side.
MIDLINE_MARGIN_MM = 5.0


def _in_lung(spec: PlannedLabel, algorithm: AlgorithmInfo) -> bool:
    """Whether a class's boxes are in a lung: a nodule (SCT 27925004), or a model named for the lung."""
    return spec.type[1] == "27925004" or "lung" in algorithm.name.lower()


def box_side(volume: Volume, centre_mm: tuple[float, ...]) -> str | None:
    """``"right"`` or ``"left"``: the patient's side of the body's midline the point lies on.

    The midline is the middle of the body's extent along the patient's x axis
    (LPS: +x is the patient's left) on the slice nearest the point, the body
    being the voxels above :data:`BODY_HU` (soft tissue and bone: the chest
    wall encloses the lungs).  None for a point within
    :data:`MIDLINE_MARGIN_MM` of the midline, or a slice with no body.
    """
    centre = np.asarray(centre_mm, dtype=np.float64)
    origin = np.asarray(volume.origin_mm, dtype=np.float64)
    dz, dy, dx = volume.spacing_mm
    along_normal = float(np.dot(centre - origin, volume.direction[2]))
    k = int(np.clip(round(along_normal / dz), 0, len(volume.voxels) - 1))
    rows, columns = np.nonzero(volume.voxels[k] > BODY_HU)
    if rows.size == 0:
        return None
    # Patient x of each body voxel: the x components of the row and column directions.
    x = origin[0] + columns * dx * volume.direction[0][0] + rows * dy * volume.direction[1][0]
    x = x + k * dz * volume.direction[2][0]
    midline = (float(x.min()) + float(x.max())) / 2
    offset = float(centre[0]) - midline
    if abs(offset) < MIDLINE_MARGIN_MM:
        return None
    return "left" if offset > 0 else "right"
