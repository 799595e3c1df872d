"""The instance-refresh mode of an Auto Scaling rollout: AWS replaces the group's instances itself, pausing at
checkpoints, watched by CloudWatch alarms, and rolls back on its own (AutoRollback) or when asked.

The self-run canary is `AsgFleet.replace` (fleet.py): amiforge picks each member and judges it by its console. Here
AWS does the replacing (StartInstanceRefresh); the rollout controller starts the refresh, polls `refresh_status`, and
calls `roll_back_refresh` when its own gates fail. Three calls, all idempotent:

- `start_refresh(fleet, artifact, version_ref, checkpoints=, checkpoint_delay=, alarms=, token=, auto_rollback=)` →
  the refresh id. AutoRollback is on unless asked otherwise: AWS rolls a failing refresh back to the group's
  configuration at its start. A roll-forward (a refresh back to the previous version after a refresh to a bad one
  had already succeeded) starts *from* the bad version, so its AutoRollback would put the bad image back: the
  controller starts it with `auto_rollback=False`.
- `refresh_status(fleet, refresh_id)` → `RefreshStatus` (one DescribeInstanceRefreshes entry, normalised).
- `roll_back_refresh(fleet, refresh_id)` → `RefreshStatus` after RollbackInstanceRefresh (or as it is, when it is
  already rolling back or rolled back).
- `batch_time(fleet)` → what replacing one batch may take on AWS's side, by part (below); read only.

## How long one batch may take (batch_time)

The controller judges a refresh stuck when its progress has not moved for a few batch times (lifecycle/refresh.py),
so a batch time must hold what the group itself makes a replacement wait for. Read from the group, in seconds:

- `instance warm-up`: an instance counts as updated (PercentageComplete) only "when the instance's health status
  changes to healthy and the specified warm-up time passes" (InstanceRefresh reference), and the refresh waits for
  it before the next batch. The warm-up is the refresh's InstanceWarmup preference — amiforge never sets it — else
  "the value of the DefaultInstanceWarmup property, if defined […], or the HealthCheckGracePeriod property
  otherwise" (RefreshPreferences reference; -1 removes a DefaultInstanceWarmup).
- `launch lifecycle hooks`, `terminate lifecycle hooks`: an instance waits in Pending:Wait / Terminating:Wait until
  its hooks are completed or time out (HeartbeatTimeout, 3600 s by default; the hooks of one transition run
  together, so the longest counts). A handler that records heartbeats can hold it longer (up to GlobalTimeout): not
  counted — the controller's margin of several batches is what covers it.
- `load balancer health checks`: a new instance serves no traffic until each of the group's load balancers has seen
  it pass HealthyThresholdCount checks HealthCheckIntervalSeconds apart (the longest of its target groups and
  classic load balancers), whether or not the group uses ELB health checks.
- `load balancer draining`: the old instance stays Terminating while its target groups deregister it
  (deregistration_delay.timeout_seconds, 300 s by default) or a classic load balancer drains it (ConnectionDraining,
  when enabled); the longest counts.

Target groups and classic load balancers come from TargetGroupARNs and LoadBalancerNames and from TrafficSources of
types elbv2 and elb; VPC Lattice traffic sources are not read. Without MaxHealthyPercentage AWS "terminates an
instance and launches its replacement simultaneously", so the termination side may overlap the launch side: the parts
are added anyway. The sum is an allowance, not a prediction: too long only delays the verdict on a stuck refresh; too
short rolls back a healthy one.

## Refusals (ConfigError with a fix, all before anything is written)

- The artifact must be an AMI id in the group's region and `available` (NotFound otherwise); checkpoints ascending in
  1..100 and ending at 100 (the refresh must cover the whole group), a delay of 0..172800 s, at most 10 alarms, each
  existing in the region (a typo must not switch a gate off).
- The group must launch from a launch template, carry `amiforge:rollout=enabled` (the IAM policy only lets amiforge
  change groups with that tag), not use a mixed instances policy, and not launch a Xen instance type (the new
  instances are judged by the readiness line on their consoles, which EC2 shows as it is only on Nitro types):
  `AsgFleet.rollout_group()` checks these as replace() does.
- The group's template version must be a **number**. AWS rolls a refresh back to the group's configuration as it was
  at the start; with `$Latest` or `$Default` (or no version, which is `$Default`) that is a moving reference, so AWS
  refuses to roll back (IrreversibleInstanceRefresh) — and `$Latest` would even start launching our version the
  moment it is created. Refused up front rather than discovered mid-rollout, when a rollback is needed.
- The ImageId of the group's current version must not be an SSM parameter (`resolve:ssm:…`): AWS cannot roll back to
  an image that is only known through a parameter whose value may have changed since.
- Another refresh already active on the group (Pending, InProgress, Baking, Cancelling, RollbackInProgress) that is
  not ours: StateError (AWS allows one at a time; amiforge never cancels someone else's).

## Instances the owner set apart: Ignore, never Wait

AWS's default for instances protected from scale in (ScaleInProtectedInstances) and for instances in Standby
(StandbyInstances) is `Wait`: the refresh stops at them for an hour, waiting for someone to lift the protection or
return them to service, and then fails (rolled back, with AutoRollback) — a rollout that hangs for an hour and then
undoes itself because of one protected instance. amiforge cannot lift either (it would override its owner: protection
marks an instance that must not be replaced, e.g. one running a long job; Standby one taken out for inspection), and
`Refresh`/`Terminate` would replace or destroy exactly those. So both are `Ignore`: the refresh replaces every other
instance, and those keep the old image (the controller lists the protected ones, still members in service, as
`not_refreshed` when the refresh succeeds).

## How "ours" is recognised, and idempotency per token

StartInstanceRefresh takes no client token and refreshes carry no tags, so a refresh is recognised by what it does:
an active refresh of the group whose DesiredConfiguration is a numeric version of the group's own template that is
the group's version with the artifact's AMI and nothing else changed (`templates.created_from`) is ours, and its id
is returned instead of starting another (also when a lost answer made the retried start fail with
InstanceRefreshInProgress). Once a refresh has succeeded, AWS points the group at its desired
version: if the group's version already holds the AMI, the newest Successful refresh to that version is returned
(and StateError if there is none: the group already runs the image, nothing to refresh).

The version is made as the fleet's: `templates.version_holding` gives the group's version itself if it holds the AMI,
else the newest version after it if that is exactly what would be created (an interrupted run made it), else a new one
(ClientToken derived from group, template, source version, AMI, version ref and token). The group is *not* pointed at it
(AWS does that when the refresh succeeds); the template's default is never moved.

Limitation of recognising by image: two tokens asking for the same AMI on the same group are indistinguishable while
the refresh is active (the second gets the first's id — the same work). After a refresh ended Failed, Cancelled or
rolled back, the same call starts a new one: the controller must not call start_refresh again for a token whose
refresh it saw end (it records the id it got back).

Every AWS call goes through `clients.call`; DescribeInstanceRefreshes has no botocore paginator, so NextToken is
followed here. Error codes (InstanceRefreshInProgress, ActiveInstanceRefreshNotFound, IrreversibleInstanceRefresh,
LimitExceeded) are mapped in errors.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from amiforge.awsapi.clients import call, paginate
from amiforge.errors import ConfigError, NotFound, StateError
from amiforge.model import Artifact
from amiforge.providers.aws.images import describe_image
from amiforge.providers.aws.templates import (
    Template,
    client_token,
    created_from,
    describe_versions,
    image_of,
    version_holding,
)
from amiforge.providers.interface import REFRESH_ACTIVE, REFRESH_ROLLBACK, REFRESH_TERMINAL, RefreshStatus

if TYPE_CHECKING:  # the fleet calls this module; this module only reads the fleet
    from amiforge.providers.aws.fleet import AsgFleet

__all__ = [
    "RefreshStatus",
    "batch_time",
    "refresh_status",
    "roll_back_refresh",
    "start_refresh",
]

_VERSION_RE: Final = re.compile(r"[1-9][0-9]*")
_SSM_IMAGE: Final = "resolve:ssm:"
_MAX_ALARMS: Final = 10
_MAX_CHECKPOINT_DELAY: Final = 172800
# batch_time's parts for the lifecycle transitions a replacement goes through, and PutLifecycleHook's default timeout.
_HOOK_PARTS: Final = {
    "autoscaling:EC2_INSTANCE_LAUNCHING": "launch lifecycle hooks",
    "autoscaling:EC2_INSTANCE_TERMINATING": "terminate lifecycle hooks",
}
_HEARTBEAT_DEFAULT: Final = 3600.0


def start_refresh(
    fleet: AsgFleet,
    artifact: Artifact,
    version_ref: str,
    *,
    checkpoints: Sequence[int],
    checkpoint_delay: int,
    alarms: Sequence[str],
    token: str,
    min_healthy_percentage: int = 90,
    auto_rollback: bool = True,
) -> str:
    """Start (or find, see the module) the instance refresh of `fleet`'s group to `artifact`; its id. `auto_rollback`
    off for a roll-forward (see the module)."""
    image_id = _check_request(
        fleet, artifact, version_ref, checkpoints, checkpoint_delay, alarms, token, min_healthy_percentage
    )
    describe_image(fleet.session, fleet.region, image_id)  # NotFound before anything is written
    raw, template, source = fleet.rollout_group()
    name = fleet.target
    version = str(raw["LaunchTemplate"].get("Version") or "$Default")
    if _VERSION_RE.fullmatch(version) is None:
        raise ConfigError(
            f"group {name} launches from {version} of its launch template: AWS can only roll an instance refresh "
            "back to a numbered version (it answers IrreversibleInstanceRefresh for $Default/$Latest)",
            fix=f"pin the group to a version number: aws autoscaling update-auto-scaling-group "
            f"--auto-scaling-group-name {name} --launch-template LaunchTemplateId={template.template_id},"
            f"Version={source}",
        )
    current = describe_versions(fleet.session, fleet.region, template, {source}).get(source)
    current_image = image_of(current) or ""
    if current_image.startswith(_SSM_IMAGE):
        raise ConfigError(
            f"version {source} of launch template {template.name} (group {name}) takes its image from an SSM "
            f"parameter ({current_image}): AWS cannot roll an instance refresh back to it",
            fix=f"give version {source}'s successor an AMI id and pin the group to it, or use the self-run canary",
        )
    if alarms:
        fleet.alarms_firing(alarms)  # ConfigError for an alarm that does not exist

    refreshes = _refreshes(fleet)
    active = [r for r in refreshes if r.get("Status") in REFRESH_ACTIVE]
    if active:
        if current is not None and _ours(fleet, template, current, active[0], image_id):
            return str(active[0]["InstanceRefreshId"])
        raise StateError(
            f"group {name} has instance refresh {active[0]['InstanceRefreshId']} {active[0].get('Status')}, "
            "not one amiforge started for this version",
            fix=f"wait for it to end (aws autoscaling describe-instance-refreshes --auto-scaling-group-name {name}) "
            "or cancel it; amiforge never cancels a refresh it did not start",
        )
    if current_image == image_id:
        done = [
            r for r in refreshes if r.get("Status") == "Successful" and _desired(r) == (template.template_id, source)
        ]
        if done:
            return str(done[0]["InstanceRefreshId"])
        raise StateError(
            f"group {name} already launches {image_id} (launch template {template.name} version {source}): "
            "there is nothing to refresh",
            fix="roll out another version, or replace individual members with the self-run canary",
        )

    target = version_holding(
        fleet.session,
        fleet.region,
        template,
        source=source,
        image_id=image_id,
        token=client_token("refresh", name, template.template_id, str(source), image_id, version_ref, token),
        description=f"amiforge {version_ref} ({image_id}) refresh of group {name}, from version {source}",
    )
    preferences: dict[str, Any] = {
        "CheckpointPercentages": list(checkpoints),
        "CheckpointDelay": checkpoint_delay,
        "MinHealthyPercentage": min_healthy_percentage,
        "AutoRollback": auto_rollback,
        "SkipMatching": True,
        # Never block on what the group's owner set apart (see the module). Of AWS's default, Wait, the
        # RefreshPreferences reference says: "Amazon EC2 Auto Scaling waits one hour for you to remove scale-in
        # protection. Otherwise, the instance refresh will fail." (for Standby: "to return the instances to service").
        "ScaleInProtectedInstances": "Ignore",
        "StandbyInstances": "Ignore",
    }
    if not checkpoints:
        del preferences["CheckpointPercentages"], preferences["CheckpointDelay"]
    if alarms:
        preferences["AlarmSpecification"] = {"Alarms": list(alarms)}
    try:
        answer = fleet.asg_call(
            "StartInstanceRefresh",
            AutoScalingGroupName=name,
            DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": template.template_id, "Version": str(target)}},
            Preferences=preferences,
        )
    except StateError:
        # InstanceRefreshInProgress: another started in between, or our own first attempt whose answer was lost.
        again = [r for r in _refreshes(fleet) if r.get("Status") in REFRESH_ACTIVE]
        if again and _desired(again[0]) == (template.template_id, target):
            return str(again[0]["InstanceRefreshId"])
        raise
    return str(answer["InstanceRefreshId"])


def batch_time(fleet: AsgFleet) -> dict[str, float]:
    """What replacing one batch of `fleet`'s group may take on AWS's side, by part, in seconds (see the module):
    `instance warm-up` always, the lifecycle-hook and load-balancer parts when the group has them. Read only: one
    DescribeAutoScalingGroups and DescribeLifecycleHooks, and per load balancer kind one listing plus one
    attributes read per target group or load balancer."""
    name = fleet.target
    groups = fleet.asg_call("DescribeAutoScalingGroups", AutoScalingGroupNames=[name]).get("AutoScalingGroups", [])
    raw = next((g for g in groups if g.get("AutoScalingGroupName") == name), None)
    if raw is None:
        raise NotFound(
            f"Auto Scaling group {name} does not exist in {fleet.region}",
            fix="check the group name and the region (aws autoscaling describe-auto-scaling-groups)",
        )
    default_warmup = raw.get("DefaultInstanceWarmup")
    warmup = default_warmup if default_warmup is not None and default_warmup >= 0 else raw.get("HealthCheckGracePeriod")
    parts: dict[str, float] = {"instance warm-up": float(warmup or 0)}
    heartbeats: dict[str, float] = {}
    for hook in fleet.asg_call("DescribeLifecycleHooks", AutoScalingGroupName=name).get("LifecycleHooks", []):
        transition = _HOOK_PARTS.get(str(hook.get("LifecycleTransition")))
        if transition is not None:
            timeout = float(hook.get("HeartbeatTimeout") or _HEARTBEAT_DEFAULT)
            heartbeats[transition] = max(heartbeats.get(transition, 0.0), timeout)
    parts.update(heartbeats)
    sources = [(str(s.get("Type")), str(s.get("Identifier"))) for s in raw.get("TrafficSources") or []]
    target_groups = sorted({*raw.get("TargetGroupARNs", []), *(i for kind, i in sources if kind == "elbv2")})
    classic = sorted({*raw.get("LoadBalancerNames", []), *(i for kind, i in sources if kind == "elb")})
    health, draining = _target_groups(fleet, target_groups)
    classic_health, classic_draining = _classic_load_balancers(fleet, classic)
    for part, seconds in (
        ("load balancer health checks", max(health, classic_health)),
        ("load balancer draining", max(draining, classic_draining)),
    ):
        if seconds > 0:
            parts[part] = seconds
    return parts


def refresh_status(fleet: AsgFleet, refresh_id: str) -> RefreshStatus:
    """The refresh `refresh_id` of `fleet`'s group; NotFound if the group has no such refresh."""
    found = _refreshes(fleet, [refresh_id])
    if not found:
        raise NotFound(
            f"group {fleet.target} has no instance refresh {refresh_id}",
            fix=f"list them: aws autoscaling describe-instance-refreshes --auto-scaling-group-name {fleet.target}",
        )
    return _status(found[0])


