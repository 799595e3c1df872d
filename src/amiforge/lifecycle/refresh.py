"""The instance-refresh mode of a rollout (Auto Scaling groups): AWS replaces the instances, amiforge judges them.

`strategy.mode: refresh` turns the waves into the refresh's CheckpointPercentages and the bake time into its
CheckpointDelay; AWS's own AutoRollback (and the strategy's alarms, which AWS watches too) stays on. At each poll the
controller judges the instances already on the new image with the same gates as a canary wave — readiness from their
consoles, p95 time-to-ready, burn rate — and rolls the refresh back (RollbackInstanceRefresh) the moment a gate fails.
A refresh that succeeded before a gate failed is rolled *forward* instead: a second refresh to the previous version,
with AutoRollback off (that refresh starts from the bad version, so rolling it back would restore the bad image); if
it stops part-way, the rollout fails saying the group may run both versions.
The refresh id is kept in the rollout's detail, so a resumed controller watches the same refresh; it never starts a
second one for a rollout whose refresh it has seen.

Pause is not something an instance refresh can do: a pause request is recorded and ignored (abort rolls back).

A refresh is judged stuck by its progress, not by how long it has run: a real group's batch takes its instance
warm-up, lifecycle hooks and load balancer draining on top of the boot, and a 10-instance group at 90 % min healthy
replaces one instance at a time. One batch time is the fleet's `refresh_batch_time()` (what the group's configuration
makes a replacement wait for) plus the readiness allowance (ready_within + console grace), by part in the rollout's
detail (`batch_time`, read before the refresh starts; a resumed controller reads it again: what the group says now
is what AWS waits for now). `ProgressWatch`: a refresh whose status, PercentageComplete and InstancesToUpdate
have not moved for STALL_BATCHES batch times (plus the checkpoint delay when the last move reached a checkpoint) is
stuck (an instance AWS waits on, a launch that never becomes healthy) and is rolled back like a failed gate.
`refresh_budget` stays as a generous backstop on the whole run (twice the batch time per batch, plus the checkpoint
delays). A rollback (or roll-forward) that stalls or outlives its own backstop raises a retryable InfraError and
leaves the rollout `rolling-back`, so `rollout resume` watches it again (the progress watch starts afresh, with a new
backstop); a resumed forward refresh likewise.
Members in service that the refresh left on the old image (protected from scale in: AWS is told to ignore them, as
it is Standby instances, which are not members in service) are listed in the succeeded rollout's detail and event as
`not_refreshed`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta

from amiforge.errors import ConfigError, GateFailed, GateFailure, InfraError
from amiforge.lifecycle.boottest import checks_of
from amiforge.lifecycle.controller import (
    POLL_SECONDS,
    Controls,
    RolloutOutcome,
    artifact_in,
    live,
    versions_by_location,
)
from amiforge.model import Artifact, ImageVersion, Rollout
from amiforge.providers.interface import (
    REFRESH_ROLLBACK,
    REFRESH_TERMINAL,
    Fleet,
    Member,
    PhaseUpdate,
    RefreshingFleet,
    RefreshStatus,
)
from amiforge.settings import Settings
from amiforge.store.interface import Store
from amiforge.strategy import Strategy, WaveDecision, checkpoints, decide

logger = logging.getLogger(__name__)

# What the backstop allows beyond the batches: AWS starting the refresh, the polls.
REFRESH_SLACK = 900.0
# A refresh whose progress has not moved for this many batch times is stuck. One batch time is already a generous
# allowance (its parts are added up though AWS runs some of them at once); three leave room for what it cannot hold —
# a launch AWS retries, an instance that fails its health check and is replaced, a hook handler's heartbeats — while a
# refresh that waits on something that never comes is caught within three batches, not within the whole group's time.
STALL_BATCHES = 3
READINESS = "readiness"  # the batch-time part the controller adds: ready_within + the fleet's console grace


def refresh_budget(strategy: Strategy, replacing: int, checkpoints: int, batch_seconds: float) -> float:
    """The backstop: seconds a refresh replacing `replacing` instances may run in all, however it progresses — each
    checkpoint's bake time, plus twice `batch_seconds` per batch AWS can replace while keeping min_healthy_percentage
    in service (at least one at a time, and a checkpoint can cut a batch short), plus REFRESH_SLACK. A rollback is the
    same without checkpoints. Whether it is stuck is `ProgressWatch`'s to say, long before this."""
    per_batch = max(1, replacing - math.ceil(replacing * strategy.min_healthy_percentage / 100))
    batches = math.ceil(replacing / per_batch) + checkpoints
    return checkpoints * strategy.bake_time + 2 * batches * batch_seconds + REFRESH_SLACK


