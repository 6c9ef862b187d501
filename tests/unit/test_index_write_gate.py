"""The SQLite write gate: gated transactions take turns, across threads and across gate objects."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text

from pacs_ai.index.db import WriteGate, flush_wal, make_engine, make_write_gate


def test_a_second_gated_transaction_waits_for_the_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    first_gate, second_gate = WriteGate(make_engine(url)), WriteGate(make_engine(url))  # two "processes"
    with first_gate.begin() as connection:
        connection.execute(text("CREATE TABLE events (name TEXT)"))
    first_inside, release_first = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with first_gate.begin() as connection:
            first_inside.set()
            release_first.wait(10)
            connection.execute(text("INSERT INTO events VALUES ('first')"))
            order.append("first committed")

    def second() -> None:
        first_inside.wait(10)
        with second_gate.begin() as connection:
            order.append("second entered")
            connection.execute(text("INSERT INTO events VALUES ('second')"))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    first_inside.wait(10)
    time.sleep(0.3)
    assert order == []
    assert _gate_is_held(first_gate)  # the second waits at the gate, not in SQLite's busy handler
    release_first.set()
    for thread in threads:
        thread.join(10)

    assert order == ["first committed", "second entered"]
    with first_gate.begin() as connection:
        assert connection.execute(text("SELECT count(*) FROM events")).scalar_one() == 2
    assert first_gate.lock_path == tmp_path / "index.sqlite3.write-lock"
    assert not _gate_is_held(first_gate)


def _gate_is_held(gate: WriteGate) -> bool:
    """Whether some transaction holds the gate's lock (tried from a descriptor of our own)."""
    assert gate.lock_path is not None
    descriptor = os.open(gate.lock_path, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


def test_a_failed_transaction_opens_the_gate_again(tmp_path: Path) -> None:
    gate = WriteGate(make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}"))
    with pytest.raises(Exception, match="no_such_table"), gate.begin() as connection:
        connection.execute(text("SELECT no_such_column FROM no_such_table"))
    assert not _gate_is_held(gate)
    entered = threading.Event()

    def enter() -> None:
        with gate.begin():
            entered.set()

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join(5)
    assert entered.is_set()


def test_connections_leave_and_return_to_the_pool_outside_the_lock(tmp_path: Path) -> None:
    """Pool checkout and the reset on return are not part of the transaction: no one waits for them."""
    gate = make_write_gate(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    lock_held_at: list[tuple[str, bool]] = []
    for pool_event in ("checkout", "checkin"):
        event.listen(
            gate.engine,
            pool_event,
            lambda *_args, name=pool_event: lock_held_at.append((name, _gate_is_held(gate))),
        )
    with gate.begin() as connection:
        assert _gate_is_held(gate)
        connection.execute(text("CREATE TABLE events (name TEXT)"))
    assert lock_held_at == [("checkout", False), ("checkin", False)]


def test_other_databases_are_not_gated() -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")  # never connected
    assert WriteGate(engine).lock_path is None
    assert WriteGate(make_engine("sqlite:///:memory:")).lock_path is None


def test_the_listener_gate_flushes_the_wal_after_releasing_the_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits do not flush under the write lock; the gate flushes the WAL once the lock is free."""
    database = tmp_path / "index.sqlite3"
    gate = make_write_gate(f"sqlite:///{database}")
    with gate.begin() as connection:
        connection.execute(text("CREATE TABLE events (name TEXT)"))
        assert connection.execute(text("PRAGMA synchronous")).scalar_one() == 1  # NORMAL
    flushes: list[tuple[str, bool]] = []
    real_fdatasync = os.fdatasync

    def recording_fdatasync(descriptor: int) -> None:
        flushes.append((os.readlink(f"/proc/self/fd/{descriptor}"), _gate_is_held(gate)))
        real_fdatasync(descriptor)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    with gate.begin() as connection:
        connection.execute(text("INSERT INTO events VALUES ('stored')"))
        assert flushes == []
    assert flushes == [(f"{database}-wal", False)]

    with pytest.raises(Exception, match="no_such_table"), gate.begin() as connection:
        connection.execute(text("INSERT INTO no_such_table VALUES (1)"))
    assert len(flushes) == 1  # nothing committed, nothing to flush


def test_other_engines_flush_inside_each_commit(tmp_path: Path) -> None:
    gate = WriteGate(make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}"))
    assert gate.wal_path is None
    with gate.begin() as connection:
        assert connection.execute(text("PRAGMA synchronous")).scalar_one() == 2  # FULL


def test_a_missing_wal_has_nothing_to_flush(tmp_path: Path) -> None:
    flush_wal(tmp_path / "index.sqlite3-wal")  # checkpointed and removed: no error
