"""The result objects of one analysis: a SEG of its label map, and the SR of its measurements and findings.

One function builds them, with identities derived from a key, so the pipeline
(key = the job's idempotency key) and the worker warm-up build them the same
way.  A classifier's result (no label map) gives the SR alone.
"""

from __future__ import annotations

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
SEGMENTATION_SR_DESCRIPTION = "AI lung measurements (unverified)"
CLASSIFICATION_SR_DESCRIPTION = "AI findings (unverified)"


def build_results(
    volume: Volume,
    result: AnalysisResult,
    *,
    key: str,
    equipment: EquipmentInfo,
    uid_prefix: str | None = None,
) -> list[tuple[str, Dataset]]:
    """``[("SEG", segmentation), ("SR", report)]`` for one analysis; ``[("SR", report)]`` without labels.

    Every UID derives from ``key``: building again for the same key gives the
    same identities, so a re-run replaces its earlier objects in a PACS.  The
    SR's Procedure Reported follows the source (CT of chest, plain chest X-ray, ...).
    """
    objects: list[tuple[str, Dataset]] = []
    seg: Dataset | None = None
    if result.labels is not None:
        seg = build_segmentation(
            volume,
            result,
            series_instance_uid=derived_uid(key, "seg-series", prefix=uid_prefix),
            sop_instance_uid=derived_uid(key, "seg-instance", prefix=uid_prefix),
            series_number=SEG_SERIES_NUMBER,
            instance_number=1,
            equipment=equipment,
            uid_prefix=uid_prefix,
        )
        objects.append(("SEG", seg))
    sr = build_measurement_report(
        volume,
        result,
        seg,
        series_instance_uid=derived_uid(key, "sr-series", prefix=uid_prefix),
        sop_instance_uid=derived_uid(key, "sr-instance", prefix=uid_prefix),
        series_number=SR_SERIES_NUMBER,
        instance_number=1,
        equipment=equipment,
        series_description=SEGMENTATION_SR_DESCRIPTION if seg is not None else CLASSIFICATION_SR_DESCRIPTION,
        procedure_reported=procedure_reported_for(volume.headers[0]),
        uid_prefix=uid_prefix,
    )
    objects.append(("SR", sr))
    return objects
