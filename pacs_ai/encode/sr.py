"""An analyzer's measurements as a TID 1500 Measurement Report (Comprehensive 3D SR).

Structure (all built with highdicom's template classes):

* observation context: a device observer (TID 1004) naming pacs-ai and the
  algorithm; no person observer, because no person has seen the result yet;
* procedure reported (default SCT 169069000 "CT of chest") and an Image
  Library (TID 1600) listing every source image, one Image Library Group per
  SOP Class / Modality / Frame of Reference: the TID 1602 descriptors shared
  by all images of a group (modality, frame of reference, matrix, pixel
  spacing, orientation, ...) are recorded once on the group (TID 1600 row 3),
  and each entry (TID 1601) carries only the descriptors that differ between
  images (for an axial series only Image Position (Patient) Z);
* one TID 1501 group per segment, with the segment's measurements; each
  measurement (TID 300) is INFERRED FROM the SEG segment (an IMAGE item with
  Referenced Segment Number) and from a point inside the segment (an SCOORD
  POINT on the source image where the segment is largest, nearest its
  centre; each group's point on a slice of its own, so labels do not
  overlap).  Not TID 1411: its Referenced Segment excludes any coordinates in
  the group, and OHIF 3.13 (cornerstone-dicom-sr) fails to open a group
  without an SCOORD/SCOORD3D; with the point it lists the group, shows its
  values on that image and jumps to it;
* one TID 1501 group per finding site for measurements over a whole region
  (``MeasurementSpec.segment_number is None``), e.g. both lungs together,
  inferred from all segments and a point inside them;
* two groups per detection (:class:`~pacs_ai.analyze.base.DetectionSpec`)
  sharing one tracking identity (:func:`_detection_groups`): a TID 1410
  group with the box's outline as its Image Region (a closed POLYLINE SCOORD
  on the source image nearest the box centre), Finding and Finding Site (the
  lung the box is in), which OHIF 3.13 hydrates into its measurements panel
  as a rectangle it can jump to; and a TID 1501 group with the box's Width /
  Height / Depth (mm, along rows, columns and the slice normal) and the
  model's score as "Certainty of Finding", each inferred from the outline;
* one image-level TID 1501 group per classification finding
  (:class:`~pacs_ai.analyze.base.FindingSpec`), referencing the source
  image(s), with the finding as Finding, a qualitative evaluation
  (finding = SCT 52101004 "Present" / SCT 2667000 "Absent", decided by the
  threshold) and the model's probability as DCM 111012 "Certainty of Finding"
  in UCUM ``{probability}`` (0..1).  One group per finding because a group
  carries one Finding and one tracking identity, which ties each probability
  to its finding without inventing per-finding measurement codes.

A classifier's result (no label map) gives an SR without a SEG: no segment
groups and no SEG in the evidence.  Its probabilities are inferred from the
whole image (a closed POLYLINE SCOORD along the image border), so OHIF 3.13
can open that SR too.

Every group and measurement carries Algorithm Identification (TID 4019); a
finding group's also carries its decision threshold as a parameter.  The
document is PARTIAL / UNVERIFIED / PRELIMINARY: AI output stays unverified
until a radiologist signs it off in their own system.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode
from pydicom.uid import SegmentationStorage

from pacs_ai.analyze.base import (
    AlgorithmInfo,
    AnalysisResult,
    Code,
    DetectionSpec,
    FindingSpec,
    MeasurementSpec,
    SegmentSpec,
)
from pacs_ai.analyze.volume import Volume
from pacs_ai.encode.coding import local_coding_schemes, to_pydicom_code
from pacs_ai.encode.copied import drop_invalid_optional_attributes
from pacs_ai.encode.equipment import EquipmentInfo, algorithm_device_uid, processing_equipment
from pacs_ai.encode.uids import derived_uid

__all__ = [
    "CERTAINTY_OF_FINDING",
    "CT_OF_CHEST",
    "PLAIN_CHEST_XRAY",
    "PROBABILITY_UNIT",
    "RADIOGRAPHIC_PROCEDURE",
    "build_measurement_report",
    "procedure_reported_for",
]

#: SNOMED CT 169069000 "Computed tomography of chest" (preferred term "CT of
#: chest"); CID 100 is extensible and has no chest-specific CT entry.
CT_OF_CHEST = Code("169069000", "SCT", "CT of chest")
#: SNOMED CT 399208008 "Plain chest X-ray" (procedure), for chest radiographs.
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
#: SNOMED CT 363680008 "Radiographic imaging procedure", for other projection radiographs.
RADIOGRAPHIC_PROCEDURE = Code("363680008", "SCT", "Radiographic imaging procedure")

#: DCM 111012 "Certainty of Finding": the name of a classifier's probability for a finding.
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")
#: A probability 0..1: UCUM's dimensionless unity with an annotation saying what it is.
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
_PRESENT = Code("52101004", "SCT", "Present")
_ABSENT = Code("2667000", "SCT", "Absent")

#: Body Part Examined values (CS, upper case) that make a radiograph a chest radiograph.
_CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG"})

_LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


def _algorithm_id(
    algorithm: AlgorithmInfo, extra_parameters: dict[str, str] | None = None
) -> hd.sr.AlgorithmIdentification:
    parameters = {**algorithm.parameters, **(extra_parameters or {})}
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        family=to_pydicom_code(algorithm.family),
        # TID 4019 parameters are free text; "name=value" sorted for a stable encoding.
        parameters=[f"{key}={value}" for key, value in sorted(parameters.items())] or None,
    )


def procedure_reported_for(header: Dataset) -> Code:
    """TID 1500 "Procedure Reported" for a source series, from its Modality and Body Part Examined.

    Projection radiographs (including a Secondary Capture of one) are "Plain
    chest X-ray" when the body part says chest, else "Radiographic imaging
    procedure"; everything else keeps :data:`CT_OF_CHEST`, the procedure of
    the built-in CT analyzer.
    """
    modality = str(header.get("Modality", "")).upper()
    if modality in _PROJECTION_MODALITIES:
        body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
        return PLAIN_CHEST_XRAY if body_part in _CHEST_BODY_PARTS else RADIOGRAPHIC_PROCEDURE
    return CT_OF_CHEST


def _observation_context(
    equipment: EquipmentInfo, algorithm: AlgorithmInfo, uid_prefix: str | None
) -> hd.sr.ObservationContext:
    # The device UID identifies "this algorithm version on this installation", stable across
    # reports so observations can be grouped by observer; Contributing Equipment has the same.
    device_uid = algorithm_device_uid(equipment, algorithm, uid_prefix)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid,
        name=f"{algorithm.name} {algorithm.version}",
        manufacturer_name=equipment.manufacturer,
        model_name=f"{equipment.model_name} {equipment.software_version}",
        serial_number=equipment.device_serial_number,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )


def _optional_site(site: Code | None) -> list[hd.sr.FindingSite] | None:
    return [hd.sr.FindingSite(to_pydicom_code(site))] if site is not None else None


def _finding_sites(specs: Sequence[MeasurementSpec]) -> list[hd.sr.FindingSite] | None:
    """Distinct finding sites of ``specs`` in first-seen order (None if there are none)."""
    sites: list[Code] = []
    for spec in specs:
        if spec.finding_site not in sites:
            sites.append(spec.finding_site)
    return [hd.sr.FindingSite(to_pydicom_code(site)) for site in sites] or None


#: Where a region's label sits: a source image and a (column, row) pixel position on it.
_Anchor = tuple[Dataset, np.ndarray]


def _anchor(volume: Volume, labels: np.ndarray | None, numbers: Sequence[int], taken: set[int]) -> _Anchor:
    """A point inside segments ``numbers``: nearest their centre on the slice where they are largest.

    Viewers put a group's label there and open that image when the group is
    selected.  Slices in ``taken`` already carry another group's label: OHIF
    draws every label of a slice at once, so labels sharing a slice overlap
    and cannot be read; the region then goes on the slice where it is largest
    among the others (still inside it), and that slice is added to ``taken``.
    For an empty region (or no label map) the centre of the middle slice.
    """
    if labels is not None:
        in_region = np.zeros(labels.shape[0], dtype=np.int64)
        for number in numbers:
            in_region += np.count_nonzero(labels == number, axis=(1, 2))
        ranked = [int(k) for k in np.argsort(-in_region, kind="stable") if in_region[k] > 0]
        free = [k for k in ranked if k not in taken]
        if ranked:
            k = (free or ranked)[0]
            taken.add(k)
            rows, columns = np.nonzero(np.isin(labels[k], numbers))
            nearest = int(np.argmin((rows - rows.mean()) ** 2 + (columns - columns.mean()) ** 2))
            return volume.headers[k], np.array([[columns[nearest], rows[nearest]]], dtype=float)
    middle = volume.headers[len(volume.headers) // 2]
    return middle, np.array([[(int(middle.Columns) - 1) / 2, (int(middle.Rows) - 1) / 2]])


def _coordinates(
    header: Dataset, graphic_type: hd.sr.GraphicTypeValues, pixels: np.ndarray
) -> hd.sr.CoordinatesForMeasurement:
    """TID 320 "INFERRED FROM" SCOORD on a source image; ``pixels`` are (column, row) pairs."""
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=graphic_type,
        # SCOORD pixel coordinates: (0.5, 0.5) is the centre of the top left pixel.
        graphic_data=pixels + 0.5,
        source_image=hd.sr.SourceImageForRegion.from_source_image(header),
    )


@dataclass(frozen=True)
class _Sources:
    """What a TID 300 measurement is "INFERRED FROM": SEG segments and a location on a source image."""

    coordinates: list[hd.sr.CoordinatesForMeasurement]
    images: list[hd.sr.SourceImageForMeasurement] | None = None


def _sources(segmentation: Dataset | None, numbers: Sequence[int], anchor: _Anchor) -> _Sources:
    """TID 300 "INFERRED FROM" items of a region's measurement: the SEG segment(s) and a point inside them.

    The SEG reference is an IMAGE item with Referenced Segment Number
    (highdicom's SourceImageForMeasurement has no argument for it, so it is
    set on the item it builds).  The point is an SCOORD on a source image,
    which is what OHIF (3.13) needs to place and open a measurement.
    """
    header, pixel = anchor
    coordinates = [_coordinates(header, hd.sr.GraphicTypeValues.POINT, pixel)]
    if segmentation is None or not numbers:
        return _Sources(coordinates)
    image = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=segmentation.SOPClassUID,
        referenced_sop_instance_uid=segmentation.SOPInstanceUID,
    )
    reference = image.ReferencedSOPSequence[0]
    reference.ReferencedSegmentNumber = list(numbers) if len(numbers) > 1 else numbers[0]
    return _Sources(coordinates, [image])


def _located_measurement(
    name: Code,
    value: float,
    unit: Code,
    algorithm_id: hd.sr.AlgorithmIdentification,
    sources: _Sources,
    derivation: Code | None = None,
) -> hd.sr.Measurement:
    """TID 300 inferred from ``sources`` (see :func:`_sources`)."""
    return hd.sr.Measurement(
        name=to_pydicom_code(name),
        value=value,
        unit=to_pydicom_code(unit),
        derivation=to_pydicom_code(derivation) if derivation is not None else None,
        algorithm_id=algorithm_id,
        referenced_images=sources.images,
        referenced_coordinates=list(sources.coordinates),
    )


def _measurements(
    specs: Sequence[MeasurementSpec], algorithm_id: hd.sr.AlgorithmIdentification, sources: _Sources
) -> list[hd.sr.Measurement]:
    return [
        _located_measurement(spec.name, spec.value, spec.unit, algorithm_id, sources, spec.derivation)
        for spec in specs
    ]


def _segment_group(
    segment: SegmentSpec,
    measurements: Sequence[MeasurementSpec],
    sources: _Sources,
    algorithm_id: hd.sr.AlgorithmIdentification,
    sop_instance_uid: str,
    uid_prefix: str | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group for one SEG segment; each measurement names the segment and a point in it."""
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid(sop_instance_uid, "tracking", "segment", str(segment.number), prefix=uid_prefix),
        identifier=f"{segment.label} (segment {segment.number})",
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=to_pydicom_code(segment.type),
        finding_category=to_pydicom_code(segment.category),
        finding_sites=_finding_sites(measurements),
        algorithm_id=algorithm_id,
        measurements=_measurements(measurements, algorithm_id, sources),
    )


