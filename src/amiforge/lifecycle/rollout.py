"""rollout: replace a fleet's members with a version, wave by wave, behind SLO gates, with automatic rollback.

The controller is a state machine kept in the store (docs/architecture.md §8, "every long operation is resumable"):

    running ──(all waves pass)──▶ succeeded
       │  ▲ pause/resume
       ▼  │
     paused          running ──(a gate fails)──▶ rolling-back ──▶ failed     running/paused ──(abort)──▶ aborted

Each wave: pick the members to replace and **record them with their tokens before asking the fleet**; ask the fleet
to replace them (it launches, waits for readiness, stops the old ones; idempotent per token); record what came back;
watch the wave for the bake time, judging it with `strategy.decide` (a burn-rate breach stops it at once); record the
decision with its numbers; move on. A failed gate rolls back every member this rollout replaced to the version it ran
before (its own tokens, recorded first too) and ends `failed` (exit 4).

Killed at any point (even -9), `amiforge rollout resume ID` runs the same loop from the store: recorded tokens make
the fleet return what it already launched, so no member is replaced twice and none is lost.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from amiforge.errors import ConfigError, GateFailed, GateFailure, NotFound, StateError
from amiforge.lifecycle.boottest import checks_of, machine_release
from amiforge.lifecycle.controller import (
    POLL_SECONDS,
    Controls,
    RolloutOutcome,
    artifact_in,
    canonical_target,
    fleet_of,
    live,
    versions_by_location,
)
from amiforge.lifecycle.leases import controller_gone, ensure_undriven, lease
from amiforge.lifecycle.refresh import drive_refresh
from amiforge.lifecycle.release import releasable
from amiforge.lifecycle.telemetry import measure
from amiforge.model import (
    Artifact,
    ImageVersion,
    Rollout,
    RolloutReplacement,
    Status,
)
from amiforge.providers.interface import Fleet, Member, PhaseUpdate, RefreshingFleet, Release, Replacement
from amiforge.recipe import Checks
from amiforge.settings import Settings
from amiforge.store.interface import Store
from amiforge.strategy import Strategy, WaveDecision, decide, plan_waves

logger = logging.getLogger(__name__)

# --- start, resume, pause, abort --------------------------------------------------------------------------------


def start(
    target: str,
    ref: str,
    *,
    store: Store,
    settings: Settings,
    strategy: Strategy,
    controls: Controls = Controls(),
    undoes: int | None = None,
) -> RolloutOutcome:
    """Start rolling `ref` onto `target` (only a releasable version), then drive it to its end. A rollback names
    the rollout it `undoes`."""
    rollout = begin(target, ref, store=store, settings=settings, strategy=strategy, undoes=undoes)
    return drive(rollout.id, store=store, settings=settings, controls=controls)


def begin(
    target: str, ref: str, *, store: Store, settings: Settings, strategy: Strategy, undoes: int | None = None
) -> Rollout:
    """Check and record a new rollout of `ref` onto `target` (`start` without driving it: the web console's
    controller thread drives it)."""
    target = canonical_target(target)
    version = store.get_version(ref)
    releasable(version, store=store, settings=settings, action="rolled out")
    fleet, provider, region = fleet_of(target, settings)
    artifact_in(version, store, provider, region)  # refuse before anything is recorded
    if strategy.mode == "refresh" and not isinstance(fleet, RefreshingFleet):
        raise ConfigError(
            f"mode: refresh needs a fleet its cloud replaces itself (an Auto Scaling group); {target} is not one",
            fix="use mode: canary for this target",
        )
    members = live(fleet.current())
    if not members:
        raise StateError(f"{target} has no running member to replace", fix="amiforge fleet show, or scale it up")
    # A rollback puts a member back on what it ran: refuse to start where that cannot be known.
    known = versions_by_location(store, provider)
    unknown = [m for m in members if (m.version_ref or known.get(m.location)) is None]
    if unknown:
        raise ConfigError(
            f"{len(unknown)} member(s) of {target} run images the registry does not know, so a rollback would have "
            "nowhere to go: " + ", ".join(f"{m.id} ({m.location})" for m in unknown[:5]),
            fix="register those images first (amiforge import packer …), or replace the members by hand",
        )
    already = sum(1 for m in members if m.version_ref == version.ref)
    waves = plan_waves(strategy, len(members), already)
    logger.info(
        "rollout of %s onto %s: %d member(s), waves %s (%s)", version.ref, target, len(members), waves, strategy.mode
    )
    rollout = store.create_rollout(
        target, version.id, strategy=strategy.model_dump(mode="json"), waves=waves, actor=settings.actor,
        undoes=undoes,
    )  # fmt: skip
    store.append_event(
        "rollout.started",
        actor=settings.actor,
        ref=version.ref,
        data={"rollout": rollout.id, "target": target, "waves": waves, "members": len(members),
              **({"undoes": undoes} if undoes is not None else {})},
    )  # fmt: skip
    return rollout


def resume(rollout_id: int, *, store: Store, settings: Settings, controls: Controls = Controls()) -> RolloutOutcome:
    """Continue a paused rollout, or one whose controller died, from what the store recorded."""
    rollout = reopen(rollout_id, store=store, settings=settings)
    logger.info("rollout #%d: resuming from wave %d (%s)", rollout.id, rollout.wave + 1, rollout.state)
    return drive(rollout.id, store=store, settings=settings, controls=controls)


def reopen(rollout_id: int, *, store: Store, settings: Settings) -> Rollout:
    """Make a paused rollout running again (a running one whose controller died stays as it is); StateError if it
    is over, or if a live controller drives it. `resume` without driving it."""
    rollout = store.get_rollout(rollout_id)
    ensure_undriven(rollout)
    if rollout.state == "running" and rollout.requested == "pause":  # asked to resume before the pause took
        rollout = store.update_rollout(rollout.id, expect="running", clear_request=True)
    if rollout.state == "paused":
        rollout = store.update_rollout(rollout.id, expect="paused", state="running", clear_request=True)
        store.append_event(
            "rollout.resumed", actor=settings.actor, ref=rollout.version_ref, data={"rollout": rollout.id}
        )
    elif rollout.state not in ("running", "rolling-back"):
        raise StateError(f"rollout #{rollout.id} is {rollout.state}; there is nothing to resume", fix="start another")
    return rollout


def request(rollout_id: int, what: str, *, store: Store, settings: Settings) -> Rollout:
    """Ask a running rollout to pause or abort; the controller acts between steps. A paused rollout has no
    controller, nor has one whose controller is gone (`serve` stopped, a CLI killed): an abort of it takes effect
    here (a pause of it waits for whoever resumes it)."""
    rollout = store.request_rollout(rollout_id, what)
    # Aborting a canary rollout nobody drives stops nothing under way; a rollback or an instance refresh is another
    # matter (a refresh goes on in the cloud, a rollback half done leaves the fleet split): those wait for a resume,
    # whose controller honours the abort.
    unattended = rollout.state == "running" and _mode(rollout) == "canary" and controller_gone(rollout)
    if what == "abort" and (rollout.state == "paused" or unattended):
        rollout = store.update_rollout(rollout.id, expect=rollout.state, state="aborted", clear_request=True)
        store.append_event(
            "rollout.aborted", actor=settings.actor, ref=rollout.version_ref, data={"rollout": rollout.id}
        )
    return rollout


def _mode(rollout: Rollout) -> str:
    return str(rollout.strategy.get("mode", "canary"))


# --- the controller ------------------------------------------------------------------------------------------------


def drive(rollout_id: int, *, store: Store, settings: Settings, controls: Controls = Controls()) -> RolloutOutcome:
    target = store.get_rollout(rollout_id).target
    with lease(rollout_id, store) as held:  # one controller at a time, in any process on any host
        try:
            return _drive(rollout_id, store=store, settings=settings, controls=replace(controls, fence=held.check))
        finally:  # however it ended (rolled back, paused, interrupted): the boots it caused are recorded
            measure(store, settings, target)


def _drive(rollout_id: int, *, store: Store, settings: Settings, controls: Controls) -> RolloutOutcome:
    rollout = store.get_rollout(rollout_id)
    version = store.get_version(rollout.version_ref)
    fleet, provider, region = fleet_of(rollout.target, settings)
    strategy = Strategy.model_validate(rollout.strategy)
    decisions: list[WaveDecision] = []
    if rollout.state == "rolling-back" and strategy.mode == "canary":
        return _roll_back(rollout, fleet, provider, region, store=store, settings=settings, decisions=decisions)
    artifact = artifact_in(version, store, provider, region)
    if strategy.mode == "refresh":
        return drive_refresh(
            rollout, fleet, version, artifact, strategy, store=store, settings=settings, controls=controls
        )
    release, checks = machine_release(version, artifact), checks_of(version)  # before any wave is planned
    while rollout.wave < len(rollout.waves):
        controls.fence()
        stopped = _honour_request(rollout, store, settings)
        if stopped is not None:
            return RolloutOutcome(stopped, decisions)
        index = rollout.wave
        planned = _plan_wave(rollout, fleet, store, provider)
        pending = [r for r in planned if r.state == "planned"]
        logger.info(
            "rollout #%d wave %d/%d: %d member(s), %d to replace",
            rollout.id,
            index + 1,
            len(rollout.waves),
            len(planned),
            len(pending),
        )
        controls.progress(PhaseUpdate(f"wave {index + 1}/{len(rollout.waves)}", "start", f"{len(planned)} member(s)"))
        if pending:
            started = controls.clock()
            controls.fence()
            _replace(fleet, pending, artifact, release, checks, store)
            controls.progress(PhaseUpdate(f"wave {index + 1}: replaced", "done", "", controls.clock() - started))
        decision = _watch(rollout, [r.token for r in planned], fleet, strategy, store, controls)
        decisions.append(decision)
        action = "continue" if decision.passed else "rollback"
        logger.info("rollout #%d wave %d: %s %s", rollout.id, index + 1, action, _numbers(decision))
        store.add_decision(rollout.id, index, passed=decision.passed, action=action, numbers=decision.as_dict())
        measure(store, settings, rollout.target)
        store.append_event(
            "rollout.wave",
            actor=settings.actor,
            ref=version.ref,
            data={"rollout": rollout.id, "wave": index + 1, **decision.as_dict()},
        )
        if not decision.passed:
            controls.progress(
                PhaseUpdate(f"wave {index + 1}/{len(rollout.waves)}", "failed", "; ".join(decision.reasons))
            )
            rollout = store.update_rollout(
                rollout.id, expect="running", state="rolling-back", detail={"failed_wave": index + 1,
                                                                             "reasons": list(decision.reasons)},
            )  # fmt: skip
            return _roll_back(rollout, fleet, provider, region, store=store, settings=settings, decisions=decisions)
        controls.progress(PhaseUpdate(f"wave {index + 1}/{len(rollout.waves)}", "done", "gates passed"))
        rollout = store.update_rollout(rollout.id, expect="running", wave=index + 1)
    rollout = store.update_rollout(rollout.id, expect="running", state="succeeded")
    logger.info("rollout #%d of %s onto %s succeeded", rollout.id, version.ref, rollout.target)
    store.append_event("rollout.succeeded", actor=settings.actor, ref=version.ref, data={"rollout": rollout.id})
    return RolloutOutcome(rollout, decisions)


def _replace(
    fleet: Fleet,
    pending: Sequence[RolloutReplacement],
    artifact: Artifact,
    release: Release,
    checks: Checks,
    store: Store,
) -> None:
    """Ask the fleet for the recorded replacements (by their tokens) on `artifact` as `release`, and record what
    each became."""
    new = fleet.replace([Replacement(r.old_member, r.token) for r in pending], artifact, release, checks)
    for replacement, member in zip(pending, new, strict=True):
        store.finish_replacement(
            replacement.token, new_member=member.id, state="done" if member.state == "ready" else "failed"
        )


def _honour_request(rollout: Rollout, store: Store, settings: Settings) -> Rollout | None:
    current = store.get_rollout(rollout.id)
    if current.requested is None:
        return None
    state = "paused" if current.requested == "pause" else "aborted"
    stopped = store.update_rollout(rollout.id, expect="running", state=state, clear_request=True)
    logger.info("rollout #%d %s as requested, at wave %d", rollout.id, state, rollout.wave + 1)
    store.append_event(f"rollout.{state}", actor=settings.actor, ref=rollout.version_ref, data={"rollout": rollout.id})
    return stopped


def _plan_wave(rollout: Rollout, fleet: Fleet, store: Store, provider: str) -> list[RolloutReplacement]:
    """The wave's replacements: those recorded already (a resumed wave), else members chosen now and recorded."""
    index = rollout.wave
    recorded = [r for r in store.replacements(rollout.id) if r.kind == "forward"]
    this_wave = [r for r in recorded if r.wave == index]
    if this_wave:
        return this_wave
    touched = {r.old_member for r in recorded} | {r.new_member for r in recorded if r.new_member}
    candidates = sorted(
        (m for m in live(fleet.current()) if m.version_ref != rollout.version_ref and m.id not in touched),
        key=lambda m: m.id,
    )
    chosen = candidates[: rollout.waves[index]]
    known = versions_by_location(store, provider) if any(m.version_ref is None for m in chosen) else {}
    items = [(m.id, m.version_ref or known.get(m.location), f"r{rollout.id}-w{index}-{m.id}") for m in chosen]
    return store.plan_replacements(rollout.id, index, "forward", items)


