"""Benchmark: the two S3 clients (obstore, boto3) on a series' worth of small objects.

Against a real S3 server (SeaweedFS, ``weed server -s3``, started for the run), through
pacs-ai's own storage backends (``storage_s3_client = "obstore"`` and ``"boto3"``):

* **GET**: ``--objects`` objects of ``--kib`` KiB (a 300-slice CT's instances) fetched as a
  worker fetches a series, :meth:`get_files` into a fresh folder, ``storage_fetch_concurrency``
  at once;
* **PUT**: the same objects uploaded as the receiver's uploader does, ``put_file`` from 8
  threads (``UPLOADS_AT_ONCE``).

The clients take turns, on a fresh store each repeat; medians of ``--repeats`` runs of wall time and
of this process's CPU time (all its threads, Rust's included: what competes with the listener for
the cores).

    python benchmarks/storage_clients.py --repeats 3

Client and server share the machine; take the ratios, not the rates.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pacs_ai.config import Settings  # noqa: E402
from pacs_ai.receive.uploader import UPLOADS_AT_ONCE  # noqa: E402
from pacs_ai.storage import Storage, open_storage  # noqa: E402
from pacs_ai.storage.keys import instance_key  # noqa: E402
from tests.object_store import SeaweedS3, storage_settings  # noqa: E402
from tests.tls_certificates import certificate_authority, issue  # noqa: E402

CLIENTS = ("obstore", "boto3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--kib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="S3 over HTTPS (a throwaway CA): the payload goes unsigned, as over HTTPS in production",
    )
    parser.add_argument("--fetch-concurrency", type=int, default=Settings().storage_fetch_concurrency)
    args = parser.parse_args()

    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}

    def measure(client: str, what: str, action: Callable[[], object]) -> None:
        started, started_cpu = time.perf_counter(), time.process_time()
        action()
        wall.setdefault((client, what), []).append(time.perf_counter() - started)
        cpu.setdefault((client, what), []).append(time.process_time() - started_cpu)

    with tempfile.TemporaryDirectory(prefix="pacs-ai-bench-") as temporary:
        directory = Path(temporary)
        sources = directory / "sources"
        sources.mkdir()
        files = []
        for n in range(args.objects):
            path = sources / f"{n}.dcm"
            path.write_bytes(os.urandom(args.kib * 1024))
            files.append(path)
        # A fresh store for each repeat: SeaweedFS reclaims deleted objects' space only when it
        # vacuums, and the test store holds about 1 GB.
        for repeat in range(args.repeats):
            tls, ca_bundle = None, None
            if args.tls:
                ca = certificate_authority(directory / f"tls-{repeat}")
                (directory / f"tls-{repeat}" / "server").mkdir()
                server = issue(ca, directory / f"tls-{repeat}" / "server", "127.0.0.1", server=True)
                tls, ca_bundle = (ca.certificate, server.certificate, server.key), ca.certificate
            with SeaweedS3(tls=tls) as store:
                for client in CLIENTS:
                    storage = open_storage(
                        Settings(
                            data_dir=directory / client,
                            storage_s3_client=client,
                            storage_fetch_concurrency=args.fetch_concurrency,
                            storage_s3_ca_bundle=ca_bundle,
                            **storage_settings(store),
                        )
                    )
                    warm = [instance_key("1.2", "1.2.0", f"{n}") for n in range(UPLOADS_AT_ONCE)]
                    for key in warm:  # connections opened and credentials resolved before the clock
                        storage.put_file(key, files[0])
                    keys = [instance_key("1.2.3", f"1.2.3.{repeat}", f"{n}") for n in range(args.objects)]

                    def put_all(storage: Storage = storage, keys: list[str] = keys) -> None:
                        with ThreadPoolExecutor(UPLOADS_AT_ONCE) as uploaders:
                            list(uploaders.map(storage.put_file, keys, files))

                    target = directory / "fetched"
                    shutil.rmtree(target, ignore_errors=True)
                    target.mkdir()
                    items = [(key, target / f"{n}.dcm") for n, key in enumerate(keys)]
                    measure(client, "PUT", put_all)
                    measure(client, "GET", lambda storage=storage, items=items: storage.get_files(items))
                    assert all(path.stat().st_size == args.kib * 1024 for _, path in items)

        print(
            f"{args.objects} objects of {args.kib} KiB, medians of {args.repeats} "
            f"(GET: get_files, {args.fetch_concurrency} at once; "
            f"PUT: put_file from {UPLOADS_AT_ONCE} threads)"
        )
        for what in ("GET", "PUT"):
            for client in CLIENTS:
                w, c = statistics.median(wall[client, what]), statistics.median(cpu[client, what])
                runs = ", ".join(f"{t:.2f}" for t in wall[client, what])
                print(
                    f"  {what} {client:8s} {w:6.2f} s wall ({runs})  {c:6.2f} s client CPU  "
                    f"{1000 * c / args.objects:5.2f} ms CPU per object"
                )
            ratio = statistics.median(wall["boto3", what]) / statistics.median(wall["obstore", what])
            print(f"  {what}: obstore {ratio:.2f}x boto3's speed")


if __name__ == "__main__":
    main()
