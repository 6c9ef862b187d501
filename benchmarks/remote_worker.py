"""Workers on other hosts (issue 19): turnaround against a local worker, and a burst of studies.

Both modes use a real PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379), Orthanc as the
PACS, and, for the "other host", a SeaweedFS S3 store (``weed server -s3``) with the worker run
as ``pacs-ai worker`` in a process tree of its own, with its own data directory and HOME, sharing
only the database URL, the broker URL and the store with the receiver (whose own worker serves
the dispatch queue only).  Same machine, so the "network" is loopback.

``turnaround``: the chest CT (default 300 slices of 512x512) sent over 4 associations, last
instance received -> SEG and SR acknowledged by the PACS, with the worker on the other "host"
against the peer in the same run: a local worker (``pacs-ai serve``'s own, the same PostgreSQL and
Redis, the local folder storage).  Runs alternate; medians of ``--repeats`` each and the time the
other host adds (target: at most 0.5 s).

``burst``: ``--studies`` chest CTs (default 10) sent at once, one storescu per study, to the
receiver with 1 and then 2 worker processes on separate "hosts" (each ``--concurrency 1``):
studies per hour (studies / first send -> last result acknowledged) and the median and p95 of
each study's turnaround (its last instance received -> its SEG and SR acknowledged).

    python benchmarks/remote_worker.py turnaround --repeats 3
    python benchmarks/remote_worker.py burst --studies 10 --slices 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.machine import memory_note  # noqa: E402
from benchmarks.turnaround import _SENT_RESULTS, _parse, stage_report  # noqa: E402
from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom  # noqa: E402
from tests.object_store import SeaweedS3, storage_environment  # noqa: E402
from tests.peers import OrthancServer, _stop_process, storescu, wait_for  # noqa: E402
from tests.service import PacsAiService, start_worker  # noqa: E402

#: Settings of every configuration: no AI draft report, no worklist (neither is measured here).
COMMON = {
    "PACS_AI_REPORT_DRAFTS_ENABLED": "false",
    "PACS_AI_WORKLIST_ENABLED": "false",
    "PACS_AI_LISTENER_PROCESSES": "2",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["turnaround", "burst"])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet-period", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="turnaround: runs of each configuration")
    parser.add_argument(
        "--no-prefetch",
        action="store_true",
        help="the receiver sends no prefetch hints (worker_prefetch = false): the job fetches its series",
    )
    parser.add_argument("--studies", type=int, default=10, help="burst: studies sent at once")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="burst: worker processes, one run each"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="remote-worker-") as tmp_name:
        tmp = Path(tmp_name)
        count = 1 if args.mode == "turnaround" else args.studies
        phantoms = [_phantom(tmp / f"ct{i}", args, i) for i in range(count)]
        with OrthancServer(aet="ORTHANC") as orthanc:
            if args.mode == "turnaround":
                turnaround(tmp, orthanc, phantoms[0], args)
            else:
                burst(tmp, orthanc, phantoms, args)
    print(memory_note())
    return 0


def _phantom(directory: Path, args: argparse.Namespace, index: int) -> PhantomTruth:
    return write_chest_phantom(
        directory,
        slices=args.slices,
        size=args.size,
        pixel_spacing_mm=350.0 / args.size,
        slice_spacing_mm=300.0 / args.slices,
        seed=index,
        patient_id=f"BURST-{index:03d}",
        accession_number=f"BURST{index:04d}",
        study_uid=f"2.25.{9_000_000 + index}",
        series_uid=f"2.25.{9_100_000 + index}",
    )


@contextlib.contextmanager
def receiver_with_workers(
    tmp: Path,
    orthanc: OrthancServer,
    store: SeaweedS3 | None,
    workers: int,
    quiet_period: float,
    prefetch: bool = True,
) -> Iterator[PacsAiService]:
    """``pacs-ai serve``: with a store, dispatch only and ``workers`` remote workers; else its own worker."""
    destinations = {"pacs": {"ae_title": orthanc.aet, "host": orthanc.host, "port": orthanc.dicom_port}}
    storage = storage_environment(store) if store is not None else {}
    env = {**COMMON, **storage, "PACS_AI_QUIET_PERIOD_SECONDS": str(quiet_period)}
    if not prefetch:
        env["PACS_AI_WORKER_PREFETCH"] = "false"
    if store is not None:
        env["PACS_AI_WORKER_QUEUES"] = '["dispatch"]'
    else:
        env["PACS_AI_WORKER_CONCURRENCY"] = "1"
    name = f"receiver-{time.monotonic_ns()}"
    service = PacsAiService(tmp / name, backend="servers", destinations=destinations, extra_env=env)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        service.start(timeout=300)  # generous: a shared machine may be busy
        shared = {key: service.env[key] for key in ("PACS_AI_DATABASE_URL", "PACS_AI_BROKER_URL", *storage)}
        for index in range(workers if store is not None else 0):
            processes.append(_start_remote_worker(tmp / f"{name}-host{index}", f"host{index}", shared))
        for index in range(len(processes)):
            wait_for(
                lambda i=index: service.worker_is_ready(f"bench@host{i}"),  # type: ignore[misc]
                timeout=120,
                description=f"the worker on host{index}",
            )
        yield service
    finally:
        for process in processes:
            _stop_process(process, group=True)
        service.stop()


def _start_remote_worker(root: Path, host: str, shared: dict[str, str]) -> subprocess.Popen[bytes]:
    """``pacs-ai worker`` with its own data directory and HOME and nothing else of the receiver's."""
    (root / "home").mkdir(parents=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(root / "home"),
        "PACS_AI_DATA_DIR": str(root / "data"),
        **COMMON,
        **shared,
    }
    return start_worker(env, f"bench@{host}", root)


