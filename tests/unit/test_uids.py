"""derived_uid: deterministic, valid, collision-resistant DICOM UIDs."""

from __future__ import annotations

import re

import pytest

from pacs_ai.encode.uids import derived_uid

# PS3.5 9.1: dot-separated numeric components, no leading zeros, at most 64 characters.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def assert_valid_uid(uid: str) -> None:
    assert len(uid) <= 64, uid
    assert UID_PATTERN.match(uid), uid


def test_same_parts_give_same_uid() -> None:
    assert derived_uid("1.2.3", "lung", "seg-series") == derived_uid("1.2.3", "lung", "seg-series")


def test_same_parts_and_prefix_give_same_uid() -> None:
    assert derived_uid("a", "b", prefix="1.2.840.99.") == derived_uid("a", "b", prefix="1.2.840.99.")


@pytest.mark.parametrize("prefix", [None, "1.2.840.99."])
def test_different_parts_give_different_uids(prefix: str | None) -> None:
    uids = {
        derived_uid("1.2.3", "seg-series", prefix=prefix),
        derived_uid("1.2.3", "seg-instance", prefix=prefix),
        derived_uid("1.2.4", "seg-series", prefix=prefix),
        derived_uid("seg-series", "1.2.3", prefix=prefix),  # order matters
    }
    assert len(uids) == 4


@pytest.mark.parametrize("prefix", [None, "1.2.840.99."])
def test_part_boundaries_matter(prefix: str | None) -> None:
    # pydicom joins entropy sources without a separator; derived_uid must not.
    assert derived_uid("ab", "c", prefix=prefix) != derived_uid("a", "bc", prefix=prefix)
    assert derived_uid("abc", prefix=prefix) != derived_uid("ab", "c", prefix=prefix)


def test_without_prefix_is_uuid_derived() -> None:
    uid = derived_uid("x")
    assert uid.startswith("2.25.")
    assert 0 < int(uid.removeprefix("2.25.")) < 2**128
    assert_valid_uid(uid)


def test_with_prefix_uses_it_and_is_valid() -> None:
    uid = derived_uid("x", prefix="1.2.840.99.")
    assert uid.startswith("1.2.840.99.")
    assert_valid_uid(uid)


def test_trailing_dot_is_optional() -> None:
    assert derived_uid("x", prefix="1.2.840.99") == derived_uid("x", prefix="1.2.840.99.")


def test_longest_prefix_still_gives_valid_uid() -> None:
    prefix = "1." + "2" * 51 + "."  # 54 characters, pydicom's maximum
    uid = derived_uid("x", prefix=prefix)
    assert uid.startswith(prefix)
    assert_valid_uid(uid)


def test_non_ascii_parts_are_fine() -> None:
    assert_valid_uid(derived_uid("Müller^Jürgen", "肺"))


@pytest.mark.parametrize("prefix", ["1.02.3.", "abc", "1." + "2" * 60 + "."])
def test_invalid_prefix_is_rejected_with_hint(prefix: str) -> None:
    with pytest.raises(ValueError, match="Invalid UID prefix"):
        derived_uid("x", prefix=prefix)


def test_no_parts_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        derived_uid()


def test_non_string_part_is_rejected() -> None:
    with pytest.raises(ValueError, match="not str"):
        derived_uid("x", 3)  # type: ignore[arg-type]
