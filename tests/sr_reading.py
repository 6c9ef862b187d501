"""Reading measurements back out of a TID 1500 SR, independently of pacs-ai's encoder."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset

FINDING_SITE = "363698007"


@dataclass(frozen=True)
class ReadMeasurement:
    name: str  # CodeValue of the concept name
    meaning: str
    value: float
    unit: str  # UCUM code
    finding_site: str | None  # CodeValue of the group's finding site


def measurements(sr: Dataset) -> list[ReadMeasurement]:
    """All NUM items of every measurement group, with the group's finding site."""
    found: list[ReadMeasurement] = []

    def walk(items: list[Dataset], site: str | None) -> None:
        for item in items:
            concept = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "CONTAINER":
                children = list(item.get("ContentSequence", []))
                group_site = site
                for child in children:
                    name = child.ConceptNameCodeSequence[0]
                    if child.ValueType == "CODE" and name.CodeValue == FINDING_SITE:
                        group_site = child.ConceptCodeSequence[0].CodeValue
                walk(children, group_site)
            elif item.ValueType == "NUM" and concept is not None:
                value = item.MeasuredValueSequence[0]
                found.append(
                    ReadMeasurement(
                        name=concept.CodeValue,
                        meaning=concept.CodeMeaning,
                        value=float(value.NumericValue),
                        unit=value.MeasurementUnitsCodeSequence[0].CodeValue,
                        finding_site=site,
                    )
                )
            elif "ContentSequence" in item:
                walk(list(item.ContentSequence), site)

    walk(list(sr.ContentSequence), None)
    return found


def volume_ml(sr: Dataset, finding_site_code: str) -> float:
    """The Volume (SCT 118565006) measured for a finding site (e.g. SCT 3341006 right lung)."""
    values = [
        m.value for m in measurements(sr) if m.name == "118565006" and m.finding_site == finding_site_code
    ]
    if len(values) != 1:
        raise AssertionError(f"expected one volume for site {finding_site_code}, found {values}")
    return values[0]