@dataclass
class ProgressWatch:
    """When a refresh last moved — its status, PercentageComplete or InstancesToUpdate changed (either way: a rollback
    brings the percentage down) — and whether it has been still for too long: STALL_BATCHES × `batch_seconds`, plus
    `checkpoint_delay` when the move reached one of the checkpoints `marks` (below 100), where AWS waits on purpose.
    The first status seen starts the watch (a resumed controller), counting a checkpoint already reached."""

    batch_seconds: float
    checkpoint_delay: float = 0.0
    marks: tuple[int, ...] = ()
    allowed: float = field(default=0.0, init=False)  # how long the refresh may stay as it was last seen
    _seen: tuple[str, int, int] | None = field(default=None, init=False)
    _since: float = field(default=0.0, init=False)

    def stalled(self, status: RefreshStatus, now: float) -> bool:
        seen = (status.status, status.percentage_complete, status.instances_to_update)
        if seen != self._seen:
            before = self._seen[1] if self._seen is not None else -1
            reached = any(before < mark <= status.percentage_complete for mark in self.marks)
            self.allowed = STALL_BATCHES * self.batch_seconds + (self.checkpoint_delay if reached else 0.0)
            self._seen, self._since = seen, now
            return False
        return now - self._since > self.allowed

    def still_for(self, now: float) -> float:
        return now - self._since

    def why(self, status: RefreshStatus, now: float, parts: Mapping[str, float]) -> str:
        """Why the refresh is stuck, with the numbers the verdict used."""
        extra = self.allowed - STALL_BATCHES * self.batch_seconds
        at_checkpoint = f" plus the {extra:g}s checkpoint delay" if extra > 0 else ""
        return (
            f"the instance refresh made no progress for {self.still_for(now):.0f}s: still {status.status} at "
            f"{status.percentage_complete}% with {status.instances_to_update} instance(s) to update, where "
            f"{STALL_BATCHES} batch times of {self.batch_seconds:g}s ({_parts(parts)}){at_checkpoint} are allowed"
            f"{_reason(status.status_reason)}"
        )


