"""The analyzer's :class:`~pacs_ai.analyze.base.Code` as highdicom/pydicom coded concepts.

Analyzers stay free of DICOM libraries; the conversion happens here, in one
place, together with the declaration of the local coding schemes they use.
"""

from __future__ import annotations

from collections.abc import Iterable

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code as PydicomCode

from pacs_ai.analyze.base import Code

__all__ = ["local_coding_schemes", "to_pydicom_code"]

#: PS3.3 8.2: designators beginning with "99" are private/local schemes.
_LOCAL_SCHEME_PREFIX = "99"


def to_pydicom_code(code: Code) -> PydicomCode:
    """Convert the analyzer's :class:`Code` to the type highdicom accepts."""
    return PydicomCode(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def local_coding_schemes(
    codes: Iterable[Code | None], responsible_organization: str
) -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification items for the local ("99...") schemes in ``codes``.

    Local codes (e.g. "99PACSAI" for measurements that have no standard code)
    are only interpretable if the object says who defined the scheme; the
    Coding Scheme Identification Sequence (SOP Common) is where receivers look.
    Sorted by designator so the encoding is stable.
    """
    designators = sorted(
        {code.scheme for code in codes if code is not None and code.scheme.startswith(_LOCAL_SCHEME_PREFIX)}
    )
    return [
        CodingSchemeIdentificationItem(
            designator=designator,
            name=f"Local codes of {responsible_organization}"[:64],
            responsible_organization=responsible_organization,
        )
        for designator in designators
    ]
