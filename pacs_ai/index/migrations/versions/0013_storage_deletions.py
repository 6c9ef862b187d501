"""storage deletions

Object keys retention could not delete from the storage (an S3 bucket, a
shared folder) yet, with the reason; tried again at every retention pass.  A
new table only.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 06:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "storage_deletions",
        sa.Column("key", sa.String(length=1024), primary_key=True),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_tried_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("storage_deletions")
