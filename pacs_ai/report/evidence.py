"""Evidence: the structured record of what is known about a study, which every draft must stay within.

It is built from what the pipeline already has: an allow-list of header facts
of the study (:data:`HEADER_FIELDS`: modality, body part, procedure code, age
band, sex; the ``report_header_fields`` setting may shorten it) and the findings JSON
the job runner stores on each succeeded job
(:func:`pacs_ai.jobs.run._findings`: algorithm, segments, measurements with
UCUM units, classification findings with probability, threshold and present,
a detector's boxes, each a present finding with its score, size and site, and
the classes a detector found none of where the profile asks to say so),
plus a prior report's text where one is supplied.

No identifier (name, patient ID, birth date or any date, accession number) and
no free text of the headers (StudyDescription, SeriesDescription, a code's
meaning: sites put names and IDs there) enters the evidence: drafters, and the
prompts built from it, whatever the backend, need none, and what is not there
cannot leak into a prompt, a draft or a log line.  Each allowed value must
also look like what DICOM defines for it (a code string, a code value), or it
is left out.

:func:`evidence_from_findings_text` builds evidence from a findings section
instead (the findings-to-impression task): its finding terms, negations, sides
and numbers become the facts an impression must agree with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from pydicom import Dataset

from pacs_ai.report.text import find_mentions, find_numbers, side_in_name
from pacs_ai.report.vocabulary import term_for_name, term_patterns


class EvidenceError(ValueError):
    """The job findings cannot be read as evidence (wrong shape, missing values)."""


#: The header facts a drafter may see, in the order they are written (``report_header_fields``).
HEADER_FIELDS = ("modality", "body_part", "procedure_code", "age_band", "sex")

#: A DICOM code string (CS: upper-case letters, digits, space, underscore; 16 at most).
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
#: A code value and its coding scheme designator (SH), restricted to what codes use.
_CODE_PART = re.compile(r"[A-Za-z0-9._:-]{1,16}")
#: (upper age limit in whole years, band) in ascending order; from 90 up one band (HIPAA's limit).
_AGE_BANDS = (
    (1, "infant"),
    (12, "child"),
    (18, "adolescent"),
    (30, "young adult"),
    (40, "thirties"),
    (50, "forties"),
    (60, "fifties"),
    (70, "sixties"),
    (80, "seventies"),
    (90, "eighties"),
)
_OLDEST_BAND = "ninety or older"


@dataclass(frozen=True)
class StudyContext:
    """DICOM context of the study a drafter may see: what kind of examination, and age band and sex.

    Only the allow-listed facts of :data:`HEADER_FIELDS`, never free text:
    the bands are words, so no age, date or number of the patient reaches a draft.
    """

    modality: str | None = None
    body_part: str | None = None
    #: "CODEVALUE (SCHEME)" of the study's procedure code, e.g. "24627-2 (LN)"; never its meaning.
    procedure_code: str | None = None
    #: Age band in words (:func:`age_band`), e.g. "sixties".
    age_band: str | None = None
    #: "M", "F" or "O" as in DICOM.
    patient_sex: str | None = None

    @property
    def patient_age_years(self) -> int | None:
        """Always None: the exact age is withheld, only :attr:`age_band` is known (read by the guardrails)."""
        return None


@dataclass(frozen=True)
class Measurement:
    """One measured value with its UCUM unit and the site it was measured on."""

    name: str
    value: float
    #: UCUM code as the analyzer recorded it ("mL", "[hnsf'U]", "%").
    unit: str
    site: str | None = None
    code: str | None = None
    derivation: str | None = None
    segment_number: int | None = None
    algorithm: str | None = None

    @property
    def side(self) -> str | None:
        """ "left", "right", "both" (a site named for both sides, or the lungs as a whole) or None."""
        side = side_in_name(self.site)
        if side is None and self.site and self.site.strip().lower() in ("lung", "lungs", "both lungs"):
            return "both"
        return side


@dataclass(frozen=True)
class Finding:
    """A finding the evidence speaks about: present or absent, with probability where a model gave one."""

    name: str
    present: bool
    probability: float | None = None
    threshold: float | None = None
    site: str | None = None
    code: str | None = None
    algorithm: str | None = None
    #: "classification" (a probability for the whole study) or "detection" (one located box of a
    #: detector, e.g. one nodule; absent = the detector found none and the profile asked to say so).
    kind: str = "classification"
    #: A detection's size: the largest extent of its box, in mm.
    size_mm: float | None = None
    #: What produced a detection, as drafts name it (the model's title, no version number).
    model: str | None = None

    @property
    def term(self) -> str:
        """The vocabulary term of the finding (see :func:`pacs_ai.report.vocabulary.term_for_name`)."""
        return term_for_name(self.name)

    @property
    def side(self) -> str | None:
        """Side from the site, else from the finding's own name ("Left pneumothorax"); None if unsided."""
        return side_in_name(self.site) or side_in_name(self.name)


