"""signed reports

The site's signed reports as findings and impression text (worklist reports
and imported past reports), read by the retrieval drafter.  A new table only.

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-07 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signed_reports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("external_id", sa.String(length=128), nullable=False),
        sa.Column("report_draft_fk", sa.Integer(), sa.ForeignKey("report_drafts.id"), nullable=True),
        sa.Column("findings_text", sa.Text(), nullable=False),
        sa.Column("impression_text", sa.Text(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("source", "external_id", name="uq_signed_report_source_external_id"),
        sa.UniqueConstraint("report_draft_fk", name="uq_signed_reports_report_draft_fk"),
    )


def downgrade() -> None:
    op.drop_table("signed_reports")
