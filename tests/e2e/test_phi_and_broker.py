"""Patient identifiers stay out of logs, prompts and report text; a killed embedded Redis comes back.

PHI: a chest CT phantom whose name, patient ID, birth date and accession number
are also written into every free-text field a site might misuse
(StudyDescription, SeriesDescription, ImageComments, ...) goes through the real
``pacs-ai serve``, its profile drafting with the ``openai`` backend against
``transformers serve`` (a real OpenAI-compatible server with a tiny model built
by the test; its random answer fails the guardrails, so the template draft is
kept with the model's text as the rejected one).  None of the identifying
strings may appear in any log file, in the worklist's draft (text, rejected
model text, reason, and the evidence the worker drafted from), in the text
content of the draft SR, or in the request the openai backend sends: rebuilt
with the functions the worker calls, from the spool header and the job's
findings.  The spool file still holds them (the test reads the right data).

Broker, on the same service (one start for both, for CI's time): the study is
sent after a ``kill -9`` of the embedded redis-server, which ``serve`` must
start again for the study to be analysed and drafted at all.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml

from pacs_ai.encode.report_sr import read_report_text
from pacs_ai.report.drafters.openai_backend import OpenAIDrafter
from pacs_ai.report.evidence import HEADER_FIELDS, evidence_from_findings
from pacs_ai.report.prompts import report_prompt
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.integration.test_drafter_backends import tiny_model_dir, transformers_serve  # noqa: F401 (fixture)
from tests.peers import storescu, wait_for
from tests.service import REPO_ROOT, PacsAiService

pytestmark = pytest.mark.e2e


@pytest.fixture
def served_model(tiny_model_dir: Path) -> Iterator[tuple[str, str]]:  # noqa: F811 (the fixture imported above)
    """``transformers serve`` of the tiny random model: (its /v1 URL, the model name)."""
    with transformers_serve(tiny_model_dir) as base_url:
        yield base_url, str(tiny_model_dir)


NAME = ("Quarrington", "Zebedee")
PATIENT_ID = "MRN48151623"
BIRTH_DATE = "19580310"
ACCESSION = "ACC7721590"
#: Every string that identifies the patient, as the free-text fields carry them too.
IDENTIFIERS = (*NAME, PATIENT_ID, "48151623", BIRTH_DATE, "1958-03-10", "10.03.1958", ACCESSION)
RADIOLOGIST = ("rad1", "Radiologist^Rita", "correct horse battery")


def _identifying_study(directory: Path) -> tuple[str, list[Path]]:
    """A 40-slice chest phantom whose free-text fields name the patient; (study UID, files)."""
    truth = write_chest_phantom(
        directory,
        slices=40,
        size=256,
        pixel_spacing_mm=1.5,
        slice_spacing_mm=5.0,
        patient_id=PATIENT_ID,
        patient_name=f"{NAME[0]}^{NAME[1]}",
        accession_number=ACCESSION,
    )
    for path in truth.paths:
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = BIRTH_DATE
        ds.StudyDescription = f"CT CHEST {NAME[1]} {NAME[0]} {PATIENT_ID} DOB 1958-03-10"
        ds.SeriesDescription = f"{NAME[0]} {BIRTH_DATE} thorax"
        ds.ImageComments = f"for {NAME[1]} {NAME[0]}, born 10.03.1958, ID {PATIENT_ID}"
        ds.PatientComments = f"{NAME[0]} {PATIENT_ID}"
        ds.AdditionalPatientHistory = f"{NAME[1]} {NAME[0]} born 1958-03-10"
        ds.RequestedProcedureDescription = f"CT chest {NAME[0]} {ACCESSION}"
        ds.save_as(path)
    return truth.study_uid, list(truth.paths)


def _profiles_with_openai_drafter(directory: Path, base_url: str, model: str) -> Path:
    profile = yaml.safe_load((REPO_ROOT / "dicom_profiles" / "ct-chest-lungs.yaml").read_text())
    profile["report"] = {
        "backend": "openai",
        "params": {"base_url": base_url, "model": model, "max_tokens": 16, "max_retries": 0},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ct-chest-lungs.yaml").write_text(yaml.safe_dump(profile))
    return directory


def _found(text: str) -> list[str]:
    return [identifier for identifier in IDENTIFIERS if identifier.lower() in text.lower()]


def _sr_text_values(ds: pydicom.Dataset) -> list[str]:
    """Every text and code meaning in an SR's content tree (the report, not its patient module)."""
    values: list[str] = []
    for item in ds.get("ContentSequence", []):
        for keyword in ("TextValue", "PersonName", "UID", "DateTime"):
            if keyword in item:
                values.append(str(item.get(keyword)))
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(keyword, []):
                values.append(str(code.get("CodeMeaning", "")))
        values += _sr_text_values(item)
    return values


