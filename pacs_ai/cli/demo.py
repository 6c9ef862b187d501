"""``pacs-ai demo``: send a synthetic chest CT to the running service and show what came of it.

The whole path a newcomer wants to see in one command after ``./scripts/serve``:
the synthetic phantom (``pacs_ai.synthetic``) goes to the configured listener by
C-STORE, as a modality would send it; the command then watches the index until
the jobs and their deliveries are settled, and prints where the results went and
what they measured.  Nothing here is a stand-in: it talks to the real service.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydicom.uid import generate_uid
from rich.markup import escape
from sqlalchemy import select

from pacs_ai.cli.common import JsonOption, console, index_sessions, print_json, settings_of
from pacs_ai.cli.studies import describe_study
from pacs_ai.config import Settings
from pacs_ai.dispatch.check import check_destination
from pacs_ai.dispatch.cstore import send_files
from pacs_ai.dispatch.errors import DeliveryError
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import DeliveryState, Job, JobState, RoutingState, Study
from pacs_ai.peer_settings import DicomDestination
from pacs_ai.synthetic.phantom import write_chest_phantom

#: The calling AE title of the demo's C-STORE (add it to allowed_calling_ae_titles where those are set).
DEMO_AE_TITLE = "PACS_AI_DEMO"
#: Job states after which nothing more happens to a job by itself.
SETTLED_JOBS = {JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value}
POLL_SECONDS = 1.0
#: UCUM codes printed as a radiologist writes them.
UNIT_NAMES = {"[hnsf'U]": "HU", "ml": "mL"}


def _listener(settings: Settings) -> DicomDestination:
    """The service's own listener, as a destination to send to (loopback where it listens on all)."""
    host = "127.0.0.1" if settings.listen_host in ("0.0.0.0", "::", "") else settings.listen_host
    return DicomDestination(
        ae_title=settings.ae_title, host=host, port=settings.listen_port, timeout_seconds=60
    )


def demo(
    ctx: typer.Context,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the results before giving up (exit 1).")
    ] = 600.0,
    slices: Annotated[int, typer.Option(help="Slices of the synthetic chest CT (4 mm apart).", min=20)] = 80,
    as_json: JsonOption = False,
) -> None:
    """Send a synthetic chest CT to the running service; print where its results went and what they measured.

    Start the service first (`./scripts/serve`).  Exit 0 when the analysis succeeded,
    1 when the service is not there, refused the study, or the analysis failed or took too long.
    """
    settings = settings_of(ctx)
    if settings.listener_tls is not None:
        _fail(
            "the listener takes TLS only; the demo sends in the clear: run it against a listener without TLS"
        )
    listener = _listener(settings)
    problem = check_destination(listener, calling_ae_title=DEMO_AE_TITLE)
    if problem is not None:
        _fail(
            f"no pacs-ai listener answers at {listener.describe()} ({problem}): start the service with "
            "`./scripts/serve` (or `pacs-ai serve`), with the same data directory or settings as this shell"
        )
    study_uid = generate_uid()
    with tempfile.TemporaryDirectory(prefix="pacs-ai-demo-") as directory:
        phantom = write_chest_phantom(
            Path(directory),
            slices=slices,
            study_uid=study_uid,
            series_uid=generate_uid(),
            accession_number="DEMO",
            patient_id="PACS-AI-DEMO",
            patient_name="Demo^Synthetic Chest",
        )
        if not as_json:
            console.print(
                f"sending a synthetic chest CT ({len(phantom.paths)} slices, study {study_uid}) "
                f"to {listener.describe()}"
            )
        try:
            send_files(listener, phantom.paths, calling_ae_title=DEMO_AE_TITLE)
        except DeliveryError as exc:
            _fail(f"the service did not store the study: {exc}")
    report = _wait_for_results(settings, study_uid, timeout, quiet=as_json)
    report["truth"] = {"right_lung_ml": phantom.right_lung_ml, "left_lung_ml": phantom.left_lung_ml}
    if as_json:
        print_json(report)
    else:
        _print_outcome(report, set(settings.destinations))
    succeeded = bool(report["jobs"]) and all(
        job["state"] == JobState.SUCCEEDED.value for job in report["jobs"]
    )
    raise typer.Exit(0 if succeeded and not report["timed_out"] else 1)


def _fail(message: str) -> None:
    console.print(f"[red]demo failed[/red]: {escape(message)}")
    raise typer.Exit(1)


