"""The way out of each artifact (`amiforge retire`): one row per artifact once it is deprecated — its stage
(deprecated, deregistered, purged), when it reached each, the snapshots the image had (read while it still
existed) and the run that moved it.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "retirements",
        sa.Column(
            "artifact_id",
            sa.Integer,
            sa.ForeignKey("artifacts.id", name="fk_retirements_artifact"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column(
            "version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_retirements_version"), nullable=False
        ),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("deprecated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deregistered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("snapshots", sa.JSON, nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
    )
    op.create_index("ix_retirements_version_id", "retirements", ["version_id"])


def downgrade() -> None:
    op.drop_index("ix_retirements_version_id", "retirements")
    op.drop_table("retirements")
