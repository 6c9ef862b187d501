"""C-STORE ingest throughput of reference SCPs (Orthanc, DCMTK storescp), measured with DCMTK storescu.

Library use: :func:`measure_ingest` times any SCP (pacs-ai's listener included) receiving a folder
over N concurrent associations.  Command line: compares the reference peers, e.g.::

    python benchmarks/ingest_peers.py --dir ../shared/data/ct-head-ge --associations 1 4 --repeats 3

Every measurement uses a freshly started peer, because Orthanc answers a re-sent instance without
storing it again, which would inflate later runs.  Timing covers only the storescu runs (wall clock
from first process start to last process exit); file scanning and profile generation happen before.

Besides the rate, every run records the CPU time the whole machine spent per instance (all
cores, from ``/proc/stat``: the peer, its storescu clients and the kernel's work for both), which
spreads far less than the rate on a shared machine and shows how much work each peer needs for the
same instances.

Fairness on a shared, noisy machine (:func:`run_interleaved`): the peers take turns within every
repeat (in a rotating order), so a slow spell of the machine hits them alike; each run starts once
the freshly started peer has finished starting up (:func:`wait_until_quiet`), so that start-up
work is not counted as ingest, and once everything earlier runs wrote is on the disk (``sync``):
storescp never flushes its files, and their writeback fell into whichever run came next (with
three peers rotating, pacs-ai followed storescp three times in five); and no peer's files are
deleted until all runs are over.
Deleting between runs made whichever peer came next slower: on ext4 without a journal, as here,
creating a file skips the inodes freed in the last minutes, reading each one to tell (seen in
``perf``: an eighth of the listener's CPU in ``recently_deleted``), and Orthanc's rate fell from
about 570 to 390 instances/s over eight runs that way.  For the same reason, start a measurement
only some minutes after anything deleted many files on the same filesystem (a test run, the end
of an earlier benchmark, which removes its runs' files): an inode counts as recently freed for 60
seconds, or six minutes while its inode table block is not yet written back.  Every run now waits
for that itself (:func:`wait_until_inodes_settle`: creating a file took about 850 us right after
20,000 files were deleted, 15-80 us otherwise).  On 2026-11-25, two
runs started within three minutes of such deletions had pacs-ai at 0.87x and 0.93x Orthanc's rate
at 4 associations, with ``__ext4_new_inode`` at 14% of the listener's CPU; runs started after a
quiet spell had it at 1.3-1.4x, with ``__ext4_new_inode`` at about 1%.  Orthanc, whose files go
into many hashed folders, lost far less.
"""

from __future__ import annotations

import argparse
import os
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


@dataclass(frozen=True)
class Run:
    """One measurement: instances per second and the whole machine's CPU milliseconds per instance."""

    rate: float
    cpu_ms_per_instance: float


