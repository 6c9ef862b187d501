"""Engine, sessions and schema migrations for the index database.

SQLite is the embedded default: WAL journal so the listener processes, the
scheduler and the workers can read while one writes, and a busy timeout so
concurrent writers wait instead of failing.  Every commit is flushed to the
disk before it counts, so a committed row survives power loss (an
acknowledged instance must): with ``synchronous=FULL`` inside the commit, or,
for the listener's writes, right after it and outside the write lock
(:func:`make_write_gate`).  PostgreSQL is used by URL in production.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, *, flush_after_commit: bool = False) -> Engine:
    """Create an engine with the connection settings pacs-ai relies on.

    SQLite commits are flushed to the disk before they return
    (``synchronous=FULL``), unless ``flush_after_commit``: then they are not
    (``synchronous=NORMAL``, still flushed around checkpoints) and the caller
    must flush the WAL itself before relying on a commit, as the gate from
    :func:`make_write_gate` does.
    """
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
        synchronous = "NORMAL" if flush_after_commit else "FULL"
        event.listen(
            engine,
            "connect",
            lambda dbapi_connection, _record: _configure_sqlite_connection(dbapi_connection, synchronous),
        )
        # Let SQLAlchemy's BEGIN be the one that takes the write lock early
        # (BEGIN IMMEDIATE) so two writers never deadlock upgrading read locks.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    return create_engine(url, pool_pre_ping=True)


def _configure_sqlite_connection(dbapi_connection: Any, synchronous: str) -> None:
    # The sqlite3 module's own transaction handling would issue BEGIN itself;
    # switch it off so the "begin" listener above controls transactions.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


class WriteGate:
    """Write transactions that queue for SQLite's write lock instead of polling for it.

    SQLite lets one writer in at a time; a connection that finds the lock taken
    calls its busy handler, which sleeps 1, 2, 5, 10... ms and tries again.
    Listener processes committing hundreds of rows a second collide often, and
    each collision costs a sleep far longer than the commit it waits for (seen
    under strace: 175 sleeps, 0.4 s in all, for 300 instances over four
    associations into two listener processes).  Here a thread first takes an
    exclusive ``flock`` on a file next to the database, which the kernel hands
    to the next waiter as soon as it is released, and only then begins; SQLite's
    lock is then free, except against writers that do not use the gate (the
    scheduler and workers, whose writes are few).  On other databases
    (PostgreSQL) :meth:`begin` is simply ``engine.begin()``.

    ``flush_wal_after_unlock`` is for an engine whose commits do not flush
    (see :func:`make_write_gate`): :meth:`begin` then flushes the WAL after
    committing and after releasing both locks, before it returns.
    """

    def __init__(self, engine: Engine, *, flush_wal_after_unlock: bool = False) -> None:
        self.engine = engine
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self.lock_path = Path(f"{database}.write-lock") if database and database != ":memory:" else None
        #: The WAL file flushed after each commit (None: the commit flushed itself, or not SQLite).
        self.wal_path = Path(f"{database}-wal") if self.lock_path and flush_wal_after_unlock else None
        #: One lock file descriptor per thread: flock excludes open file descriptions, not threads.
        self._local = threading.local()

    @contextmanager
    def begin(self, *, flush: bool = True) -> Iterator[Connection]:
        """Like ``engine.begin()``, entered once no other gated transaction is open.

        On leaving without an error the transaction is committed and on the disk.
        With ``flush=False`` (on an engine whose commits do not flush) it is
        committed but reaches the disk only with the next flushed commit or
        checkpoint: for writes that a process being killed does not lose (the
        kernel has them) and that a flushed commit always follows when it
        matters (see :class:`pacs_ai.index.associations.AssociationMark`).
        """
        if self.lock_path is None:
            with self.engine.begin() as connection:
                yield connection
            return
        descriptor = self._descriptor()
        # The connection is taken from the pool before the lock and returned after it: checking
        # out and resetting a connection are no part of the transaction, and every microsecond
        # under the lock is one that the other listener processes wait (a quarter of the time
        # held for a one-row insert).
        with self.engine.connect() as connection, _write_lock(descriptor), connection.begin():
            yield connection
        if flush:
            self._flush_commits()

    @property
    def has_dbapi_path(self) -> bool:
        """Whether :meth:`begin_dbapi` may be used (a SQLite database file)."""
        return self.lock_path is not None

    @contextmanager
    def begin_dbapi(self) -> Iterator[Any]:
        """Like :meth:`begin`, yielding a cursor of the bare DBAPI (``sqlite3``) connection.

        For the listener's one statement per received instance
        (:class:`pacs_ai.index.ingest.NewInstanceInsert`), where SQLAlchemy's
        per-statement work costs more CPU than SQLite's.  SQLite only
        (:attr:`has_dbapi_path`); the transaction is begun, committed or
        rolled back here, under the same lock and flushed the same way.
        """
        if self.lock_path is None:
            raise RuntimeError("begin_dbapi needs a SQLite database file; use begin()")
        descriptor = self._descriptor()
        pooled = self.engine.raw_connection()
        with contextlib.closing(pooled):  # back to the pool, after the lock is released
            cursor = pooled.driver_connection.cursor()  # type: ignore[union-attr]
            with contextlib.closing(cursor), _write_lock(descriptor):
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    yield cursor
                except BaseException:
                    with contextlib.suppress(Exception):  # the pool rolls back on return anyway
                        cursor.execute("ROLLBACK")
                    raise
                cursor.execute("COMMIT")
        self._flush_commits()

    def flush(self) -> None:
        """Put the commits of :meth:`begin` with ``flush=False`` on the disk now."""
        self._flush_commits()

    def _flush_commits(self) -> None:
        """Put what was committed on the disk, for an engine whose commits do not flush."""
        if self.wal_path is not None:
            flush_wal(self.wal_path)

    def _descriptor(self) -> int:
        descriptor: int | None = getattr(self._local, "descriptor", None)
        if descriptor is None:
            assert self.lock_path is not None
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._local.descriptor = descriptor
        return descriptor


@contextmanager
def _write_lock(descriptor: int) -> Iterator[None]:
    """Hold the ``flock`` on a gate's lock file (waiting for it as long as it takes)."""
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)


