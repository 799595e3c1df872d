"""A rollout started by `amiforge rollback` names the rollout whose change it undoes (`rollouts.undoes`).

The rollback rate (M6) counts a rollout that a person rolled back by hand as rolled back, like one the controller
rolled back when a gate failed, and does not count the rollback itself as a change. Rollouts from before this
revision undo nothing: which of them were rollbacks was not recorded, and is not guessed.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain column, no foreign key: SQLite adds a foreign key only by rebuilding the table, and rebuilding a table
    # other tables reference needs foreign keys switched off, which cannot happen inside the migration's
    # transaction. Rollouts are never deleted, and the store checks the rollout exists when it links one.
    op.add_column("rollouts", sa.Column("undoes", sa.Integer, nullable=True))
    # Every scrape asks, of each rollout, whether a later one undoes it: without an index, that is n² reads.
    op.create_index("ix_rollouts_undoes", "rollouts", ["undoes"])


def downgrade() -> None:
    # In place, not by a batch rebuild (the same reason as above): SQLite has DROP COLUMN since 3.35.
    op.drop_index("ix_rollouts_undoes", "rollouts")
    op.drop_column("rollouts", "undoes")
