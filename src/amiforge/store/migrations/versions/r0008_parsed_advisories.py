"""Advisories parsed once, at import: what matching needs is kept beside the raw OSV record; SBOMs kept once.

- `advisories.title`, `.identifiers`, `.severity`, `.withdrawn`: what a finding takes from its advisory;
- `advisory_ranges`: each advisory's affected intervals (or listed versions) per Debian source package and
  ecosystem;
- `sboms`: SBOM documents by sha256, which scans from now on reference (`scans.sbom` "") instead of holding a copy
  each: a rescan records a new scan of the same packages. Scans made before keep their copy, and the scans table is
  not rewritten (SQLite cannot drop a NOT NULL without copying every row, SBOMs and all).

Records imported before this revision keep NULL there: parsing is the scanners' job, which a migration (the store's
floor) cannot call, so the service layer parses them on the first scan after the upgrade (the partial index
`ix_advisories_unparsed` finds them without reading the records).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE (SQLite >= 3.35 drops columns too): a batch copy of the table would have to drop the table
    # that advisory_packages' foreign key names, and copy every raw record.
    op.add_column("advisories", sa.Column("title", sa.Text, nullable=True))
    op.add_column("advisories", sa.Column("identifiers", sa.JSON, nullable=True))
    op.add_column("advisories", sa.Column("severity", sa.String(16), nullable=True))
    op.add_column("advisories", sa.Column("withdrawn", sa.Boolean, nullable=True))
    op.create_index("ix_advisories_unparsed", "advisories", ["id"], sqlite_where=sa.text("title IS NULL"),
                    postgresql_where=sa.text("title IS NULL"))  # fmt: skip
    op.create_table(
        "advisory_ranges",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("advisory_id", sa.String(128), sa.ForeignKey("advisories.id", name="fk_advisory_ranges_advisory"),
                  nullable=False),
        sa.Column("ecosystem", sa.String(64), nullable=False),
        sa.Column("package", sa.String(256), nullable=False),
        sa.Column("introduced", sa.Text, nullable=True),
        sa.Column("fixed", sa.Text, nullable=True),
        sa.Column("last_affected", sa.Text, nullable=True),
        sa.Column("versions", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("severity", sa.String(16), nullable=False),
    )  # fmt: skip
    op.create_index("ix_advisory_ranges_package", "advisory_ranges", ["package", "ecosystem"])
    op.create_index("ix_advisory_ranges_advisory", "advisory_ranges", ["advisory_id"])
    op.create_table(
        "sboms",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("document", sa.Text, nullable=False),
    )


def downgrade() -> None:
    # Each scan gets its copy of the document back.
    op.execute("UPDATE scans SET sbom = (SELECT document FROM sboms WHERE sboms.digest = scans.sbom_digest) "
               "WHERE sbom = ''")  # fmt: skip
    op.drop_table("sboms")
    op.drop_table("advisory_ranges")
    op.drop_index("ix_advisories_unparsed", "advisories")
    for column in ("withdrawn", "severity", "identifiers", "title"):
        op.drop_column("advisories", column)