def make_write_gate(url: str) -> WriteGate:
    """The listener's write path: commits flushed after the write lock is released, not under it.

    A flush takes a few milliseconds, and with ``synchronous=FULL`` SQLite
    flushes while holding the write lock, so commits from several listener
    processes are flushed strictly one after another.  Here a commit only
    writes its WAL frames, releases the locks, and then flushes the WAL file
    (:func:`flush_wal`), so the flushes of concurrent commits overlap instead
    of queueing behind the lock one by one.  The commit is on the disk before
    :meth:`WriteGate.begin` returns, as before; only the waiting moved.
    Checkpoints are unaffected: at ``synchronous=NORMAL`` SQLite still flushes
    the WAL before copying it into the database and the database after.
    """
    engine = make_engine(url, flush_after_commit=True)
    return WriteGate(engine, flush_wal_after_unlock=True)


def flush_wal(wal_path: Path) -> None:
    """Force every commit written so far to the WAL file onto the disk.

    A missing WAL file was checkpointed into the database file, which SQLite
    flushed, and removed when its last connection closed: nothing is left to
    flush.  A WAL restarted by a checkpoint meanwhile was flushed by it too.
    """
    try:
        descriptor = os.open(wal_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fdatasync(descriptor)
    finally:
        os.close(descriptor)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_schema(url: str) -> None:
    """Bring the database to the newest schema (idempotent).

    ``heads``: every branch, should two migrations written at the same time name the same parent.
    """
    command.upgrade(alembic_config(url), "heads")
    log.info("index database schema is up to date")
