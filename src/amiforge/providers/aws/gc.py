"""Garbage collection on EC2: find, and only when asked remove, what a failed or interrupted run left behind.

A run tags everything it creates with `amiforge:managed=true` and `amiforge:run=<run>` at creation (bake.py: builder and
test instances, images, snapshots, the SSH communicator's throw-away key pairs; distribute's copies); when a cleanup
fails the run records an `orphaned` event and the resource stays, and a killed run never got to clean up at all.
`plan_gc()` finds such leftovers in one region and `apply_gc()` removes them. Planning has no side effects; applying
is a separate call so the CLI can plan by default and apply only on `--apply` (docs/architecture.md §8).

An **orphan** is a resource that

- carries both tags: every Describe call filters on them server-side, so untagged resources are never even listed;
- belongs to a run the registry knows and that has finished (`run_state(run) == "finished"`): an unknown run (another
  registry, a hand-made tag) or an active one keeps its resources;
- is older than `min_age`: a younger one may still be in use by a bake that is only starting;
- is in a state that removal applies to: instances pending/running/stopping/stopped (terminated and shutting-down
  ones are ignored), volumes `available` (never attached ones), images not `pending`, snapshots not `pending`; key
  pairs have no state (deleting one never affects an instance launched with it);
- for an image: is not a registered artifact (`registered_images`) and has no deregistration protection;
- for a snapshot: backs no existing image other than orphaned images of the same plan (any owner's image counts,
  found with the `block-device-mapping.snapshot-id` filter), and is not one a registered image was created from.

Everything else that was listed is `kept`, with the reason. `apply_gc()` refuses a plan with more orphans than the
blast-radius cap before touching anything, then works in a safe order: instances, images, snapshots (each only once
every image it backs is deregistered, never the other way round), volumes, key pairs. It continues past a failure and
reports every outcome; a resource that is already gone counts as such, so applying the same plan again converges. (EC2
deletes a key pair name that does not exist without an error, so a key pair is looked up by name and both tags first:
one that is gone is reported `gone`, and one someone re-created without amiforge's tags is never deleted.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from amiforge.awsapi.clients import AwsSession, call, paginate
from amiforge.errors import AmiforgeError, ConfigError, GateFailed, GateFailure, NotFound
from amiforge.providers.aws.images import MANAGED_TAG, parse_aws_time
from amiforge.providers.aws.instances import RUN_TAG
from amiforge.providers.interface import GcOutcome, GcPlan, GcResult, Kind, Orphan, Outcome, RunState

__all__ = [
    "DEFAULT_MAX_DELETIONS",
    "DEFAULT_MIN_AGE",
    "GcOutcome",
    "GcPlan",
    "GcResult",
    "Kind",
    "Orphan",
    "Outcome",
    "RunState",
    "apply_gc",
    "plan_gc",
]


DEFAULT_MIN_AGE: Final = timedelta(hours=1)
DEFAULT_MAX_DELETIONS: Final = 10  # docs/architecture.md §8 blast-radius cap
# The order apply works in: nothing is removed before what depends on it.
_ORDER: Final[Mapping[str, int]] = {"instance": 0, "image": 1, "snapshot": 2, "volume": 3, "key-pair": 4}

# States in which removal applies. Instance states not listed (terminated, shutting-down) are ignored outright.
_INSTANCE_STATES: Final = ("pending", "running", "stopping", "stopped")
_IMAGE_GONE: Final = frozenset({"deregistered", "transient"})  # on its way out: not listed at all
_IMAGE_REMOVABLE: Final = frozenset({"available", "disabled", "failed", "error", "invalid"})
_SNAPSHOT_REMOVABLE: Final = frozenset({"completed", "error"})
_VOLUME_GONE: Final = frozenset({"deleting", "deleted"})
# Snapshot ids per `block-device-mapping.snapshot-id` request: bounds each request's size; the lookup costs
# ⌈snapshots / this⌉ calls (plus pages), never one per snapshot.
_SNAPSHOTS_PER_LOOKUP: Final = 200
_IMAGE_ID_RE: Final = re.compile(r"\bami-[0-9a-f]{8,17}\b")

_TAG_FILTERS: Final = (
    {"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]},
    {"Name": "tag-key", "Values": [RUN_TAG]},
)


# --- planning ----------------------------------------------------------------------------------------------------


def _tags(resource: Mapping[str, Any]) -> dict[str, str]:
    return {str(t["Key"]): str(t.get("Value") or "") for t in resource.get("Tags", [])}


def _time(value: object) -> datetime | None:
    return parse_aws_time(value) if value else None


def _snapshots_of(image: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(
        str(m["Ebs"]["SnapshotId"]) for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")
    )


class _Planner:
    def __init__(
        self,
        region: str,
        run_state: Callable[[str], RunState],
        registered: frozenset[str],
        min_age: timedelta,
        now: datetime,
    ) -> None:
        self.region = region
        self._run_state = run_state
        self._runs: dict[str, RunState] = {}  # one registry lookup per run, not per resource
        self.registered = registered
        self.min_age = min_age
        self.now = now
        self.orphans: list[Orphan] = []
        self.kept: dict[str, str] = {}

    def keep(self, resource_id: str, why: str) -> None:
        self.kept.setdefault(resource_id, why)

    def run_of(self, tags: Mapping[str, str]) -> str | None:
        return tags.get(RUN_TAG) or None

    def refusal(self, tags: Mapping[str, str], created: datetime | None) -> str | None:
        """Why a listed resource is not a candidate on the rules every kind shares, or None if it is one."""
        run = self.run_of(tags)
        if tags.get(MANAGED_TAG) != "true" or run is None:
            # The Describe filters make this unreachable on AWS; a resource that slips through is still not ours.
            return f"not tagged {MANAGED_TAG}=true and {RUN_TAG}"
        state = self._runs.get(run)
        if state is None:
            state = self._runs[run] = self._run_state(run)
        if state == "unknown":
            return f"run {run} is not in this registry"
        if state == "active":
            return f"run {run} is still active"
        if state != "finished":
            return f"run {run} is {state}"
        if created is None:
            return "its creation time is unknown"
        age = self.now - created
        if age < self.min_age:
            young = f"created {_duration(age)} ago, less than {_duration(self.min_age)}"
            return f"{young}: may still be in use by a running bake"
        return None

    def add(self, kind: Kind, resource_id: str, tags: Mapping[str, str], **kw: Any) -> None:
        self.orphans.append(
            Orphan(kind=kind, id=resource_id, region=self.region, run_id=self.run_of(tags), name=tags.get("Name"), **kw)
        )


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return f"-{_duration(-delta)}"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _listed(
    ec2: Any, operation: str, key: str, what: str, *, extra: Iterable[Mapping[str, Any]] = (), **kwargs: Any
) -> list[Mapping[str, Any]]:
    """Every resource of a Describe call that carries both amiforge tags: filtered by EC2, so nothing else is listed."""
    filters = [dict(f) for f in (*_TAG_FILTERS, *extra)]
    return list(paginate(ec2, operation, key, what, Filters=filters, **kwargs))


def plan_gc(
    session: AwsSession,
    region: str,
    *,
    registered_images: Collection[str],
    run_state: Callable[[str], RunState],
    min_age: timedelta = DEFAULT_MIN_AGE,
    now: datetime,
) -> GcPlan:
    """The orphans of finished runs in `region`, and the tagged resources kept, with reasons. No side effects.

    `registered_images`: every image id the registry holds as an artifact (any region). `run_state(run)`: what the
    registry knows of a run id. `now` must be timezone-aware. Costs one Describe call per page per resource kind,
    plus one DescribeImages per 200 candidate snapshots: O(pages), never a call per resource."""
    if now.tzinfo is None:
        raise ConfigError("gc needs a timezone-aware `now`", fix="pass datetime.now(UTC)")
    if min_age < timedelta(0):
        raise ConfigError(f"min_age is {min_age}; it cannot be negative", fix="use e.g. 1h (the default)")
    planner = _Planner(region, run_state, frozenset(registered_images), min_age, now)
    ec2 = session.client("ec2", region)

    _plan_instances(planner, ec2)
    images = _plan_images(planner, ec2)
    _plan_snapshots(planner, ec2, images)
    _plan_volumes(planner, ec2)
    _plan_key_pairs(planner, ec2)

    orphans = sorted(planner.orphans, key=lambda o: (_ORDER[o.kind], o.id))
    return GcPlan(region=region, orphans=tuple(orphans), kept=tuple(sorted(planner.kept.items())))


def _plan_instances(planner: _Planner, ec2: Any) -> None:
    # Terminated and shutting-down instances are not even asked for: there is nothing left to do to them.
    states = {"Name": "instance-state-name", "Values": list(_INSTANCE_STATES)}
    what = f"managed instances in {planner.region}"
    reservations = _listed(ec2, "DescribeInstances", "Reservations", what, extra=[states])
    for instance in (i for r in reservations for i in r.get("Instances", [])):
        instance_id = str(instance["InstanceId"])
        state = str(instance.get("State", {}).get("Name") or "")
        if state not in _INSTANCE_STATES:
            continue  # terminated or shutting-down: ignored (the filter already leaves them out)
        tags = _tags(instance)
        created = _time(instance.get("LaunchTime"))
        why = planner.refusal(tags, created)
        if why is not None:
            planner.keep(instance_id, why)
            continue
        planner.add(
            "instance",
            instance_id,
            tags,
            reason=f"run {planner.run_of(tags)} finished; the instance is still {state}",
            state=state,
            created=created,
        )


@dataclass(frozen=True)
class _Images:
    """What the image listing tells the snapshot pass: which images go, and which snapshots each listed image uses."""

    orphans: frozenset[str]
    snapshots: Mapping[str, tuple[str, ...]]


def _protection(image: Mapping[str, Any]) -> str | None:
    value = str(image.get("DeregistrationProtection") or "")
    return value if value.startswith("enabled") else None


def _image_refusal(
    planner: _Planner, image: Mapping[str, Any], state: str, tags: Mapping[str, str], created: datetime | None
) -> str | None:
    if str(image["ImageId"]) in planner.registered:
        return "a registered artifact (retire removes it, never gc)"
    why = planner.refusal(tags, created)
    if why is not None:
        return why
    if state not in _IMAGE_REMOVABLE:
        return f"the image is {state}" + (": still being created or copied" if state == "pending" else "")
    protection = _protection(image)
    if protection is not None:
        return f"deregistration protection is {protection}: disable it first if the image really is an orphan"
    return None


def _plan_images(planner: _Planner, ec2: Any) -> _Images:
    what = f"managed images in {planner.region}"
    # Deprecated and disabled images are leftovers too; EC2 leaves disabled ones out unless asked.
    images = _listed(
        ec2, "DescribeImages", "Images", what, Owners=["self"], IncludeDeprecated=True, IncludeDisabled=True
    )
    orphans: set[str] = set()
    snapshots: dict[str, tuple[str, ...]] = {}
    for image in images:
        image_id = str(image["ImageId"])
        state = str(image.get("State") or "")
        if state in _IMAGE_GONE:
            continue
        snapshots[image_id] = _snapshots_of(image)
        tags = _tags(image)
        created = _time(image.get("CreationDate"))
        why = _image_refusal(planner, image, state, tags, created)
        if why is not None:
            planner.keep(image_id, why)
            continue
        orphans.add(image_id)
        planner.add(
            "image",
            image_id,
            tags,
            reason=f"run {planner.run_of(tags)} finished; the image is not a registered artifact",
            state=state,
            created=created,
        )
    return _Images(frozenset(orphans), snapshots)


def _images_using(ec2: Any, region: str, snapshot_ids: list[str]) -> dict[str, set[str]]:
    """For each snapshot, every existing image that uses it, whoever owns the image (the caller's own, shared with
    it, public): one filtered DescribeImages per batch of snapshot ids, never a scan of all images."""
    users: dict[str, set[str]] = {}
    for start in range(0, len(snapshot_ids), _SNAPSHOTS_PER_LOOKUP):
        batch = snapshot_ids[start : start + _SNAPSHOTS_PER_LOOKUP]
        wanted = set(batch)
        images = paginate(
            ec2,
            "DescribeImages",
            "Images",
            f"images using {len(batch)} snapshot(s) in {region}",
            Filters=[{"Name": "block-device-mapping.snapshot-id", "Values": batch}],
            IncludeDeprecated=True,
            IncludeDisabled=True,
        )
        for image in images:
            if str(image.get("State") or "") in _IMAGE_GONE:
                continue
            for snapshot_id in _snapshots_of(image):
                if snapshot_id in wanted:
                    users.setdefault(snapshot_id, set()).add(str(image["ImageId"]))
    return users


def _plan_snapshots(planner: _Planner, ec2: Any, images: _Images) -> None:
    what = f"managed snapshots in {planner.region}"
    listed: set[str] = set()
    candidates: list[tuple[str, dict[str, str], str, datetime | None]] = []
    for snapshot in _listed(ec2, "DescribeSnapshots", "Snapshots", what, OwnerIds=["self"]):
        snapshot_id = str(snapshot["SnapshotId"])
        listed.add(snapshot_id)
        state = str(snapshot.get("State") or "")
        tags = _tags(snapshot)
        created = _time(snapshot.get("StartTime"))
        why = planner.refusal(tags, created)
        if why is None and state not in _SNAPSHOT_REMOVABLE:
            why = f"the snapshot is {state}"
        if why is None:
            # A registered image that is already deregistered (retire keeps its snapshots through a grace period)
            # is linked to its snapshots only by the description EC2 writes ("Created by CreateImage(…) for ami-…").
            # Read only to keep more, never to delete more.
            named = sorted(set(_IMAGE_ID_RE.findall(str(snapshot.get("Description") or ""))) & planner.registered)
            if named:
                why = f"created for registered image {named[0]}"
        if why is not None:
            planner.keep(snapshot_id, why)
            continue
        candidates.append((snapshot_id, tags, state, created))

    users = _images_using(ec2, planner.region, [c[0] for c in candidates])
    for image_id, used in images.snapshots.items():  # what the listing showed, in case the lookup lags behind
        for snapshot_id in used:
            users.setdefault(snapshot_id, set()).add(image_id)

    for snapshot_id, tags, state, created in candidates:
        backing = users.get(snapshot_id, set())
        staying = sorted(backing - images.orphans)
        run = planner.run_of(tags)
        if staying:
            registered = " (a registered artifact)" if staying[0] in planner.registered else ""
            more = f" and {len(staying) - 1} more" if len(staying) > 1 else ""
            planner.keep(snapshot_id, f"backs image {staying[0]}{registered}{more}, which is not removed")
            continue
        backs = tuple(sorted(backing))
        reason = (
            f"run {run} finished; backs only orphaned image(s) {', '.join(backs)}, deleted after them"
            if backs
            else f"run {run} finished; backs no image"
        )
        planner.add("snapshot", snapshot_id, tags, reason=reason, state=state, created=created, backs=backs)

    for image_id in sorted(images.orphans):
        for snapshot_id in images.snapshots.get(image_id, ()):
            if snapshot_id not in listed:
                planner.keep(
                    snapshot_id,
                    f"backs orphaned image {image_id} but is not tagged {MANAGED_TAG}=true and {RUN_TAG}: "
                    "gc never deletes it (delete it by hand once the image is gone)",
                )


def _plan_volumes(planner: _Planner, ec2: Any) -> None:
    for volume in _listed(ec2, "DescribeVolumes", "Volumes", f"managed volumes in {planner.region}"):
        volume_id = str(volume["VolumeId"])
        state = str(volume.get("State") or "")
        if state in _VOLUME_GONE:
            continue
        tags = _tags(volume)
        created = _time(volume.get("CreateTime"))
        why = planner.refusal(tags, created)
        if why is None and state != "available":
            attached = sorted({str(a.get("InstanceId")) for a in volume.get("Attachments", []) if a.get("InstanceId")})
            why = f"attached to {', '.join(attached)}" if attached else f"the volume is {state}"
        if why is not None:
            planner.keep(volume_id, why)
            continue
        planner.add(
            "volume",
            volume_id,
            tags,
            reason=f"run {planner.run_of(tags)} finished; the volume is not attached",
            state=state,
            created=created,
        )


def _tagged_key_pairs(ec2: Any, what: str, *, extra: Iterable[Mapping[str, Any]] = ()) -> list[Mapping[str, Any]]:
    """Key pairs carrying both amiforge tags (and `extra` filters). DescribeKeyPairs has no pages: one call."""
    filters = [dict(f) for f in (*_TAG_FILTERS, *extra)]
    return list(call(ec2, "DescribeKeyPairs", what, Filters=filters).get("KeyPairs", []))


def _plan_key_pairs(planner: _Planner, ec2: Any) -> None:
    # The SSH communicator's throw-away key pairs (bake.py), one per instance, named after the run. Named by KeyName:
    # unique in a region, what the run's leftover record and DeleteKeyPair use.
    for key_pair in _tagged_key_pairs(ec2, f"managed key pairs in {planner.region}"):
        name = str(key_pair["KeyName"])
        tags = _tags(key_pair)
        created = _time(key_pair.get("CreateTime"))
        why = planner.refusal(tags, created)
        if why is not None:
            planner.keep(name, why)
            continue
        reason = f"run {planner.run_of(tags)} finished; its throw-away key pair was not deleted"
        planner.add("key-pair", name, tags, reason=reason, state="", created=created)  # key pairs have no state


# --- applying ----------------------------------------------------------------------------------------------------


def apply_gc(
    session: AwsSession,
    plan: GcPlan,
    *,
    max_deletions: int = DEFAULT_MAX_DELETIONS,
    on_progress: Callable[[Orphan, Outcome], None] | None = None,
) -> GcResult:
    """Remove the plan's orphans: instances, then images, then snapshots, then volumes, then key pairs.

    Refuses (GateFailed, before any call) a plan with more than `max_deletions` orphans. A failure is reported and
    the rest goes on, except that a snapshot is skipped while any image it backs is not confirmed gone. Already-gone
    resources are `gone`, not failures, so the same plan applied again converges. `on_progress` hears each outcome."""
    if max_deletions < 0:
        raise ConfigError(f"max_deletions is {max_deletions}; it cannot be negative", fix="use e.g. 10 (the default)")
    if len(plan.orphans) > max_deletions:
        raise GateFailed(
            "blast radius",
            [GateFailure(f"{o.kind} {o.id}", o.reason) for o in plan.orphans],
            fix=f"{len(plan.orphans)} orphans in {plan.region} exceed the cap of {max_deletions}: review the plan, "
            f"and raise the cap to at least {len(plan.orphans)} only if every one of them should go",
        )
    ec2 = session.client("ec2", plan.region)
    images_gone: set[str] = set()
    outcomes: list[GcOutcome] = []
    for orphan in sorted(plan.orphans, key=lambda o: (_ORDER[o.kind], o.id)):
        waiting = [image for image in orphan.backs if image not in images_gone]
        if waiting:
            outcome = GcOutcome(
                orphan,
                "skipped",
                f"image {', '.join(waiting)} is not deregistered; a snapshot goes only after its images",
            )
        else:
            outcome = _remove(ec2, orphan)
        if orphan.kind == "image" and outcome.outcome in ("deleted", "gone"):
            images_gone.add(orphan.id)
        outcomes.append(outcome)
        if on_progress is not None:
            on_progress(orphan, outcome.outcome)
    return GcResult(region=plan.region, outcomes=tuple(outcomes))


def _remove(ec2: Any, orphan: Orphan) -> GcOutcome:
    try:
        if orphan.kind == "instance":
            answer = call(ec2, "TerminateInstances", orphan.id, InstanceIds=[orphan.id])
            changes = answer.get("TerminatingInstances", [])
            before = str(changes[0].get("PreviousState", {}).get("Name") or "") if changes else ""
            if before in ("terminated", "shutting-down"):
                return GcOutcome(orphan, "gone", f"already {before}")
            return GcOutcome(orphan, "deleted", "terminated")
        if orphan.kind == "image":
            # Not DeleteAssociatedSnapshots: only the image's tagged snapshots are in the plan, and they go next.
            call(ec2, "DeregisterImage", orphan.id, ImageId=orphan.id)
            return GcOutcome(orphan, "deleted", "deregistered")
        if orphan.kind == "snapshot":
            call(ec2, "DeleteSnapshot", orphan.id, SnapshotId=orphan.id)
            return GcOutcome(orphan, "deleted", "deleted")
        if orphan.kind == "key-pair":
            return _remove_key_pair(ec2, orphan)
        call(ec2, "DeleteVolume", orphan.id, VolumeId=orphan.id)
        return GcOutcome(orphan, "deleted", "deleted")
    except NotFound as e:
        return GcOutcome(orphan, "gone", f"already gone ({e.message})")
    except AmiforgeError as e:
        # Reported, not swallowed: the result lists it with its diagnostics, and `ok` is False.
        return GcOutcome(orphan, "failed", e.diagnostics(), e)


def _remove_key_pair(ec2: Any, orphan: Orphan) -> GcOutcome:
    """DeleteKeyPair of a name that does not exist succeeds: look the key pair up first (by name and both tags), so a
    gone one is `gone` and one re-created under the name without amiforge's tags is left alone."""
    by_name = [{"Name": "key-name", "Values": [orphan.id]}]
    if not _tagged_key_pairs(ec2, f"key pair {orphan.id}", extra=by_name):
        return GcOutcome(orphan, "gone", "already gone (no key pair of this name carries amiforge's tags)")
    # By name (moto 5.2.5 ignores KeyPairId in DeleteKeyPair, so deleting by the id could not be tested); the window
    # for a re-import under the name between the look-up and the delete is one request long.
    call(ec2, "DeleteKeyPair", orphan.id, KeyName=orphan.id)
    return GcOutcome(orphan, "deleted", "deleted")
