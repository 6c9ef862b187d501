"""Who made a result: the identity pacs-ai writes into its SEG and SR objects.

The General Equipment attributes (Manufacturer, Manufacturer's Model Name,
Software Versions, Device Serial Number) of a SEG/SR describe the software that
created the instance.  In addition each object gets a Contributing Equipment
Sequence item naming pacs-ai *and* the algorithm (name and version in Software
Versions), because the General Equipment module has room for one device only
and an audit of an AI result must be able to tell which algorithm version
produced it.

Purpose of Reference: DCM 109102 "Processing Equipment" (CID 7005).  pacs-ai
derives new instances from the source images; it does not modify them
(109103 "Modifying Equipment" is for equipment that changed the instance
itself) and it does not synthesise images (109100).  highdicom uses the same
code for its own library entry and only accepts CID 7005 codes here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pacs_ai.analyze.base import AlgorithmInfo
from pacs_ai.encode.uids import derived_uid

__all__ = [
    "EquipmentInfo",
    "GeneralEquipment",
    "add_contributing_equipment",
    "algorithm_device_uid",
    "contributing_equipment",
    "processing_equipment",
]

#: Used when the package version cannot be read (e.g. a vendored copy).
_FALLBACK_VERSION = "0.1.0"


def _package_version() -> str:
    try:
        from pacs_ai import __version__
    except ImportError:
        return _FALLBACK_VERSION
    return str(__version__) or _FALLBACK_VERSION


class GeneralEquipment(TypedDict):
    """Keyword arguments of highdicom's SOP class constructors for the General Equipment module."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    institution_name: str | None


@dataclass(frozen=True)
class EquipmentInfo:
    """Identity of the pacs-ai installation that creates SEG/SR instances.

    All values end up in LO attributes (at most 64 characters).  Keep them
    constant for an installation: they are part of the encoded objects, and a
    re-run should produce the same content as the first run.
    """

    manufacturer: str = "pacs-ai project"
    model_name: str = "pacs-ai"
    software_version: str = field(default_factory=_package_version)
    #: Type 1 in the Enhanced General Equipment module of SEG; set a value that
    #: distinguishes installations (e.g. the station name) where that matters.
    device_serial_number: str = "unknown"
    institution_name: str | None = None
    station_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("manufacturer", "model_name", "software_version", "device_serial_number"):
            value = getattr(self, name)
            if not value or len(value) > 64 or "\\" in value:
                raise ValueError(
                    f"EquipmentInfo.{name}={value!r} must be 1-64 characters without backslash "
                    "(it is written to a DICOM LO attribute)"
                )

    def general_equipment(self) -> GeneralEquipment:
        """The General Equipment arguments every highdicom SOP class constructor takes, by name."""
        return GeneralEquipment(
            manufacturer=self.manufacturer,
            manufacturer_model_name=self.model_name,
            software_versions=self.software_version,
            device_serial_number=self.device_serial_number,
            institution_name=self.institution_name,
        )


def algorithm_device_uid(
    equipment: EquipmentInfo, algorithm: AlgorithmInfo, prefix: str | None = None
) -> str:
    """The Device UID of "this algorithm version on this pacs-ai installation".

    Stable across results, so a receiver can group every result of one
    algorithm version (IHE AI Results asks for it in Contributing Equipment);
    the measurement SR's device observer (TID 1004) carries the same UID.
    """
    return derived_uid(
        "device-observer",
        equipment.manufacturer,
        equipment.model_name,
        equipment.device_serial_number,
        algorithm.name,
        algorithm.version,
        prefix=prefix,
    )


def contributing_equipment(
    equipment: EquipmentInfo, *, software: str, description: str
) -> hd.ContributingEquipment:
    """A Processing Equipment item naming pacs-ai and, second in Software Versions, ``software``.

    ``software`` is what did the work inside pacs-ai (an algorithm, a drafting
    model, with its version); ``description`` is the Contribution Description
    (ST, up to 1024 characters).
    """
    return hd.ContributingEquipment(
        manufacturer=equipment.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=equipment.model_name,
        software_versions=[f"{equipment.model_name} {equipment.software_version}", software],
        device_serial_number=equipment.device_serial_number,
        institution_name=equipment.institution_name,
        station_name=equipment.station_name,
        contribution_description=description,
    )


def processing_equipment(
    equipment: EquipmentInfo, algorithm: AlgorithmInfo, uid_prefix: str | None = None
) -> hd.ContributingEquipment:
    """Build the Contributing Equipment item naming pacs-ai and the algorithm.

    Software Versions holds two values, ``"pacs-ai <version>"`` and
    ``"<algorithm> <version>"``, so both are recoverable without parsing the
    SR content tree; Device UID is :func:`algorithm_device_uid` (highdicom's
    class has no argument for it, so it is set on the item).  No Contribution
    DateTime is written: it would differ on every re-run while the result
    itself does not.
    """
    algorithm_version = f"{algorithm.name} {algorithm.version}"
    if len(algorithm_version) > 64:
        raise ValueError(
            f"Algorithm name and version {algorithm_version!r} exceed 64 characters "
            "(Software Versions is LO); shorten AlgorithmInfo.name or .version"
        )
    item = contributing_equipment(
        equipment,
        software=algorithm_version,
        description=(
            f"AI analysis by {algorithm.name} {algorithm.version}; result not verified by a physician"
        ),
    )
    item.DeviceUID = algorithm_device_uid(equipment, algorithm, uid_prefix)
    return item


def add_contributing_equipment(ds: Dataset, equipment: EquipmentInfo, algorithm: AlgorithmInfo) -> None:
    """Append the pacs-ai item to ``ds.ContributingEquipmentSequence`` in place.

    For datasets not built by highdicom (whose constructors take
    ``contributing_equipment`` directly).  An identical item already present
    is not added again, so calling this twice on the same dataset is harmless.
    """
    item = processing_equipment(equipment, algorithm)
    existing = ds.get("ContributingEquipmentSequence")
    if existing is None:
        ds.ContributingEquipmentSequence = [item]
        return
    if any(other == item for other in existing):
        return
    existing.append(item)