def _watch(
    rollout: Rollout,
    tokens: Sequence[str],
    fleet: Fleet,
    strategy: Strategy,
    store: Store,
    controls: Controls,
) -> WaveDecision:
    """Judge the wave's new members until the bake time is over; a final failing verdict ends the watch early."""
    deadline = controls.clock() + strategy.bake_time
    while True:
        firing = fleet.alarms_firing(strategy.gates.alarms)
        decision = decide(strategy, _wave_members(rollout, tokens, fleet, store), alarms_firing=firing)
        logger.debug("rollout #%d wave %d watch: %s", rollout.id, rollout.wave + 1, _numbers(decision))
        remaining = deadline - controls.clock()
        if (decision.final and not decision.passed) or remaining <= 0:
            return decision
        controls.sleep(min(POLL_SECONDS, remaining))
        controls.fence()


def _wave_members(rollout: Rollout, tokens: Sequence[str], fleet: Fleet, store: Store) -> list[Member]:
    """The wave's new members as the fleet reports them now; one that vanished counts as failed."""
    by_id = {m.id: m for m in fleet.current()}
    wanted = {r.token: r for r in store.replacements(rollout.id)}
    members: list[Member] = []
    for token in tokens:
        r = wanted[token]
        member = by_id.get(r.new_member or "")
        if member is None:
            member = Member(
                r.new_member or r.token, rollout.version_ref, "", "failed", r.at, detail="no longer in the fleet"
            )
        members.append(member)
    return members


