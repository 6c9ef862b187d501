"""C-STORE ingest throughput of reference SCPs (Orthanc, DCMTK storescp), measured with DCMTK storescu.

Library use: :func:`measure_ingest` times any SCP (pacs-ai's listener included) receiving a folder
over N concurrent associations.  Command line: compares the reference peers, e.g.::

    python benchmarks/ingest_peers.py --dir ../shared/data/ct-head-ge --associations 1 4 --repeats 3

Every measurement uses a freshly started peer, because Orthanc answers a re-sent instance without
storing it again, which would inflate later runs.  Timing covers only the storescu runs (wall clock
from first process start to last process exit); file scanning and profile generation happen before.

Fairness on a shared, noisy machine (:func:`run_interleaved`): the peers take turns within every
repeat (in a rotating order), so a slow spell of the machine hits them alike, and no peer's files are
deleted until all runs are over.  Deleting between runs made whichever peer came next slower: on
ext4 without a journal, as here, creating a file skips the inodes freed in the last minutes, reading
each one to tell (seen in ``perf``: an eighth of the listener's CPU in ``recently_deleted``), and
Orthanc's rate fell from about 570 to 390 instances/s over eight runs that way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.peers import (  # noqa: E402  (needs the repo root on sys.path first)
    OrthancServer,
    PeerError,
    StoreScp,
    dicom_files,
    shared_data_dir,
    storescu,
    write_storescu_profile,
)


@dataclass(frozen=True)
class Endpoint:
    """Where an SCP under test listens."""

    host: str
    port: int
    aet: str


#: Starts a fresh peer; ``keep_files=True`` leaves what it received on disk when it stops.
PeerFactory = Callable[..., AbstractContextManager[Endpoint]]


def measure_ingest(
    send_dir: Path,
    host: str,
    port: int,
    aet: str,
    associations: int,
    *,
    calling_aet: str = "BENCH",
) -> float:
    """Send every DICOM file under ``send_dir`` to ``aet@host:port``; return instances per second.

    Files are split round-robin over ``associations`` concurrent storescu processes.  Raises
    :class:`tests.peers.PeerError` if any store fails, so a fast-but-failing SCP never scores.
    """
    files = dicom_files([send_dir])
    if not files:
        raise PeerError(f"no DICOM files under {send_dir}")
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        profile = write_storescu_profile(files, Path(tmp) / "storescu.cfg")
        start = time.perf_counter()
        result = storescu(
            host, port, aet, files, calling_aet=calling_aet, associations=associations, profile=profile
        )
        elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise PeerError(f"storescu to {aet}@{host}:{port} failed:\n{result.stderr[-2000:]}")
    return len(files) / elapsed


@contextmanager
def orthanc_endpoint(keep_files: bool = False) -> Iterator[Endpoint]:
    """A fresh Orthanc 1.10 with default storage settings."""
    with OrthancServer(aet="ORTHANC", keep_workdir=keep_files) as orthanc:
        yield Endpoint(orthanc.host, orthanc.dicom_port, orthanc.aet)


@contextmanager
def storescp_endpoint(keep_files: bool = False) -> Iterator[Endpoint]:
    """A fresh DCMTK storescp forking one process per association."""
    with StoreScp(aet="STORESCP", keep_workdir=keep_files) as scp:
        yield Endpoint(scp.host, scp.port, scp.aet)


#: Peers compared by the command line; other modules may add entries (e.g. pacs-ai's listener).
PEERS: dict[str, PeerFactory] = {"orthanc": orthanc_endpoint, "dcmtk-storescp": storescp_endpoint}


@dataclass(frozen=True)
class Row:
    """Result of one (peer, associations) cell: per-run throughputs in instances/s."""

    peer: str
    associations: int
    instances: int
    rates: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median throughput over the runs."""
        return statistics.median(self.rates)


def run_interleaved(
    send_dir: Path, peers: Mapping[str, PeerFactory], associations: Sequence[int], repeats: int
) -> list[Row]:
    """Measure every peer at every association count ``repeats`` times, the peers taking turns.

    Each run gets a fresh peer whose files stay on disk, under one temporary directory, until all
    runs are done (see the module docstring); rows come out by association count, then peer.
    """
    rates: dict[tuple[int, str], list[float]] = {(n, name): [] for n in associations for name in peers}
    names = list(peers)
    with tempfile.TemporaryDirectory(prefix="ingest-runs-") as runs_dir:
        previous_tempdir, tempfile.tempdir = tempfile.tempdir, runs_dir
        try:
            for repeat in range(repeats):
                turn = names[repeat % len(names) :] + names[: repeat % len(names)]
                for count in associations:
                    for name in turn:
                        with peers[name](keep_files=True) as endpoint:
                            rate = measure_ingest(send_dir, endpoint.host, endpoint.port, endpoint.aet, count)
                        rates[(count, name)].append(rate)
        finally:
            tempfile.tempdir = previous_tempdir
    instances = len(dicom_files([send_dir]))
    return [Row(name, n, instances, tuple(rates[(n, name)])) for n in associations for name in names]


def format_table(rows: Sequence[Row]) -> str:
    """Render rows as a fixed-width text table."""
    header = f"{'peer':<16} {'assoc':>5} {'files':>6} {'median inst/s':>14}  runs (inst/s)"
    lines = [header, "-" * len(header)]
    for row in rows:
        runs = ", ".join(f"{r:.1f}" for r in row.rates)
        lines.append(f"{row.peer:<16} {row.associations:>5} {row.instances:>6} {row.median:>14.1f}  {runs}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=shared_data_dir() / "ct-head-ge", help="folder of DICOM files to send"
    )
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (fresh peer each)")
    parser.add_argument("--peers", nargs="+", choices=sorted(PEERS), default=list(PEERS))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table."""
    args = parse_args(argv)
    if not args.dir.is_dir():
        print(f"no such folder: {args.dir}", file=sys.stderr)
        return 2
    rows = run_interleaved(
        args.dir, {peer: PEERS[peer] for peer in args.peers}, args.associations, args.repeats
    )
    print(f"C-STORE ingest of {args.dir} (DCMTK storescu, wall time)")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
