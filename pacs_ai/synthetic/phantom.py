"""A deterministic chest CT phantom with exact ground truth, written as a DICOM CT series.

Anatomy (LPS patient coordinates; image columns run to patient left, rows to
posterior, slices are written inferior to superior):

* air (-1000 HU) outside an elliptic body of soft tissue (40 HU) with a fat
  rim (-100 HU) and a vertebral body (400 HU); no table;
* two lung ellipsoids (-850 HU) separated by the mediastinum; the right lung
  (patient right, x < 0) is a little larger, as in real anatomy, so a
  left/right swap shows up in the volumes;
* a trachea (air, 18 mm diameter) from the top slice down to a carina, and two
  main bronchi (12 mm) from the carina to the medial surface of each lung, so
  the airway connects the lungs as it does in real CT;
* a fraction ``laa_fraction`` of lung voxels set to -980 HU in small square
  clusters (emphysema-like);
* with ``abdominal_gas``: gas below the diaphragm, as on real chest CTs, where
  the scan reaches the upper abdomen: a stomach gas bubble under the left
  lung base (fundus, with a flat air-fluid level behind it) and a gas-filled
  colon segment (hepatic flexure) under the right lung base.  Both follow the
  dome of the lung base at a distance of ``DIAPHRAGM_MM`` (diaphragm plus
  organ wall), so on thick slices the gas lies in the slice directly below
  lung and touches it, as partial volume makes it do on real scans;
* Gaussian noise on every voxel.

The trachea runs from the top slice, above both lung apices, so the top
slices hold trachea and no lung (``PhantomTruth.airway_only_slices``).

Sizes scale with the field of view (``size * pixel_spacing_mm``) and the
scanned length, except the airway diameters, which are physical.  The truth
masks are the voxelised lung ellipsoids only (airway excluded), and the truth
%LAA-950 is counted from the values actually written (after noise), so the
truth is exact for the files on disk.

Everything derives from the arguments: the same call writes byte-identical
files, UIDs included (they are hashed from the arguments unless given).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

AIR_HU = -1000
FAT_HU = -100
SOFT_TISSUE_HU = 40
BONE_HU = 400
LUNG_HU = -850
EMPHYSEMA_HU = -980
RESCALE_INTERCEPT = -1024
#: Stored values are 12 bit: HU -1024..3071.
MAX_STORED = 4095

TRACHEA_DIAMETER_MM = 18.0
BRONCHUS_DIAMETER_MM = 12.0
#: The anatomy does not fit (trachea would touch the lungs) in a smaller field of view.
MIN_FOV_MM = 200.0

#: Lung ellipsoids in normalised coordinates: centre (u, v, w) and semi-axes, where u = x / (FOV/2),
#: v = y / (FOV/2), w = z / (scan length/2).
RIGHT_LUNG = ((-0.37, 0.0, -0.05), (0.27, 0.42, 0.78))
LEFT_LUNG = ((0.36, 0.0, -0.05), (0.25, 0.40, 0.74))
#: Trachea centre (u, v) and the carina level w.
TRACHEA_UV = (0.0, -0.12)
CARINA_W = 0.38
#: Where each main bronchus is aimed, inside its lung (u, v, w).
RIGHT_BRONCHUS_TARGET = (-0.25, -0.04, 0.20)
LEFT_BRONCHUS_TARGET = (0.24, -0.04, 0.20)
#: Emphysema clusters are squares of about this edge length.
CLUSTER_MM = 4.5
#: Abdominal gas keeps this distance (diaphragm and organ wall) from the lung ellipsoids.
DIAPHRAGM_MM = 5.0
#: Stomach (under the left lung base): centre (u, v, w) and semi-axes; gas fills it in front of
#: the air-fluid level ``STOMACH_FLUID_V`` (v grows posteriorly; the patient lies supine).
STOMACH = ((0.33, -0.02, -0.95), (0.20, 0.25, 0.30))
STOMACH_WALL_MM = 4.0
STOMACH_FLUID_V = 0.08
#: Colon segment (hepatic flexure, under the right lung base): a gas tube along x from u0 to u1 at
#: (v, w), with this diameter.
COLON = ((-0.55, -0.20), (-0.15, -0.92))
COLON_DIAMETER_MM = 24.0

STUDY_DATETIME = datetime.datetime(2024, 1, 2, 9, 30, 0)


@dataclass
class PhantomTruth:
    """What was written and what an ideal lung analysis should find.

    ``labels`` (uint8; 1 right lung, 2 left lung) is indexed like ``paths``:
    slice k is ``paths[k]``, ascending along the slice normal (inferior to superior).
    """

    study_uid: str
    series_uid: str
    accession_number: str
    patient_id: str
    paths: list[Path]
    right_lung_ml: float
    left_lung_ml: float
    right_laa950_percent: float
    left_laa950_percent: float
    labels: np.ndarray
    voxel_volume_ml: float
    #: (slice, row, column) spacing in mm.
    spacing_mm: tuple[float, float, float]
    #: Slices that hold airway (trachea) and no lung: above the apices.
    airway_only_slices: tuple[int, ...] = ()
    #: Gas below the diaphragm (stomach, colon) written, mL; 0 without ``abdominal_gas``.
    abdominal_gas_ml: float = 0.0

    @property
    def total_lung_ml(self) -> float:
        """Both lungs, mL."""
        return self.right_lung_ml + self.left_lung_ml


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=["pacs-ai chest phantom", *(str(p) for p in parts)])


def _segment_distance_sq(
    x: np.ndarray, y: np.ndarray, z: float, start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Squared distance (mm^2) of points (x, y, z) from the segment start-end (in-plane float32 arrays)."""
    d = (end - start).astype(np.float32)
    px, py, pz = x - np.float32(start[0]), y - np.float32(start[1]), np.float32(z - start[2])
    t = (px * d[0] + py * d[1] + pz * d[2]) / np.float32(d @ d)
    np.clip(t, 0.0, 1.0, out=t)
    return (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2


def ct_slice_dataset(
    *,
    index: int,
    z_mm: float,
    stored: np.ndarray,
    origin_xy: float,
    pixel_spacing_mm: float,
    slice_spacing_mm: float,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    patient_id: str,
    patient_name: str,
    accession_number: str,
) -> Dataset:
    """One axial CT Image Storage slice with every attribute the CT Image IOD requires.

    ``stored`` holds the stored (unsigned, 12-bit) values; HU = stored + RESCALE_INTERCEPT.
    The SOP Instance UID derives from the series UID and ``index``.
    """
    sop_uid = _uid(series_uid, "instance", index)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    date, time = STUDY_DATETIME.strftime("%Y%m%d"), STUDY_DATETIME.strftime("%H%M%S")

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "pacs-ai"
    ds.InstitutionName = "pacs-ai synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "CHEST CT phantom"
    ds.ManufacturerModelName = "pacs-ai chest phantom"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = slice_spacing_mm
    ds.KVP = 120
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [origin_xy, origin_xy, round(z_mm, 6)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = round(z_mm, 6)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    return ds


def write_chest_phantom(
    out_dir: Path,
    *,
    slices: int = 80,
    size: int = 256,
    pixel_spacing_mm: float = 1.5,
    slice_spacing_mm: float = 4.0,
    seed: int = 0,
    patient_id: str = "PHANTOM-001",
    patient_name: str = "Phantom^Chest",
    accession_number: str = "ACC0001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    laa_fraction: float = 0.05,
    noise_hu: float = 15.0,
    abdominal_gas: bool = False,
) -> PhantomTruth:
    """Write one CT Image Storage file per slice into ``out_dir`` and return the ground truth.

    Files are ``CT0001.dcm`` ... in ascending z (inferior to superior),
    explicit VR little endian, 12-bit unsigned stored values with
    RescaleIntercept -1024.  See the module docstring for the anatomy;
    ``abdominal_gas`` adds stomach and colon gas under the lung bases.
    """
    if slices < 3:
        raise ValueError(f"a phantom needs at least 3 slices, got {slices}")
    fov = size * pixel_spacing_mm
    if fov < MIN_FOV_MM:
        raise ValueError(
            f"field of view {fov:.0f} mm (size {size} x {pixel_spacing_mm} mm) is below {MIN_FOV_MM:.0f} mm; "
            "the airway would touch the lungs; use a larger size or pixel spacing"
        )
    if not 0.0 <= laa_fraction < 1.0:
        raise ValueError(f"laa_fraction must be in [0, 1), got {laa_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arguments = (
        slices,
        size,
        pixel_spacing_mm,
        slice_spacing_mm,
        seed,
        patient_id,
        accession_number,
        laa_fraction,
        noise_hu,
    ) + (("abdominal gas",) if abdominal_gas else ())
    study_uid = study_uid or _uid("study", *arguments)
    series_uid = series_uid or _uid("series", study_uid, *arguments)
    frame_uid = _uid("frame", series_uid)
    rng = np.random.default_rng(seed)

    half = fov / 2.0
    half_length = max((slices - 1) / 2.0 * slice_spacing_mm, slice_spacing_mm)
    centred = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2.0)
    coordinate = centred * np.float32(pixel_spacing_mm)
    x = coordinate[np.newaxis, :]  # columns: +x, patient left
    y = coordinate[:, np.newaxis]  # rows: +y, posterior
    u, v = x / half, y / half

    # The in-plane anatomy is the same on every slice; compute it once.
    body = (u / 0.85) ** 2 + (v / 0.62) ** 2 < 1.0
    inner = (u / 0.78) ** 2 + (v / 0.55) ** 2 < 1.0
    spine = u**2 + (v - 0.45) ** 2 < 0.09**2
    base = np.full((size, size), AIR_HU, dtype=np.float32)
    base[body] = FAT_HU
    base[inner] = SOFT_TISSUE_HU
    base[spine & inner] = BONE_HU
    tu, tv = TRACHEA_UV
    trachea = (x - tu * half) ** 2 + (y - tv * half) ** 2 < (TRACHEA_DIAMETER_MM / 2) ** 2
    lungs = []
    for (cu, cv, cw), (au, av, aw) in (RIGHT_LUNG, LEFT_LUNG):
        lungs.append((((u - cu) / au) ** 2 + ((v - cv) / av) ** 2, cw, aw))
    carina = np.array([tu * half, tv * half, CARINA_W * half_length])
    targets = [
        np.array([tu_ * half, tv_ * half, tw * half_length])
        for tu_, tv_, tw in (RIGHT_BRONCHUS_TARGET, LEFT_BRONCHUS_TARGET)
    ]
    bronchus_radius_sq = (BRONCHUS_DIAMETER_MM / 2) ** 2
    bronchus_z = (min(t[2] for t in targets) - BRONCHUS_DIAMETER_MM, carina[2] + BRONCHUS_DIAMETER_MM)
    cell = max(1, round(CLUSTER_MM / pixel_spacing_mm))
    gas_voxels = 0
    airway_only: list[int] = []
    cells = math.ceil(size / cell)

    labels = np.zeros((slices, size, size), dtype=np.uint8)
    lung_voxels = [0, 0]
    laa_voxels = [0, 0]
    paths: list[Path] = []
    origin_xy = float(coordinate[0])
    for k in range(slices):
        z = (k - (slices - 1) / 2.0) * slice_spacing_mm
        w = z / half_length
        hu = base.copy()
        if w >= CARINA_W:
            hu[trachea] = AIR_HU
        if bronchus_z[0] <= z <= bronchus_z[1]:
            for target in targets:
                hu[_segment_distance_sq(x, y, z, carina, target) < bronchus_radius_sq] = AIR_HU
        if abdominal_gas:
            gas = _abdominal_gas(x, y, z, half, half_length) & inner
            hu[gas] = AIR_HU
            gas_voxels += int(np.count_nonzero(gas))
        # Drawn every slice, hit or not, so the random stream does not depend on the anatomy.
        clusters = rng.random((cells, cells)) < laa_fraction
        emphysema = np.repeat(np.repeat(clusters, cell, axis=0), cell, axis=1)[:size, :size]
        for label, (in_plane, cw, aw) in enumerate(lungs, start=1):
            limit = 1.0 - ((w - cw) / aw) ** 2
            if limit <= 0:
                continue
            lung = (in_plane < limit) & body
            labels[k][lung] = label
            hu[lung] = LUNG_HU
            hu[lung & emphysema] = EMPHYSEMA_HU
        if noise_hu > 0:
            hu += rng.standard_normal((size, size), dtype=np.float32) * np.float32(noise_hu)
        stored = np.clip(np.rint(hu) - RESCALE_INTERCEPT, 0, MAX_STORED).astype(np.uint16)
        written_hu = stored.astype(np.int32) + RESCALE_INTERCEPT
        for label in (1, 2):
            lung = labels[k] == label
            lung_voxels[label - 1] += int(np.count_nonzero(lung))
            laa_voxels[label - 1] += int(np.count_nonzero(written_hu[lung] < -950))
        if w >= CARINA_W and not labels[k].any():
            airway_only.append(k)

        ds = ct_slice_dataset(
            index=k,
            z_mm=z,
            stored=stored,
            origin_xy=origin_xy,
            pixel_spacing_mm=pixel_spacing_mm,
            slice_spacing_mm=slice_spacing_mm,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            patient_id=patient_id,
            patient_name=patient_name,
            accession_number=accession_number,
        )
        path = out_dir / f"CT{k + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)

    voxel_ml = pixel_spacing_mm * pixel_spacing_mm * slice_spacing_mm / 1000.0
    return PhantomTruth(
        study_uid=study_uid,
        series_uid=series_uid,
        accession_number=accession_number,
        patient_id=patient_id,
        paths=paths,
        right_lung_ml=lung_voxels[0] * voxel_ml,
        left_lung_ml=lung_voxels[1] * voxel_ml,
        right_laa950_percent=100.0 * laa_voxels[0] / lung_voxels[0] if lung_voxels[0] else 0.0,
        left_laa950_percent=100.0 * laa_voxels[1] / lung_voxels[1] if lung_voxels[1] else 0.0,
        labels=labels,
        voxel_volume_ml=voxel_ml,
        spacing_mm=(slice_spacing_mm, pixel_spacing_mm, pixel_spacing_mm),
        airway_only_slices=tuple(airway_only),
        abdominal_gas_ml=gas_voxels * voxel_ml,
    )


def _outside_lungs(x: np.ndarray, y: np.ndarray, z: float, half: float, half_length: float) -> np.ndarray:
    """In-plane mask of points farther than ``DIAPHRAGM_MM`` (about) from both lung ellipsoids."""
    outside = np.ones((y.size, x.size), dtype=bool)
    for (cu, cv, cw), (au, av, aw) in (RIGHT_LUNG, LEFT_LUNG):
        grown = ((au * half + DIAPHRAGM_MM), (av * half + DIAPHRAGM_MM), (aw * half_length + DIAPHRAGM_MM))
        distance = ((x - cu * half) / grown[0]) ** 2 + ((y - cv * half) / grown[1]) ** 2
        outside &= distance + ((z - cw * half_length) / grown[2]) ** 2 >= 1.0
    return outside


def _abdominal_gas(x: np.ndarray, y: np.ndarray, z: float, half: float, half_length: float) -> np.ndarray:
    """In-plane mask of stomach and colon gas at height ``z`` (see the module docstring)."""
    (cu, cv, cw), (au, av, aw) = STOMACH
    lumen = [a - STOMACH_WALL_MM for a in (au * half, av * half, aw * half_length)]
    stomach = ((x - cu * half) / lumen[0]) ** 2 + ((y - cv * half) / lumen[1]) ** 2
    gas = (stomach + ((z - cw * half_length) / lumen[2]) ** 2 < 1.0) & (y < STOMACH_FLUID_V * half)
    (u0, u1), (v, w) = COLON
    tube = (y - v * half) ** 2 + np.float32((z - w * half_length) ** 2) < (COLON_DIAMETER_MM / 2) ** 2
    gas |= tube & (x >= u0 * half) & (x <= u1 * half)
    return gas & _outside_lungs(x, y, z, half, half_length)
