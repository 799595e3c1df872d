"""Boot reports keep no verdict of their own: `passed` is derived from the checks (BootReport.passed).

A stored flag could disagree with the checks it summarises (a hand edit, a bug in one writer); the checks are the
evidence, so the flag goes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot drop a column in place before 3.35; alembic copies the table there.
    with op.batch_alter_table("boot_reports") as batch:
        batch.drop_column("passed")


def downgrade() -> None:
    with op.batch_alter_table("boot_reports") as batch:
        batch.add_column(sa.Column("passed", sa.Boolean, nullable=False, server_default=sa.false()))
    # Give the older schema back the verdict its code reads, derived as BootReport.passed derives it.
    reports = sa.table("boot_reports", sa.column("id", sa.Integer), sa.column("checks", sa.JSON),
                       sa.column("passed", sa.Boolean))  # fmt: skip
    conn = op.get_bind()
    for report_id, checks in conn.execute(sa.select(reports.c.id, reports.c.checks)).all():
        verdict = bool(checks) and all(bool(c.get("passed")) for c in checks)
        conn.execute(reports.update().where(reports.c.id == report_id).values(passed=verdict))