def roll_back_refresh(fleet: AsgFleet, refresh_id: str) -> RefreshStatus:
    """Roll the active refresh `refresh_id` back (RollbackInstanceRefresh); idempotent: a refresh already rolling
    back or rolled back is returned as it is. StateError for a refresh that has ended otherwise (AWS rolls back only
    an active refresh) or when another refresh is the active one."""
    refreshes = _refreshes(fleet)  # one read: the refresh asked for and the active one
    found = [r for r in refreshes if r.get("InstanceRefreshId") == refresh_id]
    # Older than the listing goes back: asked by id (NotFound if unknown; an old one has ended).
    status = _status(found[0]) if found else refresh_status(fleet, refresh_id)
    if status.status in REFRESH_ROLLBACK:
        return status
    if status.status in REFRESH_TERMINAL:
        raise StateError(
            f"instance refresh {refresh_id} of group {fleet.target} has ended {status.status}: AWS rolls back only "
            "an active refresh",
            fix="roll forward instead: start a refresh to the version the group ran before, under a new token",
        )
    active = [r for r in refreshes if r.get("Status") in REFRESH_ACTIVE]
    if active and active[0].get("InstanceRefreshId") != refresh_id:
        raise StateError(
            f"the active instance refresh of group {fleet.target} is {active[0]['InstanceRefreshId']}, not "
            f"{refresh_id}",
            fix="roll back only the refresh this rollout started",
        )
    try:
        fleet.asg_call("RollbackInstanceRefresh", AutoScalingGroupName=fleet.target)
    except NotFound as e:
        # ActiveInstanceRefreshNotFound: it ended (or began rolling back on its own) since it was read.
        status = refresh_status(fleet, refresh_id)
        if status.status in REFRESH_ROLLBACK:
            return status
        raise StateError(
            f"instance refresh {refresh_id} of group {fleet.target} ended {status.status} before it could be "
            "rolled back",
            fix="roll forward instead: start a refresh to the version the group ran before, under a new token",
        ) from e
    return refresh_status(fleet, refresh_id)


