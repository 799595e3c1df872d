"""retire: plan, and on request apply, the way out of versions no rule keeps and nothing uses (docs/architecture.md
§15). `plan()` reads the registry, asks every provider what uses its images in each region (every source, every
page) and runs the planner (lifecycle/retire_plan.py). `apply()` takes the plan's steps region by region: deprecate;
then, before anything is removed, it reads every reference of the region again and removes only what the fresh plan
still removes; deregister; delete the snapshots. Each step is a compare-and-set on the artifact's stage with its event
(`retire.deprecated`, `retire.deregistered`, `retire.purged`), taken after the provider's step, and every provider
step is idempotent: a run killed at any point is resumed by the next, which finds the work done and records it.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from amiforge.errors import AmiforgeError, NotFound, StateError
from amiforge.lifecycle.retire_plan import (
    CHANGES,
    EVERY_REGION,
    Entry,
    Holding,
    RetirePlan,
    Step,
    VersionPlan,
    channel_references,
    finished,
    plan_retirement,
)
from amiforge.lifecycle.runs import new_run_id
from amiforge.model import ROLLOUT_LIVE, Artifact, ImageVersion, Status, check_transition
from amiforge.policy.retention import Retention
from amiforge.providers import capable_of, provider_for
from amiforge.providers.interface import CriteriaMaker, ImageState, Reference, RegionSurvey, Retirer, SourceFailure
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

# A bake or a distribute that started this long ago and never ended was killed: its version is no longer in use.
STALE_RUN = timedelta(hours=12)
# The cap's own upper bound (policy/retention.py): no plan defers anything under it.
MAX_DELETIONS_CAP = 100_000
# Removals between two readings of every reference of a region (a reading costs a few listings and a call per
# image it asks about; a batch of removals, at EC2's 5 mutating calls a second, about ten seconds).
REREAD_EVERY = 50
# Regions surveyed and applied at once (AWS regions answer independently; the local region is one).
PARALLEL_REGIONS = 8

RetirerFor = Callable[[str], Retirer | None]


@dataclass(frozen=True)
class StepOutcome:
    step: Step
    # done (this run did it), gone (found done), kept (the fresh plan keeps it), waiting (the cloud holds it a while
    # longer: a later run takes it), failed
    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class RetireOutcome:
    plan: RetirePlan
    applied: bool
    outcomes: tuple[StepOutcome, ...] = ()
    retired: tuple[str, ...] = ()  # versions the registry now holds as retired
    run_id: str | None = None

    @property
    def failed(self) -> list[StepOutcome]:
        return [o for o in self.outcomes if o.outcome == "failed"]


def current_plan(store: Store, settings: Settings) -> RetirePlan:
    """The plan under the settings' policy (the console's retirement page, `GET /api/v1/retirement`)."""
    from amiforge.lifecycle.promote import policy_of

    return plan(store, policy_of(settings).retention, retirer_for(settings))


def retirer_for(settings: Settings) -> RetirerFor:
    """The provider of each name, if it can retire its images (None: it cannot say what uses them); each made once,
    so a run's steps use what its survey listed."""
    return capable_of(settings, Retirer)


# --- reading the world -----------------------------------------------------------------------------------------


def inventory(store: Store) -> list[Entry]:
    """Every version with its artifacts and where each stands on its way out: three reads, whatever the size."""
    versions = store.list_versions(summary=True)
    held: dict[int, list[Artifact]] = defaultdict(list)
    for kind in sorted({v.provider for v in versions}):
        for _, artifact in store.provider_artifacts(kind):
            if artifact.version_id is not None:
                held[artifact.version_id].append(artifact)
    retirements = store.retirements()
    return [Entry(v, tuple(Holding(a, retirements.get(a.id or 0)) for a in held.get(v.id, ()))) for v in versions]


def registry_references(store: Store, *, now: datetime) -> list[Reference]:
    """What the registry itself says is in use, in every region: channels (current and previous), live rollouts (the
    version and what each replaced member ran), each target's last rollout's rollback image, and versions a bake or
    a distribute is working on."""
    found = channel_references(store.channels())
    latest: dict[str, int] = {}
    for rollout in store.rollouts():
        latest[rollout.target] = max(latest.get(rollout.target, 0), rollout.id)
    for rollout in store.rollouts():
        live = rollout.state in ROLLOUT_LIVE
        if not live and latest[rollout.target] != rollout.id:
            continue
        name = f"#{rollout.id} on {rollout.target} ({rollout.state})"
        if live:
            found.append(Reference("rollout", name, EVERY_REGION, version=rollout.version_ref))
        for old in {r.old_version for r in store.replacements(rollout.id) if r.old_version}:
            found.append(Reference("rollout", f"{name}: the rollback image", EVERY_REGION, version=old))
    found += _working_runs(store, now=now)
    return found


