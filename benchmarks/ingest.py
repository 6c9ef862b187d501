"""Benchmark (a): C-STORE ingest rate of pacs-ai vs Orthanc vs DCMTK storescp, same run, same files.

Sends a generated 300-slice 512x512 chest CT (or ``--dir``) with DCMTK storescu over 1 and 4
concurrent associations to a freshly started peer each time, and prints instances/s and the
ratio of pacs-ai to each peer.  pacs-ai runs as ``pacs-ai serve`` with its durability on
(fsync of every file and index commit before Success), no workers, and ``--listener-processes``
listener processes sharing the port (default: the service's own default).

    python benchmarks/ingest.py --associations 1 4 --repeats 5

Where pacs-ai and Orthanc differ (2026-11-24, 2 shared cores): counted with strace over 300
instances at 4 associations, Orthanc 1.10 called ``fdatasync`` 321 times (once per file, its
SQLite index commits mostly unflushed), while pacs-ai flushes each file, the folder entry that
names it and its index commit (the WAL, after the write lock is released; see
``pacs_ai.index.db.make_write_gate``).  ``--no-fsync`` drops the first two, to show what they
cost; it is a diagnostic, never a setting for patient data.  Single runs spread by 20% or more
on a shared machine: compare medians of several runs, and the CPU time per instance the table
reports beside each rate.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.ingest_peers import PEERS, Endpoint, format_table, run_interleaved  # noqa: E402
from pacs_ai.config import Settings  # noqa: E402
from pacs_ai.synthetic.phantom import write_chest_phantom  # noqa: E402
from tests.service import PacsAiService  # noqa: E402


def pacs_ai_endpoint_factory(  # type: ignore[no-untyped-def]
    listener_processes: int | None, backend: str, fsync: bool = True
):
    env = {
        "PACS_AI_FSYNC": "true" if fsync else "false",
        "PACS_AI_WORKER_PROCESSES": "0",
        "PACS_AI_LOG_LEVEL": "WARNING",
        # Always set: the test harness's PacsAiService runs 1 listener process unless told otherwise.
        "PACS_AI_LISTENER_PROCESSES": str(listener_processes or Settings().listener_processes),
    }

    @contextmanager
    def endpoint(keep_files: bool = False) -> Iterator[Endpoint]:
        data_dir = Path(tempfile.mkdtemp(prefix="pacs-ai-bench-")) / "data"
        try:
            with PacsAiService(data_dir, backend=backend, extra_env=env) as service:
                yield Endpoint("127.0.0.1", service.port, service.ae_title)
        finally:
            if not keep_files:
                shutil.rmtree(data_dir.parent, ignore_errors=True)

    return endpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, help="folder of DICOM files (default: a generated chest CT)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--listener-processes", type=int, help="default: the service's default")
    parser.add_argument("--backend", choices=["embedded", "servers"], default="embedded")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="diagnostic only: pacs-ai without fsync of files and folders (the index commit still "
        "waits for its flush), to show what the flushes cost; never a setting for patient data",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ingest-data-") as tmp:
        send_dir = args.dir
        if send_dir is None:
            send_dir = Path(tmp) / "ct"
            write_chest_phantom(
                send_dir, slices=args.slices, size=args.size, pixel_spacing_mm=0.7, slice_spacing_mm=1.0
            )
        pacs_ai = pacs_ai_endpoint_factory(args.listener_processes, args.backend, fsync=not args.no_fsync)
        peers = {"pacs-ai": pacs_ai, **PEERS}
        rows = run_interleaved(send_dir, peers, args.associations, args.repeats)
    print(
        f"C-STORE ingest, {rows[0].instances} instances, DCMTK storescu, loopback, median of "
        f"{args.repeats} runs per peer, peers taking turns, files kept until the end"
    )
    processes = args.listener_processes or Settings().listener_processes
    fsync = "fsync OFF (diagnostic)" if args.no_fsync else "fsync on"
    print(f"pacs-ai: {processes} listener processes, {args.backend} index/broker, {fsync}")
    print(format_table(rows))
    print()
    for associations in args.associations:
        cell = {row.peer: row for row in rows if row.associations == associations}
        ours = cell["pacs-ai"]
        ratios = ", ".join(
            f"vs {peer} {ours.median / row.median:.2f}x rate, "
            f"{ours.median_cpu_ms / row.median_cpu_ms:.2f}x CPU"
            for peer, row in cell.items()
            if peer != "pacs-ai"
        )
        print(f"{associations} association(s): pacs-ai {ours.median:.0f} inst/s; {ratios}")
    print("(rate ratio above 1: pacs-ai faster; CPU ratio below 1: pacs-ai needs less CPU per instance)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