# --- helpers ---------------------------------------------------------------------------------------------------------


def _check_request(
    fleet: AsgFleet,
    artifact: Artifact,
    version_ref: str,
    checkpoints: Sequence[int],
    checkpoint_delay: int,
    alarms: Sequence[str],
    token: str,
    min_healthy_percentage: int,
) -> str:
    problems = fleet.artifact_problems(artifact, version_ref, token)
    points = list(checkpoints)
    if points and (any(not 1 <= p <= 100 for p in points) or points != sorted(set(points)) or points[-1] != 100):
        problems.append(f"checkpoints {points} must be ascending percentages in 1..100 ending at 100")
    if not 0 <= checkpoint_delay <= _MAX_CHECKPOINT_DELAY:
        problems.append(f"checkpoint delay {checkpoint_delay}s must be 0..{_MAX_CHECKPOINT_DELAY}")
    if not 0 <= min_healthy_percentage <= 100:
        problems.append(f"min healthy percentage {min_healthy_percentage} must be 0..100")
    if len(alarms) > _MAX_ALARMS or len(set(alarms)) != len(alarms) or not all(alarms):
        problems.append(f"alarms must be at most {_MAX_ALARMS} distinct names")
    if problems:
        raise ConfigError(
            f"cannot start an instance refresh of group {fleet.target}: " + "; ".join(problems),
            fix="distribute the version to the group's region first; e.g. checkpoints [10, 50, 100], delay 300",
        )
    return artifact.location