def _working_runs(store: Store, *, now: datetime) -> list[Reference]:
    """Versions a bake or a distribute started on and has not ended (unless it started too long ago to be alive)."""
    open_runs: dict[tuple[str, str], tuple[str, datetime]] = {}
    kinds = {"bake.started", "bake.built", "bake.failed", "distribute.started", "distribute.completed",
             "distribute.failed"}  # fmt: skip
    for event in store.events(kinds=kinds):
        run, ref = event.data.get("run"), event.ref
        if not isinstance(run, str) or ref is None:
            continue
        verb, _, what = event.kind.partition(".")
        if what == "started":
            open_runs[(verb, run)] = (ref, event.at)
        else:
            open_runs.pop((verb, run), None)
    found = []
    for (verb, run), (ref, at) in sorted(open_runs.items()):
        if now - at >= STALE_RUN:
            continue
        name = f"run {run} (started {at:%Y-%m-%d %H:%M} UTC)"
        found.append(Reference(verb, name, EVERY_REGION, version=ref))
        if verb == "bake":
            # A local bake reuses the disk an earlier version of its image made from the same layers, and records
            # it only once done: every version of that image is held while it runs.
            image = ref.partition("@")[0]
            found += [Reference(verb, f"{name}, of {image}", EVERY_REGION, version=v.ref)
                      for v in store.list_versions(image, summary=True) if v.ref != ref]  # fmt: skip
    return found


def survey(entries: Sequence[Entry], retirer: RetirerFor, *, only: Collection[int]) -> list[RegionSurvey]:
    """Ask each provider about every region holding an artifact of `entries` not purged yet: what uses images
    there (every source), and the state of the artifacts of `only` (the ones a step could change: the per-image
    sources — shares, image references — cost a call per image); regions at once."""
    by_region: dict[tuple[str, str], list[Artifact]] = defaultdict(list)
    for entry in entries:
        for h in entry.holdings:
            a = h.artifact
            if h.retirement is None or h.retirement.stage != "purged":
                listed = by_region[(a.provider, a.region)]
                if a.id in only:
                    listed.append(a)

    def one(key: tuple[str, str]) -> RegionSurvey:
        kind, region = key
        try:
            found = retirer(kind)
        except AmiforgeError as e:
            found, why = None, e.message
        else:
            why = f"the {kind} provider cannot say what uses its images"
        if found is None:
            return RegionSurvey(region, (), (SourceFailure(region, f"{kind} provider", why),), {})
        return found.survey(region, by_region[key])

    keys = sorted(by_region)
    if len(keys) <= 1:
        return [one(k) for k in keys]
    with ThreadPoolExecutor(max_workers=min(PARALLEL_REGIONS, len(keys)), thread_name_prefix="survey") as pool:
        return list(pool.map(one, keys))


def _images(surveys: Sequence[RegionSurvey]) -> dict[tuple[str, str], ImageState]:
    return {(s.region, location): state for s in surveys for location, state in s.images.items()}


# --- the plan ----------------------------------------------------------------------------------------------


def plan(
    store: Store,
    retention: Retention,
    retirer: RetirerFor,
    *,
    now: datetime | None = None,
    regions: Iterable[str] = (),
    images: Iterable[str] = (),
) -> RetirePlan:
    """The plan: nothing is changed. `regions`, `images`: only those (default: all)."""
    moment = now or datetime.now(UTC)
    names = set(images)
    everything = inventory(store)
    unknown = names - {e.version.name for e in everything}
    if unknown:
        raise NotFound(f"no image named {', '.join(sorted(unknown))}", fix="`amiforge images list` shows the images")
    entries = [e for e in everything if not names or e.version.name in names]
    wanted = set(regions)
    held = {h.artifact.region for e in entries for h in e.holdings}
    if wanted - held:
        raise NotFound(
            f"no artifact in region {', '.join(sorted(wanted - held))}",
            fix=f"the registry's artifacts are in: {', '.join(sorted(held)) or 'no region yet'}",
        )
    if wanted:
        entries = [replace(e, holdings=tuple(h for h in e.holdings if h.artifact.region in wanted)) for e in entries]
    registry = registry_references(store, now=moment)
    surveys = survey(entries, retirer, only=candidates(entries, registry, retention, moment))
    return _planned(entries, surveys, registry, retention, moment)


