"""Channels: one pointer per (image name, channel) to its current version and the previous one (the rollback
image), moved by compare-and-set, and every move kept for soak times ("in staging since …").
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from amiforge.errors import StateError
from amiforge.model import ChannelPointer, Status
from amiforge.store.base import StoreCore
from amiforge.store.rows import Computed, row_mapper
from amiforge.store.schema import channel_moves_table, channels_table, versions_table

# A pointer row joined with the NAME@N of its current and previous versions.
pointer_from_row = row_mapper(
    ChannelPointer,
    "channels",
    key="name",
    current=Computed(lambda row: f"{row['cur_name']}@{row['cur_number']}"),
    previous=Computed(lambda row: f"{row['name']}@{row['prev_number']}" if row["prev_number"] is not None else None),
)


class Channels(StoreCore):
    def move_channel(
        self, name: str, channel: str, version_id: int, *, expect_current: int | None, actor: str, reason: str
    ) -> ChannelPointer:
        """Point `name:channel` at the version, compare-and-set on the current pointer (None: no pointer yet).
        The old current becomes `previous` (the rollback image). A lost race raises StateError."""
        now = self._now()
        key = (channels_table.c.name == name) & (channels_table.c.channel == channel)
        with self._guard(f"move {name}:{channel}"), self._write() as conn:
            version = self._require_version(conn, version_id)
            # Re-checked inside the write transaction: a revoke that lands after the gates were judged still wins.
            if version.status not in (Status.SIGNED, Status.SCANNED, Status.TESTED, Status.BUILT):
                raise StateError(
                    f"{version.ref} is {version.status} and cannot be put in a channel",
                    fix="promote another version",
                )
            if expect_current is None:
                try:
                    conn.execute(
                        channels_table.insert().values(
                            name=name, channel=channel, version_id=version_id, previous_version_id=None,
                            moved_at=now, moved_by=actor, reason=reason,
                        )
                    )  # fmt: skip
                except IntegrityError as e:
                    raise StateError(
                        f"{name}:{channel} was created by someone else meanwhile", fix="look again and retry"
                    ) from e
            else:
                result = conn.execute(
                    channels_table.update()
                    .where(key, channels_table.c.version_id == expect_current)
                    .values(
                        version_id=version_id, previous_version_id=expect_current, moved_at=now, moved_by=actor,
                        reason=reason,
                    )
                )  # fmt: skip
                if result.rowcount == 0:
                    raise StateError(
                        f"{name}:{channel} moved meanwhile (compare-and-set lost)", fix="look again and retry"
                    )
            conn.execute(
                channel_moves_table.insert().values(
                    name=name, channel=channel, version_id=version_id, at=now, actor=actor, reason=reason
                )
            )
        (pointer,) = self.channels(name, channel)
        return pointer

    def channels(self, name: str | None = None, channel: str | None = None) -> list[ChannelPointer]:
        cur = versions_table.alias("cur")
        prev = versions_table.alias("prev")
        query = (
            sa.select(channels_table, cur.c.name.label("cur_name"), cur.c.number.label("cur_number"),
                      prev.c.number.label("prev_number"))
            .join(cur, cur.c.id == channels_table.c.version_id)
            .outerjoin(prev, prev.c.id == channels_table.c.previous_version_id)
            .order_by(channels_table.c.name, channels_table.c.channel)
        )  # fmt: skip
        if name is not None:
            query = query.where(channels_table.c.name == name)
        if channel is not None:
            query = query.where(channels_table.c.channel == channel)
        with self._guard("list channels"), self._read() as conn:
            return pointer_from_row.each(conn.execute(query))

    def channel_entries(self, version_id: int) -> dict[str, datetime]:
        """channel -> when this version last entered it (for soak times)."""
        query = sa.select(channel_moves_table.c.channel, sa.func.max(channel_moves_table.c.at)).where(
            channel_moves_table.c.version_id == version_id
        ).group_by(channel_moves_table.c.channel)  # fmt: skip
        with self._guard(f"read channel history of version {version_id}"), self._read() as conn:
            # max() keeps the column type (UtcDateTime), so the values come back aware.
            return {ch: at for ch, at in conn.execute(query)}
