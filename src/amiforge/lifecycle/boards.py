"""The dashboards of the web console (executive, on-call, debug), for teams without Grafana: the same boards and
panels as `amiforge export grafana` (lifecycle/dashboards.py names them; each panel here is computed under the same
title), read from the registry instead of Prometheus.

What the numbers come from is the code `amiforge metrics` and `/metrics` use: M1–M6 per version and target from
`lifecycle.metrics.metrics` (lifecycle/slis.py), and the boots, rollouts and scans the registry keeps. The fleets are
not read here (a page renders from what the registry holds; `amiforge serve` collects them in the background).
Where Grafana plots a rate against Prometheus's history, a panel here buckets the registry's boots over the window.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from amiforge.errors import ConfigError
from amiforge.lifecycle.controller import canonical_target
from amiforge.lifecycle.metrics import MetricsReport, metrics
from amiforge.lifecycle.slis import quantile
from amiforge.model import BOOT_TEST_TARGET, ROLLOUT_LIVE, BootRecord, Rollout
from amiforge.settings import Settings
from amiforge.store.interface import Store

BUCKETS = 24  # points of a time series over the window
RECENT = 50  # rows of a "recent boots" table


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[datetime, float | None]]  # the start of each bucket, and the value there (None: no data)


@dataclass(frozen=True)
class PanelView:
    title: str
    kind: str  # stat | table | timeseries: as in Grafana
    unit: str  # percentunit | s | short
    table: Table
    series: list[Series] = field(default_factory=list)


@dataclass(frozen=True)
class BoardView:
    uid: str
    title: str
    start: datetime
    end: datetime
    version: str | None
    target: str | None
    panels: list[PanelView]


@dataclass(frozen=True)
class _Inputs:
    store: Store
    report: MetricsReport
    boots: list[BootRecord]  # every boot alive in the window on the chosen version and target
    rollouts: list[Rollout]  # every rollout of the chosen target (and image)
    start: datetime
    end: datetime

    def fleets(self) -> list[BootRecord]:
        return [b for b in self.boots if b.target != BOOT_TEST_TARGET]

    def decided(self, boots: Sequence[BootRecord]) -> list[BootRecord]:
        """The boots whose outcome came within the window, newest first: a member that became ready weeks ago and
        still runs is alive in the window, but its boot is not one of the window's."""
        inside = [b for b in boots if b.ended_at is not None and self.start <= b.ended_at < self.end]
        return sorted(inside, key=lambda b: b.ended_at or b.launched_at, reverse=True)

    def edges(self) -> list[datetime]:
        step = (self.end - self.start) / BUCKETS
        return [self.start + step * i for i in range(BUCKETS + 1)]


BOARDS = ("executive", "oncall", "debug")


def board(
    name: str,
    *,
    store: Store,
    settings: Settings,
    version: str | None = None,
    target: str | None = None,
    window: timedelta = timedelta(hours=24),
    now: datetime | None = None,
) -> BoardView:
    """The board `name` over `window` up to `now`, for one version and one target if given."""
    from amiforge.lifecycle.dashboards import boards  # grafana-foundation-sdk: only for a board

    if name not in BOARDS:
        raise ConfigError(f"no dashboard {name!r}", fix="one of " + ", ".join(BOARDS))
    now = now or datetime.now(UTC)
    if target is not None and target != BOOT_TEST_TARGET:
        target = canonical_target(target)  # `web` is local:web, as everywhere else
    report = metrics(store=store, settings=settings, ref=version, target=target, window=window, now=now,
                     read_fleets=False)  # fmt: skip
    chosen = None if version is None else store.get_version(version)  # NAME@N or a digest prefix
    boots = store.boots_in_window(now - window, now, version_ids=None if chosen is None else [chosen.id],
                                  targets=None if target is None else [target])  # fmt: skip
    image = None if chosen is None else chosen.name
    rollouts = [r for r in store.rollouts(target=target) if image is None or r.version_ref.partition("@")[0] == image]
    inputs = _Inputs(store, report, boots, rollouts, now - window, now)
    grafana = next(b for b in boards() if b.uid == f"amiforge-{name}")
    panels = []
    for title, panel, _queries, _instant in grafana.panels:
        kind, unit = _kind_and_unit(panel)
        table, series = PANELS[title](inputs)
        panels.append(PanelView(title, kind, unit, table, series))
    return BoardView(grafana.uid, grafana.title, now - window, now, version, target, panels)


def _kind_and_unit(panel: object) -> tuple[str, str]:
    built = panel.build()  # type: ignore[attr-defined]  # a grafana-foundation-sdk panel builder
    return str(built.type_val), str(getattr(built.field_config.defaults, "unit", "") or "short")


