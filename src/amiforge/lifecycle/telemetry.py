"""Telemetry, the recording half: every boot of a version on a target, read from where it happened.

- A boot test records its boot itself (`record_boot_test`, target `boot-test`).
- Fleets are read by `collect`: each member's signals (launch, ready or failed, replaced, its latest heartbeat)
  and whether it still runs, in one reading (`Fleet.observe`), become observations the store moves forward
  (store/telemetry.py), so reading a fleet again, or from two processes, never counts a boot twice. Fleet
  creation, rollouts and `amiforge metrics` collect the targets they touch; `amiforge serve` collects on a timer.

Collecting is measurement, not an operator's action: it records boots, not events in the audit log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from amiforge.errors import AmiforgeError, NotFound
from amiforge.lifecycle.controller import canonical_target, fleet_of
from amiforge.model import BOOT_TEST_TARGET, BootObservation, BootOutcome, BootReport, BootSignal, Member
from amiforge.providers import provider_for
from amiforge.providers.guest import boot_timing, console_tail
from amiforge.providers.interface import FleetKeeper
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def boot_test_outcome(report: BootReport) -> BootOutcome:
    """A boot test's boot: ready when the marker came and every check passed, timeout when the marker never came."""
    if report.time_to_ready is None:
        return "timeout"
    return "ready" if report.passed else "failed"


def record_boot_test(store: Store, version_id: int, report: BootReport, run_id: str) -> None:
    """The boot of a boot test, as instance `report-ID` (its console is the report's: `amiforge logs`)."""
    ended = report.started_at + timedelta(seconds=report.duration)
    failed = [c.name for c in report.checks if not c.passed]
    lines, outcome = report.console.splitlines(), boot_test_outcome(report)
    observation = BootObservation(
        instance=f"report-{report.id}",
        version_id=version_id,
        launched_at=report.started_at,
        outcome=outcome,
        time_to_ready=report.time_to_ready,
        ended_at=ended,
        stopped_at=ended,
        detail=f"run {run_id}" + ("; failed checks: " + ", ".join(failed) if failed else ""),
        timeline=boot_timing(lines),
        console_tail=console_tail(lines) if outcome != "ready" else (),
    )
    store.record_boots(BOOT_TEST_TARGET, [observation])


@dataclass(frozen=True)
class TargetCollected:
    target: str
    members: int
    changed: int  # boots recorded or moved forward
    stopped: tuple[str, ...]  # boots found gone (their fleet or machine no longer exists)
    error: str | None = None  # why the target could not be read (its boots are left as they were)


def known_targets(store: Store, settings: Settings) -> list[str]:
    """Every target worth reading: this machine's local fleets, targets with boots still running, and targets
    that rollouts went to."""
    found: set[str] = set(store.running_targets()) - {BOOT_TEST_TARGET}
    keeper = provider_for("local", settings)
    if isinstance(keeper, FleetKeeper):
        found |= {f"local:{name}" for name in keeper.fleet_names()}
    found |= {canonical_target(r.target) for r in store.rollouts()}
    return sorted(found)


def collect(
    store: Store, settings: Settings, targets: Iterable[str] | None = None, *, now: datetime | None = None
) -> list[TargetCollected]:
    """Read each target's members and record their boots. A target that cannot be read is reported, not raised:
    the others are still read."""
    chosen = known_targets(store, settings) if targets is None else sorted({canonical_target(t) for t in targets})
    return [collect_target(store, settings, target, now=now) for target in chosen]


def collect_target(store: Store, settings: Settings, target: str, *, now: datetime | None = None) -> TargetCollected:
    target = canonical_target(target)
    read_at = datetime.now(UTC)  # before the fleet is read: what launched since is not judged gone
    try:
        fleet, _, _ = fleet_of(target, settings)
        members, signals = fleet.observe(EPOCH)
    except NotFound:  # the fleet is gone (destroyed): so is every machine of it
        stopped = store.stop_boots(target, keep=(), at=now or datetime.now(UTC))
        return TargetCollected(target, 0, 0, tuple(stopped))
    except AmiforgeError as e:
        logger.warning("telemetry: cannot read %s: %s", target, e.message)
        return TargetCollected(target, 0, 0, (), e.message)
    at = now or datetime.now(UTC)
    observations = observations_of(members, signals, store, at)
    changed = store.record_boots(target, observations)
    running = {m.id for m in members if m.state != "stopped"}
    stopped = store.stop_boots(target, keep=running, at=at, launched_before=read_at)
    return TargetCollected(target, len(members), changed, tuple(stopped))


def observations_of(
    members: Sequence[Member], signals: Sequence[BootSignal], store: Store, now: datetime
) -> list[BootObservation]:
    """One observation per machine launched from a version the registry knows (others are not amiforge's): the
    members listed now, and those only the signals still tell of (an instance already terminated, replaced)."""
    by_member: dict[str, list[BootSignal]] = {}
    for signal in signals:
        by_member.setdefault(signal.member, []).append(signal)
    listed = {m.id: m for m in members}
    refs = {m.version_ref for m in members if m.version_ref} | {s.version_ref for s in signals if s.version_ref}
    ids = {ref: vid for ref, (vid, _) in store.version_states(refs).items()}
    found: list[BootObservation] = []
    for member_id in [*listed, *(m for m in by_member if m not in listed)]:
        member = listed.get(member_id)
        own = sorted(by_member.get(member_id, []), key=lambda s: s.at)
        launch = next((s for s in own if s.kind == "launch"), None)
        ref = member.version_ref if member is not None else next((s.version_ref for s in own if s.version_ref), None)
        version_id = ids.get(ref or "")
        launched_at = member.launched_at if member is not None else launch.at if launch is not None else None
        if version_id is None or launched_at is None:
            continue
        decided = next((s for s in own if s.kind in ("ready", "failed")), None)
        replaced = next((s for s in own if s.kind == "replaced"), None)
        beats = [s.at for s in own if s.kind == "heartbeat"]
        timing = next((s.timeline for s in own if s.kind == "timing"), None)
        outcome: BootOutcome | None = None
        if decided is not None:
            outcome = "ready" if decided.kind == "ready" else "timeout" if decided.timed_out else "failed"
        gone = member is None or member.state == "stopped"
        found.append(
            BootObservation(
                instance=member_id,
                version_id=version_id,
                launched_at=launched_at,
                outcome=outcome,
                time_to_ready=decided.time_to_ready if decided is not None else None,
                ended_at=decided.at if decided is not None else None,
                stopped_at=replaced.at if replaced is not None else now if gone else None,
                replaced=replaced is not None,
                last_heartbeat_at=max(beats) if beats else None,
                detail=decided.detail if decided is not None else member.detail if member is not None else "",
                timeline=timing,
                console_tail=decided.console_tail if decided is not None else (),
            )
        )
    return found


def measure(store: Store, settings: Settings, target: str) -> None:
    """Collect `target` after an operation changed it (a fleet made, a rollout wave): measurement never fails the
    operation it follows; what went wrong is logged, and the next collection reads the target again."""
    try:
        collect_target(store, settings, target)
    except Exception as e:  # a provider bug or a database hiccup must not turn a finished rollout into a failure
        logger.warning("telemetry: could not record the boots on %s: %s: %s", target, type(e).__name__, e)
