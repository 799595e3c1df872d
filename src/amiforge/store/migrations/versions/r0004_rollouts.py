"""Rollouts: the controller's state machine, the replacements it asked for (with their tokens) and its decisions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _rollout_fk(table: str) -> sa.Column[int]:
    return sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", name=f"fk_{table}_rollout"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_rollouts_version"), nullable=False),
        sa.Column("strategy", sa.JSON, nullable=False),
        sa.Column("waves", sa.JSON, nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested", sa.String(16), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        _ts("started_at"),
        _ts("updated_at"),
        _ts("finished_at", nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_rollouts_target", "rollouts", ["target"])
    op.create_table(
        "rollout_replacements",
        sa.Column("id", sa.Integer, primary_key=True),
        _rollout_fk("replacements"),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("old_member", sa.String(128), nullable=False),
        sa.Column("old_version", sa.String(80), nullable=True),
        sa.Column("token", sa.String(128), nullable=False, unique=True),
        sa.Column("new_member", sa.String(128), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        _ts("at"),
    )
    op.create_index("ix_rollout_replacements_rollout_id", "rollout_replacements", ["rollout_id"])
    op.create_table(
        "rollout_decisions",
        sa.Column("id", sa.Integer, primary_key=True),
        _rollout_fk("decisions"),
        sa.Column("wave", sa.Integer, nullable=False),
        _ts("at"),
        sa.Column("passed", sa.Boolean, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("numbers", sa.JSON, nullable=False),
    )
    op.create_index("ix_rollout_decisions_rollout_id", "rollout_decisions", ["rollout_id"])


def downgrade() -> None:
    for index, table in (
        ("ix_rollout_decisions_rollout_id", "rollout_decisions"),
        ("ix_rollout_replacements_rollout_id", "rollout_replacements"),
        ("ix_rollouts_target", "rollouts"),
    ):
        op.drop_index(index, table_name=table)
        op.drop_table(table)
