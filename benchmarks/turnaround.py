"""Benchmarks (b) and (c): end-to-end turnaround and worker peak memory for one chest CT.

Sends a generated chest CT (default 300 slices of 512x512) to a real ``pacs-ai serve``
(embedded broker and index, one worker) over 4 associations, with Orthanc as the PACS, and
reads from pacs-ai's index when each stage happened:

* quiet period: last instance received -> series routed (the configured wait, not work);
* queue: job created -> a worker started it;
* load, analyze, encode: inside the worker;
* dispatch: job finished -> the last result acknowledged by the PACS (C-STORE Success).

Turnaround = last instance received -> last result acknowledged.  "Outside the analyzer" is
turnaround minus the quiet period minus the analyzer's own time.  Worker peak memory is the
worker process's peak RSS during its first job minus its RSS when the job started, plus the
volume memory the process held before the job (``volume_memory_reserve_mb``, counted as the
job's own), compared with the volume's size.  The load stage is compared with SimpleITK's series reader on the
same files in the same run.

    python benchmarks/turnaround.py --slices 300 --size 512 --quiet-period 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pacs_ai.synthetic.phantom import write_chest_phantom  # noqa: E402
from tests.peers import OrthancServer, storescu, wait_for  # noqa: E402
from tests.service import PacsAiService  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet-period", type=float, default=1.0)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=1,
        help="pool processes of the worker (1 as in the tests and the README figures; serve's default is 2)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="turnaround-") as tmp_name:
        tmp = Path(tmp_name)
        phantom = write_chest_phantom(
            tmp / "ct",
            slices=args.slices,
            size=args.size,
            pixel_spacing_mm=350.0 / args.size,
            slice_spacing_mm=300.0 / args.slices,
        )
        with OrthancServer(aet="ORTHANC") as orthanc:
            destinations = {
                "pacs": {"ae_title": orthanc.aet, "host": orthanc.host, "port": orthanc.dicom_port}
            }
            with PacsAiService(
                tmp / "pacs-ai",
                destinations=destinations,
                extra_env={
                    "PACS_AI_QUIET_PERIOD_SECONDS": str(args.quiet_period),
                    "PACS_AI_LISTENER_PROCESSES": "2",
                    "PACS_AI_WORKER_CONCURRENCY": str(args.worker_concurrency),
                },
            ) as service:
                sent = storescu(
                    "127.0.0.1", service.port, service.ae_title, phantom.paths, associations=args.associations
                )
                if sent.returncode != 0:
                    raise SystemExit(f"storescu failed: {sent.stderr[-2000:]}")
                wait_for(
                    lambda: service.query(_SENT_RESULTS)[0][0] == 2,
                    timeout=600,
                    interval=0.2,
                    description="SEG and SR acknowledged by Orthanc",
                )
                report = stage_report(service)
        sitk_seconds = simpleitk_load_seconds(phantom.paths)
    print_report(report, args, sitk_seconds)
    return 0


#: The analysis results (SEG and SR) acknowledged by the PACS; the AI report draft, which is
#: delivered too once the study's last analysis is done, is not part of the turnaround.
_RESULTS_SENT = (
    "FROM deliveries JOIN results ON results.id = deliveries.result_fk "
    "WHERE deliveries.state = 'SENT' AND results.kind IN ('SEG', 'SR')"
)
_SENT_RESULTS = f"SELECT count(*) {_RESULTS_SENT}"


def stage_report(service: PacsAiService) -> dict[str, float]:
    ((last_received,),) = service.query("SELECT max(received_at) FROM instances")
    ((created, started, finished, timings),) = service.query(
        "SELECT created_at, started_at, finished_at, timings FROM jobs"
    )
    ((last_sent,),) = service.query(f"SELECT max(deliveries.sent_at) {_RESULTS_SENT}")
    stamps = [_parse(value) for value in (last_received, created, started, finished, last_sent)]
    timings = json.loads(timings) if isinstance(timings, str) else timings
    return {
        "quiet_period": stamps[1] - stamps[0],
        "queue": stamps[2] - stamps[1],
        "load": timings["load_seconds"],
        "analyze": timings["analyze_seconds"],
        "encode": timings["encode_seconds"],
        "record": (stamps[3] - stamps[2])
        - timings["load_seconds"]
        - timings["analyze_seconds"]
        - timings["encode_seconds"],
        "dispatch": stamps[4] - stamps[3],
        "turnaround": stamps[4] - stamps[0],
        "volume_mb": timings["volume_mb"],
        "peak_rss_mb": timings["peak_rss_mb"],
        "rss_start_mb": timings["rss_start_mb"],
        "volume_memory_mb": timings.get("volume_memory_mb", 0.0),
    }


def simpleitk_load_seconds(paths: list[Path]) -> float:
    """The peer for the load stage: SimpleITK's series reader on the same files, same run."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(paths[0].parent)))
    started = time.perf_counter()
    reader.Execute()
    return time.perf_counter() - started


def _parse(value: object) -> float:
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def print_report(report: dict[str, float], args: argparse.Namespace, sitk_seconds: float) -> None:
    outside = report["turnaround"] - report["quiet_period"] - report["analyze"]
    print(
        f"chest CT {args.slices} x {args.size}x{args.size}, sent over {args.associations} associations; "
        f"worker concurrency {args.worker_concurrency}"
    )
    print("stage                seconds")
    for stage in ("quiet_period", "queue", "load", "analyze", "encode", "record", "dispatch"):
        print(f"  {stage:<18} {report[stage]:7.2f}")
    print(f"turnaround (last instance received -> SEG+SR acknowledged): {report['turnaround']:.2f} s")
    print(
        f"  excluding the configured quiet period: {report['turnaround'] - report['quiet_period']:.2f} s "
        f"(target <= 10 s)"
    )
    print(f"  outside the analyzer (excl. quiet period): {outside:.2f} s (target <= 1 s)")
    print(
        f"load stage vs SimpleITK ImageSeriesReader on the same files: {report['load']:.2f} s vs "
        f"{sitk_seconds:.2f} s = {sitk_seconds / report['load']:.2f}x SimpleITK's speed"
    )
    held = report["volume_memory_mb"]
    delta = report["peak_rss_mb"] - (report["rss_start_mb"] - held)
    print(
        f"worker memory: peak {report['peak_rss_mb']:.0f} MB, at job start {report['rss_start_mb']:.0f} MB "
        f"of which {held:.0f} MB volume memory held for it, "
        f"increase {delta:.0f} MB = {delta / report['volume_mb']:.2f}x the volume "
        f"({report['volume_mb']:.0f} MB; target <= 3x)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
