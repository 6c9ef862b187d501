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
    """
    step = 10 * (max(version, 1) - 1)
    predecessors = [item.reference() for item in previous if item.kind == "SR"]
    objects: list[tuple[str, Dataset]] = []
    seg: Dataset | None = None
    if result.labels is not None:
        seg = build_segmentation(
            volume,
            result,
            series_instance_uid=derived_uid(key, "seg-series", prefix=uid_prefix),
            sop_instance_uid=derived_uid(key, "seg-instance", prefix=uid_prefix),
            series_number=SEG_SERIES_NUMBER + step,
            instance_number=1,
            equipment=equipment,
            series_description=versioned(SEGMENTATION_DESCRIPTION, version),
            uid_prefix=uid_prefix,
        )
        objects.append(("SEG", seg))
    sr = build_measurement_report(
        volume,
        result,
        seg,
        series_instance_uid=derived_uid(key, "sr-series", prefix=uid_prefix),
        sop_instance_uid=derived_uid(key, "sr-instance", prefix=uid_prefix),
        series_number=SR_SERIES_NUMBER + step,
        instance_number=1,
        equipment=equipment,
        series_description=versioned(
            SEGMENTATION_SR_DESCRIPTION if seg is not None else CLASSIFICATION_SR_DESCRIPTION, version
        ),
        procedure_reported=procedure_reported_for(volume.headers[0]),
        uid_prefix=uid_prefix,
        previous_versions=predecessors or None,
    )
    objects.append(("SR", sr))
    return objects
