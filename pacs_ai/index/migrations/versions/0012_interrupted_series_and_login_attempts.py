"""interrupted series and shared login throttle

Each series records when an association storing into it ended without
A-RELEASE (``interrupted_at``) and how many of its instances that association
had acknowledged; the router holds such a series for the resend window and
then marks it incomplete.  ``login_attempts`` counts worklist login attempts
per client address, shared by every web process.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 06:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("interrupted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("interrupted_instances", sa.Integer(), nullable=True))
    op.create_table(
        "login_attempts",
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("client"),
    )


def downgrade() -> None:
    op.drop_table("login_attempts")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("interrupted_instances")
        batch.drop_column("interrupted_at")
