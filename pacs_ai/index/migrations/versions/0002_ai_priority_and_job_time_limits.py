"""AI study priority and per-job time limits

Jobs carry the priority rules and time limit of their profile step from
routing time; studies record the reading priority AI findings raised them to.
All new columns are nullable, so existing rows need no backfill: a job
without rules fires none, a job without a time limit gets the installation
default, and a study without a priority has not been raised.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 13:25:52.167668
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority_rules", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("timeout_seconds", sa.Float(), nullable=True))

    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ai_priority", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("ai_priority_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("ai_priority_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("ai_priority_at")
        batch_op.drop_column("ai_priority_reason")
        batch_op.drop_column("ai_priority")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("timeout_seconds")
        batch_op.drop_column("priority_rules")
