"""Benchmark: large uploads in parts vs one PUT, and retention's batched deletes vs one DELETE per object.

Against a real S3 server (SeaweedFS, ``weed server -s3``, started for the run), through
pacs-ai's own :class:`~pacs_ai.storage.s3.S3Storage`:

* **large object** (a whole-body SEG: ``--mib`` MiB of random bytes, 64 by default, as the test
  store holds about 1 GB): uploaded with ``storage_s3_multipart_threshold_mb`` above its size
  (one PUT, what pacs-ai did before)
  and with the defaults (16 MiB parts, 4 at once), the two taking turns; medians of
  ``--repeats`` runs.  The ratio is one PUT's time over the multipart time.
* **retention's deletes**: ``--objects`` small objects (received instances) deleted with one
  DeleteObject call each (the storage's ``delete``) vs ``delete_many`` (DeleteObjects, 1000 keys
  per call); the ratio is per-object time over batched time.

    python benchmarks/storage_transfers.py --repeats 3

Both peers run in this process on the same machine; take the ratios, not the rates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pacs_ai.config import Settings  # noqa: E402
from pacs_ai.storage import StorageError, open_storage  # noqa: E402
from pacs_ai.storage.keys import instance_key, result_key  # noqa: E402
from pacs_ai.storage.s3 import S3Storage  # noqa: E402
from tests.object_store import SeaweedS3, storage_settings  # noqa: E402

MIB = 1024 * 1024


def _storage(store: SeaweedS3, data_dir: Path, **extra: object) -> S3Storage:
    """The boto3 client's storage (``storage_s3_client``; ``storage_clients.py`` compares the clients)."""
    storage = open_storage(
        Settings(data_dir=data_dir, **storage_settings(store, storage_s3_client="boto3", **extra))
    )
    assert isinstance(storage, S3Storage)
    return storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="size of the large object (MiB)")
    parser.add_argument("--objects", type=int, default=2000, help="small objects to delete")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with SeaweedS3() as store, tempfile.TemporaryDirectory(prefix="pacs-ai-bench-") as temporary:
        directory = Path(temporary)
        big = directory / "seg.dcm"
        big.write_bytes(os.urandom(args.mib * MIB))
        one_put = _storage(store, directory, storage_s3_multipart_threshold_mb=args.mib + 1)
        in_parts = _storage(store, directory)
        key = result_key("1.2.3", "1.2.3.9")
        times: dict[str, list[float]] = {"one PUT": [], "multipart": []}
        failures: dict[str, list[str]] = {"one PUT": [], "multipart": []}
        for _ in range(args.repeats):
            for name, storage in (("one PUT", one_put), ("multipart", in_parts)):
                started = time.perf_counter()
                try:
                    storage.put_file(key, big)
                except StorageError as exc:  # counted: how reliably each way uploads is measured too
                    failures[name].append(str(exc))
                    continue
                times[name].append(time.perf_counter() - started)
        for name, reasons in failures.items():
            for reason in reasons:
                print(f"  {name} failed (after botocore's retries): {reason}")
        put, parts = statistics.median(times["one PUT"]), statistics.median(times["multipart"])
        etag = str(in_parts.client.head_object(Bucket=in_parts.bucket, Key=in_parts._object(key))["ETag"])
        print(f"large object, {args.mib} MiB (medians of {args.repeats}; multipart ETag {etag}):")
        ok = {name: f"{len(times[name])} of {args.repeats} uploaded" for name in times}
        print(f"  one PUT    {put:6.2f} s  {args.mib / put:7.1f} MiB/s  ({ok['one PUT']})")
        print(
            f"  multipart  {parts:6.2f} s  {args.mib / parts:7.1f} MiB/s  ({ok['multipart']})  "
            f"ratio {put / parts:.2f}x one PUT"
        )

        deletes: dict[str, list[float]] = {"one by one": [], "DeleteObjects": []}
        for repeat in range(args.repeats):
            for name in deletes:
                keys = [
                    instance_key("1.2.3", f"1.2.3.{repeat}", f"{name[:3]}.{n}") for n in range(args.objects)
                ]
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(lambda k: in_parts.put_bytes(k, b"DICM"), keys))
                started = time.perf_counter()
                if name == "one by one":
                    for k in keys:
                        in_parts.delete(k)
                else:
                    failed = in_parts.delete_many(keys)
                    assert not failed, failed
                deletes[name].append(time.perf_counter() - started)
                assert not list(in_parts.list(f"instances/1.2.3/1.2.3.{repeat}/{name[:3]}")), "left behind"
        single, batched = (
            statistics.median(deletes["one by one"]),
            statistics.median(deletes["DeleteObjects"]),
        )
        print(f"retention deletes, {args.objects} objects (medians of {args.repeats}):")
        print(f"  one DeleteObject each  {single:6.2f} s  {args.objects / single:8.0f}/s")
        print(
            f"  DeleteObjects batches  {batched:6.2f} s  {args.objects / batched:8.0f}/s  "
            f"ratio {single / batched:.1f}x"
        )


if __name__ == "__main__":
    main()
