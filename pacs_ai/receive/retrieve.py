"""Getting studies back from a PACS: C-FIND to learn what it holds, C-MOVE to have it sent to pacs-ai.

pacs-ai is the Query/Retrieve *SCU* here (Study Root information model,
DICOM PS3.4 Annex C).  A C-MOVE asks the PACS to send a series to a *move
destination*, an AE title the PACS maps to a host and port in its own list
of DICOM nodes.  That destination is pacs-ai's own listener, so the PACS must
know it: declare pacs-ai there under its ``ae_title`` (or the title set as
``move_destination``) with the listener's host and port.  The PACS then opens
its own association to the listener and C-STOREs the instances, which take
the normal durable receive path: every instance is in the spool and the
index before the listener answers Success, so when the PACS reports the
C-MOVE complete without failures, every moved instance is safely in pacs-ai.

C-GET (instances returned on the querying association, no node entry in the
PACS needed) is not implemented: it would make the command-line process a
second receiver beside the listener.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date

from pydicom import Dataset
from pynetdicom import AE, Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_ai.dispatch.associate import request_association
from pacs_ai.dispatch.cstore import tls_context
from pacs_ai.peer_settings import QueryRetrievePeer

#: Modalities of derived objects, which pacs-ai neither analyses nor needs to fetch back: among
#: them its own earlier results (SEG, SR), key object selections and presentation states.
DERIVED_MODALITIES = frozenset({"SEG", "SR", "KO", "PR", "REG", "RTSTRUCT", "DOC"})

_PENDING = frozenset({0xFF00, 0xFF01})
_DICOM_DATE = re.compile(r"^\d{8}$")


class RetrieveError(Exception):
    """The PACS could not be queried or did not send what was asked for; the message says why."""


@dataclass(frozen=True)
class StudyMatch:
    """A study the PACS holds, as its C-FIND response describes it."""

    study_instance_uid: str
    accession_number: str | None = None
    study_date: str | None = None
    modalities: tuple[str, ...] = ()
    instances: int | None = None


@dataclass(frozen=True)
class SeriesMatch:
    """A series the PACS holds."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str | None = None
    series_description: str | None = None
    instances: int | None = None


@dataclass(frozen=True)
class MoveProgress:
    """C-MOVE sub-operation counts, from a pending (or the final) response."""

    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0

    @property
    def total(self) -> int:
        return self.remaining + self.completed + self.failed + self.warning


@dataclass(frozen=True)
class MoveOutcome:
    """How a C-MOVE ended: its final status, the counts, and the instances the PACS failed to send."""

    status: int
    progress: MoveProgress
    failed_sop_instance_uids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every sub-operation succeeded (warnings count: the destination stored the instance)."""
        return self.status == 0x0000 and self.progress.failed == 0


def dicom_date(value: date | str) -> str:
    """A DICOM DA value (YYYYMMDD) from a date or from ``YYYY-MM-DD`` / ``YYYYMMDD`` text."""
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    text = value.strip().replace("-", "")
    if not _DICOM_DATE.match(text):
        raise ValueError(f"{value!r} is not a date (give YYYY-MM-DD or YYYYMMDD)")
    date(int(text[:4]), int(text[4:6]), int(text[6:]))  # raises ValueError for 2024-02-30
    return text


def date_range(start: date | str | None, end: date | str | None) -> str | None:
    """A DICOM date range matching key (PS3.4 C.2.2.2.5): ``A-B``, ``A-`` or ``-B``; None for no limit."""
    if start is None and end is None:
        return None
    first = dicom_date(start) if start is not None else ""
    last = dicom_date(end) if end is not None else ""
    if first and last and first > last:
        raise ValueError(f"the range starts ({first}) after it ends ({last})")
    return f"{first}-{last}"


def study_query(
    *,
    study_uid: str | None = None,
    accession_number: str | None = None,
    study_dates: str | None = None,
    modality: str | None = None,
) -> Dataset:
    """The C-FIND identifier of a STUDY-level query; empty elements are return keys."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid or ""
    query.AccessionNumber = accession_number or ""
    query.StudyDate = study_dates or ""
    # Matching on Modalities in Study is optional for a PACS; the caller filters series again.
    query.ModalitiesInStudy = modality or ""
    query.NumberOfStudyRelatedInstances = ""
    return query


