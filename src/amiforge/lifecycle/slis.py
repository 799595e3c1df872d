"""Telemetry, the measuring half: the six SLIs of a version on a target over a window, and its SLOs (pure).

| id | SLI | from |
|---|---|---|
| M1 | boot success rate: ready boots / boots decided in the window (a timeout is a failure) | boots |
| M2 | time to ready p50/p95/p99 of the boots ready in the window (a late one is a timeout, out of M2) | boots |
| M3 | replacements per 1,000 instance-days: members replaced in the window / their time running in it | boots |
| M4 | agent coverage: running instances with a heartbeat within `heartbeat_within` / all running | boots |
| M5 | open vulnerabilities by severity (the latest scan), and fleet-weighted: × the instances running it | scans |
| M6 | rollback rate: rollouts rolled back / rollouts ended in the window, per image and target (†) | rollouts |

(†) Rolled back by a gate, or undone later by `amiforge rollback`; the rollbacks themselves are not counted.

An SLO is judged over its own window (30 days by default), as a share of good launches against the objective; the
error budget left is 1 - (bad share / allowed bad share): 1 untouched, 0 spent, below 0 overspent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from amiforge.model import BOOT_TEST_TARGET, BootRecord, Finding, FindingKind, Rollout, Severity
from amiforge.policy.severity import SeveritySource, rated
from amiforge.policy.slos import Slos

DAY = 86400.0


@dataclass(frozen=True)
class Quantiles:
    """Nearest-rank percentiles of times to ready, in seconds; None where no boot was ready."""

    p50: float | None
    p95: float | None
    p99: float | None


def quantile(sorted_values: Sequence[float], percent: float) -> float | None:
    """The nearest-rank percentile (the smallest value with at least `percent` % of the values at or below it)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class SloStatus:
    __computed__ = ("sli", "budget_left", "met")

    slo: str  # boot_success | time_to_ready
    objective: float  # percent
    window_seconds: float
    good: int
    total: int
    threshold_seconds: float | None = None  # time_to_ready: ready within this

    @property
    def sli(self) -> float | None:
        """The share of good launches in the SLO window (0..1); None without launches."""
        return self.good / self.total if self.total else None

    @property
    def budget_left(self) -> float | None:
        """The share of the error budget left: 1 untouched, 0 spent, below 0 overspent; None without launches."""
        if not self.total:
            return None
        allowed = 1 - self.objective / 100
        return 1 - ((self.total - self.good) / self.total) / allowed

    @property
    def met(self) -> bool | None:
        budget = self.budget_left
        return None if budget is None else budget >= 0


@dataclass(frozen=True)
class TargetSlis:
    """M1–M4 of one version on one target over the window, and its SLOs over theirs."""

    __computed__ = ("launches", "boot_success", "replacements_per_1000_days", "coverage")

    version: str
    target: str
    ready: int
    failed: int
    timeout: int
    time_to_ready: Quantiles  # M2
    replacements: int
    instance_days: float
    running: int
    heartbeating: int | None  # None: the target's provider reports no heartbeats (yet): coverage is not measured
    slos: tuple[SloStatus, ...]

    @property
    def launches(self) -> int:
        return self.ready + self.failed + self.timeout

    @property
    def boot_success(self) -> float | None:  # M1
        return self.ready / self.launches if self.launches else None

    @property
    def replacements_per_1000_days(self) -> float | None:  # M3
        return self.replacements / self.instance_days * 1000 if self.instance_days > 0 else None

    @property
    def coverage(self) -> float | None:  # M4
        return self.heartbeating / self.running if self.running and self.heartbeating is not None else None


@dataclass(frozen=True)
class VersionVulnerabilities:
    """M5: the latest scan's open CVE findings by severity, and weighted by the instances running the version."""

    __computed__ = ("fleet_weighted",)

    version: str
    scanned: bool
    by_severity: Mapping[str, int]
    running: int

    @property
    def fleet_weighted(self) -> dict[str, int]:
        return {severity: count * self.running for severity, count in self.by_severity.items()}


@dataclass(frozen=True)
class RolloutRate:
    """M6 for one image on one target: rollouts that ended in the window."""

    __computed__ = ("ended", "rollback_rate")

    image: str
    target: str
    succeeded: int
    rolled_back: int
    aborted: int

    @property
    def ended(self) -> int:
        return self.succeeded + self.rolled_back + self.aborted

    @property
    def rollback_rate(self) -> float | None:
        return self.rolled_back / self.ended if self.ended else None


# How a rollout that ended is counted (`failed`: a gate failed and the waves were rolled back, lifecycle/rollout.py).
ROLLOUT_OUTCOMES: Mapping[str, str] = {"succeeded": "succeeded", "failed": "rolled_back", "aborted": "aborted"}


def rollout_outcome(state: str, *, rollback: bool, undone: bool) -> str | None:
    """What M6 counts a rollout as, or None (not ended, or not a change): a rollout undone later by `amiforge
    rollback` was rolled back, whatever it ended as; the rollback itself is the remedy, not a change."""
    outcome = ROLLOUT_OUTCOMES.get(state)
    if outcome is None or rollback:
        return None
    return "rolled_back" if undone else outcome