def machine_cpu_seconds() -> float:
    """CPU seconds all cores of this machine have spent busy since boot (``/proc/stat``).

    Busy is user, nice, system, irq and softirq time: not idle, not waiting for I/O, not steal.
    """
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    # Not steal (time the hypervisor gave to other machines) nor guest (already counted in user).
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(*, busy_cores: float = 0.15, window: float = 0.25, timeout: float = 10.0) -> float:
    """Wait until the machine is nearly idle (the peer just started has finished starting up).

    A peer is ready as soon as it answers on its port, but may still be starting other parts
    (pacs-ai's second listener process and its worklist server, say), which would take CPU from
    the measured run.  Returns the busy cores of the last ``window``; gives up after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        start = machine_cpu_seconds()
        time.sleep(window)
        busy = (machine_cpu_seconds() - start) / window
        if busy <= busy_cores or time.monotonic() > deadline:
            return busy


def file_creation_microseconds(directory: Path, files: int = 16) -> float:
    """Median wall time, in microseconds, of creating a new empty file in ``directory``.

    The files are kept (they go with ``directory``): deleting them would add to the very
    recently freed inodes this probe looks for (see :func:`wait_until_inodes_settle`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    times = []
    for _ in range(files):
        path = directory / f"probe-{time.monotonic_ns()}"
        start = time.perf_counter()
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def wait_until_inodes_settle(
    directory: Path, *, slow_microseconds: float = 150.0, timeout: float = 420.0
) -> float:
    """Wait until creating a file in ``directory`` costs what it does on a settled filesystem.

    On ext4 without a journal (as on this machine), creating a file skips every inode of its
    block group freed in the last minutes, reading each one's inode table entry to tell: after a
    mass deletion (a test run, an earlier benchmark's clean-up) each new file costs up to a
    millisecond of CPU more, for one to six minutes.  Whichever peer runs in that spell is
    slowed, so every run waits for it to pass.  A heuristic: it sees the block group new files in
    ``directory`` come from, which need not be the one every peer's files will come from.
    Returns True once creation is fast; False, with a warning on stderr, if it is still slow
    after ``timeout`` (a filesystem slow at creating files by nature, a network one say).
    """
    start = time.monotonic()
    while True:
        cost = file_creation_microseconds(directory)
        if cost < slow_microseconds:
            return True
        if time.monotonic() - start > timeout:
            print(
                f"warning: creating a file in {directory} still takes {cost:.0f} us after "
                f"{timeout:.0f} s; measuring without waiting for it from now on",
                file=sys.stderr,
            )
            return False
        time.sleep(5.0)


def measure_ingest(
    send_dir: Path,
    host: str,
    port: int,
    aet: str,
    associations: int,
    *,
    calling_aet: str = "BENCH",
) -> Run:
    """Send every DICOM file under ``send_dir`` to ``aet@host:port``; return its rate and CPU cost.

    Files are split round-robin over ``associations`` concurrent storescu processes.  Raises
    :class:`tests.peers.PeerError` if any store fails, so a fast-but-failing SCP never scores.
    """
    files = dicom_files([send_dir])
    if not files:
        raise PeerError(f"no DICOM files under {send_dir}")
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        profile = write_storescu_profile(files, Path(tmp) / "storescu.cfg")
        cpu_start, start = machine_cpu_seconds(), time.perf_counter()
        result = storescu(
            host, port, aet, files, calling_aet=calling_aet, associations=associations, profile=profile
        )
        elapsed, cpu = time.perf_counter() - start, machine_cpu_seconds() - cpu_start
    if result.returncode != 0:
        raise PeerError(f"storescu to {aet}@{host}:{port} failed:\n{result.stderr[-2000:]}")
    return Run(rate=len(files) / elapsed, cpu_ms_per_instance=cpu * 1000 / len(files))


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
    """Result of one (peer, associations) cell: its runs, in the order they were made."""

    peer: str
    associations: int
    instances: int
    runs: tuple[Run, ...]

    @property
    def rates(self) -> tuple[float, ...]:
        """Instances per second of each run."""
        return tuple(run.rate for run in self.runs)

    @property
    def median(self) -> float:
        """Median throughput over the runs."""
        return statistics.median(self.rates)

    @property
    def median_cpu_ms(self) -> float:
        """Median CPU milliseconds per instance (whole machine) over the runs."""
        return statistics.median(run.cpu_ms_per_instance for run in self.runs)


def run_interleaved(
    send_dir: Path, peers: Mapping[str, PeerFactory], associations: Sequence[int], repeats: int
) -> list[Row]:
    """Measure every peer at every association count ``repeats`` times, the peers taking turns.

    Each run gets a fresh peer whose files stay on disk, under one temporary directory, until all
    runs are done (see the module docstring); rows come out by association count, then peer.
    """
    runs: dict[tuple[int, str], list[Run]] = {(n, name): [] for n in associations for name in peers}
    names = list(peers)
    settling, wait_for_settling = 0.0, True
    with tempfile.TemporaryDirectory(prefix="ingest-runs-") as runs_dir:
        previous_tempdir, tempfile.tempdir = tempfile.tempdir, runs_dir
        try:
            for repeat in range(repeats):
                turn = names[repeat % len(names) :] + names[: repeat % len(names)]
                for count in associations:
                    for name in turn:
                        # The last run's unflushed files (storescp never flushes) would otherwise be
                        # written back during this one, taking CPU and slowing this peer's flushes.
                        os.sync()
                        if wait_for_settling:
                            started = time.monotonic()
                            wait_for_settling = wait_until_inodes_settle(Path(runs_dir) / "probes")
                            settling += time.monotonic() - started
                        with peers[name](keep_files=True) as endpoint:
                            wait_until_quiet()
                            run = measure_ingest(send_dir, endpoint.host, endpoint.port, endpoint.aet, count)
                        runs[(count, name)].append(run)
        finally:
            tempfile.tempdir = previous_tempdir
    if settling >= 1.0:
        print(f"(waited {settling:.0f} s in all for file creation to settle)", file=sys.stderr)
    instances = len(dicom_files([send_dir]))
    return [Row(name, n, instances, tuple(runs[(n, name)])) for n in associations for name in names]


def format_table(rows: Sequence[Row]) -> str:
    """Render rows as a fixed-width text table."""
    header = (
        f"{'peer':<16} {'assoc':>5} {'files':>6} {'median inst/s':>14} {'CPU ms/inst':>11}  runs (inst/s)"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        runs = ", ".join(f"{r:.1f}" for r in row.rates)
        lines.append(
            f"{row.peer:<16} {row.associations:>5} {row.instances:>6} {row.median:>14.1f} "
            f"{row.median_cpu_ms:>11.2f}  {runs}"
        )
    lines.append("(CPU ms/inst: median busy time of the whole machine, all cores, per instance sent)")
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
