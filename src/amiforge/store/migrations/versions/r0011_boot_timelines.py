"""A boot keeps the guest's own account of it: its timeline as the guest's systemd measured it (`boots.timeline`:
the kernel with the initrd until systemd started, userspace until multi-user.target, the three units slowest to
start, in seconds), and for a boot that failed, its console's last lines (`boots.console_tail`). The debug
dashboard's boot timeline and the on-call dashboard's boot logs read them. Boots recorded before have neither.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("boots", sa.Column("timeline", sa.JSON, nullable=True))
    op.add_column("boots", sa.Column("console_tail", sa.JSON, nullable=True))


def downgrade() -> None:
    # In place (SQLite has DROP COLUMN since 3.35): a batch rebuild of a table others reference cannot run here.
    op.drop_column("boots", "console_tail")
    op.drop_column("boots", "timeline")