@dataclass(frozen=True)
class Segment:
    """A segment of a DICOM SEG the analyzers produced."""

    number: int
    label: str
    type: str | None = None
    algorithm: str | None = None


@dataclass(frozen=True)
class Evidence:
    """Everything a draft may state (:func:`evidence_from_findings`, :func:`evidence_from_findings_text`)."""

    context: StudyContext = field(default_factory=StudyContext)
    measurements: tuple[Measurement, ...] = ()
    findings: tuple[Finding, ...] = ()
    segments: tuple[Segment, ...] = ()
    #: "name version" of each analyzer whose results are included.
    algorithms: tuple[str, ...] = ()
    #: How many analyzer results (succeeded jobs) the evidence was read from, found something or not:
    #: a draft of a study whose analyzers ran and reported nothing says so instead of saying none ran.
    analyzers: int = 0
    prior_report: str | None = None
    #: Where the evidence came from: "analyzers" or "findings text".
    source: str = "analyzers"
    #: The findings section itself when the evidence was read from one (the guardrails compare with it).
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored with a draft so a reader can see what it was checked against."""
        return asdict(self)


def _text(header: Dataset | None, keyword: str) -> str | None:
    if header is None:
        return None
    value = header.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _dicom_date(value: str | None) -> date | None:
    if not value or not re.fullmatch(r"\d{8}", value):
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None


def patient_age_years(header: Dataset | None) -> int | None:
    """Whole years: PatientAge ("045Y"; months, weeks, days count as 0), else birth date to study date."""
    age = _text(header, "PatientAge")
    if age:
        match = re.fullmatch(r"(\d{3})([DWMY])", age)
        if match:
            return int(match.group(1)) if match.group(2) == "Y" else 0
    born, studied = _dicom_date(_text(header, "PatientBirthDate")), _dicom_date(_text(header, "StudyDate"))
    if born and studied and studied >= born:
        return studied.year - born.year - ((studied.month, studied.day) < (born.month, born.day))
    return None


def age_band(years: int | None) -> str | None:
    """The band of an age in whole years, in words ("infant", "child", ..., "sixties", "ninety or older")."""
    if years is None or years < 0:
        return None
    for limit, band in _AGE_BANDS:
        if years < limit:
            return band
    return _OLDEST_BAND


def _code_string(header: Dataset | None, keyword: str) -> str | None:
    text = _text(header, keyword)
    return text if text and _CODE_STRING.fullmatch(text) else None


def procedure_code(header: Dataset | None) -> str | None:
    """ "VALUE (SCHEME)" of the first Procedure Code Sequence item, else of the Requested Procedure Code's.

    The code meaning is left out: it is free text a site may write anything into.
    """
    for keyword in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        items = header.get(keyword) if header is not None else None
        if not items:
            continue
        value, scheme = _text(items[0], "CodeValue"), _text(items[0], "CodingSchemeDesignator")
        if value and scheme and _CODE_PART.fullmatch(value) and _CODE_PART.fullmatch(scheme):
            return f"{value} ({scheme})"
    return None


def study_context(header: Dataset | None, fields: Sequence[str] = HEADER_FIELDS) -> StudyContext:
    """The :class:`StudyContext` of a study from one of its datasets: only the header ``fields`` allowed.

    ``fields``: names of :data:`HEADER_FIELDS` (the ``report_header_fields``
    setting); any other name is an error, so a typo does not pass silently.
    """
    unknown = sorted(set(fields) - set(HEADER_FIELDS))
    if unknown:
        raise ValueError(f"unknown report header field(s) {unknown}; allowed: {', '.join(HEADER_FIELDS)}")
    sex = _text(header, "PatientSex")
    return StudyContext(
        modality=_code_string(header, "Modality") if "modality" in fields else None,
        body_part=_code_string(header, "BodyPartExamined") if "body_part" in fields else None,
        procedure_code=procedure_code(header) if "procedure_code" in fields else None,
        age_band=age_band(patient_age_years(header)) if "age_band" in fields else None,
        patient_sex=sex.upper() if "sex" in fields and sex and sex.upper() in ("M", "F", "O") else None,
    )


def _require(item: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in item or item[key] is None:
        raise EvidenceError(f"{where} has no {key!r}: {dict(item)!r}")
    return item[key]


def _number(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise EvidenceError(f"{where} is not a number: {value!r}") from exc
    if number != number or number in (float("inf"), float("-inf")):
        raise EvidenceError(f"{where} is not a finite number: {value!r}")
    return number


def _code_value(item: Mapping[str, Any]) -> str | None:
    code = item.get("code")
    return str(code.get("value")) if isinstance(code, Mapping) and code.get("value") is not None else None


def evidence_from_findings(
    header: Dataset | None,
    job_findings: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    prior_report: str | None = None,
    header_fields: Sequence[str] = HEADER_FIELDS,
) -> Evidence:
    """Evidence of a study from its headers and the findings JSON of its succeeded jobs.

    ``header``: any dataset of the study (read without pixel data is fine), or
    None when only results are known; only its ``header_fields`` are read
    (:func:`study_context`).  ``job_findings``: the ``Job.findings``
    value of one job, or a sequence of them (one per analyzer that ran on the
    study).  Raises :class:`EvidenceError` naming the malformed entry.
    """
    jobs = [job_findings] if isinstance(job_findings, Mapping) else list(job_findings)
    measurements: list[Measurement] = []
    findings: list[Finding] = []
    segments: list[Segment] = []
    algorithms: list[str] = []
    for index, job in enumerate(jobs):
        if not isinstance(job, Mapping):
            raise EvidenceError(f"job findings #{index} is a {type(job).__name__}, not a mapping")
        algorithm_info = job.get("algorithm") or {}
        algorithm = (
            " ".join(
                str(part) for part in (algorithm_info.get("name"), algorithm_info.get("version")) if part
            )
            or None
        )
        if algorithm:
            algorithms.append(algorithm)
        for item in job.get("segments") or []:
            where = f"segment of {algorithm or 'job #' + str(index)}"
            kind = item.get("type")
            segments.append(
                Segment(
                    number=int(_require(item, "number", where)),
                    label=str(_require(item, "label", where)),
                    type=str(kind.get("meaning"))
                    if isinstance(kind, Mapping) and kind.get("meaning")
                    else None,
                    algorithm=algorithm,
                )
            )
        for item in job.get("measurements") or []:
            where = f"measurement {item.get('name')!r} of {algorithm or 'job #' + str(index)}"
            measurements.append(
                Measurement(
                    name=str(_require(item, "name", where)),
                    value=_number(_require(item, "value", where), where),
                    unit=str(_require(item, "unit", where)),
                    site=item.get("finding_site"),
                    code=_code_value(item),
                    derivation=item.get("derivation"),
                    segment_number=item.get("segment_number"),
                    algorithm=algorithm,
                )
            )
        for item in job.get("findings") or []:
            where = f"finding {item.get('finding')!r} of {algorithm or 'job #' + str(index)}"
            probability = item.get("probability")
            threshold = item.get("threshold")
            probability = None if probability is None else _number(probability, where + " probability")
            threshold = None if threshold is None else _number(threshold, where + " threshold")
            present = item.get("present")
            if present is None:
                if probability is None or threshold is None:
                    raise EvidenceError(f"{where} has neither 'present' nor probability and threshold")
                present = probability >= threshold
            findings.append(
                Finding(
                    name=str(_require(item, "finding", where)),
                    present=bool(present),
                    probability=probability,
                    threshold=threshold,
                    site=item.get("finding_site"),
                    code=_code_value(item),
                    algorithm=algorithm,
                )
            )
        findings += _detections(job, algorithm, index)
    prior = prior_report.strip() if prior_report and prior_report.strip() else None
    return Evidence(
        context=study_context(header, header_fields),
        measurements=tuple(measurements),
        findings=tuple(findings),
        segments=tuple(segments),
        algorithms=tuple(algorithms),
        analyzers=len(jobs),
        prior_report=prior,
    )


def _detections(job: Mapping[str, Any], algorithm: str | None, index: int) -> list[Finding]:
    """A detector's boxes as present findings (one per box, with its size and site), or its classes
    as absent ones where it found none and the profile asked to report that (``not_detected``)."""
    model = str(job.get("title") or (job.get("algorithm") or {}).get("name") or "") or None
    found = []
    for item in job.get("detections") or []:
        where = f"detection {item.get('finding')!r} of {algorithm or 'job #' + str(index)}"
        threshold = item.get("threshold")
        found.append(
            Finding(
                name=str(_require(item, "finding", where)),
                present=True,
                probability=_number(_require(item, "score", where), where + " score"),
                threshold=None if threshold is None else _number(threshold, where + " threshold"),
                site=item.get("location") or item.get("finding_site"),
                code=_code_value(item),
                algorithm=algorithm,
                kind="detection",
                size_mm=_number(_require(item, "diameter_mm", where), where + " size"),
                model=model,
            )
        )
    for item in job.get("not_detected") or []:
        where = f"class not detected by {algorithm or 'job #' + str(index)}"
        found.append(
            Finding(
                name=str(_require(item, "finding", where)),
                present=False,
                code=_code_value(item),
                algorithm=algorithm,
                kind="detection",
                model=model,
            )
        )
    return found


def evidence_from_findings_text(findings_text: str, context: StudyContext | None = None) -> Evidence:
    """Evidence from a findings section: its terms (present unless every mention is negated), sides, numbers.

    A term mentioned both negated and asserted counts as present; its sides are
    the sides of its asserted mentions, or open when one of them has no side.
    Numbers with units become measurements (named by their sentence), so an
    impression may repeat them.
    """
    by_term: dict[str, list[Any]] = {}
    for mention in find_mentions(findings_text, term_patterns()):
        by_term.setdefault(mention.term, []).append(mention)
    findings = []
    for term, mentions in by_term.items():
        asserted = [m for m in mentions if not m.negated]
        sides = {m.side for m in asserted}
        side = None
        # An asserted mention without a side leaves the side open (its side word may be further away).
        if sides and None not in sides:
            side = "both" if "both" in sides or sides == {"left", "right"} else sides.pop()
        findings.append(Finding(name=term, present=bool(asserted), site=f"{side} side" if side else None))
    measurements = [
        Measurement(name=number.sentence, value=number.value, unit=number.unit, site=number.side)
        for number in find_numbers(findings_text)
        if number.unit is not None
    ]
    return Evidence(
        context=context or StudyContext(),
        measurements=tuple(measurements),
        findings=tuple(findings),
        source="findings text",
        text=findings_text,
    )