def _region_group(
    site: Code,
    measurements: Sequence[MeasurementSpec],
    sources: _Sources,
    algorithm_id: hd.sr.AlgorithmIdentification,
    sop_instance_uid: str,
    uid_prefix: str | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid(sop_instance_uid, "tracking", "region", site.scheme, site.value, prefix=uid_prefix),
        identifier=f"{site.meaning} (whole region)",
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_sites=[hd.sr.FindingSite(to_pydicom_code(site))],
        algorithm_id=algorithm_id,
        measurements=_measurements(measurements, algorithm_id, sources),
    )


def _finding_group(
    finding: FindingSpec,
    headers: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    sop_instance_uid: str,
    uid_prefix: str | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """An image-level TID 1501 group for one classification finding."""
    code = finding.finding
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid(sop_instance_uid, "tracking", "finding", code.scheme, code.value, prefix=uid_prefix),
        identifier=f"{code.meaning} (AI classification)",
    )
    # The threshold decides "present", so it belongs with the algorithm that applied it.
    algorithm_id = _algorithm_id(algorithm, {"threshold": f"{finding.threshold:g}"})
    # Inferred from the whole image: its outline is the finding's "location", which viewers
    # (OHIF 3.13) need to open the group at all; a point would suggest a place the model never named.
    image = headers[len(headers) // 2]
    columns, rows = int(image.Columns), int(image.Rows)
    whole = np.array([(0, 0), (columns, 0), (columns, rows), (0, rows), (0, 0)], dtype=float) - 0.5
    probability = _located_measurement(
        CERTAINTY_OF_FINDING,
        finding.probability,
        PROBABILITY_UNIT,
        algorithm_id,
        _Sources([_coordinates(image, hd.sr.GraphicTypeValues.POLYLINE, whole)]),
    )
    evaluation = hd.sr.QualitativeEvaluation(
        name=to_pydicom_code(code), value=to_pydicom_code(_PRESENT if finding.present else _ABSENT)
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=to_pydicom_code(code),
        algorithm_id=algorithm_id,
        finding_sites=_optional_site(finding.finding_site),
        measurements=[probability],
        qualitative_evaluations=[evaluation],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers],
    )


