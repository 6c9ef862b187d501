"""series being received by an open association

One row per series per open association (``receiving_series``), naming the
listener process (host, boot id, pid, start time) and the association's number in it;
deleted when the association ends.  A row left by a process that is gone (a
listener killed, power lost) marks its series interrupted, as an abort does.
A new table only.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receiving_series",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("boot_id", sa.String(length=64), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("process_started", sa.Float(), nullable=False),
        sa.Column("association", sa.Integer(), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_receiving_series_series_instance_uid", "receiving_series", ["series_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_receiving_series_series_instance_uid", table_name="receiving_series")
    op.drop_table("receiving_series")
