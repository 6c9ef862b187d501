"""Drafting a study's report in the running pipeline: when, from which jobs, with which drafter.

When the analysis task of a job ends (succeeded, failed, given up), the worker
asks :meth:`ReportPipeline.study_to_draft` whether the study is now due for a
draft, and if so queues the draft task, which calls
:meth:`ReportPipeline.draft_study`.  A study is due when

* none of its jobs is still waiting or running (QUEUED, RUNNING, HELD): the
  job that finishes last triggers the draft, so one draft covers every
  analysis of the study;
* it has *report jobs*: per series, profile and analyzer, the newest SUCCEEDED
  version (a failed reprocess leaves the earlier results standing; forwarding
  jobs carry no findings and do not count);
* the profile of one of those jobs drafts reports (:attr:`Profile.report`,
  the ``template`` backend unless the profile says otherwise or ``report: false``);
* no draft of the study was written from exactly this set of jobs yet.

The last condition makes drafting idempotent: a redelivered or duplicated
draft message finds its draft written and does nothing, while a new job
version (late instances, ``pacs-ai reprocess``) makes a new set, hence a new
draft version, which supersedes the open one
(:func:`pacs_ai.report.records.create_draft_record`).  Concurrent draft tasks
of one study are serialised on the study row (and by SQLite's write lock), and
the condition is checked again in the transaction that records the draft.

The drafting itself (a language model may take a while) runs outside any
database transaction.  The report settings are read from the profiles as they
are when the study is drafted; a job whose profile no longer exists counts as
one with the default (``template``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import __version__, metrics
from pacs_ai.analyze.registry import get_analyzer
from pacs_ai.config import Settings, revealed
from pacs_ai.dispatch.delivery import lease_expiry
from pacs_ai.encode.report_sr import DraftingModel, ReportText
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Delivery, Instance, Job, JobState, Series, Study
from pacs_ai.index.reports import ReportDraft
from pacs_ai.report.draft import Draft, draft_report
from pacs_ai.report.drafters import Drafter, DrafterConfig, DrafterConfigError, get_drafter
from pacs_ai.report.drafters.openai_backend import OpenAIDrafter
from pacs_ai.report.evidence import Evidence, evidence_from_findings
from pacs_ai.report.images import render_key_images
from pacs_ai.report.records import create_draft_record
from pacs_ai.route.profile_set import ProfileSet
from pacs_ai.route.profiles import Profile, ProfileError
from pacs_ai.storage.files import HostFiles

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["DraftOutcome", "ReportPipeline", "TEMPLATE_MODEL_ID", "report_jobs", "unfinished_jobs"]

log = logging.getLogger(__name__)

#: The "model" of template drafts in the SR and the index: the pacs-ai release that wrote them.
TEMPLATE_MODEL_ID = f"pacs-ai {__version__}"
#: The analyzer of routing's forwarding jobs (``pacs_ai.route.assembly.FORWARD_ANALYZER``): no findings.
_FORWARD_ANALYZER = "forward"
_WAITING = (JobState.QUEUED, JobState.RUNNING, JobState.HELD)


@dataclass(frozen=True)
class DraftOutcome:
    """What :meth:`ReportPipeline.draft_study` did."""

    #: "drafted" or "skipped".
    status: str
    study_uid: str | None = None
    #: Why nothing was drafted (skipped), or a summary of the draft.
    detail: str = ""
    draft_id: int | None = None
    version: int | None = None
    sr_instance_uid: str | None = None
    #: Deliveries of the draft SR, leased to the caller, who queues them.
    delivery_ids: list[int] = field(default_factory=list)


def unfinished_jobs(session: Session, study_id: int) -> list[int]:
    """Ids of the study's jobs still waiting or running (QUEUED, RUNNING, HELD)."""
    return list(
        session.scalars(
            select(Job.id)
            .join(Series, Series.id == Job.series_fk)
            .where(Series.study_fk == study_id, Job.state.in_(_WAITING))
            .order_by(Job.id)
        )
    )


def report_jobs(session: Session, study_id: int) -> list[Job]:
    """The jobs a draft of the study is written from, by id (see the module docstring)."""
    jobs = session.scalars(
        select(Job)
        .join(Series, Series.id == Job.series_fk)
        .where(
            Series.study_fk == study_id,
            Job.state == JobState.SUCCEEDED,
            Job.analyzer != _FORWARD_ANALYZER,
            Job.findings.is_not(None),
        )
        .order_by(Job.version.desc(), Job.id.desc())
    )
    newest: dict[tuple[int, str, str], Job] = {}
    for job in jobs:
        newest.setdefault((job.series_fk, job.profile, job.analyzer), job)
    return sorted(newest.values(), key=lambda job: job.id)


