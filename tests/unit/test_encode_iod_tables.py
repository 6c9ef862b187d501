"""highdicom's IOD lookups answered once each: same answers, same errors, and actually in use."""

from __future__ import annotations

import importlib
from typing import Any

import highdicom._standard_utils as standard_utils
import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from pacs_ai.encode.iod_tables import HIGHDICOM_MODULES, answer_iod_lookups_once

ATTRIBUTES = ("NumberOfFrames", "ContentDate", "PixelData", "FrameOfReferenceUID", "NoSuchKeyword")


def _original() -> object:
    function = standard_utils.is_attribute_in_iod
    return getattr(function, "__wrapped__", function)


def _outcome(function: Any, *args: Any) -> object:
    """What a lookup returns, or the KeyError it raises (some IODs of highdicom's tables lack modules)."""
    try:
        return function(*args)
    except KeyError as exc:
        return ("KeyError", str(exc))


def test_answers_equal_highdicoms_for_every_sop_class() -> None:
    original = _original()
    answer_iod_lookups_once()
    cached = standard_utils.is_attribute_in_iod
    assert cached is not original
    for sop_class_uid in standard_utils.get_sop_class_iod_map():
        for attribute in ATTRIBUTES:
            assert _outcome(cached, attribute, sop_class_uid) == _outcome(original, attribute, sop_class_uid)
        excluded = ["IconImageSequence"]
        assert _outcome(cached, "PixelData", sop_class_uid, excluded) == _outcome(
            original, "PixelData", sop_class_uid, excluded
        )


def test_unknown_sop_class_raises_as_highdicom_does_every_time() -> None:
    answer_iod_lookups_once()
    for _ in range(2):
        with pytest.raises(KeyError, match="No IOD found"):
            standard_utils.is_attribute_in_iod("NumberOfFrames", "1.2.3.4")


def test_every_module_holds_the_same_replacement_and_a_second_call_changes_nothing() -> None:
    answer_iod_lookups_once()
    holders = [importlib.import_module(name).is_attribute_in_iod for name in HIGHDICOM_MODULES]
    answer_iod_lookups_once()
    again = [importlib.import_module(name).is_attribute_in_iod for name in HIGHDICOM_MODULES]
    assert holders == again
    assert len({id(h) for h in holders}) == 1


def test_is_multiframe_image_asks_the_table_once_per_sop_class() -> None:
    # What the SEG build does for each source image: answered from the cache after the first.
    answer_iod_lookups_once()
    answers = standard_utils.is_attribute_in_iod.answers  # type: ignore[attr-defined]
    single, multi = Dataset(), Dataset()
    single.SOPClassUID, multi.SOPClassUID = CTImageStorage, EnhancedCTImageStorage
    standard_utils.is_multiframe_image(single)
    before = answers.cache_info()
    assert [standard_utils.is_multiframe_image(single) for _ in range(300)] == [False] * 300
    assert standard_utils.is_multiframe_image(multi) is True
    after = answers.cache_info()
    assert after.hits - before.hits >= 300
    assert after.misses - before.misses <= 1
