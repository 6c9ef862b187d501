"""Deterministic synthetic frontal chest radiographs, with or without a pneumothorax, written as DICOM.

The image is built as an attenuation map in display orientation (a PA view:
patient right on the image left, head at the top; brighter = more
attenuating) from smooth anatomy:

* a soft-tissue trunk and shoulders on an air background;
* two lungs (radiolucent), the right one shorter (liver dome) and the left one
  narrowed by the heart;
* mediastinum, heart shadow and spine; clavicles; posterior ribs as arcs;
* lung markings: vessels branching out of each hilum, fading towards the
  periphery, plus fine parenchymal texture.

A pneumothorax is the apical and lateral rim of one lung where the lung has
collapsed away from the chest wall: that rim has no lung markings and is a
little darker, and the edge of the collapsed lung shows as a thin white
visceral pleural line, as on real radiographs.  Which side and how deep
derive from the seed.

:func:`radiograph_pixels` returns the image as float32 in [0, 1] without
writing anything (for training); :func:`write_chest_radiograph` writes it as
DX Image Storage (For Presentation) or CR Image Storage, MONOCHROME2 or
MONOCHROME1 (stored inverted, as many CR systems do), with every UID derived
from the arguments, so the same call writes byte-identical files.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
SOP_CLASSES = {"DX": DX_FOR_PRESENTATION, "CR": CR_IMAGE_STORAGE}
PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")

BITS_STORED = 12
MAX_STORED = 2**BITS_STORED - 1
STUDY_DATETIME = datetime.datetime(2024, 1, 3, 8, 15, 0)
#: SNOMED CT: pneumothorax.
PNEUMOTHORAX_CODE = ("36118008", "SCT", "Pneumothorax")


@dataclass
class RadiographTruth:
    """What was written: identifiers, the class and where the pneumothorax is."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str
    accession_number: str
    pneumothorax: bool
    #: "right" or "left" (patient side) when ``pneumothorax``, else None.
    side: str | None
    photometric_interpretation: str
    #: Display-oriented pixels in [0, 1] (what a viewer shows), rows x columns.
    pixels: np.ndarray


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=["pacs-ai chest radiograph", *(str(p) for p in parts)])


