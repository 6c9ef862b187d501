"""Coding a model's output labels from its own label names, through a shipped and reviewed table.

A MONAI bundle names its outputs in ``configs/metadata.json``
(``network_data_format.outputs.pred.channel_def``: ``{"1": "spleen", ...}``);
a TorchScript descriptor in ``output.channels``.  DICOM SEG and SR need coded
concepts instead, so :data:`LABEL_CODES_FILE` (``label_codes.csv``, data, not
code) maps label names to SNOMED CT codes: the DICOM standard's segmentation
category and property type codes (PS3.16 CID 7150/7151) where the standard
lists them, TotalSegmentator's published mapping for the rest.  A profile
overrides any of it; nothing here invents a code.

Names are matched after normalisation (lower case, every run of other
characters as one ``_``), so ``"Right Kidney"`` and ``right_kidney`` are one
name.  Rows with a ``model`` column apply only to the bundle whose metadata
``name`` is that, for names too generic to be global (``"A"`` of a breast
density classifier).
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path

#: The table: one row per structure or finding, several names each.
LABEL_CODES_FILE = Path(__file__).with_name("label_codes.csv")

CodeTriple = tuple[str, str, str]


def normalise(name: str) -> str:
    """``"Right Kidney"`` -> ``"right_kidney"``: the form names are compared in."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


@dataclass(frozen=True)
class LabelCode:
    """The codes of one label: SEG category and type (or an SR finding), optional laterality."""

    #: ``(scheme, value, meaning)`` of the segmented property category; None for findings only.
    category: CodeTriple | None
    type: CodeTriple
    #: Laterality (SCT 24028007 Right, 7771000 Left) when the type code has none.
    modifier: CodeTriple | None
    #: ``DICOM`` or ``TotalSegmentator``: where the code was taken from.
    source: str

    @property
    def display_label(self) -> str:
        """A segment label from the codes, e.g. ``"Kidney, right"`` (SEG Segment Label, LO)."""
        label = self.type[2] if self.modifier is None else f"{self.type[2]}, {self.modifier[2].lower()}"
        return label[:64]


def _triple(scheme: str, value: str, meaning: str) -> CodeTriple | None:
    return (scheme, value, meaning) if value else None


@functools.cache
def label_table() -> dict[tuple[str, str], LabelCode]:
    """``(normalised model name or "", normalised label name) -> LabelCode`` from :data:`LABEL_CODES_FILE`."""
    with LABEL_CODES_FILE.open(encoding="utf-8", newline="") as stream:
        lines = [line for line in stream if not line.startswith("#")]
    table: dict[tuple[str, str], LabelCode] = {}
    for row in csv.DictReader(lines):
        type_code = _triple(row["type_scheme"], row["type_value"], row["type_meaning"])
        if type_code is None:
            raise ValueError(f"{LABEL_CODES_FILE}: row {row['names']!r} has no type code")
        code = LabelCode(
            category=_triple(row["category_scheme"], row["category_value"], row["category_meaning"]),
            type=type_code,
            modifier=_triple(row["modifier_scheme"], row["modifier_value"], row["modifier_meaning"]),
            source=row["source"],
        )
        scope = normalise(row["model"])
        for name in row["names"].split("|"):
            key = (scope, normalise(name))
            if key in table:
                raise ValueError(f"{LABEL_CODES_FILE}: name {name!r} appears twice")
            table[key] = code
    return table


def code_for(label_name: str, model_name: str = "") -> LabelCode | None:
    """The table's code for ``label_name`` of the model named ``model_name`` (metadata ``name``), if any."""
    table = label_table()
    name = normalise(label_name)
    return table.get((normalise(model_name), name)) or table.get(("", name))


#: Names that mean "no structure" in a segmentation's channel_def.
BACKGROUND_NAMES = frozenset({"background", "bg", "none", "other", "everything_else"})


def is_background(name: str) -> bool:
    return normalise(name) in BACKGROUND_NAMES