def _refreshes(fleet: AsgFleet, ids: Sequence[str] = ()) -> list[Mapping[str, Any]]:
    """The group's refreshes, newest first (as AWS lists them); only `ids` when given."""
    out: list[Mapping[str, Any]] = []
    kwargs: dict[str, Any] = {"AutoScalingGroupName": fleet.target, "MaxRecords": 100}
    if ids:
        kwargs["InstanceRefreshIds"] = list(ids)
    while True:
        page = fleet.asg_call("DescribeInstanceRefreshes", **kwargs)
        out += page.get("InstanceRefreshes", [])
        if not page.get("NextToken"):
            return out
        kwargs["NextToken"] = page["NextToken"]


def _target_groups(fleet: AsgFleet, arns: Sequence[str]) -> tuple[float, float]:
    """(health checks, deregistration delay) of the longest of the target groups `arns`, in seconds."""
    if not arns:
        return 0.0, 0.0
    elbv2 = fleet.session.client("elbv2", fleet.region)
    health = draining = 0.0
    for group in paginate(elbv2, "DescribeTargetGroups", "TargetGroups", f"target groups of group {fleet.target}",
                          TargetGroupArns=list(arns)):  # fmt: skip
        if group.get("HealthCheckEnabled", True):
            checks = float(group.get("HealthyThresholdCount") or 0) * float(
                group.get("HealthCheckIntervalSeconds") or 0
            )
            health = max(health, checks)
        arn = str(group["TargetGroupArn"])
        answer = call(elbv2, "DescribeTargetGroupAttributes", arn, TargetGroupArn=arn)
        attributes = {str(a.get("Key")): a.get("Value") for a in answer.get("Attributes", [])}
        draining = max(draining, float(attributes.get("deregistration_delay.timeout_seconds") or 0))
    return health, draining


