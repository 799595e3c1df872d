"""A rollout names the controller driving it (`rollouts.controller`, host:pid:id) and when that controller last
renewed its lease (`controller_seen_at`), so a second controller (another `amiforge serve`, or the CLI) refuses to
drive a rollout that a live one drives. Rollouts from before have no controller: the first to resume one takes it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rollouts", sa.Column("controller", sa.String(200), nullable=True))
    op.add_column("rollouts", sa.Column("controller_seen_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # In place (SQLite has DROP COLUMN since 3.35): a batch rebuild of a table others reference cannot run here.
    op.drop_column("rollouts", "controller_seen_at")
    op.drop_column("rollouts", "controller")
