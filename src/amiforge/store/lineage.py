"""Lineage: which version each one was baked from, as queries rather than walks.

Every version records the id of its parent (`versions.parent_id`, resolved from `parent` when it is created), so

- `ancestry(id)` and `descendants(id)` are one recursive query each over the primary key and `ix_versions_parent_id`;
- the ancestors that have been revoked are kept per version in `revoked_ancestors`, written when a version is
  revoked (one row per descendant it has then) and when a version is created (its parent's rows, and the parent
  itself if it is revoked), so `revoked_ancestors(ids)` answers for any number of versions with one indexed read,
  however deep their history.

A parent always exists before its child, so its id is smaller: the queries follow only links that go down in id
when climbing and up in id when descending, so no data (not even a hand-edited cycle) can make them loop.
On PostgreSQL, creating a version from a parent and revoking a version take one advisory lock (`lock_lineage`), so a
revocation never misses a descendant created at the same moment; SQLite writers are serialised anyway.
"""

from __future__ import annotations

from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from amiforge.model import ImageVersion, Status
from amiforge.store.base import VERSION_SUMMARY, StoreCore, advisory_key, version_from_row
from amiforge.store.schema import revoked_ancestors_table, versions_table

_LINEAGE_LOCK_KEY = advisory_key("amiforge-lineage")
_IN_CHUNK = 500


def lock_lineage(conn: Connection) -> None:
    """Inside a write transaction: serialise with every other creation from a parent and every revocation."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LINEAGE_LOCK_KEY)))


def _descendants_of(version_id: int) -> sa.CTE:
    """id of every version descending from `version_id` (not itself)."""
    child = versions_table.alias("child")
    down = (
        sa.select(versions_table.c.id)
        .where(versions_table.c.parent_id == version_id, versions_table.c.id > version_id)
        .cte("down", recursive=True)
    )
    return down.union_all(
        sa.select(child.c.id).join_from(down, child, (child.c.parent_id == down.c.id) & (child.c.id > down.c.id))
    )


def _ancestors_of(version_id: int) -> sa.CTE:
    """id of every ancestor of `version_id` (not itself)."""
    parent = versions_table.alias("parent")
    child = versions_table.alias("child")
    up = (
        sa.select(parent.c.id, parent.c.parent_id)
        .join_from(child, parent, (parent.c.id == child.c.parent_id) & (parent.c.id < child.c.id))
        .where(child.c.id == version_id)
        .cte("up", recursive=True)
    )
    return up.union_all(
        sa.select(parent.c.id, parent.c.parent_id).join_from(
            up, parent, (parent.c.id == up.c.parent_id) & (parent.c.id < up.c.id)
        )
    )


def record_revocation(conn: Connection, version_id: int) -> None:
    """Inside the transaction that revokes `version_id`: it is now a revoked ancestor of each of its descendants."""
    table = revoked_ancestors_table
    down = _descendants_of(version_id)
    known = sa.select(table.c.version_id).where(table.c.ancestor_id == version_id)
    rows = sa.select(down.c.id, sa.literal(version_id)).where(down.c.id.not_in(known))
    conn.execute(table.insert().from_select(["version_id", "ancestor_id"], rows))


def inherit_revocations(conn: Connection, version_id: int, parent_id: int, *, parent_revoked: bool) -> None:
    """Inside the transaction that creates `version_id` from `parent_id`: the parent's revoked ancestors are its own,
    and so is the parent if it is revoked."""
    table = revoked_ancestors_table
    inherited = (
        sa.select(sa.literal(version_id), table.c.ancestor_id)
        .join(versions_table, versions_table.c.id == table.c.ancestor_id)
        .where(table.c.version_id == parent_id, versions_table.c.status == Status.REVOKED.value)
    )
    conn.execute(table.insert().from_select(["version_id", "ancestor_id"], inherited))
    if parent_revoked:
        conn.execute(table.insert().values(version_id=version_id, ancestor_id=parent_id))


class Lineage(StoreCore):
    def ancestry(self, version_id: int, *, limit: int | None = None) -> list[ImageVersion]:
        """The version's parent, its parent's parent, … (nearest first; the nearest `limit`), in one query; without
        build log and recipe (as `list_versions(summary=True)` reads them). Empty for a version without a parent, or
        no such version."""
        up = _ancestors_of(version_id)
        query = (
            sa.select(*VERSION_SUMMARY).join(up, up.c.id == versions_table.c.id).order_by(versions_table.c.id.desc())
        )
        if limit is not None:
            query = query.limit(max(limit, 0))
        with self._guard(f"read the ancestry of version {version_id}"), self._read() as conn:
            return version_from_row.each(conn.execute(query))

    def children(self, version_id: int) -> list[str]:
        """NAME@N of each version baked from this one (not their own children), newest first."""
        v = versions_table
        query = sa.select(v.c.name, v.c.number).where(v.c.parent_id == version_id).order_by(v.c.id.desc())
        with self._guard(f"read the children of version {version_id}"), self._read() as conn:
            return [f"{name}@{number}" for name, number in conn.execute(query)]

    def descendants(self, version_id: int) -> list[ImageVersion]:
        """Every version baked from this one, from those, … (newest first), in one query; without build log and
        recipe."""
        down = _descendants_of(version_id)
        query = (
            sa.select(*VERSION_SUMMARY)
            .join(down, down.c.id == versions_table.c.id)
            .order_by(versions_table.c.id.desc())
        )
        with self._guard(f"read the descendants of version {version_id}"), self._read() as conn:
            return version_from_row.each(conn.execute(query))

    def revoked_ancestors(self, version_ids: Collection[int]) -> dict[int, list[str]]:
        """For each version id: NAME@N of its ancestors that are revoked now, nearest first, for any number of
        versions in one indexed read. Every id given is a key (an empty list: none revoked)."""
        ids = sorted(set(version_ids))
        found: dict[int, list[str]] = {i: [] for i in ids}
        table = revoked_ancestors_table
        with self._guard("read revoked ancestors"), self._read() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                query = (
                    sa.select(table.c.version_id, versions_table.c.name, versions_table.c.number)
                    .join(versions_table, versions_table.c.id == table.c.ancestor_id)
                    .where(
                        table.c.version_id.in_(ids[start : start + _IN_CHUNK]),
                        versions_table.c.status == Status.REVOKED.value,
                    )
                    .order_by(table.c.version_id, versions_table.c.id.desc())
                )
                for version_id, name, number in conn.execute(query):
                    found[version_id].append(f"{name}@{number}")
        return found