def _classic_load_balancers(fleet: AsgFleet, names: Sequence[str]) -> tuple[float, float]:
    """(health checks, connection draining) of the longest of the classic load balancers `names`, in seconds."""
    if not names:
        return 0.0, 0.0
    elb = fleet.session.client("elb", fleet.region)
    health = draining = 0.0
    for balancer in paginate(elb, "DescribeLoadBalancers", "LoadBalancerDescriptions",
                             f"load balancers of group {fleet.target}", LoadBalancerNames=list(names)):  # fmt: skip
        check = balancer.get("HealthCheck") or {}
        health = max(health, float(check.get("HealthyThreshold") or 0) * float(check.get("Interval") or 0))
        name = str(balancer["LoadBalancerName"])
        attributes = call(elb, "DescribeLoadBalancerAttributes", name, LoadBalancerName=name)
        connection = attributes.get("LoadBalancerAttributes", {}).get("ConnectionDraining") or {}
        if connection.get("Enabled"):
            draining = max(draining, float(connection.get("Timeout") or 0))
    return health, draining


def _desired(refresh: Mapping[str, Any]) -> tuple[str, int] | None:
    """(template id, version number) of a refresh's desired configuration; None when it is not a numbered version."""
    spec = refresh.get("DesiredConfiguration", {}).get("LaunchTemplate") or {}
    version = str(spec.get("Version") or "")
    if not spec.get("LaunchTemplateId") or _VERSION_RE.fullmatch(version) is None:
        return None
    return str(spec["LaunchTemplateId"]), int(version)


def _ours(
    fleet: AsgFleet, template: Template, source: Mapping[str, Any], refresh: Mapping[str, Any], image_id: str
) -> bool:
    """An active refresh to a numbered version of the group's template that is what `version_holding` gives: the
    group's version `source` with `image_id` and nothing else changed (see the module)."""
    desired = _desired(refresh)
    if desired is None or desired[0] != template.template_id:
        return False
    target = describe_versions(fleet.session, fleet.region, template, {desired[1]}).get(desired[1])
    return target is not None and target.get("LaunchTemplateData") == created_from(source, image_id)


def _status(refresh: Mapping[str, Any]) -> RefreshStatus:
    return RefreshStatus(
        refresh_id=str(refresh["InstanceRefreshId"]),
        status=str(refresh.get("Status") or ""),
        percentage_complete=int(refresh.get("PercentageComplete") or 0),
        instances_to_update=int(refresh.get("InstancesToUpdate") or 0),
        status_reason=str(refresh.get("StatusReason") or ""),
    )
