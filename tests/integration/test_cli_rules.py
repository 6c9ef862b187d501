"""``pacs-ai rules validate`` and ``pacs-ai rules test``: output and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.integration.test_cli import DESTINATIONS, REPO_ROOT
from tests.integration.test_cli import pacs_ai_in_process as pacs_ai  # the verbs under test, not the process

RULES = """
rules:
  - name: chest-ct
    when:
      all:
        - {attribute: Modality, equals: CT}
        - {attribute: BodyPartExamined, in: [CHEST, THORAX]}
        - {calling_ae: [CT_SCANNER_1]}
    actions: [{process: ct-chest-lungs}, {forward_results: [pacs]}]
  - name: trial-thin-slices
    shadow: true
    when: {attribute: SliceThickness, range: {max: 1.0}}
    actions: [{forward_originals: [pacs]}]
  - name: rest
    fallback: true
    actions: [{discard: "no AI service for this series"}]
"""


def profiles_with_rules(tmp_path: Path, rules: str) -> Path:
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO_ROOT / "dicom_profiles", profiles)
    (profiles / "rules.yaml").write_text(rules, encoding="utf-8")
    return profiles


def test_rules_validate_checks_names_of_profiles_and_destinations(tmp_path: Path) -> None:
    profiles = profiles_with_rules(tmp_path, RULES)
    env = {"PACS_AI_DATA_DIR": str(tmp_path), "PACS_AI_PROFILES_DIR": str(profiles)}
    result = pacs_ai("rules", "validate", **env, PACS_AI_DESTINATIONS=DESTINATIONS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok rest (fallback)" in result.stdout

    result = pacs_ai("rules", "validate", **env)
    assert result.returncode == 1
    assert "destination 'pacs' is not configured" in result.stdout

    (profiles / "rules.yaml").write_text(RULES.replace("Modality, equals", "Modallity, equals"))
    result = pacs_ai("rules", "validate", **env, PACS_AI_DESTINATIONS=DESTINATIONS)
    assert result.returncode == 1
    assert "rules.yaml" in result.stdout and "Modallity" in result.stdout


def test_rules_test_explains_the_match_for_files(tmp_path: Path) -> None:
    phantom = write_chest_phantom(tmp_path / "ct", slices=4, size=128, pixel_spacing_mm=2.0)
    profiles = profiles_with_rules(tmp_path, RULES)
    env = {"PACS_AI_DATA_DIR": str(tmp_path), "PACS_AI_PROFILES_DIR": str(profiles)}

    result = pacs_ai("rules", "test", str(tmp_path / "ct"), "--calling-ae", "CT_SCANNER_1", "--json", **env)
    assert result.returncode == 0, result.stdout + result.stderr
    [series] = json.loads(result.stdout)
    assert series["series_instance_uid"] == phantom.series_uid
    assert series["applied"] == ["chest-ct"]
    assert "calling AE in ['CT_SCANNER_1']: yes (CT_SCANNER_1)" in "\n".join(series["explanation"])

    result = pacs_ai("rules", "test", str(phantom.paths[0]), "--calling-ae", "MR_1", **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "applies rest" in result.stdout
    assert "calling AE in ['CT_SCANNER_1']: no (MR_1)" in result.stdout


def test_rules_test_of_an_unknown_target_exits_1(tmp_path: Path) -> None:
    profiles = profiles_with_rules(tmp_path, RULES)
    env = {"PACS_AI_DATA_DIR": str(tmp_path), "PACS_AI_PROFILES_DIR": str(profiles)}
    assert pacs_ai("db", "upgrade", **env).returncode == 0
    result = pacs_ai("rules", "test", "1.2.3.4.5", **env)
    assert result.returncode == 1
    assert "neither readable DICOM nor a study in the index" in result.stdout
    result = pacs_ai("rules", "test", "x", "--rules", str(tmp_path / "none.yaml"), **env)
    assert result.returncode == 1 and "no rules file" in result.stdout