# --- the panels, by their Grafana titles ----------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def _when(at: datetime | None) -> str:
    return "–" if at is None else f"{at:%Y-%m-%d %H:%M:%S}Z"


def _fleet_slis(i: _Inputs) -> list[tuple[str, ...]]:
    return [(r.version, r.target, _percent(r.boot_success), str(r.launches)) for r in i.report.targets
            if r.target != BOOT_TEST_TARGET]  # fmt: skip


def boot_success(i: _Inputs) -> tuple[Table, list[Series]]:
    return Table(("version", "target", "boot success", "launches"), _fleet_slis(i)), []


def p95_time_to_ready(i: _Inputs) -> tuple[Table, list[Series]]:
    rows = [(r.version, r.target, _seconds(r.time_to_ready.p95), str(r.ready)) for r in i.report.targets
            if r.target != BOOT_TEST_TARGET]  # fmt: skip
    return Table(("version", "target", "p95 time to ready", "ready boots"), rows), []


def open_vulnerabilities(i: _Inputs) -> tuple[Table, list[Series]]:
    severities = ("critical", "high", "medium", "low", "negligible", "unknown")
    rows = [(v.version, *(str(v.by_severity.get(s, 0)) if v.scanned else "not scanned" for s in severities),
             str(v.running)) for v in i.report.vulnerabilities]  # fmt: skip
    return Table(("version", *severities, "running"), rows), []


def rollouts_in_progress(i: _Inputs) -> tuple[Table, list[Series]]:
    live = Counter((r.version_ref.partition("@")[0], r.target) for r in i.rollouts if r.state in ROLLOUT_LIVE)
    return Table(("image", "target", "in progress"), [(im, t, str(n)) for (im, t), n in sorted(live.items())]), []


def rollouts_ended(i: _Inputs) -> tuple[Table, list[Series]]:
    rows = [(r.image, r.target, str(r.succeeded), str(r.rolled_back), str(r.aborted), _percent(r.rollback_rate))
            for r in i.report.rollouts]  # fmt: skip
    return Table(("image", "target", "succeeded", "rolled back", "aborted", "rollback rate"), rows), []


def _failed(i: _Inputs) -> list[BootRecord]:
    return [b for b in i.decided(i.fleets()) if b.outcome in ("failed", "timeout")][:RECENT]


def recent_failed_boots(i: _Inputs) -> tuple[Table, list[Series]]:
    rows = [(_when(b.ended_at), b.instance, b.version_ref, b.target, b.outcome or "", b.detail) for b in _failed(i)]
    return Table(("ended", "instance", "version", "target", "outcome", "detail"), rows), []


def _bucketed(i: _Inputs, boots: Sequence[BootRecord], at: Callable[[BootRecord], datetime | None],
              value: Callable[[list[BootRecord]], float | None]) -> list[tuple[datetime, float | None]]:  # fmt: skip
    edges = i.edges()
    points = []
    for lo, hi in pairwise(edges):
        inside = [b for b in boots if (t := at(b)) is not None and lo <= t < hi]
        points.append((lo, value(inside)))
    return points


def _by_version_target(boots: Sequence[BootRecord]) -> dict[str, list[BootRecord]]:
    grouped: dict[str, list[BootRecord]] = {}
    for b in boots:
        grouped.setdefault(f"{b.version_ref} on {b.target}", []).append(b)
    return dict(sorted(grouped.items()))


def replacements_per_minute(i: _Inputs) -> tuple[Table, list[Series]]:
    minutes = (i.end - i.start).total_seconds() / 60 / BUCKETS
    series = [Series(name, _bucketed(i, [b for b in boots if b.replaced], lambda b: b.stopped_at,
                                     lambda inside: len(inside) / minutes))
              for name, boots in _by_version_target(i.fleets()).items()]  # fmt: skip
    rows = [(s.name, f"{sum(v or 0 for _, v in s.points) * minutes:.0f}") for s in series]
    return Table(("version and target", "replacements in the window"), rows), series


def recent_deploys(i: _Inputs) -> tuple[Table, list[Series]]:
    recent = [r for r in i.rollouts if (r.finished_at or i.end) >= i.start]
    rows = [(_when(r.started_at), f"#{r.id}", r.version_ref, r.target,
             r.state + (f" (rollback of #{r.undoes})" if r.undoes is not None else ""), r.actor)
            for r in sorted(recent, key=lambda r: r.id, reverse=True)]  # fmt: skip
    return Table(("started", "rollout", "version", "target", "state", "by"), rows), []


