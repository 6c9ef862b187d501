"""The result objects of one analysis: a SEG and the SR that measures its segments.

One function builds both, with identities derived from a key, so the pipeline
(key = the job's idempotency key) and the worker warm-up build them the same way.
"""

from __future__ import annotations

from pydicom import Dataset

from pacs_ai.analyze.base import AnalysisResult
from pacs_ai.analyze.volume import Volume
from pacs_ai.encode.equipment import EquipmentInfo
from pacs_ai.encode.seg import build_segmentation
from pacs_ai.encode.sr import build_measurement_report
from pacs_ai.encode.uids import derived_uid

#: Series numbers of the result series, high enough not to collide with a scanner's.
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002


def build_results(
    volume: Volume,
    result: AnalysisResult,
    *,
    key: str,
    equipment: EquipmentInfo,
    uid_prefix: str | None = None,
) -> list[tuple[str, Dataset]]:
    """``[("SEG", segmentation), ("SR", measurement report)]`` for one analysis.

    Every UID derives from ``key``: building again for the same key gives the
    same identities, so a re-run replaces its earlier objects in a PACS.
    """
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
    sr = build_measurement_report(
        volume,
        result,
        seg,
        series_instance_uid=derived_uid(key, "sr-series", prefix=uid_prefix),
        sop_instance_uid=derived_uid(key, "sr-instance", prefix=uid_prefix),
        series_number=SR_SERIES_NUMBER,
        instance_number=1,
        equipment=equipment,
        uid_prefix=uid_prefix,
    )
    return [("SEG", seg), ("SR", sr)]