def _wait_for_results(settings: Settings, study_uid: str, timeout: float, *, quiet: bool) -> dict[str, Any]:
    """Poll the index until the study's jobs are settled and no delivery is pending, or ``timeout``."""
    sessions = index_sessions(settings)
    deadline = time.monotonic() + timeout
    last_state = ""
    while True:
        with session_scope(sessions) as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            report = describe_study(session, study) if study is not None else None
            if report is not None:
                job_ids = [job["id"] for job in report["jobs"]]
                report["measurements"] = [
                    {"analyzer": job.analyzer, **measurement}
                    for job in session.scalars(select(Job).where(Job.id.in_(job_ids)).order_by(Job.id))
                    for measurement in (job.findings or {}).get("measurements", [])
                ]
        timed_out = time.monotonic() > deadline
        if report is not None:
            state = _progress(report)
            if state != last_state and not quiet:
                console.print(f"  {state}")
                last_state = state
            settled = _settled(report, set(settings.destinations))
            if settled or timed_out:
                return {**report, "timed_out": not settled}
        elif timed_out:
            _fail(
                f"study {study_uid} never appeared in the index ({settings.effective_settings_file.parent})"
            )
        time.sleep(POLL_SECONDS)


def _progress(report: dict[str, Any]) -> str:
    routing = ", ".join(f"{s['routing_state']}" for s in report["series"]) or "received"
    jobs = ", ".join(f"{job['analyzer']} {job['state']}" for job in report["jobs"]) or "no jobs yet"
    return f"series {routing}; {jobs}"


def _settled(report: dict[str, Any], destinations: set[str]) -> bool:
    """True when routing ended without jobs, or every job settled and every delivery was sent or failed.

    A delivery to a destination that is not configured keeps retrying until its
    retries run out; the demo does not wait for that (its results stay in the store).
    """
    if not report["jobs"]:
        ended = {RoutingState.UNMATCHED.value, RoutingState.DISCARDED.value}
        return bool(report["series"]) and all(s["routing_state"] in ended for s in report["series"])
    pending = [
        delivery
        for result in report["results"]
        for delivery in result["deliveries"]
        if delivery["state"] == DeliveryState.PENDING.value and delivery["destination"] in destinations
    ]
    return all(job["state"] in SETTLED_JOBS for job in report["jobs"]) and not pending


def _print_outcome(report: dict[str, Any], destinations: set[str]) -> None:
    if report["timed_out"]:
        console.print(
            "[red]timed out[/red] waiting for the results; see `pacs-ai status` and the service's log"
        )
    if not report["jobs"]:
        for series in report["series"]:
            detail = escape(f"series {series['routing_state']}: {series['routing_detail']}")
            console.print(f"[red]no analysis[/red]: {detail}", highlight=False)
        return
    for job in report["jobs"]:
        line = f"job {job['id']} {job['analyzer']}: {job['state']}"
        console.print(escape(line + (f" ({job['error']})" if job["error"] else "")), highlight=False)
    console.print("[bold]where the results went[/bold]")
    for result in report["results"]:
        deliveries = "; ".join(
            f"{d['destination']} {d['state']}" + (f" ({d['last_error']})" if d["last_error"] else "")
            for d in result["deliveries"]
        )
        console.print(
            escape(
                f"  {result['kind']} {result['sop_instance_uid']}: kept at {result['path']}; "
                + (f"sent to: {deliveries}" if deliveries else "no destination configured for it")
            ),
            highlight=False,
        )
    unconfigured = sorted(
        {
            d["destination"]
            for result in report["results"]
            for d in result["deliveries"]
            if d["destination"] not in destinations
        }
    )
    if unconfigured:
        console.print(
            f"  (not configured here: {', '.join(unconfigured)}; see the README's 'Sending results to your "
            "PACS', then `pacs-ai echo NAME`)",
            highlight=False,
        )
    console.print("[bold]what they measured[/bold] (AI output, unverified until a radiologist signs it)")
    for measurement in report.get("measurements", []):
        site = f" {measurement['finding_site']}" if measurement.get("finding_site") else ""
        derivation = f" ({measurement['derivation']})" if measurement.get("derivation") else ""
        unit = UNIT_NAMES.get(measurement.get("unit") or "", measurement.get("unit") or "")
        value = f"{_number(measurement['value'])} {unit}".rstrip()
        console.print(escape(f"  {measurement['name']}{derivation}{site}: {value}"), highlight=False)
    truth = report["truth"]
    console.print(
        f"the phantom was written with {truth['right_lung_ml']:.0f} mL right and "
        f"{truth['left_lung_ml']:.0f} mL left lung; see the study in the worklist, "
        "or `pacs-ai studies show <study UID>`"
    )


def _number(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)
