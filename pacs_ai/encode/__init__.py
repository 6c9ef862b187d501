"""DICOM encoders: an :class:`~pacs_ai.analyze.base.AnalysisResult` as SEG and SR.

* :func:`build_segmentation` - the label map as a BINARY Segmentation aligned
  to the source series;
* :func:`build_measurement_report` - the measurements and classification
  findings as a TID 1500 Measurement Report referencing the SEG segments (a
  classifier's result has no label map: SR only, see
  :func:`~pacs_ai.encode.results.build_results`);
* :func:`derived_uid` - deterministic UIDs so re-runs overwrite, not duplicate;
* :class:`EquipmentInfo` - the pacs-ai identity written into both;
* :func:`write_dataset` - atomic Part 10 write;
* :func:`pacs_ai.encode.writing.write_results` - a job's SEG and SR built and
  written at the same time (the SR in a forked child), as the pipeline does.

Both objects say, in Series Description and content, that they are
AI-generated and unverified.
"""

from pacs_ai.encode.equipment import EquipmentInfo, add_contributing_equipment, processing_equipment
from pacs_ai.encode.io import write_dataset
from pacs_ai.encode.seg import build_segmentation
from pacs_ai.encode.sr import CT_OF_CHEST, build_measurement_report, procedure_reported_for
from pacs_ai.encode.uids import derived_uid

__all__ = [
    "CT_OF_CHEST",
    "EquipmentInfo",
    "add_contributing_equipment",
    "build_measurement_report",
    "build_segmentation",
    "derived_uid",
    "procedure_reported_for",
    "processing_equipment",
    "write_dataset",
]