def coverage_measured(target: str, *, any_heard: bool) -> bool:
    """Whether agent coverage (M4) means something for a version's running instances on `target`, given whether any
    of them was ever heard. A local fleet's consoles always say. On EC2 heartbeats come from the image's CloudWatch
    reporter (guest_files/cloudwatch): an AMI baked without it, or whose instances' role may not put metrics, never
    reports, so until one of its instances has been heard its coverage is not measured — not the same as 0 %."""
    if target.startswith("local:"):
        return True
    return target.startswith("aws:") and any_heard


def _overlap_days(boot: BootRecord, start: datetime, end: datetime) -> float:
    began = max(boot.launched_at, start)
    ended = min(boot.stopped_at or end, end)
    return max(0.0, (ended - began).total_seconds()) / DAY


def target_slis(
    boots: Iterable[BootRecord], *, start: datetime, now: datetime, slos_of: Callable[[str], Slos]
) -> list[TargetSlis]:
    """M1–M4 and the SLOs of every (version, target) among `boots`, which must hold every boot alive since the
    earlier of `start` and each image's SLO window (store.boots_in_window)."""
    groups: dict[tuple[str, str], list[BootRecord]] = {}
    for boot in boots:
        groups.setdefault((boot.version_ref, boot.target), []).append(boot)
    found = []
    for (version, target), members in sorted(groups.items()):
        slos = slos_of(version.partition("@")[0])
        decided = [b for b in members if b.outcome is not None and b.ended_at is not None and b.ended_at >= start]
        if not decided and not any(b.stopped_at is None or b.stopped_at >= start for b in members):
            continue  # nothing of it in the display window: its SLO window alone does not make it a row
        times = sorted(b.time_to_ready for b in decided if b.outcome == "ready" and b.time_to_ready is not None)
        fleet = target != BOOT_TEST_TARGET
        # Running: every instance still there, ready or not (a failed member that still runs has no heartbeat).
        running = [b for b in members if fleet and b.stopped_at is None]
        fresh = now - slos.heartbeat_within
        found.append(
            TargetSlis(
                version=version,
                target=target,
                ready=sum(b.outcome == "ready" for b in decided),
                failed=sum(b.outcome == "failed" for b in decided),
                timeout=sum(b.outcome == "timeout" for b in decided),
                time_to_ready=Quantiles(quantile(times, 50), quantile(times, 95), quantile(times, 99)),
                replacements=sum(
                    b.replaced and b.stopped_at is not None and start <= b.stopped_at <= now for b in members
                ),
                # Every member's time counts, ready or not: ten failing members replaced hourly is churn M3 shows.
                instance_days=sum(_overlap_days(b, start, now) for b in members if fleet),
                running=len(running),
                heartbeating=None
                if not coverage_measured(target, any_heard=any(b.last_heartbeat_at is not None for b in running))
                else sum(b.last_heartbeat_at is not None and b.last_heartbeat_at >= fresh for b in running),
                slos=slo_statuses(members, slos, now),
            )
        )
    return found


def slo_statuses(boots: Iterable[BootRecord], slos: Slos, now: datetime) -> tuple[SloStatus, ...]:
    since = now - slos.window
    decided = [b for b in boots if b.outcome is not None and b.ended_at is not None and since <= b.ended_at <= now]
    window = slos.window.total_seconds()
    under = slos.time_to_ready.under
    quick = sum(b.outcome == "ready" and b.time_to_ready is not None and b.time_to_ready <= under for b in decided)
    return (
        SloStatus("boot_success", slos.boot_success, window, sum(b.outcome == "ready" for b in decided), len(decided)),
        SloStatus("time_to_ready", slos.time_to_ready.percentile, window, quick, len(decided), under),
    )


def open_vulnerabilities(findings: Iterable[Finding], source: SeveritySource) -> dict[str, int]:
    """CVE findings by their severity under the policy's `severity_source`, every severity listed (0 when none)."""
    counts = dict.fromkeys((s.value for s in Severity), 0)
    for finding in findings:
        if finding.kind is FindingKind.CVE:
            counts[rated(finding, source)[0].value] += 1
    return counts


def rollout_rates(rollouts: Iterable[Rollout], *, start: datetime, now: datetime) -> list[RolloutRate]:
    rollouts = list(rollouts)
    undone = {r.undoes for r in rollouts if r.undoes is not None}
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for rollout in rollouts:
        outcome = rollout_outcome(rollout.state, rollback=rollout.undoes is not None, undone=rollout.id in undone)
        if outcome is None or rollout.finished_at is None or not start <= rollout.finished_at <= now:
            continue
        key = (rollout.version_ref.partition("@")[0], rollout.target)
        counts.setdefault(key, dict.fromkeys(ROLLOUT_OUTCOMES.values(), 0))[outcome] += 1
    return [RolloutRate(image, target, **c) for (image, target), c in sorted(counts.items())]


def slo_window_start(now: datetime, start: datetime, windows: Iterable[timedelta]) -> datetime:
    """The earliest time any SLI or SLO of the report reads from."""
    return min([start, *(now - w for w in windows)])
