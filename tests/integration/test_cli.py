"""The pacs-ai command line: output and exit codes of verbs that need no running service."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pacs_ai.cli.main import app

REPO_ROOT = Path(__file__).resolve().parents[2]
DESTINATIONS = json.dumps({"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}})


def pacs_ai(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pacs_ai.cli.main", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )


def pacs_ai_in_process(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pacs-ai ARGS`` in this process, with only ``env``'s settings: what :func:`pacs_ai` gives.

    For tests of what a verb does and prints rather than of the process (each ``pacs_ai`` run costs
    an interpreter's start-up, seconds of CPU).  An exception the CLI does not turn into an exit
    code fails the test with its traceback.
    """
    environment: dict[str, str | None] = {name: None for name in os.environ if name.startswith("PACS_AI_")}
    with contextlib.chdir(REPO_ROOT):  # where pacs_ai runs the process
        result = CliRunner().invoke(app, list(args), env={**environment, **env})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["pacs-ai", *args], result.exit_code, result.stdout, result.stderr)


def test_profiles_validate_passes_with_destinations_configured(tmp_path: Path) -> None:
    result = pacs_ai_in_process(
        "profiles", "validate", "--json", PACS_AI_DATA_DIR=str(tmp_path), PACS_AI_DESTINATIONS=DESTINATIONS
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["profiles"] == ["ct-chest-lungs"]


def test_profiles_validate_reports_unconfigured_destination_and_bad_files(tmp_path: Path) -> None:
    result = pacs_ai_in_process("profiles", "validate", PACS_AI_DATA_DIR=str(tmp_path))
    assert result.returncode == 1
    assert "destination 'pacs' is not configured" in result.stdout

    broken = tmp_path / "profiles"
    broken.mkdir()
    (broken / "oops.yaml").write_text("name: oops\nmatch: {modality: CT}\nanalyzers: [{name: no-such}]\n")
    result = pacs_ai_in_process("profiles", "validate", str(broken), "--json", PACS_AI_DATA_DIR=str(tmp_path))
    assert result.returncode == 1
    problems = json.loads(result.stdout)["problems"]
    assert any("oops.yaml" in problem and "modality" in problem for problem in problems)


def test_status_without_an_index_exits_1_with_advice(tmp_path: Path) -> None:
    result = pacs_ai("status", "--json", PACS_AI_DATA_DIR=str(tmp_path / "fresh"))
    assert result.returncode == 1
    assert "pacs-ai serve" in result.stdout
    assert not (tmp_path / "fresh").exists(), "a read-only verb must not create the data directory"


def test_listing_verbs_on_an_empty_index(tmp_path: Path) -> None:
    """In this process: the verbs are under test here, the process around them in the tests above."""
    assert pacs_ai_in_process("db", "upgrade", PACS_AI_DATA_DIR=str(tmp_path)).returncode == 0
    for verb in (("studies", "list"), ("jobs", "list", "--state", "failed")):
        result = pacs_ai_in_process(*verb, "--json", PACS_AI_DATA_DIR=str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []
    status = json.loads(pacs_ai_in_process("status", "--json", PACS_AI_DATA_DIR=str(tmp_path)).stdout)
    assert status["service"] is None and status["index"] == {"studies": 0, "series": 0, "instances": 0}


def test_unknown_verb_is_a_usage_error(tmp_path: Path) -> None:
    assert pacs_ai("frobnicate", PACS_AI_DATA_DIR=str(tmp_path)).returncode == 2