def drive_refresh(
    rollout: Rollout,
    fleet: Fleet,
    version: ImageVersion,
    artifact: Artifact,
    strategy: Strategy,
    *,
    store: Store,
    settings: Settings,
    controls: Controls,
) -> RolloutOutcome:
    if not isinstance(fleet, RefreshingFleet):
        raise ConfigError("an instance refresh needs an Auto Scaling group", fix="use mode: canary for this target")
    refresh_id = str(rollout.detail.get("rollback_refresh_id") or rollout.detail.get("refresh_id") or "")
    grace = timedelta(seconds=checks_of(version).ready_within + fleet.console_grace)
    # Read before a refresh starts (a group whose configuration cannot be read fails here, not mid-refresh), and again
    # by a resumed controller: what the group says now is what AWS waits for now.
    parts = {READINESS: grace.total_seconds(), **fleet.refresh_batch_time()}
    if not refresh_id and rollout.state == "running":
        members = live(fleet.current())
        known = versions_by_location(store, artifact.provider)
        before = Counter(m.version_ref or known.get(m.location) for m in members)
        previous = next((ref for ref, _ in before.most_common() if ref and ref != version.ref), None)
        points = checkpoints(strategy, len(members))
        refresh_id = fleet.start_refresh(
            artifact,
            version.ref,
            checkpoints=points,
            checkpoint_delay=int(strategy.bake_time),
            alarms=strategy.gates.alarms,
            token=f"r{rollout.id}",
            min_healthy_percentage=strategy.min_healthy_percentage,
        )
        started = {
            **rollout.detail,
            "refresh_id": refresh_id,
            "checkpoints": points,
            "previous": previous,
            "batch_time": parts,
        }
        logger.info(
            "rollout #%d: instance refresh %s started (checkpoints %s%%, previous %s, batch time %s)",
            rollout.id,
            refresh_id,
            points,
            previous,
            _parts(parts),
        )
        rollout = store.update_rollout(rollout.id, expect="running", detail=started)
        store.append_event(
            "rollout.refresh",
            actor=settings.actor,
            ref=version.ref,
            data={"rollout": rollout.id, "refresh": refresh_id},
        )
    batch_seconds = sum(parts.values())
    replacing = max(1, sum(rollout.waves))
    marks = rollout.detail.get("checkpoints")
    stops = len(marks) if isinstance(marks, list) else 1
    below_100 = tuple(int(m) for m in marks if int(m) < 100) if isinstance(marks, list) else ()
    forward_budget = refresh_budget(strategy, replacing, stops, batch_seconds)
    back_budget = refresh_budget(strategy, replacing, 0, batch_seconds)
    going_back = rollout.state == "rolling-back"
    deadline = controls.clock() + (back_budget if going_back else forward_budget)
    watch = ProgressWatch(batch_seconds) if going_back else ProgressWatch(batch_seconds, strategy.bake_time, below_100)
    decisions: list[WaveDecision] = []
    while True:
        controls.fence()  # a controller that lost its lease stops here
        status = fleet.refresh_status(refresh_id)
        logger.debug(
            "rollout #%d: refresh %s %s %s%%", rollout.id, refresh_id, status.status, status.percentage_complete
        )
        controls.progress(PhaseUpdate("instance refresh", "start", f"{status.status} {status.percentage_complete}%"))
        backwards = rollout.state == "rolling-back" or status.status in REFRESH_ROLLBACK
        if backwards and not going_back:  # AWS began rolling back on its own (AutoRollback): the rollback's own watch
            going_back, deadline, watch = True, controls.clock() + back_budget, ProgressWatch(batch_seconds)
        stalled = watch.stalled(status, controls.clock())
        if backwards:
            if status.status not in REFRESH_TERMINAL:
                if stalled or controls.clock() > deadline:
                    stuck = (
                        watch.why(status, controls.clock(), parts)
                        if stalled
                        else f"it is still {status.status} ({status.percentage_complete}%) after {back_budget:.0f}s "
                        "of rolling back"
                    )
                    raise InfraError(
                        f"rollout #{rollout.id}: instance refresh {refresh_id} of {rollout.target} is not ending: "
                        f"{stuck}",
                        retryable=True,
                        fix=f"AWS goes on with it; amiforge rollout resume {rollout.id} watches it again (aws "
                        "autoscaling describe-instance-refreshes shows its status reason and scaling activities)",
                    )
                controls.sleep(POLL_SECONDS)
                continue
            back_to = rollout.detail.get("previous")
            if "rollback_refresh_id" not in rollout.detail:
                return _failed(rollout, status.status, status.status_reason, store, settings, decisions)
            if status.status == "Successful":
                ended = f"{status.status} (rolled forward to {back_to})"
                return _failed(rollout, ended, status.status_reason, store, settings, decisions)
            # The roll-forward stopped part-way (it has no AutoRollback): the group may run both versions.
            ended = f"{status.status} (the roll-forward to {back_to} did not finish: the group may run both)"
            fix = (
                f"amiforge rollout status {rollout.id} shows why it stopped; then amiforge rollback --target "
                f"{rollout.target} --to {back_to}"
            )
            return _failed(rollout, ended, status.status_reason, store, settings, decisions, fix=fix)
        if status.status in REFRESH_TERMINAL and status.status != "Successful":  # Failed, Cancelled: AWS stopped it
            return _failed(rollout, status.status, status.status_reason, store, settings, decisions)
        members = _judged(fleet, artifact, grace)
        decision = decide(strategy, members, alarms_firing=fleet.alarms_firing(strategy.gates.alarms))
        requested = store.get_rollout(rollout.id).requested
        overdue = status.status != "Successful" and (stalled or controls.clock() > deadline)
        if requested == "abort" or (decision.final and not decision.passed) or overdue:
            if requested == "abort":
                why = ["abort requested"]
            elif decision.final and not decision.passed:
                why = list(decision.reasons)
            elif stalled:
                why = [watch.why(status, controls.clock(), parts)]
            else:
                why = [
                    f"the instance refresh was still {status.status} at {status.percentage_complete}% after "
                    f"{forward_budget:.0f}s, the most a refresh of {replacing} instance(s) may take ({stops} "
                    f"checkpoint(s) of {strategy.bake_time:g}s bake time and twice {batch_seconds:g}s per "
                    f"replacement batch){_reason(status.status_reason)}"
                ]
            logger.info(
                "rollout #%d: rolling the refresh back (%s) at %s%%: %s",
                rollout.id,
                "; ".join(why),
                status.percentage_complete,
                decision.as_dict(),
            )
            decisions.append(decision)
            store.add_decision(rollout.id, rollout.wave, passed=False, action="rollback", numbers=decision.as_dict())
            failure = {**rollout.detail, "failed_wave": rollout.wave + 1, "reasons": why}
            if status.status == "Successful":
                # AWS finished before the gate could judge (a short checkpoint delay): roll forward to the old image.
                refresh_id = _roll_forward(fleet, artifact.provider, rollout, store, f"r{rollout.id}-back")
                logger.info(
                    "rollout #%d: the refresh had finished; rolling forward to the previous version (refresh %s)",
                    rollout.id,
                    refresh_id,
                )
                failure["rollback_refresh_id"] = refresh_id
            else:
                fleet.roll_back_refresh(refresh_id)
            rollout = store.update_rollout(
                rollout.id, expect="running", state="rolling-back", clear_request=True, detail=failure
            )
            going_back, deadline, watch = True, controls.clock() + back_budget, ProgressWatch(batch_seconds)
            continue
        if requested == "pause":
            store.append_event("rollout.pause_ignored", actor=settings.actor, ref=version.ref,
                               data={"rollout": rollout.id, "why": "an instance refresh cannot pause"})  # fmt: skip
            rollout = store.update_rollout(rollout.id, expect="running", clear_request=True)
            logger.info("rollout #%d: pause requested and ignored (an instance refresh cannot pause)", rollout.id)
        marks = rollout.detail.get("checkpoints")
        reached = sum(1 for p in (marks if isinstance(marks, list) else []) if int(p) <= status.percentage_complete)
        if status.status == "Successful":
            reached = len(rollout.waves)
        if decision.passed and reached > rollout.wave:
            decisions.append(decision)
            logger.info(
                "rollout #%d: checkpoint(s) %d..%d passed at %s%%: %s",
                rollout.id,
                rollout.wave + 1,
                reached,
                status.percentage_complete,
                decision.as_dict(),
            )
            for wave in range(rollout.wave, reached):
                store.add_decision(rollout.id, wave, passed=True, action="continue", numbers=decision.as_dict())
            rollout = store.update_rollout(rollout.id, expect="running", wave=reached)
        if status.status == "Successful" and decision.passed and rollout.wave >= len(rollout.waves):
            # Members the refresh was told to leave alone (protected from scale in) still run the old image: say which.
            kept = [m.id for m in live(fleet.current()) if m.location != artifact.location]
            logger.info("rollout #%d: instance refresh %s succeeded", rollout.id, refresh_id)
            if kept:
                logger.warning(
                    "rollout #%d: %d member(s) kept the old image (protected from scale in, which the refresh "
                    "leaves alone): %s",
                    rollout.id,
                    len(kept),
                    ", ".join(kept),
                )
            rollout = store.update_rollout(
                rollout.id, expect="running", state="succeeded", detail={**rollout.detail, "not_refreshed": kept}
            )
            store.append_event(
                "rollout.succeeded",
                actor=settings.actor,
                ref=version.ref,
                data={"rollout": rollout.id, "not_refreshed": kept},
            )
            return RolloutOutcome(rollout, decisions)
        controls.sleep(POLL_SECONDS)