def _smooth_step(distance: np.ndarray, width: float) -> np.ndarray:
    """0 outside, 1 inside, with a soft edge ``width`` wide; ``distance`` is < 0 inside."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / width, -50.0, 50.0)))


def _lung_field(
    x: np.ndarray, y: np.ndarray, cx: float, top: float, bottom: float, half_width: float, medial_sign: float
) -> np.ndarray:
    """Signed level function of one lung (< 0 inside): a tall rounded shape with a domed base.

    ``medial_sign`` is +1 when the mediastinum lies towards +x (the right lung,
    on the image left), so the medial border can be made straighter.
    """
    height = bottom - top
    v = (y - top) / height  # 0 at the apex, 1 at the base
    # Narrow apex, widest at about two thirds of the height.
    width = half_width * np.sqrt(np.clip(np.sin(np.clip(v, 0.0, 1.0) * np.pi * 0.62 + 0.12), 0.0, None))
    u = (x - cx) / np.maximum(width, 1e-3)
    # The medial border is straighter than the lateral one.
    u = np.where(u * medial_sign > 0, u * 1.08, u)
    # Diaphragm dome: the base is higher in the middle of the lung than at its sides.
    base = 1.0 - 0.10 * (1.0 - np.clip(np.abs((x - cx) / half_width), 0.0, 1.0) ** 2)
    return np.maximum(np.abs(u) - 1.0, np.maximum(-v, v - base))


def _vessel_tree(
    shape: tuple[int, int],
    hila: list[tuple[float, float, float]],
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
) -> np.ndarray:
    """Lung markings: branching lines out of each hilum (x, y, outward direction sign), fading outward."""
    rows, columns = shape
    canvas = np.zeros(shape, dtype=np.float32)
    scale = np.array([(columns - 1) / 2.0, (rows - 1) / 2.0])

    def draw(px: float, py: float, angle: float, length: float, strength: float, depth: int) -> None:
        steps = max(2, int(length * max(rows, columns) * 0.6))
        for t in np.linspace(0.0, 1.0, steps):
            qx = px + np.cos(angle) * length * t
            qy = py + np.sin(angle) * length * t
            c = int(round((qx + 1.0) * scale[0]))
            r = int(round((qy + 1.0) * scale[1]))
            if 0 <= r < rows and 0 <= c < columns:
                canvas[r, c] = max(canvas[r, c], strength * (1.0 - 0.5 * t))
        if depth == 0:
            return
        ex, ey = px + np.cos(angle) * length, py + np.sin(angle) * length
        for turn in (-1.0, 1.0):
            draw(
                ex,
                ey,
                angle + turn * rng.uniform(0.25, 0.6),
                length * rng.uniform(0.55, 0.8),
                strength * 0.75,
                depth - 1,
            )

    for hx, hy, outward in hila:
        for _ in range(5):
            angle = np.pi / 2 - outward * rng.uniform(0.2, 2.6)  # fan from downwards through lateral to up
            angle = angle if np.sin(angle) > -0.95 else angle + 0.3
            draw(hx, hy, angle, rng.uniform(0.16, 0.24), 1.0, 3)
    # Vessels are tubes, not pixels: blur to about a millimetre-scale width.
    canvas = ndimage.grey_dilation(canvas, size=max(1, max(rows, columns) // 256) * 2 + 1)
    return ndimage.gaussian_filter(canvas, sigma=max(rows, columns) / 400.0)


def radiograph_pixels(
    *,
    seed: int = 0,
    pneumothorax: bool = False,
    rows: int = 512,
    columns: int = 512,
    side: str | None = None,
) -> np.ndarray:
    """The display-oriented image (float32, 0 black .. 1 white), PA view, deterministic from the arguments.

    ``side`` ("right" or "left", patient side) chooses the pneumothorax side;
    by default it derives from the seed.
    """
    if rows < 64 or columns < 64:
        raise ValueError(f"a radiograph needs at least 64 x 64 pixels, got {rows} x {columns}")
    return _render(seed, pneumothorax, rows, columns, side)[0]


def _render(
    seed: int, pneumothorax: bool, rows: int, columns: int, side: str | None
) -> tuple[np.ndarray, str | None]:
    rng = np.random.default_rng([seed, 7331])
    y, x = np.meshgrid(
        np.linspace(-1.0, 1.0, rows, dtype=np.float32),
        np.linspace(-1.0, 1.0, columns, dtype=np.float32),
        indexing="ij",
    )
    edge = 2.5 / max(rows, columns)  # soft edges about a pixel or two wide

    # Trunk with shoulders; air outside.
    trunk_half_width = 0.86 + rng.uniform(-0.04, 0.04)
    trunk = _smooth_step(
        np.abs(x) / trunk_half_width - 1.0 + 0.25 * np.clip(-(y + 0.55), 0, None) ** 2 * 4, edge * 4
    )
    trunk *= _smooth_step(-(y + 0.92), edge * 6)
    attenuation = 0.58 * trunk

    # Lungs. Image left is the patient's right.
    lung_top = -0.72 + rng.uniform(-0.04, 0.04)
    right_bottom = 0.50 + rng.uniform(-0.05, 0.03)
    left_bottom = right_bottom + 0.06 + rng.uniform(0.0, 0.04)
    spread = rng.uniform(-0.03, 0.03)
    lungs = {
        "right": _lung_field(
            x, y, -0.40 - spread, lung_top, right_bottom, 0.28 + rng.uniform(-0.02, 0.02), 1.0
        ),
        "left": _lung_field(
            x, y, 0.40 + spread, lung_top + 0.03, left_bottom, 0.26 + rng.uniform(-0.02, 0.02), -1.0
        ),
    }
    masks = {name: _smooth_step(level, 0.03) for name, level in lungs.items()}
    lung_any = np.maximum(masks["right"], masks["left"])
    # Mediastinum, heart (bulging to the patient's left = image right), spine.
    mediastinum = _smooth_step(np.abs(x - 0.01) / 0.13 - 1.0, 0.05) * _smooth_step(-(y + 0.85), 0.05)
    heart_cx, heart_cy = 0.10 + rng.uniform(-0.03, 0.03), 0.30 + rng.uniform(-0.03, 0.03)
    heart = _smooth_step(np.hypot((x - heart_cx) / 0.33, (y - heart_cy) / 0.26) - 1.0, 0.04)
    spine = _smooth_step(np.abs(x) / 0.07 - 1.0, 0.05) * trunk
    # The heart lies in front of the lung: where they overlap, the heart shadow wins.
    lung_any = lung_any * (1.0 - 0.8 * heart)
    attenuation -= 0.36 * lung_any
    attenuation += 0.16 * np.maximum(mediastinum, heart) * trunk + 0.06 * spine

    # Posterior ribs: arcs sloping down laterally, over each hemithorax; clavicles at the top.
    ribs = np.zeros_like(x)
    rib_phase = rng.uniform(-0.03, 0.03)
    for k in range(10):
        y0 = -0.72 + rib_phase + k * 0.125
        for sign in (-1.0, 1.0):
            lateral = np.clip(sign * x, 0.0, None)
            centre_line = y0 + 0.55 * lateral**2 + 0.10 * lateral
            band = _smooth_step(np.abs(y - centre_line) / 0.022 - 1.0, 0.25)
            ribs = np.maximum(ribs, band * (sign * x > 0.06) * (sign * x < 0.85))
    clavicles = np.zeros_like(x)
    for sign in (-1.0, 1.0):
        lateral = sign * x
        centre_line = -0.66 - 0.28 * (lateral - 0.1) + 0.25 * (lateral - 0.35) ** 2
        clavicles = np.maximum(
            clavicles,
            _smooth_step(np.abs(y - centre_line) / 0.028 - 1.0, 0.2) * (lateral > 0.1) * (lateral < 0.62),
        )
    attenuation += (0.045 * ribs + 0.10 * clavicles) * trunk

    # Lung markings (vessels from the hila) and parenchymal texture, inside the lungs only.
    hila = [(-0.17, -0.02 + rng.uniform(-0.03, 0.03), 1.0), (0.19, 0.0 + rng.uniform(-0.03, 0.03), -1.0)]
    vessels = np.clip(_vessel_tree((rows, columns), hila, rng, x, y), 0.0, 1.0)
    texture = ndimage.gaussian_filter(
        rng.standard_normal((rows, columns)).astype(np.float32), sigma=max(rows, columns) / 170.0
    )
    texture /= float(np.abs(texture).max()) + 1e-6
    markings = 0.12 * vessels + 0.025 * texture

    # Drawn with or without a pneumothorax, so the rest of the random stream (noise) does not depend on it:
    # the same seed gives the same anatomy and noise in both classes.
    side_draw, shrink = rng.random(), rng.uniform(1.25, 1.55)
    chosen: str | None = None
    if pneumothorax:
        chosen = side or ("right" if side_draw < 0.5 else "left")
        if chosen not in ("right", "left"):
            raise ValueError(f"side must be 'right' or 'left', got {side!r}")
        # The collapsed lung: the lung field shrunk towards its hilum, most at the apex and the lateral wall.
        hx, hy, _ = hila[0] if chosen == "right" else hila[1]
        lateral = -1.0 if chosen == "right" else 1.0
        # Points are pulled away from the hilum before evaluating the field: the field shrinks.
        sx = hx + (x - hx) * np.where((x - hx) * lateral > 0, shrink, 1.0)
        sy = hy + (y - hy) * np.where(y < hy, shrink, 1.0)
        cx = -0.40 - spread if chosen == "right" else 0.40 + spread
        top = lung_top if chosen == "right" else lung_top + 0.03
        bottom = right_bottom if chosen == "right" else left_bottom
        half_width = 0.28 if chosen == "right" else 0.26
        collapsed_level = _lung_field(sx, sy, cx, top, bottom, half_width, -lateral)
        collapsed = _smooth_step(collapsed_level, 0.02)
        air_gap = masks[chosen] * (1.0 - collapsed)
        other = masks["left" if chosen == "right" else "right"]
        markings *= np.maximum(collapsed, other)
        pleural_line = np.exp(-((collapsed_level / 0.012) ** 2)) * masks[chosen]
        attenuation -= 0.06 * air_gap
        attenuation += 0.09 * pleural_line * (air_gap > 0.02).astype(np.float32)
    attenuation += markings * lung_any

    # Exposure and detector: a monotone response, a little blur and quantum noise.
    gamma = rng.uniform(0.85, 1.15)
    image = np.clip(attenuation, 0.0, None) / 0.85
    image = np.clip(image, 0.0, 1.0) ** gamma
    image = ndimage.gaussian_filter(image, sigma=max(rows, columns) / 900.0)
    image += rng.normal(0.0, 0.012, image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return image, chosen


def radiograph_dataset(
    pixels: np.ndarray,
    *,
    sop_class: str,
    photometric_interpretation: str,
    pixel_spacing_mm: float,
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str,
    patient_id: str,
    patient_name: str,
    accession_number: str,
) -> Dataset:
    """A DX (For Presentation) or CR Image Storage dataset holding ``pixels`` (display-oriented, 0..1)."""
    values = np.rint(pixels * MAX_STORED).astype(np.uint16)
    if photometric_interpretation == "MONOCHROME1":
        values = (MAX_STORED - values).astype(np.uint16)  # the minimum stored value displays white
    sop_class_uid = SOP_CLASSES[sop_class]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    date, time = STUDY_DATETIME.strftime("%Y%m%d"), STUDY_DATETIME.strftime("%H%M%S")

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""] if sop_class == "DX" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = accession_number
    ds.Modality = sop_class
    ds.Manufacturer = "pacs-ai"
    ds.InstitutionName = "pacs-ai synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "CHEST PA synthetic"
    ds.ManufacturerModelName = "pacs-ai chest radiograph"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    # In a PA view seen as displayed, columns run towards the patient's left and rows towards the feet.
    ds.PatientOrientation = ["L", "F"]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric_interpretation
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    # A window over the full stored range: viewers (and loaders applying the VOI LUT) show it unchanged.
    ds.WindowCenter = (MAX_STORED + 1) // 2
    ds.WindowWidth = MAX_STORED + 1
    ds.LossyImageCompression = "00"
    if sop_class == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric_interpretation == "MONOCHROME1" else 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if photometric_interpretation == "MONOCHROME1" else "IDENTITY"
        ds.ImageLaterality = "U"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
        ds.BurnedInAnnotation = "NO"
        ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
        ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
        ds.PositionerType = "NONE"  # a wall stand
        ds.AcquisitionContextSequence = []
    ds.KVP = 120
    ds.PixelData = values.tobytes()
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def write_chest_radiograph(
    out_path: Path,
    *,
    seed: int = 0,
    pneumothorax: bool = False,
    side: str | None = None,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing_mm: float = 0.7,
    sop_class: str = "DX",
    photometric_interpretation: str = "MONOCHROME2",
    patient_id: str = "CXR-001",
    patient_name: str = "Phantom^Radiograph",
    accession_number: str = "ACCX0001",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> RadiographTruth:
    """Write one chest radiograph to ``out_path`` (a file, or a directory to write ``CXR.dcm`` into).

    ``sop_class`` is "DX" (Digital X-Ray Image Storage - For Presentation) or
    "CR" (Computed Radiography Image Storage).  UIDs are hashed from the
    arguments unless given.
    """
    if sop_class not in SOP_CLASSES:
        raise ValueError(f"sop_class must be one of {sorted(SOP_CLASSES)}, got {sop_class!r}")
    if photometric_interpretation not in PHOTOMETRIC_INTERPRETATIONS:
        raise ValueError(
            f"photometric_interpretation must be one of {PHOTOMETRIC_INTERPRETATIONS}, "
            f"got {photometric_interpretation!r}"
        )
    if rows < 64 or columns < 64:
        raise ValueError(f"a radiograph needs at least 64 x 64 pixels, got {rows} x {columns}")
    out_path = Path(out_path)
    if out_path.is_dir() or out_path.suffix == "":
        out_path.mkdir(parents=True, exist_ok=True)
        out_path = out_path / "CXR.dcm"
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    arguments = (
        seed,
        pneumothorax,
        side,
        rows,
        columns,
        pixel_spacing_mm,
        sop_class,
        photometric_interpretation,
        patient_id,
        accession_number,
    )
    study_uid = study_uid or _uid("study", *arguments)
    series_uid = series_uid or _uid("series", study_uid, *arguments)
    sop_instance_uid = _uid("instance", series_uid)
    pixels, chosen = _render(seed, pneumothorax, rows, columns, side)
    ds = radiograph_dataset(
        pixels,
        sop_class=sop_class,
        photometric_interpretation=photometric_interpretation,
        pixel_spacing_mm=pixel_spacing_mm,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_instance_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
    )
    pydicom.dcmwrite(out_path, ds, enforce_file_format=True)
    return RadiographTruth(
        path=out_path,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=str(SOP_CLASSES[sop_class]),
        patient_id=patient_id,
        accession_number=accession_number,
        pneumothorax=pneumothorax,
        side=chosen,
        photometric_interpretation=photometric_interpretation,
        pixels=pixels,
    )