def _roll_back(
    rollout: Rollout,
    fleet: Fleet,
    provider: str,
    region: str,
    *,
    store: Store,
    settings: Settings,
    decisions: list[WaveDecision],
) -> RolloutOutcome:
    """Put every member this rollout replaced back on the version it ran before, then end `failed` (exit 4)."""
    current = {m.id: m for m in live(fleet.current())}
    forward = [r for r in store.replacements(rollout.id) if r.kind == "forward" and r.new_member]
    # What still runs the new version in place of a member: back to that member's version (if we know it).
    to_undo = [
        r
        for r in forward
        if r.new_member in current
        and r.old_member not in current
        and r.old_version
        and r.old_version != rollout.version_ref
    ]
    by_version: dict[str, list[RolloutReplacement]] = {}
    logger.info("rollout #%d rolling back: %d member(s) to put back", rollout.id, len(to_undo))
    for r in to_undo:
        by_version.setdefault(str(r.old_version), []).append(r)
    for old_ref, items in by_version.items():
        old = store.get_version(old_ref)
        old_checks = checks_of(old)  # a damaged recipe fails before anything is planned
        planned = store.plan_replacements(
            rollout.id,
            rollout.wave,
            "rollback",
            [(str(r.new_member), rollout.version_ref, f"r{rollout.id}-rb-{r.new_member}") for r in items],
        )
        pending = [p for p in planned if p.state == "planned"]
        if pending:
            old_artifact = artifact_in(old, store, provider, region)
            _replace(fleet, pending, old_artifact, machine_release(old, old_artifact), old_checks, store)
        logger.info("rollout #%d rollback: %d member(s) back to %s", rollout.id, len(items), old.ref)
    rolled = [r for r in store.replacements(rollout.id) if r.kind == "rollback"]
    failed_back = [r for r in rolled if r.state != "done"]
    logger.info(
        "rollout #%d rolled back %d of %d member(s); failed: %s",
        rollout.id,
        len(rolled) - len(failed_back),
        len(rolled),
        [r.old_member for r in failed_back] or "none",
    )
    rollout = store.update_rollout(
        rollout.id,
        expect="rolling-back",
        state="failed",
        detail={**rollout.detail, "rolled_back": len(rolled), "rollback_failed": [r.old_member for r in failed_back]},
    )
    store.append_event(
        "rollout.rolled_back",
        actor=settings.actor,
        ref=rollout.version_ref,
        data={
            "rollout": rollout.id,
            "members": [r.old_member for r in rolled],
            "failed": [r.old_member for r in failed_back],
        },
    )
    reasons = rollout.detail.get("reasons")
    wave = rollout.detail.get("failed_wave", "?")
    raise GateFailed(
        "rollout",
        [GateFailure(f"wave {wave}", str(reason)) for reason in (reasons if isinstance(reasons, list) else [])]
        or [GateFailure("rollout", "a gate failed")],
        fix=f"rolled back {len(rolled) - len(failed_back)} of {len(rolled)} member(s); "
        f"amiforge rollout status {rollout.id} shows the numbers"
        + (f"; these did not come back: {', '.join(r.old_member for r in failed_back)}" if failed_back else ""),
    )


