"""Telemetry: every boot of a version on a target (`boots`) and their running totals (`boot_totals`).

A boot is recorded as an observation of it (`record_boots`): a boot test's report, a fleet member read from its
fleet. Observing it again only moves it forward — an outcome, a stop, a replacement are set once, a heartbeat only
advances — so a collector may read the same member any number of times, from any number of processes. The totals
change in the same transaction as the boot whose outcome or replacement they count, so the counters Prometheus
scrapes never disagree with the boots, and never go down.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from amiforge.model import BOOT_OUTCOMES, BootObservation, BootRecord, BootTotals
from amiforge.store.base import StoreCore
from amiforge.store.rows import Computed, float_or_none, row_mapper, text_or_empty
from amiforge.store.schema import boot_totals_table, boots_table, versions_table

_CHUNK = 500  # instances looked up per query (well under SQLite's bound-parameter limit)


def _outcome(value: object) -> str | None:
    if value is None:
        return None
    if value not in BOOT_OUTCOMES:
        raise ValueError(f"unknown boot outcome {value!r}")
    return str(value)


def _timeline(value: Mapping[str, float] | None) -> dict[str, float] | None:
    """As stored: the phases in their order (kernel, userspace, then the slowest units), a few of them at most."""
    return None if value is None else {str(k)[:200]: float(v) for k, v in list(value.items())[:8]}


def _tail(obs: BootObservation) -> list[str] | None:
    """Kept with the outcome it explains, once: a few short lines (guest.console_tail)."""
    return [line[:200] for line in obs.console_tail[:10]] or None


def _tail_of(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TypeError(f"expected a JSON list of lines, found {type(value).__name__}")
    return tuple(str(line) for line in value)


def _timeline_of(value: object) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a JSON object of seconds, found {type(value).__name__}")
    return {str(k): float(v) for k, v in value.items()}


boot_from_row = row_mapper(
    BootRecord,
    "boots",
    version_ref=Computed(lambda row: f"{row['name']}@{row['number']}"),  # joined from the version
    outcome=_outcome,
    time_to_ready=float_or_none,
    replaced=bool,
    detail=text_or_empty,
    timeline=_timeline_of,
    console_tail=_tail_of,
)


def _seconds(value: object) -> dict[int, int]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a JSON object of seconds, found {type(value).__name__}")
    return dict(zip(map(int, value), map(int, value.values()), strict=True))  # a scrape reads thousands: map, in C


totals_from_row = row_mapper(BootTotals, "boot_totals", key="version_id", ttr_sum=float, ttr_seconds=_seconds)


@dataclass
class _Increment:
    """What one recording adds to the totals of a (version, target)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*BOOT_OUTCOMES, "replaced"), 0))
    ttr_sum: float = 0.0
    ttr_seconds: dict[int, int] = field(default_factory=dict)

    def outcome(self, outcome: str, ttr: float | None) -> None:
        self.counts[outcome] += 1
        if outcome == "ready" and ttr is not None:
            self.ttr_sum += ttr
            key = max(0, math.ceil(ttr))
            self.ttr_seconds[key] = self.ttr_seconds.get(key, 0) + 1


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None or (b is not None and b > a) else a