def candidates(
    entries: Sequence[Entry], registry: Sequence[Reference], retention: Retention, now: datetime
) -> set[int]:
    """The artifacts a step could change, judged by the registry alone: what the providers' references can only
    keep from changing. The per-image sources are read for these."""
    # Without the cap: an image the cap defers now may be planned out once the sources keep others.
    uncapped = retention.model_copy(update={"max_deletions": MAX_DELETIONS_CAP})
    preliminary, _ = plan_retirement(entries, references=registry, retention=uncapped, now=now)
    return {s.artifact_id for v in preliminary for s in v.steps if s.action in CHANGES}


def _planned(
    entries: Sequence[Entry],
    surveys: Sequence[RegionSurvey],
    registry: Sequence[Reference],
    retention: Retention,
    now: datetime,
) -> RetirePlan:
    references = list(registry) + [r for s in surveys for r in s.references]
    failures = tuple(f for s in surveys for f in s.failures)
    versions, notes = plan_retirement(
        entries, references=references, failures=failures, images=_images(surveys), retention=retention, now=now
    )
    calls = {s.region: dict(s.calls) for s in surveys if s.calls}
    return RetirePlan(
        now, versions, failures, tuple(notes) + tuple(n for s in surveys for n in s.notes), calls,
        retention.max_deletions,
    )  # fmt: skip


# --- apply -------------------------------------------------------------------------------------------------


def apply(
    store: Store,
    retention: Retention,
    retirer: RetirerFor,
    *,
    actor: str,
    now: datetime | None = None,
    regions: Iterable[str] = (),
    images: Iterable[str] = (),
    progress: Callable[[StepOutcome], None] = lambda _o: None,
) -> RetireOutcome:
    """Plan, then take the plan's steps (see the module's docstring). A step that fails is reported and the others
    go on; what failed is planned again by the next run."""
    moment = now or datetime.now(UTC)
    first = plan(store, retention, retirer, now=moment, regions=regions, images=images)
    run_id = new_run_id()
    by_key: dict[tuple[str, str], list[Step]] = defaultdict(list)
    for step in first.steps("deprecate", "deregister", "delete-snapshots"):
        by_key[(step.provider, step.region)].append(step)
    refs = {v.version: v for v in first.versions}

    def region(key: tuple[str, str]) -> list[StepOutcome]:
        kind, name = key
        found = retirer(kind)
        if found is None:  # pragma: no cover - such a region is blocked: it has no steps to take
            raise StateError(f"the {kind} provider cannot retire images")
        return _apply_region(store, retention, found, kind, name, by_key[key], actor=actor, run_id=run_id,
                             now=moment, progress=progress)  # fmt: skip

    keys = sorted(by_key)
    outcomes: list[StepOutcome] = []
    with ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_REGIONS, len(keys))), thread_name_prefix="retire") as pool:
        for done in pool.map(region, keys):
            outcomes += done
    retired = _retire_versions(store, refs, outcomes, retention, actor=actor, run_id=run_id)
    return RetireOutcome(first, True, tuple(outcomes), tuple(retired), run_id)