def _reason(text: str) -> str:
    return f": {text}" if text else ""


def _parts(parts: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {seconds:g}s" for name, seconds in parts.items())


def _roll_forward(fleet: RefreshingFleet, provider: str, rollout: Rollout, store: Store, token: str) -> str:
    """A second refresh, back to the version the group ran before (AWS rolls back only an active refresh). Without
    AutoRollback: this refresh starts from the bad version, so AWS rolling *it* back would restore the bad image."""
    previous = rollout.detail.get("previous")
    if not isinstance(previous, str):
        raise GateFailed(
            "rollout",
            [GateFailure("rollback", "the refresh ended and the previous version is unknown")],
            fix=f"amiforge rollback --target {rollout.target} --to NAME@N",
        )
    old = store.get_version(previous)
    artifact = artifact_in(old, store, provider, fleet.region)
    return fleet.start_refresh(
        artifact, old.ref, checkpoints=[100], checkpoint_delay=0, alarms=(), token=token, auto_rollback=False
    )


def _judged(fleet: RefreshingFleet, artifact: Artifact, grace: timedelta) -> list[Member]:
    """The instances on the new image; one still without READY after ready_within + console grace has failed."""
    now = fleet.now()
    judged = []
    for m in live(fleet.current()):
        if m.location != artifact.location:
            continue
        if m.state == "launching" and now - m.launched_at > grace:
            m = replace(m, state="failed", detail=f"not ready {grace.total_seconds():.0f}s after launch")
        judged.append(m)
    return judged


def _failed(
    rollout: Rollout,
    status: str,
    reason: str,
    store: Store,
    settings: Settings,
    decisions: list[WaveDecision],
    *,
    fix: str = "",
) -> RolloutOutcome:
    expect = rollout.state
    logger.info("rollout #%d: instance refresh ended %s (%s)", rollout.id, status, reason or "no reason given")
    reasons = rollout.detail.get("reasons") or [f"the instance refresh ended {status}: {reason or 'no reason given'}"]
    rollout = store.update_rollout(
        rollout.id, expect=expect, state="failed", detail={**rollout.detail, "refresh_status": status}
    )
    store.append_event(
        "rollout.rolled_back",
        actor=settings.actor,
        ref=rollout.version_ref,
        data={"rollout": rollout.id, "refresh": rollout.detail.get("refresh_id"), "status": status},
    )
    raise GateFailed(
        "rollout",
        [GateFailure("instance refresh", str(r)) for r in (reasons if isinstance(reasons, list) else [reasons])],
        fix=fix or f"AWS rolled the group back ({status}); amiforge rollout status {rollout.id} shows the numbers",
    )
