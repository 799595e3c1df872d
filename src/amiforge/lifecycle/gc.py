"""gc: what failed or interrupted runs left behind — on this machine and in the cloud — found from the registry's
point of view.

A resource is only ever a candidate when it is tagged as amiforge's AND its run is one this registry knows to be over
(docs/architecture.md §8: "gc and retire touch only what is tagged and known to the registry"). The registry answers
from its event log: a bake run is over once it is built or failed; a boot test once its report is recorded; a distribute
run only when its latest attempt completed (a copy left by a failed attempt is adopted by the next one, so it is not an
orphan). An image any version holds as an artifact is never touched. Locally, the candidates are temporary directories
in the places runs make them (providers/local/leftovers.py). Plans by default; `apply` needs to be asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from amiforge.errors import AmiforgeError, ConfigError, GateFailed, GateFailure
from amiforge.lifecycle.boottest import provider_spec_of
from amiforge.lifecycle.runs import recorded_leftovers
from amiforge.model import Event, check_aws_region
from amiforge.providers import provider_for
from amiforge.providers.interface import LOCAL_GC_REGION as LOCAL
from amiforge.providers.interface import Collector, GcPlan, GcResult, RunState
from amiforge.recipe import AwsProvider as AwsSpec
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

# Event kinds that end a run of their kind, and those that start one.
_ENDS = {"bake.built", "bake.failed", "test.passed", "test.failed", "distribute.completed"}
_STARTS = {"bake.started", "distribute.started"}
# Every kind of event that names its run: what gc reads of the log.
_RUN_KINDS = _ENDS | _STARTS | {"distribute.failed", "orphaned", "publish", "scan.completed"}
# Far beyond a bake's own deadline (waiting.Wait: 2 h for the image): a bake still "running" after this was killed.
STALE_BAKE = timedelta(hours=12)


@dataclass(frozen=True)
class GcOutcome:
    plans: list[GcPlan]
    results: list[GcResult]
    applied: bool
    failures: list[tuple[str, AmiforgeError]] = field(default_factory=list)  # (region, why it could not be collected)


def run_states(events: Iterable[Event], *, now: datetime, stale_after: timedelta = STALE_BAKE) -> dict[str, RunState]:
    """Run id → state, from the audit log (in order: the last start or end of a run decides). A bake that started
    more than `stale_after` ago and never ended was killed (SIGKILL, a lost machine): it is over too."""
    states: dict[str, RunState] = {}
    bakes: dict[str, datetime] = {}
    for event in events:
        run = event.data.get("run")
        if not isinstance(run, str):
            continue
        if event.kind in _ENDS:
            states[run] = "finished"
        elif event.kind in _STARTS or event.kind == "distribute.failed":
            states[run] = "active"  # a failed distribute attempt is resumed by the next one
            if event.kind == "bake.started":
                bakes[run] = event.at
        else:
            states.setdefault(run, "active")
    for run, started in bakes.items():
        if states[run] == "active" and now - started > stale_after:
            states[run] = "finished"
    return states


def aws_view(store: Store) -> tuple[set[str], set[str]]:
    """(every aws image the registry holds, every region it knows of from artifacts and recipes)."""
    held = [artifact for _, artifact in store.provider_artifacts("aws")]
    images = {a.location for a in held}
    regions = {a.region for a in held}
    for version in store.list_versions():
        if version.provider == "aws":
            spec = provider_spec_of(version)
            if isinstance(spec, AwsSpec):
                regions.add(spec.region)
                regions.update(r.region for r in spec.distribution.regions)
    return images, regions


def _collector(kind: str, settings: Settings) -> Collector:
    provider = provider_for(kind, settings)
    if not isinstance(provider, Collector):  # pragma: no cover - both providers collect
        raise ConfigError(f"the {kind} provider cannot collect leftovers")
    return provider


def gc(
    *,
    store: Store,
    settings: Settings,
    regions: Sequence[str] = (),
    apply: bool = False,
    min_age: timedelta = timedelta(hours=1),
    max_deletions: int = 10,
    now: datetime | None = None,
) -> GcOutcome:
    """Plan (and with `apply`, carry out) the removal of what finished runs left behind: on this machine (`local`,
    or the local region's name, in `regions` — or no regions at all) and on AWS (every other region in `regions`,
    or else every region the registry knows of). Each region is planned and applied on its own: an AWS region that
    does not answer is reported in `failures` and never stops the others."""
    if max_deletions < 0:
        raise ConfigError(f"--max is {max_deletions}; it cannot be negative", fix="use e.g. 10 (the default)")
    asked = list(dict.fromkeys(regions))
    here = {LOCAL, settings.region}
    aws_regions = [check_aws_region(r, what="--region") for r in asked if r not in here]
    images: set[str] = set()
    failures: list[tuple[str, AmiforgeError]] = []
    if not asked or aws_regions:
        try:
            images, known = aws_view(store)
            aws_regions = aws_regions or sorted(known)
        except AmiforgeError as e:  # a damaged AWS version in the registry: AWS is not collected, this machine is
            failures.append(("aws", e))
            aws_regions = []
    moment = now or datetime.now(UTC)
    # Only the kinds that carry a run id (where runs stand, what they left behind): never the whole log.
    events = store.events(kinds=_RUN_KINDS)
    states = run_states(events, now=moment)
    recorded = [(_run_of(e), leftover) for e, leftover in recorded_leftovers(events)]
    targets: list[tuple[Collector, str, set[str]]] = []
    if not asked or here & set(asked):
        targets.append((_collector("local", settings), LOCAL, set()))
    if aws_regions:
        aws = _collector("aws", settings)  # boto3 is imported only when there is an AWS region to look at
        targets += [(aws, region, images) for region in aws_regions]
    plans: list[tuple[Collector, GcPlan]] = []
    for collector, region, registered in targets:
        try:
            plan = collector.plan_gc(
                region,
                registered=registered,
                run_state=lambda run: states.get(run, "unknown"),
                recorded=recorded,
                min_age=min_age,
                now=moment,
            )
        except AmiforgeError as e:  # e.g. an AWS region that does not answer: the other regions go on
            failures.append((region, e))
            continue
        plans.append((collector, plan))
        logger.info("gc plan %s: %d orphan(s)", region, len(plan.orphans))
    if not apply:
        return GcOutcome([p for _, p in plans], [], applied=False, failures=failures)
    total = sum(len(p.orphans) for _, p in plans)
    if total > max_deletions:
        # The cap is over the whole run, not per region; each collector checks its region again.
        raise GateFailed(
            "blast radius",
            [GateFailure(p.region, f"{len(p.orphans)} orphan(s)") for _, p in plans if p.orphans],
            fix=f"{total} deletions exceed the cap of {max_deletions}: review the plan, then pass --max {total}",
        )
    results = []
    for collector, plan in plans:
        if not plan.orphans:
            continue
        logger.info("gc %s: removing %s", plan.region, ", ".join(f"{o.kind} {o.id}" for o in plan.orphans))
        try:
            result = collector.apply_gc(plan, max_deletions=max_deletions)
        except AmiforgeError as e:
            logger.info("gc %s failed: %s", plan.region, e)
            failures.append((plan.region, e))
            continue
        for o in result.outcomes:
            logger.info("gc %s: %s %s %s", plan.region, o.orphan.kind, o.orphan.id, o.outcome)
        results.append(result)
        store.append_event(
            "gc.applied",
            actor=settings.actor,
            ref=None,
            data={
                "region": plan.region,
                "outcomes": [
                    {"kind": o.orphan.kind, "id": o.orphan.id, "run": o.orphan.run_id, "outcome": o.outcome}
                    for o in result.outcomes
                ],
            },
        )
    return GcOutcome([p for _, p in plans], results, applied=True, failures=failures)


def _run_of(event: Event) -> str | None:
    run = event.data.get("run")
    return run if isinstance(run, str) else None
