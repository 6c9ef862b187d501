"""Running the real ``pacs-ai serve`` in a subprocess, for end-to-end tests and benchmarks.

Backends:

* ``embedded``: SQLite index and the redis-server pacs-ai starts itself (the README's default);
* ``servers``: PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379, as in production.
  Each use gets its own throwaway PostgreSQL database and its own Redis database number.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.storage.keys import spool_path
from tests.peers import echoscu, free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get(
    "PACS_AI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_TEST_URL = os.environ.get("PACS_AI_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def start_worker(
    env: dict[str, str], node: str, log_dir: Path, *, queues: str = "cpu,gpu", **popen: Any
) -> subprocess.Popen[bytes]:
    """``pacs-ai worker`` (concurrency 1) in a process group of its own, as on a worker host.

    Its log and its standard output go to ``log_dir``; ``popen`` adds ``subprocess.Popen``
    arguments (e.g. ``user`` to run it as another Unix user).
    """
    return subprocess.Popen(
        [sys.executable, "-m", "pacs_ai.cli.main", "worker", "--queues", queues, "--concurrency", "1"]
        + ["--name", node, "--logfile", str(log_dir / "worker.log")],
        env=env,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=open(log_dir / "stdout.log", "wb"),  # noqa: SIM115 - the child keeps it
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **popen,
    )


class PostgresDatabase:
    """A throwaway PostgreSQL database, dropped on exit."""

    def __init__(self) -> None:
        self.name = f"pacs_ai_test_{uuid.uuid4().hex[:12]}"
        self.admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")

    @property
    def url(self) -> str:
        return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + self.name

    def __enter__(self) -> PostgresDatabase:
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.name}"'))
        return self

    def __exit__(self, *exc: object) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


class PacsAiService:
    """``pacs-ai serve`` with a throwaway data directory, stopped (SIGTERM) on exit."""

    def __init__(
        self,
        data_dir: Path,
        *,
        backend: str = "embedded",
        destinations: dict[str, dict[str, Any]] | None = None,
        profiles_dir: Path | None = None,
        ae_title: str = "PACS_AI",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.backend = backend
        self.port = free_port()
        #: The worklist web app ``pacs-ai serve`` runs (PACS_AI_WORKLIST_ENABLED=false in extra_env: none).
        self.worklist_port = free_port()
        #: The service's Prometheus exporter (/metrics).
        self.metrics_port = free_port()
        self.ae_title = ae_title
        self.process: subprocess.Popen[bytes] | None = None
        self._postgres: PostgresDatabase | None = None
        self.env = {
            **os.environ,
            "PACS_AI_DATA_DIR": str(data_dir),
            "PACS_AI_AE_TITLE": ae_title,
            "PACS_AI_LISTEN_HOST": "127.0.0.1",
            "PACS_AI_LISTEN_PORT": str(self.port),
            "PACS_AI_LISTENER_PROCESSES": "1",
            "PACS_AI_WORKER_CONCURRENCY": "1",
            "PACS_AI_QUIET_PERIOD_SECONDS": "1.0",
            "PACS_AI_MIN_FREE_DISK_MB": "64",
            "PACS_AI_DESTINATIONS": json.dumps(destinations or {}),
            "PACS_AI_WORKLIST_HOST": "127.0.0.1",
            "PACS_AI_WORKLIST_PORT": str(self.worklist_port),
            "PACS_AI_METRICS_PORT": str(self.metrics_port),
            # Gauges (queue depths, backlogs, disk) read every second rather than every 15.
            "PACS_AI_METRICS_SAMPLE_SECONDS": "1",
            **({"PACS_AI_PROFILES_DIR": str(profiles_dir)} if profiles_dir else {}),
            **(extra_env or {}),
        }
        self.env.pop("PACS_AI_SETTINGS_JSON", None)
        self.env.pop("PACS_AI_CONFIG_FILE", None)
        self.database_url = f"sqlite:///{data_dir / 'index.sqlite3'}"

    @property
    def worklist_url(self) -> str:
        """Base URL of the worklist, without the trailing slash."""
        return f"http://127.0.0.1:{self.worklist_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self) -> str:
        """The text of the service's /metrics, as Prometheus would scrape it."""
        response = httpx.get(self.metrics_url, timeout=10)
        response.raise_for_status()
        return response.text

    @property
    def worklist_enabled(self) -> bool:
        return self.env.get("PACS_AI_WORKLIST_ENABLED", "true").lower() not in ("0", "false", "no", "off")

    def worklist_healthy(self) -> bool:
        try:
            return httpx.get(f"{self.worklist_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "pacs-ai.log"

    def logs(self) -> str:
        parts = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            parts.append(f"===== {path.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def start(self, timeout: float = 90.0) -> PacsAiService:
        if self.backend == "servers":
            self._postgres = PostgresDatabase().__enter__()
            self.database_url = self._postgres.url
            redis_db = random.randint(1, 15)
            self.env["PACS_AI_DATABASE_URL"] = self.database_url
            self.env["PACS_AI_BROKER_URL"] = f"{REDIS_TEST_URL}/{redis_db}"
            import redis

            redis.Redis.from_url(f"{REDIS_TEST_URL}/{redis_db}").flushdb()
        elif self.backend != "embedded":
            raise ValueError(f"unknown backend {self.backend!r}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pacs_ai.cli.main", "serve"],
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.data_dir / "serve.stderr", "wb"),  # noqa: SIM115
        )
        try:
            wait_for(
                lambda: self.is_ready(), timeout=timeout, interval=0.3, description="pacs-ai to become ready"
            )
        except Exception:
            self.stop()
            raise RuntimeError(f"pacs-ai did not start:\n{self.stderr_tail()}\n{self.logs()}") from None
        return self

    def stderr_tail(self) -> str:
        path = self.data_dir / "serve.stderr"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def is_ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"pacs-ai exited with {self.process.returncode}:\n{self.stderr_tail()}")
        state = self.run_state()
        if not state or not state.get("workers") and self.env.get("PACS_AI_WORKER_PROCESSES") != "0":
            return False
        workers_ready = all(self.worker_is_ready(worker["node"]) for worker in state["workers"])
        if self.worklist_enabled and not self.worklist_healthy():
            return False
        return workers_ready and echoscu("127.0.0.1", self.port, self.ae_title)

    def worker_is_ready(self, node: str) -> bool:
        """True when the worker's row in the index says it consumes its queues (it writes it itself)."""
        try:
            return bool(self.query("SELECT 1 FROM workers WHERE node = :node AND state = 'READY'", node=node))
        except SQLAlchemyError:  # no index or no workers table yet
            return False

    def run_state(self) -> dict[str, Any] | None:
        path = self.data_dir / "run" / "service.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def spool_file(self, key: str) -> Path:
        """The receiver's spool file of an instance the index records by its storage key."""
        return spool_path(self.data_dir / "spool", key)

    def engine(self) -> Engine:
        return create_engine(self.database_url)

    def query(self, sql: str, **params: Any) -> list[Any]:
        engine = self.engine()
        try:
            with engine.connect() as connection:
                return list(connection.execute(text(sql), params).all())
        finally:
            engine.dispose()

    def cli(
        self, *args: str, check: bool = False, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``pacs-ai ARGS`` against this service's settings; ``input`` goes to standard input."""
        return subprocess.run(
            [sys.executable, "-m", "pacs_ai.cli.main", *args],
            env=self.env,
            cwd=REPO_ROOT,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._postgres is not None:
            # Workers may still hold connections for a moment after exiting.
            time.sleep(0.2)
            self._postgres.__exit__(None, None, None)
            self._postgres = None

    def __enter__(self) -> PacsAiService:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
