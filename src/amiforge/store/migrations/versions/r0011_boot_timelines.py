"""A boot keeps its timeline as the guest's systemd measured it (`boots.timeline`): the kernel (with the initrd)
until systemd started, userspace until multi-user.target, and the three units slowest to start, in seconds. The
debug dashboard's boot timeline per instance reads it. Boots recorded before have none: it was never measured.

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


def downgrade() -> None:
    # In place (SQLite has DROP COLUMN since 3.35): a batch rebuild of a table others reference cannot run here.
    op.drop_column("boots", "timeline")