def _apply_region(
    store: Store,
    retention: Retention,
    retirer: Retirer,
    kind: str,
    region: str,
    steps: Sequence[Step],
    *,
    actor: str,
    run_id: str,
    now: datetime,
    progress: Callable[[StepOutcome], None],
) -> list[StepOutcome]:
    outcomes: list[StepOutcome] = []

    def record(outcome: StepOutcome) -> None:
        outcomes.append(outcome)
        progress(outcome)

    for step in (s for s in steps if s.action == "deprecate"):
        record(_guarded(step, functools.partial(_deprecate, store, retirer, step, actor=actor, run_id=run_id, now=now)))
    removals = [s for s in steps if s.action in ("deregister", "delete-snapshots")]
    # Re-read every reference of the region (and the registry's) right before anything is removed, and again every
    # REREAD_EVERY removals: a fleet launched or a template written since keeps its image.
    for start in range(0, len(removals), REREAD_EVERY):
        batch = removals[start : start + REREAD_EVERY]
        entries = [
            replace(e, holdings=tuple(h for h in e.holdings if h.artifact.region == region and
                                      h.artifact.provider == kind))
            for e in inventory(store)
            if any(h.artifact.provider == kind and h.artifact.region == region for h in e.holdings)
        ]  # fmt: skip
        going = {s.artifact_id for s in batch}
        fresh_survey = retirer.survey(
            region, [h.artifact for e in entries for h in e.holdings if h.artifact.id in going]
        )
        fresh = _planned(entries, [fresh_survey], registry_references(store, now=now), retention, now)
        still = {s.artifact_id: s for s in fresh.steps("deregister", "delete-snapshots")}
        for step in batch:
            again = still.get(step.artifact_id)
            if again is None or again.action != step.action:
                now_step = next((s for s in fresh.steps() if s.artifact_id == step.artifact_id), None)
                why = now_step.why if now_step is not None else "no longer in the registry"
                record(StepOutcome(step, "kept", f"read again before removing: {why}"))
                continue
            record(_guarded(again, functools.partial(_remove, store, retirer, again, actor=actor, run_id=run_id)))
    return outcomes


def _guarded(step: Step, act: Callable[[], StepOutcome]) -> StepOutcome:
    try:
        outcome = act()
    except AmiforgeError as e:
        logger.info("retire: %s %s %s failed: %s", step.action, step.version, step.location, e)
        return StepOutcome(step, "failed", e.message)
    logger.info("retire: %s %s %s: %s", step.action, step.version, step.location, outcome.outcome)
    return outcome


def _artifact(step: Step, store: Store) -> Artifact:
    version = store.get_version(step.version)
    for artifact in store.artifacts(version.id):
        if artifact.id == step.artifact_id:
            return artifact
    raise StateError(f"{step.version} no longer has artifact {step.artifact_id}", fix="plan again")


def _event_data(step: Step, **extra: object) -> dict[str, object]:
    return {"provider": step.provider, "region": step.region, "location": step.location, "why": step.why, **extra}


def _deprecate(store: Store, retirer: Retirer, step: Step, *, actor: str, run_id: str, now: datetime) -> StepOutcome:
    artifact = _artifact(step, store)
    snapshots = retirer.deprecate(artifact, now)
    # The version becomes deprecated in the same transaction (revoked and failed ones keep saying so).
    store.advance_retirement(step.artifact_id, "deprecated", expect=None, run_id=run_id, actor=actor,
                             ref=step.version, data=_event_data(step, snapshots=list(snapshots)),
                             snapshots=snapshots)  # fmt: skip
    return StepOutcome(step, "done", f"{len(snapshots)} snapshot(s) noted" if snapshots else "")


def _remove(store: Store, retirer: Retirer, step: Step, *, actor: str, run_id: str) -> StepOutcome:
    if step.action == "deregister":
        removal, why = retirer.deregister(_artifact(step, store))
        if removal == "waiting":
            return StepOutcome(step, "waiting", why)
        store.advance_retirement(step.artifact_id, "deregistered", expect="deprecated", run_id=run_id, actor=actor,
                                 ref=step.version, data=_event_data(step, removed=removal == "removed"))  # fmt: skip
        return StepOutcome(step, "done" if removal == "removed" else "gone")
    # A snapshot another artifact on its way out also names (two versions of one local image) waits for that one.
    others = {s for aid, r in store.retirements().items()
              if aid != step.artifact_id and r.stage != "purged" for s in r.snapshots}  # fmt: skip
    shared = [s for s in step.snapshots if s in others]
    kept = shared + retirer.delete_snapshots(step.region, [s for s in step.snapshots if s not in others])
    if kept:
        return StepOutcome(step, "kept", "another image still uses snapshot(s) " + ", ".join(kept))
    store.advance_retirement(step.artifact_id, "purged", expect="deregistered", run_id=run_id, actor=actor,
                             ref=step.version, data=_event_data(step, snapshots=list(step.snapshots)))  # fmt: skip
    return StepOutcome(step, "done")


