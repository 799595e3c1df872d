"""`amiforge metrics`: M1–M6 of versions on their targets over a window, with their SLOs (lifecycle/slis.py computes,
lifecycle/telemetry.py records)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from amiforge.errors import ConfigError, NotFound
from amiforge.lifecycle.controller import canonical_target
from amiforge.lifecycle.promote import policy_of
from amiforge.lifecycle.slis import (
    RolloutRate,
    TargetSlis,
    VersionVulnerabilities,
    open_vulnerabilities,
    rollout_rates,
    slo_window_start,
    target_slis,
)
from amiforge.lifecycle.telemetry import EPOCH, TargetCollected, collect, known_targets
from amiforge.model import BOOT_TEST_TARGET
from amiforge.settings import Settings
from amiforge.store.interface import Store


@dataclass(frozen=True)
class MetricsReport:
    """M1–M6 over `window_seconds` up to `now`, with each SLO over its own window."""

    now: datetime
    window_seconds: float
    targets: tuple[TargetSlis, ...]  # M1–M4 and SLOs, per version and target
    vulnerabilities: tuple[VersionVulnerabilities, ...]  # M5, per version
    rollouts: tuple[RolloutRate, ...]  # M6, per image and target
    collected: tuple[TargetCollected, ...] = ()


def metrics(
    *,
    store: Store,
    settings: Settings,
    ref: str | None = None,
    target: str | None = None,
    window: timedelta = timedelta(hours=24),
    now: datetime | None = None,
    read_fleets: bool = True,
) -> MetricsReport:
    """M1–M6 of every version with boots in the window (or of `ref`), on every target (or on `target`). The fleets
    are read first (`read_fleets`), so what is measured is what runs now."""
    if window <= timedelta(0):
        raise ConfigError("--window must be longer than 0", fix="e.g. --window 24h")
    chosen_target = None if target is None else canonical_target(target) if target != BOOT_TEST_TARGET else target
    if chosen_target is not None and chosen_target != BOOT_TEST_TARGET:
        _require_target(store, settings, chosen_target)
    collected: list[TargetCollected] = []
    if read_fleets:
        fleets = None if chosen_target is None else [] if chosen_target == BOOT_TEST_TARGET else [chosen_target]
        collected = collect(store, settings, fleets, now=now)
    now = now or datetime.now(UTC)
    start = now - window
    chosen = None if ref is None else store.get_version(ref)  # NAME@N, NAME:CHANNEL or a digest prefix
    ref = None if chosen is None else chosen.ref
    version_ids = None if chosen is None else [chosen.id]
    policy = policy_of(settings)
    slos = policy.slos
    windows = [slos.default.window, *(o.window for o in slos.images.values() if o.window is not None)]
    boots = store.boots_in_window(
        slo_window_start(now, start, windows),
        now,
        version_ids=version_ids,
        targets=None if chosen_target is None else [chosen_target],
    )
    rows = target_slis(boots, start=start, now=now, slos_of=slos.of)
    running: dict[str, int] = {}
    for row in rows:
        running[row.version] = running.get(row.version, 0) + row.running
    refs = sorted({r.version for r in rows} | ({ref} if ref else set()), key=_ref_order)
    vulns = []
    for version_ref in refs:
        version = store.get_version(version_ref)
        scan = store.latest_scan(version.id)
        findings = scan.findings if scan is not None else ()
        vulns.append(
            VersionVulnerabilities(
                version.ref, scan is not None, open_vulnerabilities(findings, policy.severity_source),
                running.get(version.ref, 0),
            )
        )  # fmt: skip
    image = None if ref is None else ref.partition("@")[0]
    rollouts = [
        r for r in store.rollouts(target=chosen_target) if image is None or r.version_ref.partition("@")[0] == image
    ]
    return MetricsReport(
        now, window.total_seconds(), tuple(rows), tuple(vulns), tuple(rollout_rates(rollouts, start=start, now=now)),
        tuple(collected),
    )  # fmt: skip


def _ref_order(ref: str) -> tuple[str, int]:
    name, _, number = ref.partition("@")
    return name, int(number) if number.isdigit() else 0


def _require_target(store: Store, settings: Settings, target: str) -> None:
    """A target amiforge knows of: a fleet or group it has read or rolled out to, or a local fleet that exists."""
    if target in known_targets(store, settings) or store.boots_in_window(EPOCH, datetime.now(UTC), targets=[target]):
        return
    raise NotFound(
        f"no boots recorded on {target}, and no fleet or rollout by that name",
        fix="`amiforge fleet list` shows the local fleets; `amiforge metrics` without --target shows every target",
    )
