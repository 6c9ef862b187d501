"""Profile matching and validation: pure functions, no peers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_ai.route.assembly import quiet_period_for
from pacs_ai.route.profiles import (
    Profile,
    ProfileError,
    SeriesFacts,
    load_profile,
    load_profiles,
    match_profiles,
)

REPO_PROFILES = Path(__file__).resolve().parents[2] / "dicom_profiles"


def facts(**overrides: object) -> SeriesFacts:
    values: dict[str, object] = {
        "modality": "CT",
        "body_part_examined": "CHEST",
        "series_description": "Thorax 1.0 B30f",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
        "slice_thickness": 1.0,
        "instance_count": 300,
    }
    values.update(overrides)
    return SeriesFacts(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def chest_profile() -> Profile:
    return load_profile(REPO_PROFILES / "ct-chest-lungs.yaml")


def test_shipped_profiles_are_valid() -> None:
    assert [p.name for p in load_profiles(REPO_PROFILES)] == ["ct-chest-lungs"]


def test_chest_ct_matches(chest_profile: Profile) -> None:
    decision = match_profiles([chest_profile], facts())
    assert decision.matched == [chest_profile]
    assert decision.explain() == "matched ct-chest-lungs"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"modality": None}, "Modality is missing"),
        ({"modality": "MR"}, "Modality 'MR' is not one of ['CT']"),
        ({"instance_count": 2}, "2 instances, fewer than 20"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}, "SOP Class 1.2.840.10008.5.1.4.1.1.7 is not one of"),
        ({"body_part_examined": "HEAD", "series_description": "Brain"}, "none of:"),
    ],
)
def test_mismatch_reasons_are_explicit(
    chest_profile: Profile, overrides: dict[str, object], reason: str
) -> None:
    decision = match_profiles([chest_profile], facts(**overrides))
    assert decision.matched == []
    assert reason in decision.explain()


def test_alternatives_any_of(chest_profile: Profile) -> None:
    # No body part, but the description says chest: the "any" clause holds.
    assert match_profiles(
        [chest_profile], facts(body_part_examined=None, series_description="CHEST W/O")
    ).matched
    # Body part says lung, description is uninformative.
    assert match_profiles([chest_profile], facts(body_part_examined="lung", series_description="")).matched


def test_criteria_on_image_type_and_thickness() -> None:
    profile = Profile.model_validate(
        {
            "name": "thin-axial",
            "match": {"image_type_includes": ["AXIAL"], "slice_thickness": {"max": 2.0}},
            "analyzers": [{"name": "ct-chest-lung"}],
        }
    )
    assert match_profiles([profile], facts()).matched
    reasons = match_profiles([profile], facts(image_type="DERIVED\\SECONDARY\\MPR", slice_thickness=5.0))
    assert "lacks ['AXIAL']" in reasons.explain() and "SliceThickness 5.0 outside" in reasons.explain()


def test_disabled_profile_does_not_match(chest_profile: Profile) -> None:
    disabled = chest_profile.model_copy(update={"enabled": False})
    assert "profile is disabled" in match_profiles([disabled], facts()).explain()


def test_quiet_period_override_takes_the_longest(chest_profile: Profile) -> None:
    slow = chest_profile.model_copy(update={"name": "slow", "quiet_period_seconds": 30.0})
    assert quiet_period_for(match_profiles([chest_profile, slow], facts()), 3.0) == 30.0
    assert quiet_period_for(match_profiles([chest_profile], facts()), 3.0) == 3.0


def test_invalid_profiles_report_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: bad\nmatch: {series_description: '(unclosed'}\nanalyzers: []\n")
    (tmp_path / "typo.yaml").write_text("name: typo\nmatch: {modalty: [CT]}\nanalyzers: [{name: x}]\n")
    with pytest.raises(ProfileError) as error:
        load_profiles(tmp_path)
    message = str(error.value)
    assert "bad.yaml" in message and "not a valid regular expression" in message
    assert "bad.yaml" in message and "analyzers" in message
    assert "typo.yaml" in message and "modalty" in message


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="PACS_AI_PROFILES_DIR"):
        load_profiles(tmp_path / "absent")