def series_query(study_uid: str) -> Dataset:
    """The C-FIND identifier of a SERIES-level query for every series of one study."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SeriesDescription = ""
    query.NumberOfSeriesRelatedInstances = ""
    return query


def move_identifier(study_uid: str, series_uid: str) -> Dataset:
    """The C-MOVE identifier of one series (Study Root: the study's UID is a required unique key)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = series_uid
    return identifier


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    return None if value in (None, "") else str(value).strip() or None


def _count(dataset: Dataset, keyword: str) -> int | None:
    value = dataset.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def study_match(identifier: Dataset) -> StudyMatch:
    modalities = identifier.get("ModalitiesInStudy") or []
    if isinstance(modalities, str):
        modalities = [modalities]
    return StudyMatch(
        study_instance_uid=str(identifier.StudyInstanceUID),
        accession_number=_text(identifier, "AccessionNumber"),
        study_date=_text(identifier, "StudyDate"),
        modalities=tuple(str(m) for m in modalities if m),
        instances=_count(identifier, "NumberOfStudyRelatedInstances"),
    )


def series_match(identifier: Dataset) -> SeriesMatch:
    return SeriesMatch(
        study_instance_uid=str(identifier.StudyInstanceUID),
        series_instance_uid=str(identifier.SeriesInstanceUID),
        modality=_text(identifier, "Modality"),
        series_description=_text(identifier, "SeriesDescription"),
        instances=_count(identifier, "NumberOfSeriesRelatedInstances"),
    )


def series_to_retrieve(series: list[SeriesMatch], modality: str | None = None) -> list[SeriesMatch]:
    """The series of a study worth retrieving for analysis: no derived objects, only ``modality`` if given."""
    wanted = modality.upper() if modality else None
    return [
        match
        for match in series
        if (match.modality or "").upper() not in DERIVED_MODALITIES
        and (wanted is None or (match.modality or "").upper() == wanted)
    ]


def move_progress(status: Dataset) -> MoveProgress:
    """The sub-operation counts of a C-MOVE response (absent counts are 0)."""
    return MoveProgress(
        remaining=_count(status, "NumberOfRemainingSuboperations") or 0,
        completed=_count(status, "NumberOfCompletedSuboperations") or 0,
        failed=_count(status, "NumberOfFailedSuboperations") or 0,
        warning=_count(status, "NumberOfWarningSuboperations") or 0,
    )


def explain_move_status(status: int, peer: QueryRetrievePeer, destination: str) -> str:
    """What a C-MOVE failure status means, with what to do about it."""
    if status == 0xA801:
        return (
            f"{peer.ae_title} does not know the move destination {destination!r} (status 0xA801): declare "
            f"pacs-ai's listener in the PACS as a DICOM node with AE title {destination!r}, its host and port"
        )
    if status == 0xA701 or status == 0xA702:
        return f"{peer.ae_title} is out of resources (status 0x{status:04X})"
    if status == 0xB000:
        return (
            f"{peer.ae_title} could not send some instances (status 0xB000): is `pacs-ai serve` running, "
            "and does the PACS have the right host and port for it?"
        )
    if status == 0xFE00:
        return "the retrieval was cancelled (status 0xFE00)"
    if status == 0xA900 or (status & 0xF000) == 0xC000:
        return f"{peer.ae_title} could not process the request (status 0x{status:04X})"
    return f"{peer.ae_title} answered status 0x{status:04X}"


class QueryRetrieveClient:
    """C-FIND and C-MOVE against one :class:`QueryRetrievePeer`, one association per request."""

    def __init__(self, peer: QueryRetrievePeer, *, calling_ae_title: str) -> None:
        self.peer = peer
        self.calling_ae_title = calling_ae_title

    @contextmanager
    def _association(self, sop_class: str) -> Iterator[Association]:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.peer.timeout_seconds
        ae.add_requested_context(sop_class)
        tls_args = None
        if self.peer.tls is not None:
            try:
                tls_args = (tls_context(self.peer.tls), self.peer.tls.server_hostname or self.peer.host)
            except (OSError, ssl.SSLError) as exc:
                raise RetrieveError(f"TLS settings of {self.peer.describe()} cannot be used: {exc}") from exc
        requested = request_association(ae, self.peer.host, self.peer.port, self.peer.ae_title, tls_args)
        assoc = requested.association
        refusal = requested.refusal()
        if refusal is not None:
            raise RetrieveError(
                f"{self.peer.describe()} {refusal} (does the PACS allow queries and retrievals from AE "
                f"title {self.calling_ae_title!r}?)"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _find(self, query: Dataset) -> list[Dataset]:
        matches: list[Dataset] = []
        with self._association(StudyRootQueryRetrieveInformationModelFind) as assoc:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    raise RetrieveError(f"no C-FIND response from {self.peer.describe()} (timeout or abort)")
                if code in _PENDING:
                    if identifier is not None:
                        matches.append(identifier)
                    continue
                if code != 0x0000:
                    raise RetrieveError(f"C-FIND on {self.peer.describe()} failed with status 0x{code:04X}")
        return matches

    def find_studies(
        self,
        *,
        study_uid: str | None = None,
        accession_number: str | None = None,
        study_dates: str | None = None,
        modality: str | None = None,
    ) -> list[StudyMatch]:
        """Studies matching every given key (at least one should be given)."""
        query = study_query(
            study_uid=study_uid, accession_number=accession_number, study_dates=study_dates, modality=modality
        )
        return [study_match(found) for found in self._find(query) if "StudyInstanceUID" in found]

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        """Every series of a study."""
        return [
            series_match(identifier)
            for identifier in self._find(series_query(study_uid))
            if "SeriesInstanceUID" in identifier
        ]

    def move_series(
        self,
        study_uid: str,
        series_uid: str,
        *,
        destination: str,
        on_progress: Callable[[MoveProgress], None] | None = None,
    ) -> MoveOutcome:
        """Have the PACS send one series to ``destination``; returns when the PACS says it is done.

        ``on_progress`` is called with each pending response's counts.  The
        outcome's :attr:`MoveOutcome.ok` tells whether everything arrived.
        """
        identifier = move_identifier(study_uid, series_uid)
        last = MoveProgress()
        with self._association(StudyRootQueryRetrieveInformationModelMove) as assoc:
            for status, response in assoc.send_c_move(
                identifier, destination, StudyRootQueryRetrieveInformationModelMove
            ):
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    raise RetrieveError(
                        f"no C-MOVE response from {self.peer.describe()} (timeout or abort) while retrieving "
                        f"series {series_uid}"
                    )
                progress = move_progress(status)
                if code in _PENDING:
                    last = progress
                    if on_progress is not None:
                        on_progress(progress)
                    continue
                # Some PACS leave the counts out of the final response; keep the last pending ones then.
                final = (
                    progress
                    if progress.total
                    else MoveProgress(
                        completed=last.completed + last.remaining if code == 0x0000 else last.completed,
                        failed=last.failed,
                        warning=last.warning,
                    )
                )
                failed_list = response.get("FailedSOPInstanceUIDList") if response is not None else None
                if isinstance(failed_list, str):
                    failed_list = [failed_list]
                outcome = MoveOutcome(code, final, [str(uid) for uid in failed_list or [] if uid])
                if on_progress is not None:
                    on_progress(final)
                return outcome
        raise RetrieveError(f"{self.peer.describe()} ended the C-MOVE of {series_uid} without a final status")