def _draft_of_jobs(session: Session, study_id: int, job_ids: Sequence[int]) -> ReportDraft | None:
    """The study's draft written from exactly these jobs, if any (whatever became of it)."""
    wanted = sorted(job_ids)
    for draft in session.scalars(select(ReportDraft).where(ReportDraft.study_fk == study_id)):
        if sorted(draft.job_ids or [draft.job_fk]) == wanted:
            return draft
    return None


def _config_key(config: DrafterConfig) -> str:
    return json.dumps({"backend": config.backend, "params": config.params}, sort_keys=True, default=str)


def _key_image_count(drafter: Drafter) -> int:
    """How many key images the backend uses: multimodal transformers models and openai with send_images."""
    params: Any = getattr(drafter, "params", None)
    if drafter.name == "transformers" and params is not None and params.task == "image-text-to-text":
        return int(params.max_images)
    if drafter.name == "openai" and params is not None and params.send_images:
        return 1
    return 0


@dataclass(frozen=True)
class _StudyWork:
    """What phase one of :meth:`ReportPipeline.draft_study` read from the index."""

    study_id: int
    study_uid: str
    job_ids: list[int]
    profiles: list[str]
    findings: list[dict[str, Any]]
    header_path: Path | None
    #: (analyzer, params, source paths) of the first report job, for key images.
    image_source: tuple[str, dict[str, Any], list[Path]]


