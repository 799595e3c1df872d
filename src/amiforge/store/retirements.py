"""Retirements: where each artifact stands on its way out (deprecated → deregistered → purged), moved by
compare-and-set on its stage, each move and its event committed together (lifecycle/retire.py)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from amiforge.errors import StateError
from amiforge.model import RETIRE_STAGES, Retirement, Status
from amiforge.store.base import StoreCore
from amiforge.store.events import append_in
from amiforge.store.rows import row_mapper
from amiforge.store.schema import artifacts_table, retirements_table, versions_table

retirement_from_row = row_mapper(
    Retirement, "retirements", key="artifact_id", snapshots=lambda v: tuple(str(s) for s in v)
)

# The states a version leaves for deprecated when its first artifact is deprecated (revoked and failed stay so).
_DEPRECATES = (Status.BUILT, Status.TESTED, Status.SCANNED, Status.SIGNED)
# The time column each stage sets.
_STAMP = {"deprecated": "deprecated_at", "deregistered": "deregistered_at", "purged": "purged_at"}


class Retirements(StoreCore):
    def retirements(self, artifact_ids: Collection[int] | None = None) -> dict[int, Retirement]:
        """artifact id → its retirement, for every artifact on its way out (or only those of `artifact_ids`)."""
        query = sa.select(retirements_table)
        if artifact_ids is not None:
            query = query.where(retirements_table.c.artifact_id.in_(sorted(artifact_ids)))
        with self._guard("read retirements"), self._read() as conn:
            return {r.artifact_id: r for r in retirement_from_row.each(conn.execute(query))}

    def advance_retirement(
        self,
        artifact_id: int,
        stage: str,
        *,
        expect: str | None,
        run_id: str,
        actor: str,
        ref: str,
        data: Mapping[str, object],
        snapshots: Sequence[str] = (),
        at: datetime | None = None,
    ) -> Retirement:
        """Move the artifact to `stage` if it is still at `expect` (None: not on its way out yet), recording the
        `retire.<stage>` event in the same transaction. A lost race or a step out of order raises StateError."""
        if stage not in RETIRE_STAGES or (expect is not None and expect not in RETIRE_STAGES):
            raise ValueError(f"not a retirement stage: {stage!r} (from {expect!r})")
        if RETIRE_STAGES.index(stage) != (-1 if expect is None else RETIRE_STAGES.index(expect)) + 1:
            raise StateError(f"an artifact cannot go from {expect or 'in use'} to {stage}", fix="plan again")
        now = at or self._now()
        t = retirements_table
        with self._guard(f"record artifact {artifact_id} as {stage}"), self._write() as conn:
            version_id = conn.execute(
                sa.select(artifacts_table.c.version_id).where(artifacts_table.c.id == artifact_id)
            ).scalar_one_or_none()
            if version_id is None:
                raise StateError(f"no artifact with id {artifact_id}", fix="plan again")
            if stage == "deprecated":
                # The version with its first artifact, in the same transaction: a kill between the two would leave
                # a version that says it is signed while its images go.
                v = versions_table
                conn.execute(
                    v.update()
                    .where(v.c.id == version_id, v.c.status.in_([s.value for s in _DEPRECATES]))
                    .values(status=Status.DEPRECATED.value, updated_at=now)
                )
            if expect is None:
                try:
                    conn.execute(
                        t.insert().values(
                            artifact_id=artifact_id, version_id=version_id, stage=stage, deprecated_at=now,
                            snapshots=list(snapshots), run_id=run_id,
                        )
                    )  # fmt: skip
                except IntegrityError as e:
                    raise StateError(
                        f"artifact {artifact_id} was deprecated by someone else meanwhile", fix="plan again"
                    ) from e
            else:
                moved = conn.execute(
                    t.update()
                    .where(t.c.artifact_id == artifact_id, t.c.stage == expect)
                    .values(stage=stage, run_id=run_id, **{_STAMP[stage]: now})
                )
                if moved.rowcount != 1:
                    raise StateError(
                        f"artifact {artifact_id} is no longer {expect} (another retire moved it)", fix="plan again"
                    )
            append_in(conn, f"retire.{stage}", at=now, actor=actor, ref=ref, data={**data, "run": run_id})
            row = conn.execute(sa.select(t).where(t.c.artifact_id == artifact_id)).mappings().one()
            return retirement_from_row(row)

    def reopen_retirement(
        self,
        artifact_id: int,
        *,
        run_id: str,
        actor: str,
        ref: str,
        data: Mapping[str, object],
        version_status: Status | None = None,
    ) -> Retirement:
        """A deregistered artifact brought back (`retire restore`): deprecated again from now, so the grace period
        starts over; a retired version becomes `version_status` again; `retire.restored` is recorded in the same
        transaction. StateError unless it is deregistered."""
        now = self._now()
        t = retirements_table
        with self._guard(f"record artifact {artifact_id} as restored"), self._write() as conn:
            moved = conn.execute(
                t.update()
                .where(t.c.artifact_id == artifact_id, t.c.stage == "deregistered")
                .values(stage="deprecated", deprecated_at=now, deregistered_at=None, run_id=run_id)
            )
            if moved.rowcount != 1:
                raise StateError(f"artifact {artifact_id} is not deregistered", fix="`amiforge retire` shows its stage")
            if version_status is not None:
                v = versions_table
                version_id = sa.select(t.c.version_id).where(t.c.artifact_id == artifact_id).scalar_subquery()
                conn.execute(
                    v.update()
                    .where(v.c.id == version_id, v.c.status == Status.RETIRED.value)
                    .values(status=version_status.value, updated_at=now)
                )
            append_in(conn, "retire.restored", at=now, actor=actor, ref=ref, data={**data, "run": run_id})
            row = conn.execute(sa.select(t).where(t.c.artifact_id == artifact_id)).mappings().one()
            return retirement_from_row(row)
