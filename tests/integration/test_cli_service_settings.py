"""The CLI in another shell uses the settings ``pacs-ai serve`` was given (issue 23, item 4).

The service's record is written the way ``serve`` writes it
(:meth:`Settings.write_effective_settings`); the commands run in subprocesses
whose environment names only the data directory, as a second shell would.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pacs_ai.config import Settings
from tests.integration.test_cli import pacs_ai
from tests.peers import StoreScp

SECRET = "hunter2-not-for-the-record"


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacs-ai ARGS`` in a shell given only the data directory."""
    return pacs_ai(*args, PACS_AI_DATA_DIR=str(data_dir))


def test_cli_in_another_shell_knows_the_services_destinations(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with StoreScp(aet="PACSAITEST") as pacs:
        service = Settings(
            data_dir=data_dir,
            listen_port=11999,
            destinations={
                "pacs": {"type": "dicom", "ae_title": pacs.aet, "host": pacs.host, "port": pacs.port},
                "web": {"type": "dicomweb", "url": "http://127.0.0.1:9/dicom-web", "bearer_token": SECRET},
            },
        )
        # Before the service has run, the CLI does not know "pacs" (the failure the issue reports).
        assert _cli(data_dir, "echo", "pacs").returncode == 2
        record = service.write_effective_settings()

        assert SECRET not in record.read_text(encoding="utf-8")
        echoed = _cli(data_dir, "echo", "pacs")
        assert echoed.returncode == 0, echoed.stdout + echoed.stderr

    validated = _cli(data_dir, "profiles", "validate", "--json")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert json.loads(validated.stdout)["problems"] == []

    shown = _cli(data_dir, "config", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    settings = report["settings"]
    assert settings["listen_port"] == {"value": 11999, "from": f"running service ({record})"}
    assert settings["data_dir"]["from"] == "env PACS_AI_DATA_DIR"
    assert settings["ae_title"] == {"value": "PACS_AI", "from": "default"}
    assert set(settings["destinations"]["value"]) == {"pacs"}  # "web" needs its token, left out
    assert report["not_taken_from_service"] == ["destinations.web"]

    # This shell's own settings win over the service's; secrets are masked.
    yaml_file = tmp_path / "settings.yaml"
    yaml_file.write_text(f"listen_port: 12000\nworklist_session_secret: {SECRET}\n", encoding="utf-8")
    shown = _cli(data_dir, "--config", str(yaml_file), "config", "show")
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout
    assert f"listen_port = 12000  (YAML file {yaml_file})" in shown.stdout
    assert "worklist_session_secret = **********" in shown.stdout
