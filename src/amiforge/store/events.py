"""The audit log: append-only and hash-chained.

Every event carries the hash of the one before (`event_hash`: sha256 of the previous hash and the canonical JSON of
the event's fields); the one-row `event_head` holds the newest seq and hash, so deleting the newest events shows
too. Appenders lock the head row, which serialises them; `append_in` appends inside a caller's write transaction,
so a change and its audit record commit together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from amiforge.errors import InfraError
from amiforge.model import Event
from amiforge.store.base import StoreCore
from amiforge.store.rows import json_object, row_mapper
from amiforge.store.schema import aware, event_head_table, events_table

GENESIS_HASH = "0" * 64

event_from_row = row_mapper(Event, "events", key="seq", seq=int, data=json_object)


def event_hash(
    prev_hash: str,
    *,
    seq: int,
    at: datetime,
    actor: str,
    kind: str,
    ref: str | None,
    data: Mapping[str, object],
) -> str:
    """sha256(prev_hash + canonical JSON of the event's fields). The one definition of the chain."""
    body = json.dumps(
        {
            "seq": seq,
            "at": aware(at, "event time").isoformat(),
            "actor": actor,
            "kind": kind,
            "ref": ref,
            "data": data,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def plain_json(data: Mapping[str, object]) -> dict[str, Any]:
    # What is hashed must be exactly what is stored and read back: tuples become lists, keys strings, and
    # anything else (datetimes, paths, enums) its str(), as the hash's `default=str` would.
    plain: dict[str, Any] = json.loads(json.dumps(dict(data), default=str, allow_nan=False))
    return plain


def _short(digest: str) -> str:
    return digest[:12] + "…"


def append_in(
    conn: Connection,
    kind: str,
    *,
    at: datetime,
    actor: str,
    ref: str | None,
    data: Mapping[str, object] | None,
) -> Event:
    """Append an event inside the caller's write transaction: a change and its audit record commit together."""
    payload = plain_json(data or {})
    # FOR UPDATE locks the head row on PostgreSQL; on SQLite, BEGIN IMMEDIATE holds the write lock.
    head = conn.execute(
        sa.select(event_head_table.c.seq, event_head_table.c.hash).where(event_head_table.c.id == 1).with_for_update()
    ).one_or_none()
    if head is None:
        raise InfraError(
            "the event log has no head row: the registry schema is damaged",
            fix="restore the registry from a backup; `amiforge events --verify` shows what is broken",
        )
    seq = head.seq + 1
    digest = event_hash(head.hash, seq=seq, at=at, actor=actor, kind=kind, ref=ref, data=payload)
    conn.execute(
        events_table.insert().values(
            seq=seq,
            at=at,
            actor=actor,
            kind=kind,
            ref=ref,
            data=payload,
            prev_hash=head.hash,
            hash=digest,
        )
    )
    moved = conn.execute(
        event_head_table.update()
        .where(event_head_table.c.id == 1, event_head_table.c.hash == head.hash)
        .values(seq=seq, hash=digest)
    )
    if moved.rowcount != 1:
        # Only possible if something bypassed the lock; refuse rather than fork the chain.
        raise InfraError(f"the event log head moved while appending seq {seq}", retryable=True)
    return Event(seq=seq, at=at, actor=actor, kind=kind, ref=ref, data=payload, prev_hash=head.hash, hash=digest)


class EventLog(StoreCore):
    def append_event(
        self, kind: str, *, actor: str, ref: str | None = None, data: Mapping[str, object] | None = None
    ) -> Event:
        with self._guard(f"record a {kind} event"), self._write() as conn:
            return append_in(conn, kind, at=self._now(), actor=actor, ref=ref, data=data)

    def events(
        self,
        ref: str | None = None,
        *,
        limit: int | None = None,
        before: int | None = None,
        kinds: Collection[str] | None = None,
        refs: Collection[str] | None = None,
    ) -> list[Event]:
        """Oldest first; with `ref`, only events about that version (by exact NAME@N), with `refs` about any of
        those; with `kinds`, only events of those kinds (the database filters: a reader of a few kinds never maps
        the whole log). `limit`: only the newest that many; `before`: only events older than seq `before` (the
        keyset cursor: the oldest seq of the page already shown)."""
        query = sa.select(events_table)
        if ref is not None:
            query = query.where(events_table.c.ref == ref)
        if refs is not None:
            query = query.where(events_table.c.ref.in_(sorted(refs)))
        if kinds is not None:
            query = query.where(events_table.c.kind.in_(sorted(kinds)))
        if before is not None:
            query = query.where(events_table.c.seq < before)
        if limit is None:
            query = query.order_by(events_table.c.seq)
        else:
            # The newest `limit`, fetched newest-first and turned around below.
            query = query.order_by(events_table.c.seq.desc()).limit(max(limit, 0))
        with self._guard("read events"), self._read() as conn:
            found = event_from_row.each(conn.execute(query))
        return found if limit is None else found[::-1]

    def count_events(self, ref: str | None = None, *, before: int | None = None) -> int:
        """How many events (about `ref`; older than seq `before`) the log holds. The whole log's count comes from
        its head, one row instead of a scan of every event: seqs run from 1 to the head's without a gap in an
        intact log (`verify_events` checks exactly that)."""
        if ref is None:
            with self._guard("count events"), self._read() as conn:
                head = conn.execute(sa.select(event_head_table.c.seq).where(event_head_table.c.id == 1)).scalar()
            if head is not None:
                return max(0, min(int(head), before - 1)) if before is not None else int(head)
        query = sa.select(sa.func.count()).select_from(events_table)
        if ref is not None:
            query = query.where(events_table.c.ref == ref)
        if before is not None:
            query = query.where(events_table.c.seq < before)
        with self._guard("count events"), self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def verify_events(self) -> list[str]:
        problems: list[str] = []
        # `data` and `at` are read raw and decoded here, so a row whose data is no longer JSON or whose time is no
        # longer a time is reported as the tampering it is, instead of stopping the check that exists to find it.
        raw_columns = ("data", "at")
        columns = [c for c in events_table.columns if c.name not in raw_columns]
        raw_values = [sa.type_coerce(events_table.c[name], sa.Text).label(name) for name in raw_columns]
        query = sa.select(*columns, *raw_values)
        with self._guard("verify the event log"), self._read() as conn:
            prev_hash, expected_seq, last_seq = GENESIS_HASH, 1, 0
            for raw in conn.execute(query.order_by(events_table.c.seq)).mappings():
                try:
                    data = json.loads(raw["data"]) if isinstance(raw["data"], str | bytes) else raw["data"]
                    at = raw["at"] if isinstance(raw["at"], datetime) else datetime.fromisoformat(str(raw["at"]))
                    e = event_from_row({**raw, "data": data, "at": at if at.tzinfo else at.replace(tzinfo=UTC)})
                except (ValueError, InfraError):
                    problems.append(f"seq {raw['seq']}: its data or time cannot be read; the row was changed after it "
                                    "was written")  # fmt: skip
                    prev_hash, expected_seq, last_seq = raw["hash"], int(raw["seq"]) + 1, int(raw["seq"])
                    continue
                if e.seq != expected_seq:
                    missing = f"seq {expected_seq}" if e.seq == expected_seq + 1 else f"seq {expected_seq}..{e.seq - 1}"
                    problems.append(f"{missing} missing: events were deleted before seq {e.seq}")
                if e.prev_hash != prev_hash:
                    problems.append(
                        f"seq {e.seq}: prev_hash {_short(e.prev_hash)} does not match the hash of the event "
                        f"before it ({_short(prev_hash)})"
                    )
                recomputed = event_hash(
                    e.prev_hash, seq=e.seq, at=e.at, actor=e.actor, kind=e.kind, ref=e.ref, data=e.data
                )
                if recomputed != e.hash:
                    problems.append(
                        f"seq {e.seq}: hash mismatch: the stored hash {_short(e.hash)} does not match the "
                        f"event's contents ({_short(recomputed)}); the row was changed after it was written"
                    )
                prev_hash, expected_seq, last_seq = e.hash, e.seq + 1, e.seq
            head = conn.execute(
                sa.select(event_head_table.c.seq, event_head_table.c.hash).where(event_head_table.c.id == 1)
            ).one_or_none()
        if head is None:
            problems.append("head: the event_head row is missing")
        elif head.seq != last_seq or head.hash != prev_hash:
            problems.append(
                f"head mismatch: the head records seq {head.seq} ({_short(head.hash)}) but the newest "
                f"event is seq {last_seq} ({_short(prev_hash)}); the newest events were deleted or "
                "written outside amiforge"
            )
        return problems