# --- rollback and incidents ----------------------------------------------------------------------------------------


def last_change(target: str, store: Store) -> tuple[Rollout, str] | None:
    """The target's last rollout that replaced members, and the version it replaced (what most of them ran)."""
    for rollout in reversed(store.rollouts(target=canonical_target(target))):
        olds = Counter(r.old_version for r in store.replacements(rollout.id) if r.kind == "forward" and r.old_version)
        if olds:
            return rollout, olds.most_common(1)[0][0]
    return None


def rollback(
    target: str,
    *,
    store: Store,
    settings: Settings,
    to: str | None = None,
    controls: Controls = Controls(),
) -> RolloutOutcome:
    """Back to the previous version (or `to`): a one-wave rollout of it, through the same gates. It records the
    rollout it undoes, which the rollback rate (M6) then counts as rolled back."""
    rollout = begin_rollback(target, store=store, settings=settings, to=to)
    return drive(rollout.id, store=store, settings=settings, controls=controls)


def begin_rollback(target: str, *, store: Store, settings: Settings, to: str | None = None) -> Rollout:
    """Check and record the rollback rollout (`rollback` without driving it)."""
    last = last_change(target, store)
    if to is not None:
        ref = to
    elif last is not None:
        ref = last[1]
    else:
        raise NotFound(f"no earlier rollout on {canonical_target(target)} says what it ran before", fix="pass --to REF")
    strategy = Strategy(waves=["100%"], bake_time=0.0)
    # It undoes the last change when it goes back to what that change replaced; `--to` another version (a fix rolled
    # forward) is a change of its own.
    undoes = last[0].id if last is not None and store.get_version(ref).ref == last[1] else None
    return begin(target, ref, store=store, settings=settings, strategy=strategy, undoes=undoes)


