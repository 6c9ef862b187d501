"""highdicom's questions about its tables of the DICOM standard, answered once each.

highdicom decides whether an attribute belongs to the IOD of a SOP Class
(``highdicom._standard_utils.is_attribute_in_iod``) by scanning every attribute
of every module of that IOD, about 0.4 ms a question.  Building a SEG asks it
once per source image (``is_multiframe_image``, from
``get_plane_positions_of_series``): for a 300-slice CT, 300 times the same
question, about a quarter of the SEG's build time.  The tables are fixed for a
highdicom release, so each answer is kept (:func:`answer_iod_lookups_once`).

highdicom offers no hook for this, so the function is replaced where highdicom's
modules hold it.  The replacement gives the same answers and raises the same
errors (an unknown SOP Class is not cached); ``tests/unit/test_encode_iod_tables.py``
checks both against the original for every SOP Class highdicom knows, and fails
if highdicom no longer has the function where this module looks for it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence

__all__ = ["HIGHDICOM_MODULES", "answer_iod_lookups_once"]

#: The highdicom modules that hold ``is_attribute_in_iod`` under that name: where it is
#: defined (its own module's callers, ``is_multiframe_image`` among them, look it up there)
#: and the modules that imported it by name.
HIGHDICOM_MODULES = ("highdicom._standard_utils", "highdicom.base", "highdicom.sr.content")

_IsAttributeInIod = Callable[[str, str, Sequence[str] | None], bool]


def _answering_once(original: _IsAttributeInIod) -> _IsAttributeInIod:
    @functools.lru_cache(maxsize=4096)
    def answer(attribute: str, sop_class_uid: str, excluded: tuple[str, ...] | None) -> bool:
        return original(attribute, sop_class_uid, None if excluded is None else list(excluded))

    @functools.wraps(original)
    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        excluded = None if exclude_path_elements is None else tuple(exclude_path_elements)
        return answer(str(attribute), str(sop_class_uid), excluded)

    is_attribute_in_iod.answers = answer  # type: ignore[attr-defined]  # cache_info() for tests
    return is_attribute_in_iod


def answer_iod_lookups_once() -> None:
    """Make highdicom's ``is_attribute_in_iod`` keep its answers; safe to call more than once.

    Raises
    ------
    RuntimeError
        If a module of :data:`HIGHDICOM_MODULES` no longer has the function
        (a highdicom release moved it): this module needs updating then.
    """
    defining = importlib.import_module(HIGHDICOM_MODULES[0])
    original = getattr(defining, "is_attribute_in_iod", None)
    if original is None:
        raise RuntimeError(
            f"{HIGHDICOM_MODULES[0]} has no is_attribute_in_iod; update pacs_ai.encode.iod_tables"
        )
    original = getattr(original, "__wrapped__", original)
    replacement = None
    for name in HIGHDICOM_MODULES:
        module = importlib.import_module(name)
        current = getattr(module, "is_attribute_in_iod", None)
        if current is None or getattr(current, "__wrapped__", current) is not original:
            raise RuntimeError(
                f"{name}.is_attribute_in_iod is not highdicom's function; update pacs_ai.encode.iod_tables"
            )
        if current is original:
            replacement = replacement or _answering_once(original)
            module.is_attribute_in_iod = replacement  # type: ignore[attr-defined]