def _log_files(service: PacsAiService) -> dict[str, str]:
    paths = [*service.data_dir.glob("logs/*.log"), service.data_dir / "serve.stderr"]
    paths += list(service.data_dir.glob("redis/*.log"))
    return {str(path): path.read_text(errors="replace") for path in paths if path.is_file()}


def _login(service: PacsAiService) -> httpx.Client:
    username, name, password = RADIOLOGIST
    added = service.cli(
        "users",
        "add",
        username,
        "--role",
        "radiologist",
        "--name",
        name,
        "--password-stdin",
        input=password + "\n",
    )
    assert added.returncode == 0, added.stdout + added.stderr
    client = httpx.Client(base_url=service.worklist_url, timeout=30)
    assert client.post("/api/login", json={"username": username, "password": password}).status_code == 200
    return client


def _draft(client: httpx.Client, study_uid: str) -> dict[str, Any]:
    def draft() -> dict[str, Any] | None:
        response = client.get(f"/api/studies/{study_uid}")
        return response.json()["draft"] if response.status_code == 200 else None

    return wait_for(draft, timeout=240, interval=1.0, description="the AI draft in the worklist")


def _kill_the_embedded_redis_and_wait_for_its_restart(service: PacsAiService) -> None:
    pidfile = service.data_dir / "redis" / "redis.pid"
    killed = int(pidfile.read_text())
    os.kill(killed, signal.SIGKILL)

    def restarted() -> int | None:
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            return None
        return pid if pid != killed and Path(f"/proc/{pid}").exists() else None

    wait_for(restarted, timeout=30, interval=0.2, description="serve to start redis-server again")
    assert f"embedded redis-server (pid {killed}) exited" in service.log_path.read_text()


def test_after_a_broker_restart_no_identifier_reaches_a_log_a_prompt_or_a_draft(
    service_factory: Any,
    served_model: tuple[str, str],
    tmp_path: Path,
) -> None:
    base_url, model = served_model
    study_uid, paths = _identifying_study(tmp_path / "study")
    service: PacsAiService = service_factory(
        profiles_dir=_profiles_with_openai_drafter(tmp_path / "profiles", base_url, model),
    )
    client = _login(service)
    _kill_the_embedded_redis_and_wait_for_its_restart(service)
    # Sent after the broker's restart: the study must still be analysed and drafted.
    sent = storescu("127.0.0.1", service.port, service.ae_title, paths, calling_aet="CT_SCANNER")
    assert sent.returncode == 0, sent.stderr

    draft = _draft(client, study_uid)
    # The openai backend was asked (the tiny model's answer fails the guardrails: template kept).
    assert draft["guardrail"]["requested_backend"] == "openai" and draft["backend"] == "template", draft
    logs = _log_files(service)
    # The worker did send its prompt to the server (httpx logs each request at INFO).
    assert any("/v1/chat/completions" in text and "200 OK" in text for text in logs.values())

    # The files received still carry the identifiers: what follows looks for something that is there.
    stored = Path(service.query("SELECT path FROM instances ORDER BY id LIMIT 1")[0][0])  # a storage key
    [spooled] = [p for p in service.data_dir.rglob(stored.name) if p.parts[-3:] == stored.parts[-3:]]
    header = pydicom.dcmread(spooled, stop_before_pixels=True)
    assert _found(str(header.StudyDescription) + str(header.SeriesDescription) + str(header.ImageComments))

    assert {name: _found(text) for name, text in logs.items() if _found(text)} == {}
    assert _found(json.dumps(draft)) == []

    # The prompt the worker sends, rebuilt with the functions it calls, from the same header and findings.
    [findings] = [
        json.loads(row[0]) for row in service.query("SELECT findings FROM jobs WHERE findings IS NOT NULL")
    ]
    evidence = evidence_from_findings(header, findings, header_fields=HEADER_FIELDS)
    drafter = OpenAIDrafter.from_params({"base_url": base_url, "model": model})
    body = json.dumps(drafter.request_body(report_prompt(evidence)))
    # The birth date gives the age band, in words; the date itself is not there.
    assert "Examination: CT, CHEST" in body and "age band sixties" in body
    assert _found(body) == []

    # The draft SR's report text.
    results = [pydicom.dcmread(p) for p in service.data_dir.rglob("*.dcm") if "results" in p.parts]
    [sr] = [ds for ds in results if ds.SOPInstanceUID == draft["draft_sr_uid"]]
    report = read_report_text(sr)
    assert report.findings and _found(report.findings + report.impression) == []
    assert _found(" ".join(_sr_text_values(sr))) == []