def boot_failure_share(i: _Inputs) -> tuple[Table, list[Series]]:
    def share(inside: list[BootRecord]) -> float | None:
        return sum(b.outcome != "ready" for b in inside) / len(inside) if inside else None

    series = [Series(name, _bucketed(i, [b for b in boots if b.outcome is not None], lambda b: b.ended_at, share))
              for name, boots in _by_version_target(i.fleets()).items()]  # fmt: skip
    rows = [(name, _percent(share(i.decided(boots)))) for name, boots in _by_version_target(i.fleets()).items()]
    return Table(("version and target", "failed share over the window"), rows), series


def boot_logs(i: _Inputs) -> tuple[Table, list[Series]]:
    rows = [(_when(b.ended_at), b.instance, b.version_ref, "\n".join(b.console_tail)) for b in _failed(i)
            if b.console_tail]  # fmt: skip
    return Table(("ended", "instance", "version", "last console lines"), rows), []


def agent_coverage(i: _Inputs) -> tuple[Table, list[Series]]:
    rows = [(r.version, r.target, str(r.running), "not measured" if r.heartbeating is None else str(r.heartbeating),
             _percent(r.coverage)) for r in i.report.targets if r.target != BOOT_TEST_TARGET]  # fmt: skip
    return Table(("version", "target", "running", "heartbeating", "coverage"), rows), []


def boot_timeline(i: _Inputs) -> tuple[Table, list[Series]]:
    decided = i.decided(i.boots)[:RECENT]
    rows = [(b.instance, b.version_ref, b.target, b.outcome or "",
             _seconds(b.time_to_ready if b.time_to_ready is not None
                      else ((b.ended_at - b.launched_at).total_seconds() if b.ended_at else None)))
            for b in decided]  # fmt: skip
    return Table(("instance", "version", "target", "outcome", "seconds to outcome"), rows), []


def boot_phases(i: _Inputs) -> tuple[Table, list[Series]]:
    timed = [b for b in i.decided(i.boots) if b.timeline][:RECENT]
    rows = [(b.instance, b.version_ref, b.target,
             ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in (b.timeline or {}).items()))
            for b in timed]  # fmt: skip
    return Table(("instance", "version", "target", "phases"), rows), []


def time_to_ready_quantiles(i: _Inputs) -> tuple[Table, list[Series]]:
    ready = [b for b in i.fleets() if b.time_to_ready is not None]

    def at(percent: float) -> Callable[[list[BootRecord]], float | None]:
        return lambda inside: quantile(sorted(b.time_to_ready or 0.0 for b in inside), percent)

    series = [Series(f"p{p}", _bucketed(i, ready, lambda b: b.ended_at, at(p))) for p in (50, 95, 99)]
    whole = sorted(b.time_to_ready or 0.0 for b in i.decided(ready))
    rows = [(f"p{p}", _seconds(quantile(whole, p))) for p in (50, 95, 99)]
    return Table(("quantile", "over the window"), rows), series


def versions_by_state(i: _Inputs) -> tuple[Table, list[Series]]:
    rows = [(name, status, str(count)) for name, status, count in i.store.version_tally()]
    return Table(("image", "state", "versions"), rows), []


def boot_tests(i: _Inputs) -> tuple[Table, list[Series]]:
    rows = [(r.version, str(r.ready), str(r.failed), str(r.timeout)) for r in i.report.targets
            if r.target == BOOT_TEST_TARGET]  # fmt: skip
    return Table(("version", "ready", "failed", "timeout"), rows), []


# Each Grafana panel's title (lifecycle/dashboards.py) -> how the console computes it; tests/unit/test_boards.py
# checks that every panel of every board has one.
PANELS: dict[str, Callable[[_Inputs], tuple[Table, list[Series]]]] = {
    "Boot success (24 h)": boot_success,
    "p95 time to ready (24 h)": p95_time_to_ready,
    "Open vulnerabilities by version": open_vulnerabilities,
    "Rollouts in progress": rollouts_in_progress,
    "How rollouts ended (canary status)": rollouts_ended,
    "Recent failed boots (instance ids)": recent_failed_boots,
    "Replacements per minute": replacements_per_minute,
    "Recent deploys and rollbacks": recent_deploys,
    "Boot failures (share of launches, 5 m)": boot_failure_share,
    "Boot logs: the last console lines of recent failed boots": boot_logs,
    "Agent coverage (heartbeats)": agent_coverage,
    "Boot timeline: seconds to outcome, by instance": boot_timeline,
    "Boot phases by instance (the guest's systemd: kernel, userspace, slowest units)": boot_phases,
    "Time to ready (p50, p95, p99)": time_to_ready_quantiles,
    "Pipeline runs: versions by state": versions_by_state,
    "Boot tests by outcome": boot_tests,
}