@dataclass(frozen=True)
class Incident:
    version: ImageVersion
    rollouts: list[Rollout]
    members: list[RolloutReplacement]
    timeline: list[tuple[datetime, str, str]]
    rollback_commands: list[str]


def incident(ref: str, *, store: Store, hours: float = 24.0, now: datetime | None = None) -> Incident:
    """What ran `ref` in the last `hours`: its rollouts, the members they launched, the timeline, how to undo."""
    version = store.get_version(ref)
    since = (now or datetime.now(UTC)) - timedelta(hours=hours)
    rollouts = [r for r in store.rollouts(version_id=version.id) if (r.finished_at or r.updated_at) >= since]
    members = [r for rollout in rollouts for r in store.replacements(rollout.id) if r.new_member]
    timeline = [(e.at, e.kind, _describe(e.data)) for e in store.events(version.ref) if e.at >= since]
    commands = sorted({f"amiforge rollback --target {r.target}" for r in rollouts if r.state == "succeeded"})
    if version.status != Status.REVOKED:
        commands.append(f'amiforge revoke {version.ref} --reason "…"')
    return Incident(version, rollouts, members, timeline, commands)


def _describe(data: object) -> str:
    if not isinstance(data, dict):
        return ""
    keys = ("rollout", "wave", "target", "reasons", "channel", "error", "members")
    return ", ".join(f"{k}={data[k]}" for k in keys if k in data and data[k] not in (None, [], ""))


def _numbers(d: WaveDecision) -> str:
    """A wave decision's numbers in one line, for the log."""
    return (
        f"(members {d.members}, ready {d.ready}, failed {d.failed}, success rate {d.success_rate}, "
        f"p95 time to ready {d.time_to_ready_p95}, burn rate {d.burn_rate:.2f}, alarms {list(d.alarms)}, "
        f"reasons {list(d.reasons)})"
    )