def _retire_versions(
    store: Store,
    plans: Mapping[str, VersionPlan],
    outcomes: Sequence[StepOutcome],
    retention: Retention,
    *,
    actor: str,
    run_id: str,
) -> list[str]:
    """Mark retired every version of the plan whose artifacts are all done now."""
    touched = {o.step.version for o in outcomes} | {v for v, p in plans.items() if p.retire}
    retired = []
    retirements = store.retirements()
    for ref in sorted(touched):
        version = store.get_version(ref)
        if version.status is Status.RETIRED:
            continue
        rules = retention.of(version.name)
        artifacts = store.artifacts(version.id)
        done = all(finished(retirements.get(a.id or 0), rules) for a in artifacts)
        if not artifacts or not done:
            continue
        try:
            check_transition(version.status, Status.RETIRED)
            store.transition(version.id, Status.RETIRED, expect=version.status)
        except StateError as e:
            logger.info("retire: %s stays %s: %s", ref, version.status, e)
            continue
        store.append_event("retire.retired", actor=actor, ref=ref, data={"run": run_id, "was": version.status.value})
        retired.append(ref)
    return retired


# --- restore -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    version: str
    artifacts: tuple[Artifact, ...]
    status: Status


def restore(store: Store, ref: str, retirer: RetirerFor, *, actor: str) -> Restored:
    """Bring a version's deregistered images back from the Recycle Bin, while their snapshots are kept: each is
    deprecated again from now (a fresh grace period); a retired version becomes what it was before (deprecated,
    or revoked or failed if it was). Resumable: a restore cut short is finished by the next."""
    version = store.get_version(ref)
    retirements = store.retirements()
    artifacts = [a for a in store.artifacts(version.id) if a.id in retirements]
    waiting = [a for a in artifacts if retirements[a.id or 0].stage == "deregistered"]
    reopened = [a for a in artifacts if retirements[a.id or 0].stage == "deprecated"]
    if not waiting and not (version.status is Status.RETIRED and reopened):
        stages = sorted({retirements[a.id or 0].stage for a in artifacts}) or ["in use"]
        raise StateError(
            f"{version.ref} has no deregistered image to restore (its images are: {', '.join(stages)})",
            fix="only an image deregistered and whose snapshots are kept can come back; `amiforge retire --all` "
            "shows each image's stage",
        )
    back = _status_before(store, version)
    run_id = new_run_id()
    for artifact in waiting:
        found = retirer(artifact.provider)
        if found is None:
            raise StateError(f"the {artifact.provider} provider cannot restore images")
        found.restore(artifact)
        store.reopen_retirement(artifact.id or 0, run_id=run_id, actor=actor, ref=version.ref, version_status=back,
                                data={"provider": artifact.provider, "region": artifact.region,
                                      "location": artifact.location})  # fmt: skip
    current = store.get_version(version.ref)
    if current.status is Status.RETIRED:  # a restore cut short after its images came back
        current = store.transition(current.id, back, expect=Status.RETIRED)
    return Restored(version.ref, tuple(waiting), current.status)


def _status_before(store: Store, version: ImageVersion) -> Status:
    """What a retired version was before it retired (its `retire.retired` event says): revoked or failed stay so,
    anything else comes back deprecated."""
    was = next((e.data.get("was") for e in reversed(store.events(version.ref, kinds={"retire.retired"}))), None)
    return Status(was) if was in (Status.REVOKED.value, Status.FAILED.value) else Status.DEPRECATED


# --- the Allowed AMIs criteria of the channels -------------------------------------------------------------


def allowed_criteria(
    store: Store, settings: Settings, *, regions: Iterable[str] = ()
) -> dict[str, list[dict[str, Any]]]:
    """region → Allowed AMIs criteria that allow exactly the channels' versions there (current and previous):
    `aws ec2 replace-image-criteria-in-allowed-images-settings --image-criteria` for the accounts that run them."""
    wanted = set(regions)
    keep = {ref for c in store.channels() for ref in (c.current, c.previous) if ref}
    by_region: dict[str, list[Artifact]] = defaultdict(list)
    for ref, artifact in store.provider_artifacts("aws"):
        if ref in keep and (not wanted or artifact.region in wanted):
            by_region[artifact.region].append(artifact)
    maker = provider_for("aws", settings)
    if not isinstance(maker, CriteriaMaker):  # pragma: no cover - the AWS provider makes them
        raise StateError("the aws provider cannot make Allowed AMIs criteria")
    return {region: maker.allowed_criteria(region, artifacts) for region, artifacts in sorted(by_region.items())}
