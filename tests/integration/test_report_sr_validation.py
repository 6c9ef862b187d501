"""Draft and signed report SRs checked by dicom3tools' dciodvfy and DCMTK's dsrdump.

A synthetic chest CT is written to disk, its SEG and measurement SR are built
by the pipeline's encoders, and the draft report SR is built with all of them
as evidence and written; it is then read back from its file (as the worklist
does) and signed.  Both files must have zero "Error" lines in dciodvfy, and
dsrdump must parse them (exit 0, nothing on stderr) and show the flags,
observers, predecessor and sections.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from pacs_ai.encode import EquipmentInfo, write_dataset
from pacs_ai.encode.report_sr import (
    DraftingModel,
    ReportText,
    Verifier,
    build_draft_sr,
    build_signed_sr,
    draft_sr_uids,
    signed_sr_uids,
)
from pacs_ai.encode.results import build_results
from tests import peers
from tests.integration.synthetic_ct import load_volume, lung_labels, lung_result, make_ct_series, write_series

PREFIX = "1.2.826.0.1.3680043.8.498.77."
EQUIPMENT = EquipmentInfo(device_serial_number="TEST-0001", institution_name="Test Hospital")
DRAFTER = DraftingModel("template", "pacs-ai-template-1")


@pytest.fixture(scope="module")
def report_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("report-sr")
    volume = load_volume(write_series(make_ct_series(), out / "ct"))
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    objects = build_results(volume, result, key="job-key", equipment=EQUIPMENT, uid_prefix=PREFIX)
    series_uid, sop_uid = draft_sr_uids("study|report|job-key", 1, PREFIX)
    draft = build_draft_sr(
        evidence=[*volume.headers, *(ds for _, ds in objects)],
        text=ReportText(
            "Right lung 2400 mL, left lung 2100 mL.\n\nNo focal consolidation.",
            "No acute abnormality.",
        ),
        drafter=DRAFTER,
        equipment=EQUIPMENT,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        uid_prefix=PREFIX,
    )
    draft_path = write_dataset(draft, out / "draft.dcm", fsync=False)
    stored_draft = pydicom.dcmread(draft_path)
    signed_series, signed_sop = signed_sr_uids(str(stored_draft.SOPInstanceUID), PREFIX)
    signed = build_signed_sr(
        stored_draft,
        text=ReportText("Right lung 2400 mL, left lung 2100 mL. Edited.", "No acute abnormality."),
        drafter=DRAFTER,
        verifier=Verifier("Doe^Jane", "jdoe", "Test Hospital", datetime.now(UTC)),
        equipment=EQUIPMENT,
        series_instance_uid=signed_series,
        sop_instance_uid=signed_sop,
        uid_prefix=PREFIX,
    )
    return draft_path, write_dataset(signed, out / "signed.dcm", fsync=False)


@pytest.mark.parametrize("which", ["draft", "signed"])
def test_dciodvfy_reports_no_errors(report_files: tuple[Path, Path], which: str) -> None:
    path = report_files[0] if which == "draft" else report_files[1]
    assert peers.dciodvfy_errors(path) == []


def test_dsrdump_reads_the_draft(report_files: tuple[Path, Path]) -> None:
    result = peers.dsrdump(report_files[0])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "Enhanced SR Document" in out
    assert "Completion Flag     : PARTIAL" in out
    assert "Verification Flag   : UNVERIFIED" in out
    assert "Preliminary Flag    : PRELIMINARY" in out
    # SEPARATE: viewers show each observer context item on its own line, with its name.
    assert '<CONTAINER:(,,"Diagnostic Imaging Report")=SEPARATE>' in out
    assert '(121007,DCM,"Device")' in out and '(121006,DCM,"Person")' not in out
    # The status is in the text itself, first in the findings.
    findings = out.index('<contains CONTAINER:(,,"Findings")')
    assert out.index('<contains TEXT:(,,"Comment")="AI draft, not verified', findings) < out.index(
        '(,,"Finding")=', findings
    )
    assert '<contains CONTAINER:(,,"Findings")' in out and '<contains CONTAINER:(,,"Impressions")' in out


def test_dsrdump_reads_the_signed_version_with_its_predecessor(report_files: tuple[Path, Path]) -> None:
    result = peers.dsrdump(report_files[1], "+Pc", "+Pl")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "Completion Flag     : COMPLETE" in out
    assert "Verification Flag   : VERIFIED" in out
    assert "Preliminary Flag    : FINAL" in out
    assert "Doe^Jane, Test Hospital" in out
    assert "Predecessor Docs    : 1" in out
    assert '<has obs context PNAME:(121008,DCM,"Person Observer Name")="Doe^Jane">' in out
    assert "Edited." in out


def test_text_beyond_the_source_character_set_is_written_as_utf8(tmp_path: Path) -> None:
    """Typographic quotes and other scripts switch the report to ISO_IR 192 instead of being mangled."""
    headers = make_ct_series(n_slices=3, rows=16, columns=16)
    series_uid, sop_uid = draft_sr_uids("utf8", 1, PREFIX)
    draft = build_draft_sr(
        evidence=headers,
        text=ReportText("Kein Erguss – “unauffällig”.", "肺野清晰"),
        drafter=DRAFTER,
        equipment=EQUIPMENT,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )
    path = write_dataset(draft, tmp_path / "utf8.dcm", fsync=False)
    assert peers.dciodvfy_errors(path) == []
    stored = pydicom.dcmread(path)
    assert stored.SpecificCharacterSet == "ISO_IR 192"
    result = peers.dsrdump(path, "+U8", "+Pl")
    assert result.returncode == 0
    # +U8 because tests.peers decodes dsrdump's output as UTF-8; DCMTK 3.6.7's VR checker then says it
    # cannot check UTF-8 values: that warning is expected, anything else on stderr is a problem.
    assert [line for line in result.stderr.splitlines() if "ISO_IR 192" not in line] == []
    assert "“unauffällig”" in result.stdout and "肺野清晰" in result.stdout