class ReportPipeline:
    """Drafting for one worker process: the profiles (reloaded on change) and the drafters built so far.

    Drafters are kept per backend and parameters, so a transformers model is
    loaded once per process, on its first draft, and reused for every study.
    """

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], profiles: ProfileSet | None = None
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self._profiles = profiles
        self._drafters: dict[str, Drafter] = {}

    # --- profiles -----------------------------------------------------------------------------

    def _profile_map(self) -> dict[str, Profile]:
        try:
            if self._profiles is None:
                self._profiles = ProfileSet(self.settings.profiles_dir)
            return {profile.name: profile for profile in self._profiles.refresh()}
        except ProfileError as exc:
            log.error("profiles cannot be read; drafting with the default (template): %s", exc)
            return {}

    def report_config(self, profile_names: Sequence[str]) -> DrafterConfig | None:
        """The drafter of the first of these profiles that drafts; None when none does, or drafting is off."""
        if not self.settings.report_drafts_enabled:
            return None
        profiles = self._profile_map()
        for name in profile_names:
            profile = profiles.get(name)
            if profile is None:
                log.warning("profile %s no longer exists; its study is drafted with the template", name)
                return DrafterConfig()
            if profile.report is not None:
                return profile.report
        return None

    # --- when -----------------------------------------------------------------------------------

    def study_to_draft(self, job_id: int) -> int | None:
        """The id of the study of ``job_id`` if it is now due for a draft (see the module docstring)."""
        with session_scope(self.sessions) as session:
            job = session.get(Job, job_id)
            if job is None:
                return None
            study_id = job.series.study_fk
            reason = self._not_due(session, study_id)
        if reason:
            log.debug("study of job %d not drafted: %s", job_id, reason)
            return None
        return study_id

    def _not_due(self, session: Session, study_id: int) -> str | None:
        """Why the study is not due for a draft now; None when it is."""
        waiting = unfinished_jobs(session, study_id)
        if waiting:
            return f"jobs {waiting} are not finished"
        jobs = report_jobs(session, study_id)
        if not jobs:
            return "no job of the study succeeded"
        if self.report_config([job.profile for job in jobs]) is None:
            return "no profile of its jobs drafts reports"
        existing = _draft_of_jobs(session, study_id, [job.id for job in jobs])
        if existing is not None:
            return f"draft {existing.id} (version {existing.version}) was written from the same jobs"
        return None

    # --- what -----------------------------------------------------------------------------------

    def draft_study(self, study_id: int) -> DraftOutcome:
        """Draft the study's report now and record it; skipped (with the reason) if it is not due.

        Raises for what a retry may fix (database errors) and for what it
        cannot (unreadable evidence, an SR that cannot be written); the caller
        records the failure.
        """
        work = self._read_work(study_id)
        if isinstance(work, DraftOutcome):
            metrics.draft_finished("skipped")
            return work
        config = self.report_config(work.profiles) or DrafterConfig()
        try:
            header = pydicom.dcmread(work.header_path, stop_before_pixels=True) if work.header_path else None
            evidence = evidence_from_findings(
                header, work.findings, header_fields=self.settings.report_header_fields
            )
            draft = self._draft(evidence, config, work)
            outcome = self._record(work, draft, evidence)
        except Exception:
            metrics.draft_finished("error", config.backend)
            raise
        drafted = "fallback" if draft.fallback_reason else "drafted"
        metrics.draft_finished(drafted if outcome.status == "drafted" else "skipped", draft.backend)
        return outcome

    def _read_work(self, study_id: int) -> _StudyWork | DraftOutcome:
        with session_scope(self.sessions) as session:
            study = session.get(Study, study_id)
            if study is None:
                return DraftOutcome("skipped", detail=f"study {study_id} does not exist")
            reason = self._not_due(session, study_id)
            if reason:
                return DraftOutcome("skipped", study.study_instance_uid, reason)
            jobs = report_jobs(session, study_id)
            first = jobs[0]
            keys = list(
                session.scalars(
                    select(Instance.path)
                    .where(Instance.series_fk == first.series_fk)
                    .order_by(Instance.instance_number, Instance.id)
                )
            )
            # The series as local files: this worker's cache already has it when it analysed it.
            paths = HostFiles(self.settings).local_paths(keys)
            return _StudyWork(
                study_id=study_id,
                study_uid=study.study_instance_uid,
                job_ids=[job.id for job in jobs],
                profiles=[job.profile for job in jobs],
                findings=[dict(job.findings or {}) for job in jobs],
                header_path=paths[0] if paths else None,
                image_source=(first.analyzer, dict(first.params or {}), paths),
            )

    def drafter_for(self, config: DrafterConfig) -> Drafter | None:
        """The process's drafter for ``config`` (built on first use); None for the template or a bad config.

        A configuration the backend refuses (say, the API key variable is
        gone) gives None: :func:`draft_report` then builds it, fails the same
        way and records the reason with the template draft.
        """
        if config.backend == "template":
            return None
        key = _config_key(config)
        drafter = self._drafters.get(key)
        if drafter is None:
            try:
                drafter = get_drafter(config.backend, config.params)
            except DrafterConfigError as exc:
                log.error("the %s drafter cannot be built: %s", config.backend, exc)
                return None
            if isinstance(drafter, OpenAIDrafter):
                drafter.use_api_key(revealed(self.settings.report_llm_api_key))
            self._drafters[key] = drafter
        return drafter

    def _key_images(self, drafter: Drafter, work: _StudyWork) -> list[Image]:
        count = _key_image_count(drafter)
        analyzer_name, params, paths = work.image_source
        if count == 0 or not paths:
            return []
        try:
            volume = get_analyzer(analyzer_name).load(paths, params)
            return render_key_images(volume, count=count)
        except Exception as exc:  # the draft can be written without pictures
            log.warning("key images of study %s not rendered, drafting without: %s", work.study_uid, exc)
            return []

    def _draft(self, evidence: Evidence, config: DrafterConfig, work: _StudyWork) -> Draft:
        drafter = self.drafter_for(config)
        images = self._key_images(drafter, work) if drafter is not None else []
        return draft_report(evidence, config, images=images, drafter=drafter)

    def _record(self, work: _StudyWork, draft: Draft, evidence: Evidence) -> DraftOutcome:
        record = draft.to_dict()
        guardrail = {
            "passed": draft.guardrails.passed,
            "violations": record["violations"],
            "requested_backend": draft.requested_backend,
            "header": draft.header,
            "rejected": record["rejected"],
            "evidence": evidence.to_dict(),
        }
        with session_scope(self.sessions) as session:
            # Serialise the study's drafts (PostgreSQL; SQLite's write lock already does) and look again.
            session.scalar(select(Study.id).where(Study.id == work.study_id).with_for_update())
            existing = _draft_of_jobs(session, work.study_id, work.job_ids)
            if existing is not None:
                return DraftOutcome(
                    "skipped",
                    work.study_uid,
                    f"draft {existing.id} (version {existing.version}) was written from these jobs meanwhile",
                )
            recorded = create_draft_record(
                session,
                self.settings,
                job_ids=work.job_ids,
                text=ReportText(findings=draft.findings, impression=draft.impression),
                drafter=DraftingModel(draft.backend, draft.model_id or TEMPLATE_MODEL_ID),
                guardrail=guardrail,
                fallback_reason=draft.fallback_reason,
            )
            # Leased like the analysis results: the caller queues them now, the scheduler if that is lost.
            for delivery in session.scalars(select(Delivery).where(Delivery.id.in_(recorded.delivery_ids))):
                delivery.next_attempt_at = lease_expiry()
            version = session.scalar(select(ReportDraft.version).where(ReportDraft.id == recorded.draft_id))
        summary = f"{draft.backend} draft" + (
            f" (fallback: {draft.fallback_reason})" if draft.fallback_reason else ""
        )
        return DraftOutcome(
            "drafted",
            work.study_uid,
            summary,
            draft_id=recorded.draft_id,
            version=version,
            sr_instance_uid=recorded.sr_instance_uid,
            delivery_ids=list(recorded.delivery_ids),
        )
