"""The listener's hot path into the index: one INSERT per instance on the bare sqlite3 connection."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text

from pacs_ai.index.db import WriteGate, make_engine, make_write_gate, upgrade_schema
from pacs_ai.index.ingest import InstanceHeader, NewInstanceInsert, Sender, ensure_series, instance_row
from pacs_ai.index.models import Instance
from tests.unit.test_index_write_gate import _gate_is_held

SENDER = Sender("CT_SCANNER", "10.0.0.7")
HEADER = InstanceHeader(
    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
    study_instance_uid="1.2.826.0.1.3680043.8.498.2",
    series_instance_uid="1.2.826.0.1.3680043.8.498.3",
    transfer_syntax_uid="1.2.840.10008.1.2.1",
    patient_id="P1",
    issuer_of_patient_id="",
    patient_name="Doe^Jane",
    patient_birth_date=None,
    patient_sex=None,
    accession_number="A1",
    study_date="20261125",
    study_description=None,
    modality="CT",
    body_part_examined="CHEST",
    series_description=None,
    series_number=1,
    instance_number=7,
    image_type=None,
    slice_thickness=1.0,
)


@pytest.fixture
def gate(tmp_path: Path) -> WriteGate:
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    upgrade_schema(url)
    return make_write_gate(url)


def _series_id(gate: WriteGate) -> int:
    with gate.begin() as connection:
        return ensure_series(connection, HEADER, SENDER)


def test_rows_read_back_as_sqlalchemy_would_have_written_them(gate: WriteGate) -> None:
    series_id = _series_id(gate)
    insert = NewInstanceInsert(gate.engine.dialect)
    row = instance_row(HEADER, path="/spool/a.dcm", size=525_000, sender=SENDER, series_id=series_id)
    with gate.begin_dbapi() as cursor:
        assert insert.execute(cursor, row) is True
    with gate.engine.connect() as connection:
        stored = connection.execute(select(Instance)).one()
    assert stored.sop_instance_uid == HEADER.sop_instance_uid
    assert (stored.series_fk, stored.instance_number, stored.size_bytes) == (series_id, 7, 525_000)
    assert stored.routed is False and stored.duplicates_received == 0 and stored.purged_at is None
    # The DateTime column's own conversion was applied: it reads back as the datetime written.
    assert isinstance(stored.received_at, datetime) and stored.received_at == row["received_at"]


def test_an_indexed_sop_instance_is_not_inserted_again(gate: WriteGate) -> None:
    series_id = _series_id(gate)
    insert = NewInstanceInsert(gate.engine.dialect)
    first = instance_row(HEADER, path="/spool/a.dcm", size=1, sender=SENDER, series_id=series_id)
    other = instance_row(
        dataclasses.replace(HEADER, sop_instance_uid="1.2.826.0.1.3680043.8.498.4"),
        path="/spool/b.dcm",
        size=1,
        sender=SENDER,
        series_id=series_id,
    )
    with gate.begin_dbapi() as cursor:
        assert insert.execute(cursor, first) is True
    with gate.begin_dbapi() as cursor:
        assert [insert.execute(cursor, row) for row in (first, other)] == [False, True]
    with gate.engine.connect() as connection:
        paths = connection.execute(select(Instance.path).order_by(Instance.id)).scalars().all()
    assert paths == ["/spool/a.dcm", "/spool/b.dcm"]


def test_a_failed_dbapi_transaction_is_rolled_back_and_opens_the_gate(gate: WriteGate) -> None:
    series_id = _series_id(gate)
    insert = NewInstanceInsert(gate.engine.dialect)
    good = instance_row(HEADER, path="/spool/a.dcm", size=1, sender=SENDER, series_id=series_id)
    orphan = dict(good, sop_instance_uid="1.2.826.0.1.3680043.8.498.5", series_fk=series_id + 100)
    with pytest.raises(gate.engine.dialect.loaded_dbapi.IntegrityError), gate.begin_dbapi() as cursor:
        insert.execute(cursor, good)
        insert.execute(cursor, orphan)  # no such series: the foreign key refuses it
    assert not _gate_is_held(gate)
    with gate.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM instances")).scalar_one() == 0
    with gate.begin_dbapi() as cursor:  # the pooled connection is usable again
        assert insert.execute(cursor, good) is True


def test_the_dbapi_path_commits_under_the_lock_and_flushes_after_it(
    gate: WriteGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    series_id = _series_id(gate)
    insert = NewInstanceInsert(gate.engine.dialect)
    flushes: list[bool] = []
    real_fdatasync = os.fdatasync

    def recording_fdatasync(descriptor: int) -> None:
        flushes.append(_gate_is_held(gate))
        real_fdatasync(descriptor)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    with gate.begin_dbapi() as cursor:
        assert _gate_is_held(gate)
        insert.execute(
            cursor, instance_row(HEADER, path="/spool/a.dcm", size=1, sender=SENDER, series_id=series_id)
        )
    assert flushes == [False]


def test_only_sqlite_files_have_the_dbapi_path() -> None:
    assert not WriteGate(make_engine("sqlite:///:memory:")).has_dbapi_path
    with (
        pytest.raises(RuntimeError, match="SQLite database file"),
        WriteGate(make_engine("sqlite:///:memory:")).begin_dbapi(),
    ):
        pass
