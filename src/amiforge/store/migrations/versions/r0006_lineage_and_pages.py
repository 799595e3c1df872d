"""Lineage and pages: ancestry from one query, listings a page at a time.

- `versions.parent_id`: the id of the version `parent` names (NAME@N), filled in here for every existing version,
  so ancestry and descendants are one recursive query over an index instead of one lookup per generation;
- `revoked_ancestors`: for each version, its ancestors that have been revoked (filled in here from the versions
  revoked so far), so `amiforge channels` flags every pointer from one indexed read;
- `ix_versions_name_id`: one image's versions newest first, a page at a time (keyset on the id).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME_AT_N = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]{0,62})@(?P<number>[1-9][0-9]{0,17})$")
_CHUNK = 5_000


def upgrade() -> None:
    op.add_column("versions", sa.Column("parent_id", sa.Integer, nullable=True))
    conn = op.get_bind()
    versions = sa.table(
        "versions",
        sa.column("id", sa.Integer),
        sa.column("name", sa.String),
        sa.column("number", sa.Integer),
        sa.column("parent", sa.String),
        sa.column("parent_id", sa.Integer),
        sa.column("status", sa.String),
    )
    # Resolved in Python from one read: portable, and linear in the number of versions on every database.
    ids = {(name, number): vid for vid, name, number in conn.execute(sa.select(versions.c.id, versions.c.name,
                                                                                 versions.c.number))}  # fmt: skip
    links = []
    unlinked = 0
    for vid, parent in conn.execute(sa.select(versions.c.id, versions.c.parent).where(versions.c.parent.is_not(None))):
        match = _NAME_AT_N.match(parent.strip())
        parent_id = ids.get((match["name"], int(match["number"]))) if match else None
        if parent_id is not None and parent_id < vid:  # a parent always exists before its child
            links.append({"vid": vid, "pid": parent_id})
        else:
            unlinked += 1
    if unlinked:
        # amiforge writes parents as NAME@N of an existing version; anything else was written by hand.
        logging.getLogger("amiforge.store.migrations").warning(
            "%d version(s) name a parent that is not an earlier NAME@N of this registry: their ancestry ends there "
            "(revocations of what they descend from will not flag them)",
            unlinked,
        )
    update = versions.update().where(versions.c.id == sa.bindparam("vid")).values(parent_id=sa.bindparam("pid"))
    for start in range(0, len(links), _CHUNK):
        conn.execute(update, links[start : start + _CHUNK])
    op.create_index("ix_versions_parent_id", "versions", ["parent_id"])
    op.create_index("ix_versions_name_id", "versions", ["name", "id"])

    op.create_table(
        "revoked_ancestors",
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_revoked_ancestors_version"),
                  primary_key=True),
        sa.Column("ancestor_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_revoked_ancestors_ancestor"),
                  primary_key=True),
    )  # fmt: skip
    # Every descendant of every version revoked so far, in one recursive query (a tree: each is reached once per
    # revoked ancestor, so UNION ALL makes no duplicates).
    child = versions.alias("child")
    seeds = sa.select(versions.c.id.label("ancestor_id"), versions.c.id.label("version_id")).where(
        versions.c.status == "revoked"
    )
    reach = seeds.cte("reach", recursive=True)
    reach = reach.union_all(
        sa.select(reach.c.ancestor_id, child.c.id).join(
            child, sa.and_(child.c.parent_id == reach.c.version_id, child.c.id > reach.c.version_id)
        )
    )
    rows = sa.select(reach.c.version_id, reach.c.ancestor_id).where(reach.c.version_id != reach.c.ancestor_id)
    revoked = sa.table("revoked_ancestors", sa.column("version_id", sa.Integer), sa.column("ancestor_id", sa.Integer))
    conn.execute(revoked.insert().from_select(["version_id", "ancestor_id"], rows))


def downgrade() -> None:
    op.drop_table("revoked_ancestors")
    op.drop_index("ix_versions_name_id", table_name="versions")
    op.drop_index("ix_versions_parent_id", table_name="versions")
    # Native DROP COLUMN (SQLite 3.35+, PostgreSQL): a batch copy of `versions` would have to drop the table that
    # every other table references, which SQLite refuses with foreign keys on.
    op.drop_column("versions", "parent_id")
