"""routing rules

The sender's address on each series, and on each job the rule that opened it
and its routing priority.  New nullable or defaulted columns only.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 13:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("peer_address", sa.String(length=64), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("rule", sa.String(length=128), nullable=True))
        batch.add_column(
            sa.Column("routing_priority", sa.String(length=16), nullable=False, server_default="routine")
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("routing_priority")
        batch.drop_column("rule")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("peer_address")
