"""Benchmark: C-STORE ingest with the object store vs the local folder vs Orthanc, same run, same files.

Sends a generated 300-slice 512x512 chest CT with DCMTK storescu over 4 concurrent associations
(``--associations``) to a freshly started peer each time, the peers taking turns:

* ``pacs-ai+s3``: ``pacs-ai serve`` with ``storage_url=s3://...`` on a real S3 server (SeaweedFS,
  a fresh one for each run: the store the tests start holds about 1 GB).  Success still means fsynced
  in the local spool and indexed; the uploader puts each instance into the store meanwhile, on
  the same two cores.  After the last acknowledgement the run also waits until every instance is
  in the store and reports that wait ("drain"): the store's side of durability.
* ``pacs-ai``: the embedded local folder (the spool is the storage), as ``benchmarks/ingest.py``.
* ``orthanc``: Orthanc with its default storage.

    python benchmarks/ingest_storage.py --repeats 3

Medians of the runs; single runs spread by 20% or more on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.ingest import pacs_ai_endpoint_factory  # noqa: E402
from benchmarks.ingest_peers import Endpoint, format_table, orthanc_endpoint, run_interleaved  # noqa: E402
from benchmarks.machine import memory_note  # noqa: E402
from pacs_ai.config import Settings  # noqa: E402
from pacs_ai.synthetic.phantom import write_chest_phantom  # noqa: E402
from tests.object_store import SeaweedS3, storage_environment  # noqa: E402
from tests.service import PacsAiService  # noqa: E402

#: Seconds the uploads may take after a run before the benchmark stops (the store failing, say).
DRAIN_TIMEOUT_SECONDS = 300.0
#: The object store peer with its uploads at the listener's priority (``--compare-nice``).
SAME_PRIORITY = "pacs-ai+s3 nice0"
#: The object store peer with SeaweedFS niced (``--store-nice``).
STORE_APART = "pacs-ai+s3 store-niced"
#: The object store peer holding its uploads until a burst is over (``--upload-hold-ms``).
HOLDING = "pacs-ai+s3 hold"


def object_store_endpoint_factory(
    drains: list[float],
    upload_nice: int | None = None,
    store_nice: int = 0,
    upload_hold_ms: int | None = None,
) -> Callable[..., AbstractContextManager[Endpoint]]:
    """``pacs-ai serve`` on an S3 store of its own (SeaweedFS, started before the run is timed; the
    store the tests start holds about 1 GB, six runs of the 300-slice CT); each run appends to
    ``drains`` how long the uploads took to finish after the last acknowledgement.
    ``upload_nice`` overrides ``storage_upload_nice``; ``store_nice`` runs SeaweedFS that many steps
    below normal priority (``--store-nice``); ``upload_hold_ms`` overrides ``storage_upload_hold_ms``."""
    env = {
        "PACS_AI_WORKER_PROCESSES": "0",
        "PACS_AI_LOG_LEVEL": "WARNING",
        "PACS_AI_LISTENER_PROCESSES": str(Settings().listener_processes),
    }
    if upload_nice is not None:
        env["PACS_AI_STORAGE_UPLOAD_NICE"] = str(upload_nice)
    if upload_hold_ms is not None:
        env["PACS_AI_STORAGE_UPLOAD_HOLD_MS"] = str(upload_hold_ms)

    @contextmanager
    def endpoint(keep_files: bool = False) -> Iterator[Endpoint]:
        data_dir = Path(tempfile.mkdtemp(prefix="pacs-ai-s3-bench-")) / "data"
        with SeaweedS3(nice=store_nice) as store:
            service = PacsAiService(data_dir, extra_env={**env, **storage_environment(store)})
            service.start(timeout=300)  # generous: a shared machine may be busy
            try:
                yield Endpoint("127.0.0.1", service.port, service.ae_title)
                acknowledged = time.perf_counter()
                while service.query("SELECT count(*) FROM instances WHERE uploaded_at IS NULL")[0][0]:
                    if time.perf_counter() - acknowledged > DRAIN_TIMEOUT_SECONDS:
                        waited = f"uploads not done {DRAIN_TIMEOUT_SECONDS:g} s after the run"
                        raise SystemExit(f"{waited}:\n{service.logs()}")
                    time.sleep(0.05)
                drains.append(time.perf_counter() - acknowledged)
            finally:
                service.stop()

    return endpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--associations", type=int, nargs="+", default=[4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compare-nice",
        action="store_true",
        help="also run the object store with its uploads at the listener's priority (storage_upload_nice 0)",
    )
    parser.add_argument(
        "--store-nice",
        type=int,
        default=0,
        help="also run the object store peer with SeaweedFS at this nice value: on one machine, a stand-in "
        "for the store on a host of its own, whose CPU the receiver does not share (0: not run)",
    )
    parser.add_argument(
        "--upload-hold-ms",
        type=int,
        default=0,
        help="also run the object store peer with storage_upload_hold_ms at this value: its uploads wait "
        "until no instance has arrived for that long (0: not run)",
    )
    args = parser.parse_args(argv)

    drains: list[float] = []
    holding_drains: list[float] = []
    same_priority_drains: list[float] = []
    store_apart_drains: list[float] = []
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="ingest-data-") as tmp:
        send_dir = Path(tmp) / "ct"
        write_chest_phantom(
            send_dir, slices=args.slices, size=args.size, pixel_spacing_mm=0.7, slice_spacing_mm=1.0
        )
        peers = {
            "pacs-ai+s3": object_store_endpoint_factory(drains),
            "pacs-ai": pacs_ai_endpoint_factory(None, "embedded"),
            "orthanc": orthanc_endpoint,
        }
        if args.compare_nice:
            peers[SAME_PRIORITY] = object_store_endpoint_factory(same_priority_drains, upload_nice=0)
        if args.store_nice:
            peers[STORE_APART] = object_store_endpoint_factory(store_apart_drains, store_nice=args.store_nice)
        if args.upload_hold_ms:
            peers[HOLDING] = object_store_endpoint_factory(holding_drains, upload_hold_ms=args.upload_hold_ms)
        rows = run_interleaved(send_dir, peers, args.associations, args.repeats)
    loads.append(os.getloadavg()[0])
    print(
        f"C-STORE ingest, {rows[0].instances} instances, DCMTK storescu, loopback, median of "
        f"{args.repeats} runs per peer, peers taking turns; pacs-ai fsync on, SQLite, embedded Redis"
    )
    print(format_table(rows))
    print()
    for associations in args.associations:
        cell = {row.peer: row for row in rows if row.associations == associations}
        s3, local, orthanc = cell["pacs-ai+s3"], cell["pacs-ai"], cell["orthanc"]
        print(
            f"{associations} association(s): object store {s3.median:.0f} inst/s = "
            f"{s3.median / orthanc.median:.2f}x Orthanc ({orthanc.median:.0f}/s), "
            f"{s3.median / local.median:.2f}x the local folder ({local.median:.0f}/s); "
            f"local folder {local.median / orthanc.median:.2f}x Orthanc"
        )
        if STORE_APART in cell:
            apart = cell[STORE_APART]
            print(
                f"  SeaweedFS at nice {args.store_nice} (the store's CPU not taken from the receiver): "
                f"{apart.median:.0f} inst/s = {apart.median / orthanc.median:.2f}x Orthanc; uploads finished "
                f"{statistics.median(store_apart_drains):.2f} s after the last acknowledgement"
            )
        if HOLDING in cell:
            holding = cell[HOLDING]
            print(
                f"  uploads held until {args.upload_hold_ms} ms without a new instance "
                f"(storage_upload_hold_ms): {holding.median:.0f} inst/s = "
                f"{holding.median / orthanc.median:.2f}x Orthanc, {holding.median / local.median:.2f}x the "
                f"local folder; uploads finished {statistics.median(holding_drains):.2f} s after the last "
                "acknowledgement"
            )
        if SAME_PRIORITY in cell:
            same = cell[SAME_PRIORITY]
            print(
                f"  uploads at the listener's priority (storage_upload_nice 0): {same.median:.0f} inst/s = "
                f"{same.median / orthanc.median:.2f}x Orthanc"
            )
    print(
        f"uploads finished {statistics.median(drains):.2f} s (median; "
        f"{min(drains):.2f}-{max(drains):.2f}) after the last acknowledgement"
        + (
            f"; at the listener's priority {statistics.median(same_priority_drains):.2f} s"
            if same_priority_drains
            else ""
        )
    )
    print(f"load average (1 min) at the start and the end: {loads[0]:.1f}, {loads[1]:.1f}")
    print(memory_note())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