#: Box extents of a detection (CID 7470 Linear Measurements), along the image rows, columns and normal.
_BOX_EXTENTS = (
    Code("103355008", "SCT", "Width"),
    Code("121207", "DCM", "Height"),
    Code("131197000", "SCT", "Depth"),
)
_MILLIMETRE = Code("mm", "UCUM", "millimeter")


def _detection_slice(volume: Volume, detection: DetectionSpec) -> int:
    """Index of the source image whose plane is nearest the box centre (the box is drawn on it)."""
    centre = np.array(detection.center_mm)

    def distance(header: Dataset) -> float:
        cosines = [float(v) for v in header.ImageOrientationPatient]
        normal = np.cross(cosines[:3], cosines[3:])
        return abs(float(np.dot(centre - np.array([float(v) for v in header.ImagePositionPatient]), normal)))

    return min(range(len(volume.headers)), key=lambda k: distance(volume.headers[k]))


def _detection_plane(volume: Volume, detection: DetectionSpec) -> Dataset:
    """The source image whose plane is nearest the box centre (the box is drawn on it)."""
    return volume.headers[_detection_slice(volume, detection)]


def _box_outline(header: Dataset, detection: DetectionSpec) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The box as a closed rectangle in ``header``'s pixels ((column, row) pairs) and its extents in mm.

    Extents are along the image rows, columns and the plane normal.
    """
    cosines = [float(v) for v in header.ImageOrientationPatient]
    axes = np.array([cosines[:3], cosines[3:], np.cross(cosines[:3], cosines[3:])])
    origin = np.array([float(v) for v in header.ImagePositionPatient])
    lo, hi = detection.box_min_mm, detection.box_max_mm
    corners = np.array([(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    projected = (corners - origin) @ axes.T  # mm along rows, along columns, along the normal
    low, high = projected.min(axis=0), projected.max(axis=0)
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    c0, c1 = low[0] / column_spacing, high[0] / column_spacing
    r0, r1 = low[1] / row_spacing, high[1] / row_spacing
    outline = np.array([(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)])
    extents = high - low
    return outline, (float(extents[0]), float(extents[1]), float(extents[2]))


def _detection_groups(
    index: int,
    detection: DetectionSpec,
    volume: Volume,
    algorithm: AlgorithmInfo,
    sop_instance_uid: str,
    uid_prefix: str | None,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations]:
    """Two groups for one detected box, with one tracking identity: its region, then its measurements.

    * TID 1410: the box's outline on the source image nearest its centre as
      the Image Region (a closed POLYLINE SCOORD, 5 points), Finding and
      Finding Site, no measurements.  This is the group OHIF 3.13 hydrates
      into its measurements panel: @cornerstonejs/adapters take an Image Region
      (DCM 111030) POLYLINE of 5 points for a RectangleROI, and read its
      corners from the group's first NUM when there is one, which a TID 1410
      NUM cannot give (no INFERRED FROM coordinates there);
    * TID 1501: the box's Width / Height / Depth (mm) and the model's score,
      each INFERRED FROM the same outline.

    Both carry the same Tracking Identifier and Tracking Unique Identifier
    (the same finding), so a viewer lists one nodule with its values.
    """
    header = _detection_plane(volume, detection)
    outline, extents = _box_outline(header, detection)
    location = _Sources([_coordinates(header, hd.sr.GraphicTypeValues.POLYLINE, outline)])
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline + 0.5,  # (0.5, 0.5) is the centre of the top left pixel
        source_image=hd.sr.SourceImageForRegion.from_source_image(header),
    )
    code = detection.finding

    def tracking() -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(
            uid=derived_uid(
                sop_instance_uid,
                "tracking",
                "detection",
                str(index),
                *(f"{v:.3f}" for v in detection.center_mm),
                prefix=uid_prefix,
            ),
            identifier=f"{code.meaning} {index} (AI detection)",
        )

    algorithm_id = _algorithm_id(algorithm)
    measurements = [
        _located_measurement(name, round(extent, 2), _MILLIMETRE, algorithm_id, location)
        for name, extent in zip(_BOX_EXTENTS, extents, strict=True)
    ]
    measurements.append(
        _located_measurement(CERTAINTY_OF_FINDING, detection.score, PROBABILITY_UNIT, algorithm_id, location)
    )
    return [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(),
            referenced_region=region,
            finding_type=to_pydicom_code(code),
            algorithm_id=algorithm_id,
            finding_sites=_optional_site(detection.finding_site),
        ),
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(),
            finding_type=to_pydicom_code(code),
            algorithm_id=algorithm_id,
            finding_sites=_optional_site(detection.finding_site),
            measurements=measurements,
        ),
    ]


def _check_finding(finding: FindingSpec) -> None:
    if not (0.0 <= finding.probability <= 1.0) or not (0.0 <= finding.threshold <= 1.0):
        raise ValueError(
            f"Finding {finding.finding.meaning!r} has probability {finding.probability} and threshold "
            f"{finding.threshold}; both must be within 0..1"
        )


# --- Image Library (TID 1600) ----------------------------------------------------------------
#
# highdicom's ImageLibrary writes the full TID 1602 descriptor set (~16 content
# items) under every entry, and Comprehensive3DSR then deep-copies, re-parses
# and searches that whole tree: ~5,000 items and ~4 s for a 300-slice series,
# plus ~1 s to write them.  TID 1600 row 3 lets an Image Library Group carry
# the descriptors its entries share (DCMTK's TID1600_ImageLibrary does the
# same in moveCommonImageDescriptorsToImageGroups()), so the library is built
# here with the shared descriptors once per group and only the differing ones
# per entry, and it is added to the document after Comprehensive3DSR has done
# its copying and evidence search on the small rest of the tree.

_DescriptorKey = tuple[str, str]  # (coding scheme designator, code value) of a descriptor's concept name
_Reader = Callable[[Dataset], object]

_CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT"})  # as highdicom's ImageLibraryEntryDescriptors
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
_SOURCE = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")
#: Modality code (CID 29) of each projection modality, by its Modality attribute value.
_CID29_MODALITIES: dict[str, PydicomCode] = {
    code.value: code
    for code in (getattr(codes.cid29, name) for name in codes.cid29.dir())
    if code.value in _PROJECTION_MODALITIES
}


def _key(code: PydicomCode | hd.sr.CodedConcept) -> _DescriptorKey:
    return (code.scheme_designator, code.value)


def _element(keyword: str, index: int | None = None) -> _Reader:
    """Reader of a header attribute (or one of its values); None where absent."""

    def read(header: Dataset) -> object:
        value = header.get(keyword)
        if value is None or index is None:
            return value
        return value[index] if len(value) > index else None

    return read


def _descriptor_readers(modality: str) -> dict[_DescriptorKey, _Reader]:
    """Where each TID 1602-1604 descriptor highdicom writes takes its value from."""
    readers: dict[_DescriptorKey, _Reader] = {
        _key(codes.DCM.Modality): _element("SOPClassUID"),  # highdicom codes the modality from the SOP Class
        _key(codes.DCM.FrameOfReferenceUID): _element("FrameOfReferenceUID"),
        _key(codes.DCM.PixelDataRows): _element("Rows"),
        _key(codes.DCM.PixelDataColumns): _element("Columns"),
    }
    if modality in _CROSS_SECTIONAL_MODALITIES:  # TID 1604
        readers |= {
            _key(codes.DCM.HorizontalPixelSpacing): _element("PixelSpacing", 1),
            _key(codes.DCM.VerticalPixelSpacing): _element("PixelSpacing", 0),
            _key(codes.DCM.SliceThickness): _element("SliceThickness"),
            _key(codes.DCM.SpacingBetweenSlices): _element("SpacingBetweenSlices"),
            _key(codes.DCM.ImagePositionPatientX): _element("ImagePositionPatient", 0),
            _key(codes.DCM.ImagePositionPatientY): _element("ImagePositionPatient", 1),
            _key(codes.DCM.ImagePositionPatientZ): _element("ImagePositionPatient", 2),
            _key(codes.DCM.ImageOrientationPatientRowX): _element("ImageOrientationPatient", 0),
            _key(codes.DCM.ImageOrientationPatientRowY): _element("ImageOrientationPatient", 1),
            _key(codes.DCM.ImageOrientationPatientRowZ): _element("ImageOrientationPatient", 2),
            _key(codes.DCM.ImageOrientationPatientColumnX): _element("ImageOrientationPatient", 3),
            _key(codes.DCM.ImageOrientationPatientColumnY): _element("ImageOrientationPatient", 4),
            _key(codes.DCM.ImageOrientationPatientColumnZ): _element("ImageOrientationPatient", 5),
        }
    elif modality in _PROJECTION_MODALITIES:  # TID 1603
        readers |= {
            _key(codes.DCM.PatientOrientationRow): _element("PatientOrientation", 0),
            _key(codes.DCM.PatientOrientationColumn): _element("PatientOrientation", 1),
            _key(codes.DCM.HorizontalPixelSpacing): _element("ImagerPixelSpacing", 1),
            _key(codes.DCM.VerticalPixelSpacing): _element("ImagerPixelSpacing", 0),
        }
    return readers


def _projection_descriptors(header: Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602 + 1603 descriptors of a projection image, written from what the header has.

    highdicom's ImageLibraryEntryDescriptors requires Patient Orientation and
    Imager Pixel Spacing on projection images, which CR (Type 3 / empty Type 2)
    and Secondary Captures of radiographs often lack.  Every TID 1603 row is
    optional, so descriptors whose attribute is absent or empty are left out
    here instead of failing.  Modality is the header's (CID 29: CR, DX, ...),
    also for a Secondary Capture of a radiograph, which says more than
    highdicom's "OT" for that SOP Class.
    """
    acquisition = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = hd.sr.CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="Pixels")
    modality = _CID29_MODALITIES[str(header.Modality)]
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acquisition)
    ]
    if "FrameOfReferenceUID" in header:
        items.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=header.FrameOfReferenceUID,
                relationship_type=acquisition,
            )
        )
    for name, keyword in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
        items.append(
            hd.sr.NumContentItem(
                name=name, value=int(header[keyword].value), unit=pixels, relationship_type=acquisition
            )
        )
    readers = _descriptor_readers(str(header.Modality))
    for name in (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn):
        value = readers[_key(name)](header)
        if value:
            items.append(hd.sr.TextContentItem(name=name, value=str(value), relationship_type=acquisition))
    for name in (codes.DCM.HorizontalPixelSpacing, codes.DCM.VerticalPixelSpacing):
        value = readers[_key(name)](header)
        if value is not None:
            items.append(
                hd.sr.NumContentItem(
                    name=name,
                    value=cast(float, value),
                    unit=codes.UCUM.Millimeter,
                    relationship_type=acquisition,
                )
            )
    return items