def turnaround(tmp: Path, orthanc: OrthancServer, phantom: PhantomTruth, args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, float]]] = {"local": [], "remote": []}
    for repeat in range(args.repeats):
        for kind in ("local", "remote"):
            with contextlib.ExitStack() as stack:
                # A store of its own per run: the test store holds about 1 GB and reclaims nothing
                # overwritten, so a fourth run of a 300-slice CT in one store filled it (PUTs: 500).
                store = stack.enter_context(SeaweedS3()) if kind == "remote" else None
                service = stack.enter_context(
                    receiver_with_workers(tmp, orthanc, store, 1, args.quiet_period, not args.no_prefetch)
                )
                _send(service, phantom)
                wait_for(
                    lambda s=service: s.query(_SENT_RESULTS)[0][0] == 2,  # type: ignore[misc]
                    timeout=600,
                    interval=0.2,
                    description="SEG and SR acknowledged",
                )
                report = _with_store_stages(service, stage_report(service))
            runs[kind].append(report)
            print(
                f"run {repeat + 1} {kind:<6} turnaround {report['turnaround']:.2f} s "
                f"(load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    print(
        f"\nchest CT {args.slices} x {args.size}x{args.size}, quiet period {args.quiet_period:g} s, "
        f"prefetch hints {'off' if args.no_prefetch else 'on'}, medians "
        f"(quiet_period = upload + route: last instance received -> its last upload -> job opened):"
    )
    print(f"{'stage':<14}{'local worker':>14}{'other host':>14}")
    stages = (
        *("quiet_period", "upload", "route", "queue", "fetch", "load", "analyze", "encode", "store"),
        *("record", "dispatch"),
    )
    for stage in (*stages, "fetched_objects", "turnaround"):
        local = statistics.median(r[stage] for r in runs["local"])
        remote = statistics.median(r[stage] for r in runs["remote"])
        print(f"{stage:<14}{local:>14.2f}{remote:>14.2f}")
    added = [r["turnaround"] - r["analyze"] for r in runs["remote"]]
    peer = [r["turnaround"] - r["analyze"] for r in runs["local"]]
    print(
        f"turnaround outside the analyzer: other host {statistics.median(added):.2f} s, local worker "
        f"{statistics.median(peer):.2f} s; added {statistics.median(added) - statistics.median(peer):+.2f} s "
        "(target <= 0.5 s)"
    )


