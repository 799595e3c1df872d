"""Supply chain: scans (SBOM + findings), the vulnerability database, signing keys, signatures, channels.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _version_fk(table: str) -> sa.Column[int]:
    return sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name=f"fk_{table}_version"), nullable=False)


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "scans",
        sa.Column("id", sa.Integer, primary_key=True),
        _version_fk("scans"),
        _ts("scanned_at"),
        sa.Column("packages", sa.JSON, nullable=False),
        sa.Column("sbom", sa.Text, nullable=False),
        sa.Column("sbom_digest", sa.String(64), nullable=False),
        sa.Column("findings", sa.JSON, nullable=False),
        sa.Column("vulndb", sa.Text, nullable=False),
    )
    op.create_index("ix_scans_version_id", "scans", ["version_id"])
    op.create_table(
        "vulndb_imports",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        _ts("imported_at"),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_table(
        "advisories",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column(
            "import_id", sa.Integer, sa.ForeignKey("vulndb_imports.id", name="fk_advisories_import"), nullable=False
        ),
        sa.Column("modified", sa.String(64), nullable=False),
        sa.Column("record", sa.JSON, nullable=False),
    )
    op.create_table(
        "advisory_packages",
        sa.Column(
            "advisory_id",
            sa.String(128),
            sa.ForeignKey("advisories.id", name="fk_advisory_packages_advisory"),
            primary_key=True,
        ),
        sa.Column("package", sa.String(256), primary_key=True),
    )
    op.create_index("ix_advisory_packages_package", "advisory_packages", ["package"])
    op.create_table(
        "signing_keys",
        sa.Column("key_id", sa.String(128), primary_key=True),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        _ts("added_at"),
        _ts("revoked_at", nullable=True),
        sa.Column("revoked_reason", sa.Text, nullable=True),
    )
    op.create_table(
        "signatures",
        sa.Column("id", sa.Integer, primary_key=True),
        _version_fk("signatures"),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("statement_digest", sa.String(64), nullable=False),
        _ts("signed_at"),
    )
    op.create_index("ix_signatures_version_id", "signatures", ["version_id"])
    op.create_table(
        "channels",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("channel", sa.String(32), primary_key=True),
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_channels_version"), nullable=False),
        sa.Column(
            "previous_version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_channels_previous"), nullable=True
        ),
        _ts("moved_at"),
        sa.Column("moved_by", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_table(
        "channel_moves",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        _version_fk("channel_moves"),
        _ts("at"),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_channel_moves_version_id", "channel_moves", ["version_id"])


def downgrade() -> None:
    for index, table in (
        ("ix_channel_moves_version_id", "channel_moves"),
        ("ix_signatures_version_id", "signatures"),
        ("ix_advisory_packages_package", "advisory_packages"),
        ("ix_scans_version_id", "scans"),
    ):
        op.drop_index(index, table_name=table)
    for table in (
        "channel_moves",
        "channels",
        "signatures",
        "signing_keys",
        "advisory_packages",
        "advisories",
        "vulndb_imports",
        "scans",
    ):
        op.drop_table(table)
