"""The result objects of one analysis: a SEG of its label map, and the SR of its measurements and findings.

One function builds them, with identities derived from a key, so the pipeline
(key = the job's idempotency key) and the worker warm-up build them the same
way.  A classifier's result (no label map) gives the SR alone.

Versions: analysing a series again (``pacs-ai reprocess``) opens a new job
version, whose key, and so every Series and SOP Instance UID, is new.  The
new objects never overwrite or silently duplicate the earlier ones, which
stay in the PACS; instead they say what they replace, in the standard place
where DICOM has one:

* the SR lists the previous version's SR in its Predecessor Documents
  Sequence (0040,A360) (PS3.3 C.17.2: documents whose content this one
  revises);
* the Segmentation IOD has no attribute for a previous version, so the new
  SEG is tied to the old one through the SRs: the new SR references the new
  SEG and its predecessor, the old SR, references the old SEG;
* from version 2 on, Series Descriptions end in " (v2)", " (v3)", ... and
  Series Numbers are 10 higher per version, so the versions are told apart
  at a glance in a viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import SegmentationStorage

from pacs_ai.analyze.base import AnalysisResult
from pacs_ai.analyze.volume import Volume
from pacs_ai.encode.equipment import EquipmentInfo
from pacs_ai.encode.seg import build_segmentation
from pacs_ai.encode.sr import build_measurement_report, procedure_reported_for
from pacs_ai.encode.uids import derived_uid

#: Series numbers of the result series, high enough not to collide with a scanner's.
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002

#: Series Descriptions (LO, 64 characters); both say the content is AI-generated and unverified.
SEGMENTATION_DESCRIPTION = "AI lung segmentation (unverified)"
SEGMENTATION_SR_DESCRIPTION = "AI lung measurements (unverified)"
CLASSIFICATION_SR_DESCRIPTION = "AI findings (unverified)"


def titles(result: AnalysisResult) -> tuple[str, str]:
    """(SEG, SR) Series Descriptions naming what produced ``result``, marked AI and unverified.

    A result with a ``title`` (a model's own name, e.g. "Spleen CT segmentation")
    is titled by it: "AI Spleen CT segmentation (unverified)" for the SEG, and
    for the SR the same with what it holds (measurements, findings or
    detections); without one, the built-in lung analyzer's titles.  LO: 64
    characters at most, the model's name shortened first.
    """
    if not result.title:
        sr = SEGMENTATION_SR_DESCRIPTION if result.labels is not None else CLASSIFICATION_SR_DESCRIPTION
        return SEGMENTATION_DESCRIPTION, sr
    content = "detections" if result.detections else "findings" if result.findings else "measurements"
    seg_tail, sr_tail = " (unverified)", f" {content} (unverified)"
    room = 64 - len("AI ") - max(len(seg_tail), len(sr_tail))
    name = result.title if len(result.title) <= room else result.title[: room - 1].rstrip() + "~"
    return f"AI {name}{seg_tail}", f"AI {name}{sr_tail}"


@dataclass(frozen=True)
class PreviousResult:
    """An object of an earlier version of the same analysis, which a new version replaces."""

    kind: str  # "SEG" or "SR"
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def reference(self) -> Dataset:
        """The attributes a Hierarchical SOP Instance Reference needs (what highdicom reads)."""
        dataset = Dataset()
        dataset.StudyInstanceUID = self.study_instance_uid
        dataset.SeriesInstanceUID = self.series_instance_uid
        dataset.SOPClassUID = self.sop_class_uid
        dataset.SOPInstanceUID = self.sop_instance_uid
        return dataset


def versioned(description: str, version: int) -> str:
    """A Series Description with the version appended from version 2 on (LO: at most 64 characters)."""
    if version <= 1:
        return description
    suffix = f" (v{version})"
    return description[: 64 - len(suffix)] + suffix


@dataclass(frozen=True)
class ResultIdentities:
    """The Series and SOP Instance UIDs of one analysis's SEG and SR.

    All derive from the job's key, so they are known before either object is
    built: the SR can then be built without the SEG object (see
    :func:`segmentation_reference`), at the same time as the SEG.
    """

    seg_series_instance_uid: str
    seg_sop_instance_uid: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str

    @classmethod
    def derive(cls, key: str, uid_prefix: str | None = None) -> ResultIdentities:
        """The identities for ``key`` (the job's idempotency key): the same on every run."""
        return cls(
            seg_series_instance_uid=derived_uid(key, "seg-series", prefix=uid_prefix),
            seg_sop_instance_uid=derived_uid(key, "seg-instance", prefix=uid_prefix),
            sr_series_instance_uid=derived_uid(key, "sr-series", prefix=uid_prefix),
            sr_sop_instance_uid=derived_uid(key, "sr-instance", prefix=uid_prefix),
        )


def segmentation_reference(volume: Volume, result: AnalysisResult, identities: ResultIdentities) -> Dataset:
    """What the SR reads of its SEG, without building the SEG: identities and segment numbers.

    :func:`~pacs_ai.encode.sr.build_measurement_report` uses the SEG's Study,
    Series and SOP Instance UIDs, its SOP Class and the numbers in its Segment
    Sequence (to check that every measured segment is encoded); all of them
    are known before the SEG exists, since :func:`build_segmentation_for`
    encodes exactly ``result.segments`` under ``identities``.
    """
    reference = Dataset()
    reference.StudyInstanceUID = volume.headers[0].StudyInstanceUID
    reference.SeriesInstanceUID = identities.seg_series_instance_uid
    reference.SOPClassUID = SegmentationStorage
    reference.SOPInstanceUID = identities.seg_sop_instance_uid
    segments = []
    for spec in result.segments:
        item = Dataset()
        item.SegmentNumber = spec.number
        segments.append(item)
    reference.SegmentSequence = segments
    return reference


def build_segmentation_for(
    volume: Volume,
    result: AnalysisResult,
    *,
    identities: ResultIdentities,
    equipment: EquipmentInfo,
    uid_prefix: str | None = None,
    version: int = 1,
) -> Dataset:
    """The SEG of one analysis (``result.labels`` must be set), as the pipeline numbers and names it."""
    return build_segmentation(
        volume,
        result,
        series_instance_uid=identities.seg_series_instance_uid,
        sop_instance_uid=identities.seg_sop_instance_uid,
        series_number=SEG_SERIES_NUMBER + _series_number_step(version),
        instance_number=1,
        equipment=equipment,
        series_description=versioned(titles(result)[0], version),
        uid_prefix=uid_prefix,
    )


def build_report_for(
    volume: Volume,
    result: AnalysisResult,
    segmentation: Dataset | None,
    *,
    identities: ResultIdentities,
    equipment: EquipmentInfo,
    uid_prefix: str | None = None,
    version: int = 1,
    previous: Sequence[PreviousResult] = (),
) -> Dataset:
    """The SR of one analysis.

    ``segmentation`` is its SEG or the SEG's :func:`segmentation_reference`
    (the SR comes out the same); None for a result without a label map.
    """
    predecessors = [item.reference() for item in previous if item.kind == "SR"]
    return build_measurement_report(
        volume,
        result,
        segmentation,
        series_instance_uid=identities.sr_series_instance_uid,
        sop_instance_uid=identities.sr_sop_instance_uid,
        series_number=SR_SERIES_NUMBER + _series_number_step(version),
        instance_number=1,
        equipment=equipment,
        series_description=versioned(titles(result)[1], version),
        procedure_reported=procedure_reported_for(volume.headers[0]),
        uid_prefix=uid_prefix,
        previous_versions=predecessors or None,
    )


def _series_number_step(version: int) -> int:
    """Series Numbers are 10 higher per version (see the module docstring)."""
    return 10 * (max(version, 1) - 1)


def build_results(
    volume: Volume,
    result: AnalysisResult,
    *,
    key: str,
    equipment: EquipmentInfo,
    uid_prefix: str | None = None,
    version: int = 1,
    previous: Sequence[PreviousResult] = (),
) -> list[tuple[str, Dataset]]:
    """``[("SEG", segmentation), ("SR", report)]`` for one analysis; ``[("SR", report)]`` without labels.

    Every UID derives from ``key``: building again for the same key gives the
    same identities, so a re-run replaces its earlier objects in a PACS.  The
    SR's Procedure Reported follows the source (CT of chest, plain chest X-ray, ...).
    ``version`` is the job version and ``previous`` the objects of the version
    this one replaces (see the module docstring for how they are referenced).
    One after the other, in this process; the pipeline builds the two at the
    same time (:mod:`pacs_ai.encode.writing`).
    """
    identities = ResultIdentities.derive(key, uid_prefix)
    objects: list[tuple[str, Dataset]] = []
    seg: Dataset | None = None
    if result.labels is not None:
        seg = build_segmentation_for(
            volume, result, identities=identities, equipment=equipment, uid_prefix=uid_prefix, version=version
        )
        objects.append(("SEG", seg))
    sr = build_report_for(
        volume,
        result,
        seg,
        identities=identities,
        equipment=equipment,
        uid_prefix=uid_prefix,
        version=version,
        previous=previous,
    )
    objects.append(("SR", sr))
    return objects