def _entry_descriptors(header: Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602 descriptors of one image: highdicom's, or ours for projection images (see above)."""
    if str(header.get("Modality", "")) in _PROJECTION_MODALITIES:
        return _projection_descriptors(header)
    return cast(list[hd.sr.ContentItem], list(hd.sr.ImageLibraryEntryDescriptors(header)))


def _with_value(template: hd.sr.ContentItem, value: object) -> hd.sr.ContentItem:
    """A descriptor like ``template`` (same concept, type, unit) with another value."""
    relationship = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    if isinstance(template, hd.sr.NumContentItem):
        return hd.sr.NumContentItem(
            name=template.name,
            value=cast(float, value),  # the header's value as is, as highdicom passes it
            unit=template.unit,
            relationship_type=relationship,
        )
    if isinstance(template, hd.sr.TextContentItem):
        return hd.sr.TextContentItem(name=template.name, value=str(value), relationship_type=relationship)
    if isinstance(template, hd.sr.UIDRefContentItem):
        return hd.sr.UIDRefContentItem(name=template.name, value=str(value), relationship_type=relationship)
    raise TypeError(f"No per-image variant for a {type(template).__name__} descriptor")


def _library_group(headers: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """One Image Library Group (TID 1600 rows 2-4) for images of one SOP Class, Modality and FoR."""
    # The descriptors of the first image are built (by highdicom, which also
    # validates an image SOP Class with a CID 29 modality, or for projection
    # images by _projection_descriptors); the others are only compared with it.
    template = _entry_descriptors(headers[0])
    readers = _descriptor_readers(headers[0].Modality)
    in_template = {_key(item.name) for item in template}
    readable = in_template <= readers.keys() and not any(
        # e.g. Spacing Between Slices missing in the first header only
        read(header) is not None
        for key, read in readers.items()
        if key not in in_template
        for header in headers[1:]
    )
    if readable:
        first = {key: read(headers[0]) for key, read in readers.items()}
        varying = {
            key for key, read in readers.items() if any(read(header) != first[key] for header in headers[1:])
        }
        shared = [item for item in template if _key(item.name) not in varying]
        per_image = [(item, readers[_key(item.name)]) for item in template if _key(item.name) in varying]
        entry_descriptors = [
            [_with_value(item, value) for item, read in per_image if (value := read(header)) is not None]
            for header in headers
        ]
    else:  # descriptors this module cannot compare: all of them per image, as highdicom does
        shared = []
        entry_descriptors = [_entry_descriptors(header) for header in headers]

    entries = []
    for header, descriptors in zip(headers, entry_descriptors, strict=True):
        entry = hd.sr.ImageContentItem(  # TID 1601
            name=_SOURCE,
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        if descriptors:
            entry.ContentSequence = hd.sr.ContentSequence(descriptors)
        entries.append(entry)
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence([*shared, *entries])
    return group


def _image_library(headers: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """The TID 1600 Image Library listing every image of ``headers``, in their order within each group."""
    groups: dict[tuple[str, str, str | None], list[Dataset]] = {}
    for header in headers:
        key = (header.SOPClassUID, header.Modality, header.get("FrameOfReferenceUID"))
        groups.setdefault(key, []).append(header)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([_library_group(members) for members in groups.values()])
    return library


def _insert_image_library(sr: hd.sr.Comprehensive3DSR, library: hd.sr.ContainerContentItem) -> None:
    """Put ``library`` into the TID 1500 root container, just before Imaging Measurements.

    That is where highdicom's MeasurementReport puts it.  Comprehensive3DSR
    holds the tree twice (the dataset's Content Sequence and the parsed copy
    behind ``sr.content``); both get the same library items.
    """
    imaging_measurements = _key(codes.DCM.ImagingMeasurements)
    sequences = [sr.ContentSequence]
    if sr.content[0].ContentSequence is not sr.ContentSequence:
        sequences.append(sr.content[0].ContentSequence)
    for sequence in sequences:
        position = next(
            (
                i
                for i, item in enumerate(sequence)
                if _key(hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0]))
                == imaging_measurements
            ),
            len(sequence),
        )
        sequence.insert(position, library)


def _check_inputs(volume: Volume, result: AnalysisResult, segmentation: Dataset | None) -> None:
    """Reject inputs that would produce an SR pointing at the wrong objects."""
    if not volume.headers:
        raise ValueError("Volume has no source headers; the SR must reference its source images")
    for finding in result.findings:
        _check_finding(finding)
    for detection in result.detections:
        if not 0.0 <= detection.score <= 1.0:
            raise ValueError(
                f"Detection {detection.finding.meaning!r} has score {detection.score}; must be 0..1"
            )
        if any(lo > hi for lo, hi in zip(detection.box_min_mm, detection.box_max_mm, strict=True)):
            raise ValueError(f"Detection box {detection.box_min_mm}..{detection.box_max_mm} has min > max")
    if segmentation is None:
        if result.labels is not None or result.segments:
            raise ValueError(
                "The result has a label map or segments but no SEG was given; pass the SEG built by "
                "build_segmentation() for this result"
            )
        referencing = sorted({m.segment_number for m in result.measurements if m.segment_number is not None})
        if referencing:
            raise ValueError(
                f"Measurements refer to segment numbers {referencing}, but the result has no segmentation"
            )
        return
    if segmentation.SOPClassUID not in (SegmentationStorage, _LABELMAP_SEGMENTATION_STORAGE):
        raise ValueError(
            f"'segmentation' has SOP Class {segmentation.SOPClassUID}, not a Segmentation; "
            "pass the SEG built by build_segmentation() for this result"
        )
    if segmentation.StudyInstanceUID != volume.headers[0].StudyInstanceUID:
        raise ValueError(
            "The SEG belongs to study "
            f"{segmentation.StudyInstanceUID}, the volume to {volume.headers[0].StudyInstanceUID}"
        )
    encoded = {int(item.SegmentNumber) for item in segmentation.SegmentSequence}
    missing = sorted({spec.number for spec in result.segments} - encoded)
    if missing:
        raise ValueError(f"Segments {missing} of the result are not in the SEG {segmentation.SOPInstanceUID}")
    known = {spec.number for spec in result.segments}
    unknown = sorted(
        {
            m.segment_number
            for m in result.measurements
            if m.segment_number is not None and m.segment_number not in known
        }
    )
    if unknown:
        raise ValueError(f"Measurements refer to segment numbers {unknown} that the result does not describe")


def build_measurement_report(
    volume: Volume,
    result: AnalysisResult,
    segmentation: Dataset | None,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    equipment: EquipmentInfo,
    series_description: str = "AI lung measurements (unverified)",
    procedure_reported: Code = CT_OF_CHEST,
    uid_prefix: str | None = None,
    previous_versions: Sequence[Dataset] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Encode ``result.measurements`` and ``result.findings`` as a TID 1500 Measurement Report.

    Parameters
    ----------
    volume:
        The analysed series (its headers become the Image Library and evidence).
    result:
        The analyzer's output, the same one encoded in ``segmentation``.
    segmentation:
        The SEG of ``result`` (from :func:`~pacs_ai.encode.seg.build_segmentation`
        or read back from disk); its segments are referenced by the TID 1411
        groups.  ``None`` for a result without a label map (a classifier).
    series_instance_uid, sop_instance_uid:
        Identities of the SR; pass :func:`~pacs_ai.encode.uids.derived_uid`
        values so a re-run overwrites instead of duplicating.
    series_number, instance_number:
        Numbers shown by viewers.
    equipment:
        pacs-ai identity (General Equipment, device observer, Contributing Equipment).
    series_description:
        Must make clear the content is AI-generated and unverified.
    procedure_reported:
        TID 1500 "Procedure Reported" (CID 100, extensible).
    uid_prefix:
        UID root for the tracking and device observer UIDs (None: 2.25 UIDs).
    previous_versions:
        Earlier versions of this report (data sets with Study, Series and SOP
        Instance UIDs and SOP Class UID), listed in the Predecessor Documents
        Sequence; None for a first version.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        PARTIAL, UNVERIFIED and PRELIMINARY.

    Raises
    ------
    ValueError
        If ``segmentation`` is not a SEG of the same study containing every
        segment of ``result``, a measurement refers to an unknown segment, a
        result with segments comes without its SEG, or a finding's probability
        or threshold is outside 0..1.
    """
    _check_inputs(volume, result, segmentation)
    algorithm_id = _algorithm_id(result.algorithm)

    # One labelled group per slice, so that a viewer's labels do not overlap; detections are
    # drawn on the slice nearest their centre, so theirs are taken first.
    taken = {_detection_slice(volume, detection) for detection in result.detections}

    def sources(numbers: Sequence[int]) -> _Sources:
        return _sources(segmentation, numbers, _anchor(volume, result.labels, numbers, taken))

    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    if segmentation is not None:  # without one, _check_inputs made sure there are no segments
        for segment in result.segments:
            specs = [m for m in result.measurements if m.segment_number == segment.number]
            groups.append(
                _segment_group(
                    segment, specs, sources([segment.number]), algorithm_id, sop_instance_uid, uid_prefix
                )
            )
    # Whole-region measurements, one group per finding site, in first-seen order; they are
    # inferred from all segments together (e.g. "Lung" = right and left lung).
    regions: dict[Code, list[MeasurementSpec]] = {}
    for spec in result.measurements:
        if spec.segment_number is None:
            regions.setdefault(spec.finding_site, []).append(spec)
    every_segment = [segment.number for segment in result.segments]
    for site, specs in regions.items():
        groups.append(
            _region_group(site, specs, sources(every_segment), algorithm_id, sop_instance_uid, uid_prefix)
        )
    for index, detection in enumerate(result.detections, start=1):
        groups += _detection_groups(index, detection, volume, result.algorithm, sop_instance_uid, uid_prefix)
    for finding in result.findings:
        groups.append(_finding_group(finding, volume.headers, result.algorithm, sop_instance_uid, uid_prefix))

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(equipment, result.algorithm, uid_prefix),
        procedure_reported=to_pydicom_code(procedure_reported),
        imaging_measurements=groups,
        # No referenced_images: the Image Library is added below (_insert_image_library).
    )
    used_codes: list[Code | None] = [procedure_reported, result.algorithm.family]
    for spec in result.measurements:
        used_codes += [spec.name, spec.unit, spec.finding_site, spec.derivation]
    for segment in result.segments:
        used_codes += [segment.category, segment.type]
    for finding in result.findings:
        used_codes += [finding.finding, finding.finding_site]
    for detection in result.detections:
        used_codes += [detection.finding, detection.finding_site]

    sr = hd.sr.Comprehensive3DSR(
        # Source images first: highdicom records the acquisition equipment of
        # evidence[0], which must be the scanner, not the SEG.
        evidence=[*volume.headers, *([segmentation] if segmentation is not None else [])],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        **equipment.general_equipment(),
        series_description=series_description,
        is_complete=False,
        is_final=False,
        is_verified=False,
        contributing_equipment=[processing_equipment(equipment, result.algorithm, uid_prefix)],
        coding_schemes=local_coding_schemes(used_codes, equipment.manufacturer) or None,
        previous_versions=previous_versions,
    )
    # Every library entry is one of the headers, all recorded as evidence above.
    _insert_image_library(sr, _image_library(volume.headers))
    drop_invalid_optional_attributes(sr)
    return sr