class Telemetry(StoreCore):
    def record_boots(self, target: str, observations: Sequence[BootObservation]) -> int:
        """Record what is known now of these boots on `target`; the number of boots that changed."""
        changed = 0
        b = boots_table
        with self._guard(f"record boots on {target}"), self._write() as conn:
            postgres = conn.dialect.name == "postgresql"
            increments: dict[int, _Increment] = {}
            for start in range(0, len(observations), _CHUNK):
                chunk = observations[start : start + _CHUNK]
                known = self._boot_rows(conn, target, [o.instance for o in chunk])
                fresh = [o for o in chunk if o.instance not in known]
                if fresh:
                    # Another collector may insert the same boot meanwhile (PostgreSQL locks no row that does not
                    # exist yet): what it inserted first is read back below and moved forward like any known row.
                    # One statement run over many rows (SQLAlchemy batches it, RETURNING included, from one compiled
                    # form): a VALUES list of the chunk would be compiled anew for each chunk, 7× slower.
                    insert = (pg_insert if postgres else sqlite_insert)(b).on_conflict_do_nothing(
                        index_elements=["target", "instance"]
                    )
                    done = conn.execute(insert.returning(b.c.instance), [_new_row(target, o) for o in fresh])
                    inserted = set(done.scalars())
                    for obs in fresh:
                        if obs.instance in inserted:
                            # Even a boot still launching makes its (version, target) counters exist, at zero:
                            # Prometheus's rate() takes a series' first value as its start, so outcomes should
                            # arrive as increments of a series it already scraped (serve collects every 15 s).
                            inc = increments.setdefault(obs.version_id, _Increment())
                            if obs.outcome is not None:
                                inc.outcome(obs.outcome, obs.time_to_ready)
                            inc.counts["replaced"] += obs.replaced
                    changed += len(inserted)
                    raced = [o.instance for o in fresh if o.instance not in inserted]
                    known.update(self._boot_rows(conn, target, raced) if raced else {})
                    chunk = [o for o in chunk if o.instance in known and o.instance not in inserted]
                for obs in chunk:
                    row = known[obs.instance]
                    update = _forward(row, obs)
                    if not update:
                        continue
                    inc = increments.setdefault(int(row["version_id"]), _Increment())
                    if "outcome" in update:
                        inc.outcome(str(update["outcome"]), update.get("time_to_ready", row["time_to_ready"]))
                    if update.get("replaced"):
                        inc.counts["replaced"] += 1
                    conn.execute(b.update().where(b.c.id == row["id"]).values(**update))
                    changed += 1
            for version_id, inc in increments.items():
                self._add_totals(conn, version_id, target, inc)
        return changed

    @staticmethod
    def _boot_rows(conn: sa.Connection, target: str, instances: Sequence[str]) -> dict[str, Any]:
        b = boots_table
        query = sa.select(b).where(b.c.target == target, b.c.instance.in_(list(instances)))
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()  # SQLite writers hold the database's write lock already
        return {row["instance"]: row for row in conn.execute(query).mappings()}

    @staticmethod
    def _add_totals(conn: sa.Connection, version_id: int, target: str, inc: _Increment) -> None:
        t = boot_totals_table
        insert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(t)
        zero = {"ready": 0, "failed": 0, "timeout": 0, "replaced": 0, "ttr_sum": 0.0, "ttr_seconds": {}}
        conn.execute(insert.values(version_id=version_id, target=target, **zero).on_conflict_do_nothing())
        query = sa.select(t).where(t.c.version_id == version_id, t.c.target == target)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()  # SQLite writers hold the database's write lock already
        row = conn.execute(query).mappings().one()
        seconds = _seconds(row["ttr_seconds"])
        for key, count in inc.ttr_seconds.items():
            seconds[key] = seconds.get(key, 0) + count
        conn.execute(
            t.update()
            .where(t.c.version_id == version_id, t.c.target == target)
            .values(
                **{name: int(row[name]) + count for name, count in inc.counts.items()},
                ttr_sum=float(row["ttr_sum"]) + inc.ttr_sum,
                ttr_seconds={str(k): v for k, v in sorted(seconds.items())},
            )
        )

    def stop_boots(
        self, target: str, *, keep: Collection[str], at: datetime, launched_before: datetime | None = None
    ) -> list[str]:
        """Mark every boot on `target` still running but for the instances in `keep` as stopped at `at` (they are
        gone: a destroyed fleet, a terminated instance); the instances marked. `launched_before`: only boots
        launched before it (when `keep` was read), so a boot another collector recorded since is not stopped."""
        b = boots_table
        with self._guard(f"record stopped boots on {target}"), self._write() as conn:
            query = sa.select(b.c.id, b.c.instance).where(b.c.target == target, b.c.stopped_at.is_(None))
            if launched_before is not None:
                query = query.where(b.c.launched_at < launched_before)
            running = conn.execute(query).all()
            gone = [(row_id, instance) for row_id, instance in running if instance not in keep]
            for start in range(0, len(gone), _CHUNK):
                ids = [row_id for row_id, _ in gone[start : start + _CHUNK]]
                conn.execute(b.update().where(b.c.id.in_(ids)).values(stopped_at=at))
        return [instance for _, instance in gone]

    def running_targets(self) -> list[str]:
        """Targets with a boot not known to have stopped."""
        b = boots_table
        with self._guard("list targets with running boots"), self._read() as conn:
            query = sa.select(b.c.target).where(b.c.stopped_at.is_(None)).distinct().order_by(b.c.target)
            return [str(t) for t in conn.execute(query).scalars()]

    def running_members(self) -> list[tuple[int, str, datetime | None]]:
        """(version id, target, last heartbeat) of every boot not known to have stopped: a fleet's members now, as
        last collected. Three columns, not whole boots: a scrape counts them."""
        b = boots_table
        query = sa.select(b.c.version_id, b.c.target, b.c.last_heartbeat_at).where(b.c.stopped_at.is_(None))
        with self._guard("read running boots"), self._read() as conn:
            return [(int(vid), str(target), heard) for vid, target, heard in conn.execute(query)]

    def recent_boots(self, since: datetime, limit: int) -> list[BootRecord]:
        """The newest `limit` boots decided since `since`, newest first."""
        b, v = boots_table, versions_table
        query = (
            sa.select(b, v.c.name, v.c.number)
            .join(v, v.c.id == b.c.version_id)
            .where(b.c.ended_at >= since)
            .order_by(b.c.ended_at.desc(), b.c.id.desc())
            .limit(limit)
        )
        with self._guard("read recent boots"), self._read() as conn:
            return boot_from_row.each(conn.execute(query))

    def versions_with_boots(self) -> list[tuple[int, str, int]]:
        """(id, image name, number) of every version that has booted anywhere."""
        t, v = boot_totals_table, versions_table
        ids = sa.select(t.c.version_id).distinct().subquery()
        query = sa.select(v.c.id, v.c.name, v.c.number).join(ids, ids.c.version_id == v.c.id).order_by(v.c.id)
        with self._guard("list versions that booted"), self._read() as conn:
            return [(int(i), str(n), int(num)) for i, n, num in conn.execute(query)]

    def boots_in_window(
        self,
        start: datetime,
        end: datetime,
        *,
        version_ids: Collection[int] | None = None,
        targets: Collection[str] | None = None,
    ) -> list[BootRecord]:
        """Every boot alive at some time in [start, end): launched before `end`, and running or stopped since
        `start` (what each SLI of that window needs: outcomes in it, instance time in it, instances running)."""
        b, v = boots_table, versions_table
        base = sa.select(b, v.c.name, v.c.number).join(v, v.c.id == b.c.version_id).where(b.c.launched_at < end)
        if version_ids is not None:
            base = base.where(b.c.version_id.in_(list(version_ids)))
        if targets is not None:
            base = base.where(b.c.target.in_(list(targets)))
        with self._guard("read boots"), self._read() as conn:
            running = conn.execute(base.where(b.c.stopped_at.is_(None)))
            found = boot_from_row.each(running)
            stopped = conn.execute(base.where(b.c.stopped_at >= start))
            found += boot_from_row.each(stopped)
        return sorted(found, key=lambda r: (r.launched_at, r.id))

    def boot_totals(self, version_ids: Iterable[int] | None = None) -> list[BootTotals]:
        t = boot_totals_table
        query = sa.select(t).order_by(t.c.version_id, t.c.target)
        if version_ids is not None:
            query = query.where(t.c.version_id.in_(list(version_ids)))
        with self._guard("read boot totals"), self._read() as conn:
            return totals_from_row.each(conn.execute(query))


