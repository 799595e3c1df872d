"""Initial registry schema: versions, artifacts, layers, boot reports, the event log and its head.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64


def _version_fk(table: str) -> sa.Column[int]:
    return sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("versions.id", name=f"fk_{table}_version"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("recipe_digest", sa.String(128), nullable=False),
        sa.Column("recipe_path", sa.Text, nullable=False),
        sa.Column("recipe", sa.Text, nullable=False, server_default=""),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("digest", sa.String(128), nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=True),
        sa.Column("parent", sa.String(128), nullable=True),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("log", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", "number", name="uq_versions_name_number"),
    )
    op.create_index("ix_versions_digest", "versions", ["digest"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer, primary_key=True),
        _version_fk("artifacts"),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("region", sa.String(128), nullable=False),
        sa.Column("location", sa.Text, nullable=False),
        sa.Column("digest", sa.String(128), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("kernel", sa.Text, nullable=True),
        sa.Column("initrd", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("version_id", "provider", "region", "location", name="uq_artifacts_copy"),
    )

    op.create_table(
        "layers",
        sa.Column("id", sa.Integer, primary_key=True),
        _version_fk("layers"),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("hit", sa.Boolean, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("version_id", "index", name="uq_layers_version_index"),
    )

    op.create_table(
        "boot_reports",
        sa.Column("id", sa.Integer, primary_key=True),
        _version_fk("boot_reports"),
        sa.Column("passed", sa.Boolean, nullable=False),
        sa.Column("time_to_ready", sa.Float, nullable=True),
        sa.Column("checks", sa.JSON, nullable=False),
        sa.Column("console", sa.Text, nullable=False),
        sa.Column("accel", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration", sa.Float, nullable=False),
    )
    op.create_index("ix_boot_reports_version_id", "boot_reports", ["version_id"])

    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("ref", sa.String(128), nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_events_ref", "events", ["ref"])

    event_head = op.create_table(
        "event_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_event_head_single_row"),
    )
    # The genesis: no events yet, and the first event's prev_hash is 64 zeros.
    op.bulk_insert(event_head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])


def downgrade() -> None:
    op.drop_table("event_head")
    op.drop_index("ix_events_ref", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_boot_reports_version_id", table_name="boot_reports")
    op.drop_table("boot_reports")
    op.drop_table("layers")
    op.drop_table("artifacts")
    op.drop_index("ix_versions_digest", table_name="versions")
    op.drop_table("versions")
