"""Building and writing one job's SEG and SR at the same time, on two cores.

The SEG and the SR of an analysis take about as long each to build and write
(300-slice CT: ~0.4 s each, all of it Python holding the GIL).  Neither needs
the other's object: every identity derives from the job key
(:class:`~pacs_ai.encode.results.ResultIdentities`) and the SR reads of its
SEG only identities and segment numbers
(:func:`~pacs_ai.encode.results.segmentation_reference`).  So the SR is built
and written in a forked child (:class:`~pacs_ai.forked.ForkedCall`) while this
process builds and writes the SEG; the job waits for both, so its results are
recorded together exactly as before.

Both files are written atomically and fsynced (:func:`~pacs_ai.encode.io.write_dataset`)
before this returns: what the index records afterwards is on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import SegmentationStorage

from pacs_ai.analyze.base import AnalysisResult
from pacs_ai.analyze.volume import Volume
from pacs_ai.encode.equipment import EquipmentInfo
from pacs_ai.encode.io import write_dataset
from pacs_ai.encode.results import (
    PreviousResult,
    ResultIdentities,
    build_report_for,
    build_segmentation_for,
    segmentation_reference,
)
from pacs_ai.forked import ForkedCall

__all__ = ["WrittenResult", "write_results"]

_COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass(frozen=True)
class WrittenResult:
    """A result object on disk, with what the index records of it."""

    kind: str  # "SEG" or "SR"
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


def write_results(
    volume: Volume,
    result: AnalysisResult,
    directory: Path,
    *,
    key: str,
    equipment: EquipmentInfo,
    uid_prefix: str | None = None,
    version: int = 1,
    previous: Sequence[PreviousResult] = (),
    fsync: bool = True,
) -> list[WrittenResult]:
    """Build and write the SEG (if ``result`` has labels) and the SR of one analysis into ``directory``.

    Same objects as :func:`~pacs_ai.encode.results.build_results` for the same
    arguments, each in ``directory/<SOP Instance UID>.dcm``.  The SR is built
    in a forked child while this process builds the SEG; a result without a
    label map (a classifier's) has only the SR, built here.

    Raises
    ------
    ValueError
        If the SEG cannot be encoded (see :func:`~pacs_ai.encode.seg.build_segmentation`).
    pacs_ai.forked.ForkedCallFailed
        If the SR could not be built or written (the reason is in the message).
    """
    identities = ResultIdentities.derive(key, uid_prefix)
    directory.mkdir(parents=True, exist_ok=True)
    sr = WrittenResult(
        "SR",
        _COMPREHENSIVE_3D_SR,
        identities.sr_sop_instance_uid,
        identities.sr_series_instance_uid,
        directory / f"{identities.sr_sop_instance_uid}.dcm",
    )

    def write_report() -> None:
        reference = segmentation_reference(volume, result, identities) if result.labels is not None else None
        report = build_report_for(
            volume,
            result,
            reference,
            identities=identities,
            equipment=equipment,
            uid_prefix=uid_prefix,
            version=version,
            previous=previous,
        )
        if str(report.SOPClassUID) != sr.sop_class_uid:  # the record must say what the file is
            raise ValueError(f"the SR was built as SOP Class {report.SOPClassUID}, not {sr.sop_class_uid}")
        write_dataset(report, sr.path, fsync=fsync)

    if result.labels is None:
        write_report()
        return [sr]

    seg = WrittenResult(
        "SEG",
        str(SegmentationStorage),
        identities.seg_sop_instance_uid,
        identities.seg_series_instance_uid,
        directory / f"{identities.seg_sop_instance_uid}.dcm",
    )
    with ForkedCall(write_report, name="SR") as report_child:
        segmentation = build_segmentation_for(
            volume, result, identities=identities, equipment=equipment, uid_prefix=uid_prefix, version=version
        )
        if str(segmentation.SOPClassUID) != seg.sop_class_uid:
            raise ValueError(
                f"the SEG was built as SOP Class {segmentation.SOPClassUID}, not {seg.sop_class_uid}"
            )
        write_dataset(segmentation, seg.path, fsync=fsync)
        report_child.wait()
    return [seg, sr]