def _new_row(target: str, obs: BootObservation) -> dict[str, Any]:
    return {
        "version_id": obs.version_id,
        "target": target,
        "instance": obs.instance,
        "launched_at": obs.launched_at,
        "outcome": obs.outcome,
        "time_to_ready": obs.time_to_ready,
        "ended_at": obs.ended_at if obs.outcome is not None else None,
        "stopped_at": obs.stopped_at,
        "replaced": obs.replaced,
        "last_heartbeat_at": obs.last_heartbeat_at,
        "detail": obs.detail[:2000],
        "timeline": _timeline(obs.timeline),
        "console_tail": _tail(obs) if obs.outcome is not None else None,
    }


def _forward(row: Mapping[Any, Any], obs: BootObservation) -> dict[str, Any]:
    """What `obs` adds to the boot as recorded: only what moves it forward."""
    update: dict[str, Any] = {}
    if row["outcome"] is None and obs.outcome is not None:
        update.update(outcome=obs.outcome, time_to_ready=obs.time_to_ready, ended_at=obs.ended_at,
                      detail=obs.detail[:2000], console_tail=_tail(obs))  # fmt: skip
    if row["stopped_at"] is None and obs.stopped_at is not None:
        update["stopped_at"] = obs.stopped_at
    if not row["replaced"] and obs.replaced:
        update["replaced"] = True
    if row["timeline"] is None and obs.timeline is not None:
        update["timeline"] = _timeline(obs.timeline)
    heard = _later(row["last_heartbeat_at"], obs.last_heartbeat_at)
    if heard != row["last_heartbeat_at"]:
        update["last_heartbeat_at"] = heard
    return update