def _with_store_stages(service: PacsAiService, report: dict[str, float]) -> dict[str, float]:
    """Split the worker's fetch of the series and its store of the results out of "record", and
    the wait for the last upload (last instance received -> last instance in the store) out of
    "quiet_period" (0 for the local folder, which uploads nothing)."""
    ((timings,),) = service.query("SELECT timings FROM jobs")
    timings = json.loads(timings) if isinstance(timings, str) else timings
    fetch, store = timings.get("fetch_seconds", 0.0), timings.get("store_seconds", 0.0)
    ((received, uploaded),) = service.query("SELECT max(received_at), max(uploaded_at) FROM instances")
    upload = _parse(uploaded) - _parse(received) if uploaded is not None else 0.0
    return {
        **report,
        "fetched_objects": timings.get("fetched_objects", 0.0),
        "upload": upload,
        "route": report["quiet_period"] - upload,
        "fetch": fetch,
        "store": store,
        "record": report["record"] - fetch - store,
    }


def burst(
    tmp: Path,
    orthanc: OrthancServer,
    phantoms: list[PhantomTruth],
    args: argparse.Namespace,
) -> None:
    results = {}
    for workers in args.workers:
        # A store of its own per configuration: the test store holds about 1 GB.
        with (
            SeaweedS3() as own_store,
            receiver_with_workers(tmp, orthanc, own_store, workers, args.quiet_period) as service,
        ):
            started = time.time()
            senders = [_send_in_background(service, phantom) for phantom in phantoms]
            for sender in senders:
                if sender.wait() != 0:
                    raise SystemExit("storescu failed")
            wait_for(
                lambda s=service: s.query(_SENT_RESULTS)[0][0] == 2 * len(phantoms),  # type: ignore[misc]
                timeout=3600,
                interval=1.0,
                description=f"SEG and SR of {len(phantoms)} studies acknowledged",
            )
            results[workers] = _burst_report(service, started)
        print(f"{workers} worker(s): {_format_burst(results[workers], len(phantoms))}", flush=True)
    print(f"\nburst of {len(phantoms)} chest CTs ({args.slices} x {args.size}x{args.size}) sent at once:")
    for workers, report in results.items():
        print(f"  {workers} worker process(es) on separate hosts: {_format_burst(report, len(phantoms))}")
    if 1 in results and 2 in results:
        ratio = results[2]["studies_per_hour"] / results[1]["studies_per_hour"]
        print(f"  2 workers / 1 worker, studies per hour: {ratio:.2f}x")


def _send(service: PacsAiService, phantom: PhantomTruth) -> None:
    sent = storescu("127.0.0.1", service.port, service.ae_title, phantom.paths, associations=4)
    if sent.returncode != 0:
        raise SystemExit(f"storescu failed: {sent.stderr[-2000:]}")


def _send_in_background(service: PacsAiService, phantom: PhantomTruth) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aec", service.ae_title, "127.0.0.1", str(service.port), *map(str, phantom.paths)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


_PER_STUDY = """
SELECT studies.study_instance_uid,
       (SELECT max(i.received_at) FROM instances i JOIN series s ON s.id = i.series_fk
         WHERE s.study_fk = studies.id) AS last_received,
       (SELECT max(d.sent_at) FROM deliveries d JOIN results r ON r.id = d.result_fk
         JOIN jobs j ON j.id = r.job_fk JOIN series s ON s.id = j.series_fk
         WHERE s.study_fk = studies.id AND r.kind IN ('SEG', 'SR')) AS last_sent
FROM studies
"""


def _burst_report(service: PacsAiService, started: float) -> dict[str, Any]:
    rows = service.query(_PER_STUDY)
    turnarounds = sorted(_parse(sent) - _parse(received) for _, received, sent in rows)
    last = max(_parse(sent) for _, _, sent in rows)
    elapsed = last - started
    return {
        "elapsed": elapsed,
        "studies_per_hour": len(rows) / elapsed * 3600,
        "p50": statistics.median(turnarounds),
        "p95": turnarounds[max(0, round(0.95 * len(turnarounds)) - 1)],
    }


def _format_burst(report: dict[str, Any], studies: int) -> str:
    return (
        f"{studies} studies in {report['elapsed']:.1f} s = {report['studies_per_hour']:.0f} studies/hour; "
        f"turnaround median {report['p50']:.1f} s, p95 {report['p95']:.1f} s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
