"""storage keys

Instances and results are recorded by storage key (``instances/<study>/<series>/<sop>.dcm``,
``results/<study>/<sop>.dcm``), not by a host's path, so any host reading the
storage finds them (see :mod:`pacs_ai.storage.keys`).  Rows written before are
converted: a path in a ``spool`` folder (``.../spool/<study>/<series>/<sop>.dcm``)
or a ``results`` folder (``.../results/<study>/<sop>.dcm``) becomes its key;
any other path is left as it is (only the host that wrote it can read it).
``instances.uploaded_at`` records when an instance reached a remote object
store; the rows already there are counted as uploaded only once the uploader
has put them there.

A downgrade keeps the keys (the data directory is not known here): the
embedded layout finds them only through pacs-ai's storage.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 03:00:00
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: Rows converted per statement batch.
BATCH = 5000


def instance_key_of(path: str) -> str | None:
    """The key of a spool path ``.../spool/<study>/<series>/<sop>.dcm``; None for anything else."""
    parts = PurePosixPath(path).parts
    if path.startswith("/") and len(parts) >= 5 and parts[-4] == "spool" and parts[-1].endswith(".dcm"):
        return "instances/" + "/".join(parts[-3:])
    return None


def result_key_of(path: str) -> str | None:
    """The key of a results path ``.../results/<study>/<sop>.dcm``; None for anything else."""
    parts = PurePosixPath(path).parts
    if path.startswith("/") and len(parts) >= 4 and parts[-3] == "results" and parts[-1].endswith(".dcm"):
        return "results/" + "/".join(parts[-2:])
    return None


def _convert(table: str, key_of: Callable[[str], str | None]) -> None:
    connection = op.get_bind()
    rows = sa.table(table, sa.column("id", sa.Integer), sa.column("path", sa.Text))
    last_id = 0
    while True:
        batch = connection.execute(
            sa.select(rows.c.id, rows.c.path).where(rows.c.id > last_id).order_by(rows.c.id).limit(BATCH)
        ).all()
        if not batch:
            return
        last_id = batch[-1].id
        changes = [
            {"row_id": row.id, "key": key}
            for row in batch
            if (key := key_of(row.path) or _other_key(table, row.path)) is not None
        ]
        if changes:
            connection.execute(
                rows.update().where(rows.c.id == sa.bindparam("row_id")).values(path=sa.bindparam("key")),
                changes,
            )


def _other_key(table: str, path: str) -> str | None:
    """A forwarded original (a result row) is recorded by its instance's key."""
    return instance_key_of(path) if table == "results" else None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=True))
    _convert("instances", instance_key_of)
    _convert("results", result_key_of)


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("uploaded_at")
