"""Long work that must survive a crash: operations (one row per attempt at distribute, sharing a run id so a rerun
adopts what an earlier attempt created) and rollouts (the controller's durable state machine, its replacements and
its gate decisions). State changes are compare-and-set.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa

from amiforge.errors import NotFound, StateError
from amiforge.model import ROLLOUT_LIVE, Operation, Rollout, RolloutDecision, RolloutReplacement
from amiforge.store.base import StoreCore, inserted_id
from amiforge.store.rows import Computed, loose_object, row_mapper
from amiforge.store.schema import (
    operations_table,
    rollout_decisions_table,
    rollout_replacements_table,
    rollouts_table,
    versions_table,
)

operation_from_row = row_mapper(Operation, "operations", detail=loose_object)
rollout_from_row = row_mapper(
    Rollout,
    "rollouts",
    version_ref=Computed(lambda row: f"{row['name']}@{row['number']}"),  # joined from the version
    strategy=loose_object,
    waves=lambda value: tuple(int(w) for w in value or ()),
    detail=loose_object,
)
replacement_from_row = row_mapper(RolloutReplacement, "rollout_replacements")
decision_from_row = row_mapper(RolloutDecision, "rollout_decisions", passed=bool, numbers=loose_object)


class Operations(StoreCore):
    # operations

    def begin_operation(self, kind: str, version_id: int, *, actor: str, new_run_id: str) -> Operation:
        with self._guard(f"start {kind} of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            earlier = conn.execute(
                sa.select(operations_table.c.run_id)
                .where(operations_table.c.version_id == version_id, operations_table.c.kind == kind)
                .order_by(operations_table.c.id)
                .limit(1)
            ).scalar_one_or_none()
            row_id = inserted_id(conn.execute(
                operations_table.insert().values(
                    kind=kind, version_id=version_id, run_id=earlier or new_run_id, state="running", actor=actor,
                    started_at=self._now(), finished_at=None, detail={},
                )
            ))  # fmt: skip
        return self._operation_by_id(row_id)

    def update_operation(self, operation_id: int, state: str, detail: Mapping[str, object]) -> Operation:
        if state not in ("running", "done", "failed"):
            raise ValueError(f"an operation is running, done or failed, not {state!r}")
        with self._guard(f"finish operation {operation_id}"), self._write() as conn:
            conn.execute(
                operations_table.update()
                .where(operations_table.c.id == operation_id)
                .values(state=state, finished_at=None if state == "running" else self._now(), detail=dict(detail))
            )
        return self._operation_by_id(operation_id)

    def operations(self, version_id: int, kind: str | None = None) -> list[Operation]:
        query = sa.select(operations_table).where(operations_table.c.version_id == version_id)
        if kind is not None:
            query = query.where(operations_table.c.kind == kind)
        with self._guard(f"list operations of version {version_id}"), self._read() as conn:
            return operation_from_row.each(conn.execute(query.order_by(operations_table.c.id)))

    def _operation_by_id(self, operation_id: int) -> Operation:
        with self._guard(f"read operation {operation_id}"), self._read() as conn:
            row = conn.execute(sa.select(operations_table).where(operations_table.c.id == operation_id)).mappings()
            found = row.one_or_none()
        if found is None:
            raise NotFound(f"no operation {operation_id}")
        return operation_from_row(found)

    # rollouts

    def create_rollout(
        self,
        target: str,
        version_id: int,
        *,
        strategy: Mapping[str, object],
        waves: Sequence[int],
        actor: str,
        undoes: int | None = None,
    ) -> Rollout:
        now = self._now()
        with self._guard(f"start a rollout on {target}"), self._write() as conn:
            self._require_version(conn, version_id)
            busy = conn.execute(
                sa.select(rollouts_table.c.id, rollouts_table.c.state).where(
                    rollouts_table.c.target == target, rollouts_table.c.state.in_(ROLLOUT_LIVE)
                )
            ).first()
            if busy is not None:
                raise StateError(
                    f"rollout #{busy.id} on {target} is {busy.state}",
                    fix=f"amiforge rollout resume {busy.id} (or abort it) before starting another",
                )
            if (
                undoes is not None
                and conn.execute(
                    sa.select(rollouts_table.c.id).where(
                        rollouts_table.c.id == undoes, rollouts_table.c.target == target
                    )
                ).first()
                is None
            ):
                raise NotFound(f"no rollout #{undoes} on {target} to undo", fix="amiforge rollout status lists them")
            row_id = inserted_id(conn.execute(
                rollouts_table.insert().values(
                    target=target, version_id=version_id, strategy=dict(strategy), waves=list(waves), wave=0,
                    state="running", requested=None, actor=actor, started_at=now, updated_at=now, finished_at=None,
                    detail={}, undoes=undoes,
                )
            ))  # fmt: skip
        return self.get_rollout(row_id)

    def get_rollout(self, rollout_id: int) -> Rollout:
        found = self._rollout_rows(rollouts_table.c.id == rollout_id)
        if not found:
            raise NotFound(f"no rollout #{rollout_id}", fix="amiforge rollout status lists the rollouts")
        return found[0]

    def rollouts(self, *, target: str | None = None, version_id: int | None = None) -> list[Rollout]:
        where: sa.ColumnElement[bool] = sa.true()
        if target is not None:
            where = where & (rollouts_table.c.target == target)
        if version_id is not None:
            where = where & (rollouts_table.c.version_id == version_id)
        return self._rollout_rows(where)

    def claim_rollout(
        self, rollout_id: int, owner: str, *, expect: str | None, expect_seen: datetime | None = None
    ) -> bool:
        """Make `owner` the controller of a live rollout whose controller is still `expect`, last renewed at
        `expect_seen` (compare-and-set: a renewal in between makes it fail); False if it is no longer so."""
        now = self._now()
        r = rollouts_table
        held = r.c.controller.is_(None) if expect is None else r.c.controller == expect
        seen = r.c.controller_seen_at.is_(None) if expect_seen is None else r.c.controller_seen_at == expect_seen
        with self._guard(f"claim rollout #{rollout_id}"), self._write() as conn:
            done = conn.execute(r.update().where(r.c.id == rollout_id, held, seen, r.c.state.in_(ROLLOUT_LIVE))
                                .values(controller=owner, controller_seen_at=now))  # fmt: skip
            return done.rowcount == 1

    def renew_rollout(self, rollout_id: int, owner: str, *, release: bool = False) -> bool:
        """Renew `owner`'s lease on the rollout (or give it up: `release`); False if it no longer holds it."""
        now = self._now()
        r = rollouts_table
        values = {"controller": None, "controller_seen_at": None} if release else {"controller_seen_at": now}
        with self._guard(f"renew rollout #{rollout_id}"), self._write() as conn:
            done = conn.execute(r.update().where(r.c.id == rollout_id, r.c.controller == owner).values(**values))
            return done.rowcount == 1

    def rollout_page(
        self, *, limit: int, before: int | None = None, states: Collection[str] | None = None
    ) -> list[Rollout]:
        """Newest first: at most `limit` rollouts with ids below `before` (the keyset cursor), in `states` if given."""
        where: sa.ColumnElement[bool] = sa.true()
        if before is not None:
            where = where & (rollouts_table.c.id < before)
        if states is not None:
            where = where & rollouts_table.c.state.in_(sorted(states))
        return self._rollout_rows(where, newest=max(limit, 0))

    def rollout_tally(self) -> list[tuple[str, str, str, bool, bool, int]]:
        """(image, target, state, is a rollback, was undone by one, how many rollouts) for every rollout ever
        started, in one grouped read."""
        r, v = rollouts_table, versions_table
        later = rollouts_table.alias("later")
        undone = sa.exists().where(later.c.undoes == r.c.id)
        remedy = r.c.undoes.is_not(None)
        query = (
            sa.select(v.c.name, r.c.target, r.c.state, remedy, undone, sa.func.count())
            .join(v, v.c.id == r.c.version_id)
            .group_by(v.c.name, r.c.target, r.c.state, remedy, undone)
            .order_by(v.c.name, r.c.target, r.c.state)
        )
        with self._guard("count rollouts"), self._read() as conn:
            return [(str(n), str(t), str(s), bool(rb), bool(u), int(c)) for n, t, s, rb, u, c in conn.execute(query)]

    def _rollout_rows(self, where: sa.ColumnElement[bool], *, newest: int | None = None) -> list[Rollout]:
        """Oldest first; or, with `newest`, that many of the newest, newest first."""
        query = (
            sa.select(rollouts_table, versions_table.c.name, versions_table.c.number)
            .join(versions_table, versions_table.c.id == rollouts_table.c.version_id)
            .where(where)
        )
        if newest is None:
            query = query.order_by(rollouts_table.c.id)
        else:
            query = query.order_by(rollouts_table.c.id.desc()).limit(newest)
        with self._guard("read rollouts"), self._read() as conn:
            return rollout_from_row.each(conn.execute(query))

    def update_rollout(
        self,
        rollout_id: int,
        *,
        expect: str,
        state: str | None = None,
        wave: int | None = None,
        detail: Mapping[str, object] | None = None,
        clear_request: bool = False,
    ) -> Rollout:
        now = self._now()
        values: dict[str, object] = {"updated_at": now}
        if state is not None:
            values["state"] = state
            if state not in ROLLOUT_LIVE:
                values["finished_at"] = now
        if wave is not None:
            values["wave"] = wave
        if detail is not None:
            values["detail"] = dict(detail)
        if clear_request:
            values["requested"] = None
        with self._guard(f"update rollout #{rollout_id}"), self._write() as conn:
            result = conn.execute(
                rollouts_table.update()
                .where(rollouts_table.c.id == rollout_id, rollouts_table.c.state == expect)
                .values(**values)
            )
            if result.rowcount == 0:
                raise StateError(
                    f"rollout #{rollout_id} is no longer {expect} (another controller moved it)",
                    fix=f"amiforge rollout status {rollout_id}",
                )
        return self.get_rollout(rollout_id)

    def request_rollout(self, rollout_id: int, request: str) -> Rollout:
        if request not in ("pause", "abort"):
            raise ValueError(f"a rollout can be asked to pause or abort, not {request!r}")
        with self._guard(f"ask rollout #{rollout_id} to {request}"), self._write() as conn:
            result = conn.execute(
                rollouts_table.update()
                .where(rollouts_table.c.id == rollout_id, rollouts_table.c.state.in_(ROLLOUT_LIVE))
                .values(requested=request, updated_at=self._now())
            )
        if result.rowcount == 0:
            rollout = self.get_rollout(rollout_id)  # NotFound, or:
            raise StateError(f"rollout #{rollout_id} is {rollout.state} already", fix="nothing to do")
        return self.get_rollout(rollout_id)

    def plan_replacements(
        self, rollout_id: int, wave: int, kind: str, items: Sequence[tuple[str, str | None, str]]
    ) -> list[RolloutReplacement]:
        now = self._now()
        with self._guard(f"plan replacements of rollout #{rollout_id}"), self._write() as conn:
            for old_member, old_version, token in items:
                known = conn.execute(
                    sa.select(rollout_replacements_table.c.id).where(rollout_replacements_table.c.token == token)
                ).first()
                if known is None:
                    conn.execute(
                        rollout_replacements_table.insert().values(
                            rollout_id=rollout_id, wave=wave, kind=kind, old_member=old_member,
                            old_version=old_version, token=token, new_member=None, state="planned", at=now,
                        )
                    )  # fmt: skip
        tokens = {token for _, _, token in items}
        return [r for r in self.replacements(rollout_id) if r.token in tokens]

    def finish_replacement(self, token: str, *, new_member: str, state: str) -> RolloutReplacement:
        if state not in ("done", "failed"):
            raise ValueError(f"a replacement ends done or failed, not {state!r}")
        table = rollout_replacements_table
        with self._guard(f"record replacement {token}"), self._write() as conn:
            conn.execute(
                table.update().where(table.c.token == token).values(new_member=new_member, state=state, at=self._now())
            )
            row = conn.execute(sa.select(table).where(table.c.token == token)).mappings().one_or_none()
        if row is None:
            raise NotFound(f"no replacement with token {token}")
        return replacement_from_row(row)

    def replacements(self, rollout_id: int) -> list[RolloutReplacement]:
        table = rollout_replacements_table
        query = sa.select(table).where(table.c.rollout_id == rollout_id).order_by(table.c.id)
        with self._guard(f"list replacements of rollout #{rollout_id}"), self._read() as conn:
            return replacement_from_row.each(conn.execute(query))

    def add_decision(
        self, rollout_id: int, wave: int, *, passed: bool, action: str, numbers: Mapping[str, object]
    ) -> RolloutDecision:
        with self._guard(f"record a decision of rollout #{rollout_id}"), self._write() as conn:
            row_id = inserted_id(conn.execute(
                rollout_decisions_table.insert().values(
                    rollout_id=rollout_id, wave=wave, at=self._now(), passed=passed, action=action,
                    numbers=dict(numbers),
                )
            ))  # fmt: skip
        (decision,) = [d for d in self.decisions(rollout_id) if d.id == row_id]
        return decision

    def decisions(self, rollout_id: int) -> list[RolloutDecision]:
        table = rollout_decisions_table
        query = sa.select(table).where(table.c.rollout_id == rollout_id).order_by(table.c.id)
        with self._guard(f"list decisions of rollout #{rollout_id}"), self._read() as conn:
            return decision_from_row.each(conn.execute(query))
