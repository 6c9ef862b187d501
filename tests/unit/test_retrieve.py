"""The pure parts of Query/Retrieve and reprocessing: identifiers, dates, C-MOVE statuses, versions."""

from __future__ import annotations

from datetime import date

import pytest
from pydicom import Dataset

from pacs_ai.encode.results import PreviousResult, versioned
from pacs_ai.peer_settings import QueryRetrievePeer
from pacs_ai.receive.retrieve import (
    MoveOutcome,
    MoveProgress,
    SeriesMatch,
    date_range,
    dicom_date,
    explain_move_status,
    move_identifier,
    move_progress,
    series_match,
    series_query,
    series_to_retrieve,
    study_match,
    study_query,
)

PEER = QueryRetrievePeer(ae_title="PACS", host="pacs.example.org", port=104)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2024-03-01", "20240301"), ("20240301", "20240301"), (date(2024, 3, 1), "20240301")],
)
def test_dicom_date_accepts_iso_and_dicom_forms(value: str | date, expected: str) -> None:
    assert dicom_date(value) == expected


@pytest.mark.parametrize("value", ["2024-02-30", "01.03.2024", "2024-3-1", ""])
def test_dicom_date_refuses_what_is_not_a_date(value: str) -> None:
    with pytest.raises(ValueError):
        dicom_date(value)


def test_date_range_open_and_closed() -> None:
    assert date_range("2024-01-01", "2024-01-31") == "20240101-20240131"
    assert date_range("2024-01-01", None) == "20240101-"
    assert date_range(None, "2024-01-31") == "-20240131"
    assert date_range(None, None) is None
    with pytest.raises(ValueError, match="starts"):
        date_range("2024-02-01", "2024-01-01")


def test_study_query_has_matching_and_return_keys() -> None:
    query = study_query(accession_number="ACC1", study_dates="20240101-", modality="CT")
    assert query.QueryRetrieveLevel == "STUDY"
    assert (query.AccessionNumber, query.StudyDate, query.ModalitiesInStudy) == ("ACC1", "20240101-", "CT")
    assert query.StudyInstanceUID == "" and query.NumberOfStudyRelatedInstances == ""


def test_series_query_and_move_identifier_name_the_study() -> None:
    query = series_query("1.2.3")
    assert (query.QueryRetrieveLevel, query.StudyInstanceUID, query.SeriesInstanceUID) == (
        "SERIES",
        "1.2.3",
        "",
    )
    identifier = move_identifier("1.2.3", "1.2.3.4")
    assert (identifier.QueryRetrieveLevel, identifier.StudyInstanceUID, identifier.SeriesInstanceUID) == (
        "SERIES",
        "1.2.3",
        "1.2.3.4",
    )


def test_matches_read_from_responses() -> None:
    response = Dataset()
    response.StudyInstanceUID = "1.2.3"
    response.AccessionNumber = ""
    response.StudyDate = "20240301"
    response.ModalitiesInStudy = ["CT", "SR"]
    response.NumberOfStudyRelatedInstances = "61"
    match = study_match(response)
    assert (match.accession_number, match.study_date, match.modalities, match.instances) == (
        None,
        "20240301",
        ("CT", "SR"),
        61,
    )
    one = Dataset()
    one.StudyInstanceUID = "1.2.3"
    one.ModalitiesInStudy = "CT"
    assert study_match(one).modalities == ("CT",)

    series = Dataset()
    series.StudyInstanceUID = "1.2.3"
    series.SeriesInstanceUID = "1.2.3.4"
    series.Modality = "CT"
    assert series_match(series).instances is None and series_match(series).modality == "CT"


def test_move_progress_and_outcome() -> None:
    status = Dataset()
    status.Status = 0xFF00
    status.NumberOfRemainingSuboperations = 10
    status.NumberOfCompletedSuboperations = 48
    status.NumberOfFailedSuboperations = 1
    status.NumberOfWarningSuboperations = 1
    progress = move_progress(status)
    assert progress == MoveProgress(remaining=10, completed=48, failed=1, warning=1) and progress.total == 60
    assert MoveOutcome(0x0000, MoveProgress(completed=59, warning=1)).ok
    assert not MoveOutcome(0xB000, MoveProgress(completed=59, failed=1)).ok
    assert not MoveOutcome(0x0000, MoveProgress(completed=59, failed=1)).ok


def test_move_failures_are_explained_with_what_to_do() -> None:
    unknown = explain_move_status(0xA801, PEER, "PACS_AI")
    assert "0xA801" in unknown and "'PACS_AI'" in unknown and "DICOM node" in unknown
    assert "pacs-ai serve" in explain_move_status(0xB000, PEER, "PACS_AI")
    assert "0xC001" in explain_move_status(0xC001, PEER, "PACS_AI")


def test_versioned_descriptions_fit_a_long_string_element() -> None:
    assert versioned("AI lung segmentation (unverified)", 1) == "AI lung segmentation (unverified)"
    assert versioned("AI lung segmentation (unverified)", 2) == "AI lung segmentation (unverified) (v2)"
    long = versioned("x" * 64, 12)
    assert len(long) == 64 and long.endswith(" (v12)")


def test_previous_result_reference_has_what_highdicom_reads() -> None:
    reference = PreviousResult("SR", "1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4").reference()
    assert (
        reference.StudyInstanceUID,
        reference.SeriesInstanceUID,
        reference.SOPClassUID,
        reference.SOPInstanceUID,
    ) == ("1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4")


def test_derived_series_and_other_modalities_are_not_retrieved() -> None:
    found = [
        SeriesMatch("1.2", "1.2.1", "CT"),
        SeriesMatch("1.2", "1.2.2", "SEG"),
        SeriesMatch("1.2", "1.2.3", "SR"),
        SeriesMatch("1.2", "1.2.4", "ct"),
        SeriesMatch("1.2", "1.2.5", "MR"),
        SeriesMatch("1.2", "1.2.6", None),
    ]
    assert [s.series_instance_uid for s in series_to_retrieve(found)] == ["1.2.1", "1.2.4", "1.2.5", "1.2.6"]
    assert [s.series_instance_uid for s in series_to_retrieve(found, "CT")] == ["1.2.1", "1.2.4"]
