"""worklist users and report drafts

Users of the radiologist worklist (argon2 password hashes, roles) and the AI
report drafts with the radiologist's decision on each.  New tables only, so
existing rows are untouched.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 13:33:18.736327
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=324), nullable=False),
        sa.Column(
            "role", sa.Enum("RADIOLOGIST", "ADMIN", name="role", native_enum=False, length=16), nullable=False
        ),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "report_drafts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_fk", sa.Integer(), nullable=False),
        sa.Column("job_fk", sa.Integer(), nullable=False),
        sa.Column("job_ids", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "DRAFT",
                "ACCEPTED",
                "REJECTED",
                "SUPERSEDED",
                name="reportstatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("findings_text", sa.Text(), nullable=False),
        sa.Column("impression_text", sa.Text(), nullable=False),
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("guardrail", sa.JSON(), nullable=True),
        sa.Column("fallback_reason", sa.Text(), nullable=True),
        sa.Column("draft_sr_uid", sa.String(length=64), nullable=True),
        sa.Column("signed_findings_text", sa.Text(), nullable=True),
        sa.Column("signed_impression_text", sa.Text(), nullable=True),
        sa.Column("edited", sa.Boolean(), nullable=False),
        sa.Column("signed_sr_uid", sa.String(length=64), nullable=True),
        sa.Column("reject_reason", sa.Text(), nullable=True),
        sa.Column("decided_by_fk", sa.Integer(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["decided_by_fk"],
            ["users.id"],
        ),
        sa.ForeignKeyConstraint(
            ["job_fk"],
            ["jobs.id"],
        ),
        sa.ForeignKeyConstraint(
            ["study_fk"],
            ["studies.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("draft_sr_uid"),
        sa.UniqueConstraint("signed_sr_uid"),
        sa.UniqueConstraint("study_fk", "version", name="uq_report_draft_study_version"),
    )
    with op.batch_alter_table("report_drafts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_report_drafts_job_fk"), ["job_fk"], unique=False)
        batch_op.create_index(batch_op.f("ix_report_drafts_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_report_drafts_study_fk"), ["study_fk"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("report_drafts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_drafts_study_fk"))
        batch_op.drop_index(batch_op.f("ix_report_drafts_status"))
        batch_op.drop_index(batch_op.f("ix_report_drafts_job_fk"))

    op.drop_table("report_drafts")
    op.drop_table("users")
