"""Telemetry: every boot of a version on a target (`boots`) and their running totals (`boot_totals`).

The boot reports recorded before this revision become boots of the target `boot-test` (instance `report-ID`), with
their totals, so a version's boot success rate starts from its history, not from zero.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    boots = op.create_table(
        "boots",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_boots_version"), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("instance", sa.String(128), nullable=False),
        sa.Column("launched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("time_to_ready", sa.Float, nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("replaced", sa.Boolean, nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.UniqueConstraint("target", "instance", name="uq_boots_target_instance"),
    )
    op.create_index("ix_boots_version_launched", "boots", ["version_id", "launched_at"])
    op.create_index("ix_boots_stopped", "boots", ["stopped_at"])
    op.create_index("ix_boots_ended", "boots", ["ended_at"])
    op.create_index("ix_boots_running", "boots", ["target"], sqlite_where=sa.text("stopped_at IS NULL"),
                    postgresql_where=sa.text("stopped_at IS NULL"))  # fmt: skip
    totals = op.create_table(
        "boot_totals",
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_boot_totals_version"),
                  primary_key=True),
        sa.Column("target", sa.String(200), primary_key=True),
        sa.Column("ready", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("timeout", sa.Integer, nullable=False),
        sa.Column("replaced", sa.Integer, nullable=False),
        sa.Column("ttr_sum", sa.Float, nullable=False),
        sa.Column("ttr_seconds", sa.JSON, nullable=False),
    )  # fmt: skip
    _backfill(boots, totals)


def _backfill(boots: sa.Table | None, totals: sa.Table | None) -> None:
    """Boot reports -> boots of `boot-test`: ready when the marker came and every check passed (BootReport.passed),
    timeout when the marker never came, failed otherwise."""
    assert boots is not None and totals is not None
    bind = op.get_bind()
    reports = sa.table(
        "boot_reports",
        sa.column("id", sa.Integer),
        sa.column("version_id", sa.Integer),
        sa.column("time_to_ready", sa.Float),
        sa.column("checks", sa.Text),
        sa.column("started_at", sa.DateTime(timezone=True)),
        sa.column("duration", sa.Float),
    )
    rows: list[dict[str, object]] = []
    sums: dict[int, dict[str, object]] = {}
    for r in bind.execute(sa.select(reports).order_by(reports.c.id)).mappings():
        try:
            checks = json.loads(r["checks"]) if isinstance(r["checks"], str) else r["checks"]
            passed = bool(checks) and all(bool(c.get("passed")) for c in checks)
        except (ValueError, TypeError, AttributeError):
            passed = False  # a damaged report is no evidence of a good boot
        ttr = r["time_to_ready"]
        outcome = "timeout" if ttr is None else "ready" if passed else "failed"
        started: datetime = r["started_at"]
        started = started.replace(tzinfo=UTC) if started.tzinfo is None else started.astimezone(UTC)
        rows.append({
            "version_id": r["version_id"], "target": "boot-test", "instance": f"report-{r['id']}",
            "launched_at": started, "outcome": outcome, "time_to_ready": ttr,
            "ended_at": started + timedelta(seconds=float(r["duration"] or 0)),
            "stopped_at": started + timedelta(seconds=float(r["duration"] or 0)),
            "replaced": False, "last_heartbeat_at": None, "detail": "from a boot report recorded before 0009",
        })  # fmt: skip
        total = sums.setdefault(
            r["version_id"],
            {"version_id": r["version_id"], "target": "boot-test", "ready": 0, "failed": 0, "timeout": 0,
             "replaced": 0, "ttr_sum": 0.0, "ttr_seconds": {}},
        )  # fmt: skip
        total[outcome] = int(total[outcome]) + 1  # type: ignore[call-overload]
        if outcome == "ready" and ttr is not None:
            total["ttr_sum"] = float(total["ttr_sum"]) + ttr  # type: ignore[arg-type]
            seconds: dict[str, int] = total["ttr_seconds"]  # type: ignore[assignment]
            key = str(math.ceil(ttr))
            seconds[key] = seconds.get(key, 0) + 1
    if rows:
        op.bulk_insert(boots, rows)
        op.bulk_insert(totals, list(sums.values()))


def downgrade() -> None:
    op.drop_table("boot_totals")
    op.drop_index("ix_boots_running", "boots")
    op.drop_index("ix_boots_ended", "boots")
    op.drop_index("ix_boots_stopped", "boots")
    op.drop_index("ix_boots_version_launched", "boots")
    op.drop_table("boots")
