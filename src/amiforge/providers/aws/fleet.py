"""An Auto Scaling group as a `Fleet`: the rollout controller's self-run canary on AWS, wave by wave.

`AsgFleet(session, region, group)` replaces members of a group that launches from a launch template by terminating
them inside the group, so the group itself launches their replacements from a new template version. No instance is
launched outside the group; the group keeps its desired capacity, subnets, load balancers and lifecycle hooks.

## replace(replacements, artifact, release, checks)

Reads first, refuses before anything is written:
1. The image must be `available` in the region. The group must exist, launch from a launch template and carry the
   opt-in tag `amiforge:rollout=enabled` (the IAM policy for "rollout" only lets amiforge change groups with that tag,
   see iam.py). Refused with a fix: a launch configuration (no versions to roll between), a mixed instances policy
   (its overrides may name other templates; not handled), a group on `$Latest` (below), and a group whose version
   launches a Xen instance type (DescribeInstanceTypes' Hypervisor): EC2 gives the latest console output only on
   the Nitro hypervisor and posts a Xen instance's console only around boot, reboot and termination, so its
   readiness line may never be seen and a good image would be judged not ready. Refresh mode refuses the same.
2. Version rule. The group's version is resolved to a number `source`: a number as is, `$Default` (or no version) to
   the template's default. `$Latest` is refused: creating our version would itself change what the group launches
   (every scale-out or health replacement from then on, before and outside the rollout), and setting the group back
   to `$Latest` could never restore the old image, since `$Latest` would then *be* the new one — rollback would be
   impossible. `$Default` is safe (a new version never changes the default) and so is any number.
   `templates.version_holding` (shared with publish) gives the numeric version that is `source` with the artifact's
   AMI id: `source` itself if it holds the image, else the newest version after `source` if it is exactly what would
   be created (made by an interrupted call), else a new version created from `source` with a ClientToken derived from
   what it is made of.
   The group is pointed at that number (UpdateAutoScalingGroup); the template's default is never moved (that is the
   channel's publication, owned by promote/publish).
3. Per replacement (old member O, token T), unless an instance tagged `amiforge:replacement=T` exists already:
   tag O `amiforge:replaced-by=T` (the intent, durable before the destructive call), then
   TerminateInstanceInAutoScalingGroup(O, ShouldDecrementDesiredCapacity=False). The group launches a replacement from
   the version of step 2. All of a call's members are terminated before any is waited for: the wave is the
   controller's unit of capacity, so at most the wave is booting at once.
4. Claim: poll the group until every O terminated for a token has a replacement: an InService/Pending, Healthy
   member on the new AMI that carries no replacement tag, newest first (they are interchangeable: same template
   version; the newest are the ones launched for our terminations, older ones are scale-outs). It is
   tagged `amiforge:replacement=T`, `amiforge:version=<ref>`, `amiforge:group`, `amiforge:replaces=O` (+ when, +
   O's version) in one CreateTags — never `amiforge:managed`: the instance is the group's, not amiforge's (IAM
   allows a rollout's tags only without that key, iam.py TagOthers). Claims for members terminated by this fleet
   (tagged replaced-by) come first; a member that was already gone without our tag (the group replaced it on its own)
   takes a left-over candidate if there is one, else it is returned as a `stopped` member with its old id: nothing
   was launched for it, and no other instance is terminated in its place.
5. Wait, with `bake.poll` (doubling delays, injectable sleep/clock), until each new member is ready or failed.
   Ready: a complete `AMIFORGE-READY <uptime>` line on its console (GetConsoleOutput, as the boot test reads it:
   one `ConsoleReader` and `ConsoleLog` per instance for the fleet's life, joining EC2's 64 KB windows; a line still
   being written does not count) with an uptime of at most `checks.ready_within`; time-to-ready is that uptime.
   Failed: the line shows a longer uptime; the instance is Unhealthy, leaves the group or stops; or no line by
   `LaunchTime + ready_within + console_grace` (EC2 publishes console output with a delay; the failure says when
   the console wrote more than EC2's window between two reads, so the line may have been lost). The outcome is
   written on the instance (`amiforge:ready=<uptime>`, or `amiforge:failed=<why>` + `amiforge:failed-at`), so it is
   decided once and later calls read it back. `checks`' units/commands/ports are not run on fleet members (they ran
   at the boot test; that would need SSM on them).
   The old member is already gone by then (the group terminated it to make room): a new member that fails is
   returned as failed and stays in the group; the controller rolls back by replacing *it* with the old version.

Idempotency per token, the property a resumed controller relies on (a kill -9 between any two calls): everything
the fleet knows is in tags, re-read at the start of every call, never in local state (tokens are looked up among the
instances tagged `amiforge:group=<group>`, so another group's token is never ours; what it keeps in memory is only
what the consoles showed, which a new fleet reads again). Before the version exists, a
rerun makes it (ClientToken, or the "newest after source" reuse); after, it finds it; once the group points at it,
`source` holds the image and nothing is created. O is terminated only for its own token and only while it is still
a member; a token is bound to its O by the replaced-by tag, so a rerun never terminates anything else for it, and a
member asked again under a second token is refused. A claim tags exactly one untagged instance per token and skips
tokens that have one, so a resumed call finds its replacement instead of terminating another instance; a
replacement the group launched before the crash but that was never tagged is claimed by the rerun. No instance is
lost: the group keeps its desired capacity throughout, and nothing here decrements it. (Tag reads are eventually
consistent on AWS: a rerun within a second or two of a claim could claim a second instance for the same token —
both on the new image, nothing terminated twice; the earliest is the token's.)

## current(), signals(since)

`current()`: the group's members (DescribeAutoScalingGroups + DescribeInstances, paged), each with the version from
its `amiforge:version` tag (None if absent), its AMI, and a state from its lifecycle/health and readiness (tags
first, the console for members not yet decided). `signals(since)`: for instances this fleet tagged (found by their
`amiforge:group` tag, so terminated ones count while EC2 still lists them, about an hour): launch (LaunchTime),
ready (LaunchTime + uptime, with time_to_ready), failed (when decided), replaced (the old member, when terminated).
Both only read.

Every AWS call goes through `clients.call`/`paginate`; the busy-group codes (ScalingActivityInProgress,
ResourceContention) are retryable in errors.py and retried here with the same `Wait`. A rollout target names a group
as `aws:REGION/GROUP`; `parse_group_target` reads the part after `aws:`.

AWS-managed instance refresh (StartInstanceRefresh with checkpoints and auto-rollback) is refresh.py: it replaces
by percentage on AWS's own schedule, judged by AWS health checks and alarms; this class only forwards to it.

`alarms_firing` reads metric, composite and log alarms alike (DescribeAlarms answers metric alarms only unless
AlarmTypes names the others).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from amiforge.awsapi.clients import AwsSession, call, paginate
from amiforge.errors import ConfigError, InfraError, NotFound, StateError
from amiforge.model import Artifact
from amiforge.providers.aws import refresh
from amiforge.providers.aws.asg_records import (
    ACTIVE_STATES,
    EC2_ALIVE,
    FAILED_AT_TAG,
    FAILED_TAG,
    GROUP_TAG,
    IMAGE_ID_RE,
    KIND_ORDER,
    READY_TAG,
    REPLACED_AT_TAG,
    REPLACED_BY_TAG,
    REPLACED_VERSION_TAG,
    REPLACES_TAG,
    ROLLOUT_ENABLED,
    ROLLOUT_TAG,
    TAG_VALUE_MAX,
    TOKEN_TAG,
    VERSION_RE,
    VERSION_TAG,
    Claim,
    Group,
    Instance,
    as_member,
    chunks,
    float_or_none,
    parse_time,
)
from amiforge.providers.aws.console import ConsoleFactory, ConsoleLog, ConsoleReader, ready_uptime
from amiforge.providers.aws.images import describe_image, instance_type_info, parse_aws_time
from amiforge.providers.aws.templates import (
    Template,
    client_token,
    describe_versions,
    find_template,
    version_holding,
)
from amiforge.providers.interface import BootSignal, Member, MemberState, RefreshStatus, Release, Replacement
from amiforge.recipe import Checks
from amiforge.waiting import Wait, poll, retry

__all__ = ["CONSOLE_GRACE", "AsgFleet"]

T = TypeVar("T")

# EC2 publishes console output with a delay (minutes on older instance types): added to ready_within.
CONSOLE_GRACE: Final = 300.0
# DescribeAlarms' AlarmTypes (each type's alarms come under the key "<type>s") and its limit of 100 AlarmNames.
_ALARM_TYPES: Final = ("MetricAlarm", "CompositeAlarm", "LogAlarm")
_ALARM_NAMES_MAX: Final = 100
# The instances' own reports (guest_files/cloudwatch): CloudWatch's namespace for them, how far back a heartbeat is
# looked for (the image's heartbeat_within is minutes: 3 by default), and GetMetricData's limit of queries a call.
METRIC_NAMESPACE: Final = "amiforge"
HEARTBEAT_LOOKBACK: Final = timedelta(minutes=15)
_QUERIES_MAX: Final = 500
# What was heard of each instance, by (region, instance id): (when it was asked, monotonic; the heartbeat or None).
# `amiforge serve` collects every 15 s; GetMetricData is billed per metric asked for, and its data has minutes.
_HEARD: dict[tuple[str, str], tuple[float, datetime | None]] = {}
_HEARD_LOCK = threading.Lock()
_HEARD_TTL: Final = 60.0


class AsgFleet:
    """An Auto Scaling group launching from a launch template, as a `Fleet` (see the module docstring).

    `wait`: delays and the deadline for the group to launch replacements and to stop being busy; its `sleep` and
    `clock` are the ones every wait uses. `now`: the wall clock readiness deadlines and recorded times use (EC2's
    LaunchTime is wall-clock time). `console_grace`: added to `checks.ready_within` for EC2's console delay.
    `console_reader`: how an instance's console is read (console.ConsoleReader; tests inject fakes)."""

    def __init__(
        self,
        session: AwsSession,
        region: str,
        group: str,
        *,
        wait: Wait = Wait(first_delay=5.0, max_delay=15.0, deadline=600.0),
        console_grace: float = CONSOLE_GRACE,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        console_reader: ConsoleFactory = ConsoleReader,
    ) -> None:
        self.session = session
        self.region = region
        self.target = group
        self.wait = wait
        self.console_grace = console_grace
        self._now = now
        self._console_reader = console_reader
        # One console per instance for the fleet's life: its reader remembers a Xen type's fallback, its log joins
        # EC2's sliding windows. Dropped once the readiness line is seen; the line's uptime is kept instead.
        self._consoles: dict[str, ConsoleLog] = {}
        self._ready_seen: dict[str, float] = {}
        self._hypervisors: dict[str, str] = {}

    def now(self) -> datetime:
        """The fleet's wall clock (readiness deadlines are measured with it)."""
        return self._now()

    # --- the RefreshingFleet protocol: AWS replaces the instances (providers/aws/refresh.py) ----------------------

    def start_refresh(
        self,
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
        return refresh.start_refresh(
            self,
            artifact,
            version_ref,
            checkpoints=checkpoints,
            checkpoint_delay=checkpoint_delay,
            alarms=alarms,
            token=token,
            min_healthy_percentage=min_healthy_percentage,
            auto_rollback=auto_rollback,
        )

    def refresh_status(self, refresh_id: str) -> RefreshStatus:
        return refresh.refresh_status(self, refresh_id)

    def roll_back_refresh(self, refresh_id: str) -> RefreshStatus:
        return refresh.roll_back_refresh(self, refresh_id)

    def refresh_batch_time(self) -> dict[str, float]:
        return refresh.batch_time(self)

    # --- the Fleet protocol ---------------------------------------------------------------------------------------

    def current(self) -> list[Member]:
        group = self._group()
        instances = self._instances(group.members)
        members = []
        for instance_id, record in group.members.items():
            instance = instances.get(instance_id)
            if instance is not None:  # not yet visible to DescribeInstances: it shows on the next call
                members.append(self._member_now(instance, record))
        return sorted(members, key=lambda m: (m.launched_at, m.id))

    def replace(
        self, replacements: Sequence[Replacement], artifact: Artifact, release: Release, checks: Checks
    ) -> list[Member]:
        # The AMI carries its release file from its bake; the instances are tagged with the version.
        version_ref = release.version
        image_id = self._check_request(replacements, artifact, version_ref)
        if not replacements:
            return []
        describe_image(self.session, self.region, image_id)  # NotFound before anything is written
        group = self._group()
        template, source = self._check_group(group)
        target = version_holding(
            self.session,
            self.region,
            template,
            source=source,
            image_id=image_id,
            token=client_token("fleet", group.name, template.template_id, str(source), image_id, version_ref),
            description=f"amiforge {version_ref} ({image_id}) for group {group.name}, from version {source}",
        )
        if group.raw["LaunchTemplate"].get("Version") != str(target):
            self._busy_retry(
                f"pointing group {group.name} at version {target}",
                lambda: self.asg_call(
                    "UpdateAutoScalingGroup",
                    AutoScalingGroupName=group.name,
                    LaunchTemplate={"LaunchTemplateId": template.template_id, "Version": str(target)},
                ),
            )
        claims = self._start(group, replacements, image_id)
        self._claim(claims, image_id, version_ref)
        return self._await(claims, version_ref, checks)

    def rollout_group(self) -> tuple[Mapping[str, Any], Template, int]:
        """The group as replace() checks it before any write: its DescribeAutoScalingGroups record, its launch
        template and the number its version resolves to. ConfigError with a fix for a launch configuration, a mixed
        instances policy, a group without the opt-in tag, or `$Latest` (NotFound for no such group). Shared with
        refresh.py, which refuses more (it also needs the version to be a number)."""
        group = self._group()
        template, source = self._check_group(group)
        return group.raw, template, source

    def alarms_firing(self, names: Sequence[str]) -> list[str]:
        """The named CloudWatch alarms (in the group's region; metric, composite or log alarms) in state ALARM. An
        alarm that does not exist is an error, not a pass: a typo in a strategy must not switch a gate off."""
        if not names:
            return []
        cloudwatch = self.session.client("cloudwatch", self.region)
        found: dict[str, str] = {}
        wanted = sorted(set(names))
        for chunk in (wanted[i : i + _ALARM_NAMES_MAX] for i in range(0, len(wanted), _ALARM_NAMES_MAX)):
            # Without AlarmTypes, DescribeAlarms answers metric alarms only: a composite (or log) alarm named as a
            # gate would be reported missing. Every type is asked for; their lists come in separate keys.
            kwargs: dict[str, Any] = {"AlarmNames": chunk, "AlarmTypes": list(_ALARM_TYPES), "MaxRecords": 100}
            # Not clients.paginate: it yields the items of one result key, and a page of DescribeAlarms holds all
            # three (MetricAlarms, CompositeAlarms, LogAlarms); one paginate per type would triple the calls of
            # every poll. (It would not set MaxRecords either: it sizes pages only through MaxResults.)
            while True:
                page = call(cloudwatch, "DescribeAlarms", ", ".join(chunk), **kwargs)
                for kind in _ALARM_TYPES:
                    found.update((str(a["AlarmName"]), str(a["StateValue"])) for a in page.get(f"{kind}s", []))
                if not page.get("NextToken"):
                    break
                kwargs["NextToken"] = page["NextToken"]
        missing = sorted(set(names) - set(found))
        if missing:
            raise ConfigError(
                f"CloudWatch alarm(s) {', '.join(missing)} do not exist in {self.region}",
                fix="fix the names in the strategy's gates.alarms",
            )
        return [name for name in names if found[name] == "ALARM"]

    def observe(self, since: datetime) -> tuple[list[Member], list[BootSignal]]:
        # Two sources read one after the other: the signals first, so an instance launched between the two reads is
        # listed by current() and never taken for one gone (the collector stops what signals name and current() not).
        signals = self.signals(since)
        return self.current(), signals

    def signals(self, since: datetime) -> list[BootSignal]:
        out: dict[tuple[str, str], BootSignal] = {}
        tagged = self._tagged()
        alive = {i.id: i for i in tagged if TOKEN_TAG in i.tags and i.state in EC2_ALIVE}
        for instance_id, at in self._heartbeats(sorted(alive)).items():
            ref = alive[instance_id].tags.get(VERSION_TAG)
            out[(instance_id, "heartbeat")] = BootSignal(instance_id, "heartbeat", at, ref)
        for instance in tagged:
            tags = instance.tags
            if REPLACED_BY_TAG in tags:  # an old member this fleet terminated (while EC2 still lists it)
                at = parse_time(tags.get(REPLACED_AT_TAG)) or instance.launched_at
                detail = f"replaced under token {tags[REPLACED_BY_TAG]}"
                out[(instance.id, "replaced")] = BootSignal(
                    instance.id, "replaced", at, tags.get(VERSION_TAG), None, detail
                )
            if TOKEN_TAG not in tags:
                continue
            ref = tags.get(VERSION_TAG)
            out[(instance.id, "launch")] = BootSignal(instance.id, "launch", instance.launched_at, ref)
            uptime = float_or_none(tags.get(READY_TAG))
            if uptime is None and FAILED_TAG not in tags and instance.state in EC2_ALIVE:
                uptime = self._console_uptime(instance.id)  # ready, but no replace() call has recorded it yet
            if uptime is not None:
                at = instance.launched_at + timedelta(seconds=uptime)
                out[(instance.id, "ready")] = BootSignal(instance.id, "ready", at, ref, uptime)
            if FAILED_TAG in tags:
                at = parse_time(tags.get(FAILED_AT_TAG)) or instance.launched_at
                why = tags[FAILED_TAG]
                out[(instance.id, "failed")] = BootSignal(instance.id, "failed", at, ref, None, why, _timed_out(why))
            old = tags.get(REPLACES_TAG)
            # The old member's own replaced-by tag and this replaces tag describe one event; the old one's wins.
            if old and (old, "replaced") not in out:
                at = parse_time(tags.get(REPLACED_AT_TAG)) or instance.launched_at
                out[(old, "replaced")] = BootSignal(
                    old, "replaced", at, tags.get(REPLACED_VERSION_TAG), None, f"replaced by {instance.id}"
                )
        chosen = sorted(out.values(), key=lambda s: (s.at, KIND_ORDER[s.kind], s.member))
        return [s for s in chosen if s.at >= since]

    def _heartbeats(self, instance_ids: Sequence[str]) -> dict[str, datetime]:
        """When each instance last reported a heartbeat to CloudWatch (guest_files/cloudwatch: metric Heartbeat in
        namespace amiforge, its InstanceId series), within HEARTBEAT_LOOKBACK; an instance with none is absent. The
        time is the end of the minute it fell in (CloudWatch keeps minutes), or now if that is later: a beat every
        60 s then always looks at most a minute old, not two. Asked at most once a minute per instance (the data has
        minute resolution, and each metric asked for is billed: _HEARD)."""
        end = self._now()
        asked = time.monotonic()
        with _HEARD_LOCK:
            for key in [k for k, (at, _) in _HEARD.items() if asked - at > 600]:
                del _HEARD[key]  # instances long gone
            known = {i: _HEARD[(self.region, i)] for i in instance_ids if (self.region, i) in _HEARD}
        fresh = {i: heard for i, (at, heard) in known.items() if asked - at < _HEARD_TTL}
        stale = [i for i in instance_ids if i not in fresh]
        found = self._read_heartbeats(stale, end) if stale else {}
        with _HEARD_LOCK:
            _HEARD.update({(self.region, i): (asked, found.get(i)) for i in stale})
        return {i: at for i, at in {**fresh, **found}.items() if at is not None}

    def _read_heartbeats(self, instance_ids: Sequence[str], end: datetime) -> dict[str, datetime | None]:
        cloudwatch = self.session.client("cloudwatch", self.region)
        found: dict[str, datetime | None] = {}
        for chunk in (instance_ids[i : i + _QUERIES_MAX] for i in range(0, len(instance_ids), _QUERIES_MAX)):
            queries = [
                {"Id": f"h{n}", "ReturnData": True, "MetricStat": {
                    "Metric": {"Namespace": METRIC_NAMESPACE, "MetricName": "Heartbeat",
                               "Dimensions": [{"Name": "InstanceId", "Value": instance_id}]},
                    "Period": 60, "Stat": "SampleCount"}}
                for n, instance_id in enumerate(chunk)
            ]  # fmt: skip
            # EndTime a minute ahead: the current minute's datapoints count (the request's times have whole seconds:
            # a beat in the second of the call would fall after an EndTime of now).
            kwargs: dict[str, Any] = {
                "MetricDataQueries": queries, "StartTime": end - HEARTBEAT_LOOKBACK,
                "EndTime": end + timedelta(minutes=1), "ScanBy": "TimestampDescending",
            }  # fmt: skip
            while True:
                page = call(cloudwatch, "GetMetricData", f"heartbeats of group {self.target}", **kwargs)
                for result in page.get("MetricDataResults", []):
                    instance_id = chunk[int(str(result["Id"])[1:])]
                    beats = [t for t, v in zip(result.get("Timestamps", []), result.get("Values", []), strict=False)
                             if v > 0]  # fmt: skip
                    if beats:
                        start = max(t if t.tzinfo else t.replace(tzinfo=UTC) for t in beats)
                        latest = min(start + timedelta(seconds=60), end)
                        found[instance_id] = max(latest, found.get(instance_id) or latest)
                if not page.get("NextToken"):
                    break
                kwargs["NextToken"] = page["NextToken"]
        return found

    # --- replace, step by step ------------------------------------------------------------------------------------

    def artifact_problems(self, artifact: Artifact, version_ref: str, token: str | None = None) -> list[str]:
        """What is wrong with asking this group to run `artifact` as `version_ref` (and `token`); [] if nothing."""
        problems = []
        if artifact.provider != "aws" or artifact.region != self.region:
            problems.append(f"artifact is {artifact.provider} in {artifact.region}, not aws in {self.region}")
        if IMAGE_ID_RE.fullmatch(artifact.location) is None:
            problems.append(f"artifact location {artifact.location!r} is not an AMI id")
        if not version_ref or len(version_ref) >= TAG_VALUE_MAX:
            problems.append(f"version ref {version_ref!r} must be 1-255 characters (a tag value)")
        if token is not None and (not token or len(token) >= TAG_VALUE_MAX):
            problems.append("a token must be 1-255 characters (a tag value)")
        return problems

    def _check_request(self, replacements: Sequence[Replacement], artifact: Artifact, version_ref: str) -> str:
        problems = self.artifact_problems(artifact, version_ref)
        tokens = [r.token for r in replacements]
        members = [r.member for r in replacements]
        for what, values in (("token", tokens), ("member", members)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                problems.append(f"{what}s asked twice in one call: {', '.join(repeated)}")
        bad_tokens = [t for t in tokens if not t or len(t) >= TAG_VALUE_MAX]
        if bad_tokens:
            problems.append("a token must be 1-255 characters (a tag value)")
        if problems:
            raise ConfigError(
                f"cannot replace members of group {self.target}: " + "; ".join(problems),
                fix="distribute the version to this region first; give each replacement its own member and token",
            )
        return artifact.location

    def _check_group(self, group: Group) -> tuple[Template, int]:
        """The group's template and the number its version resolves to; ConfigError for what is not handled."""
        raw = group.raw
        name = group.name
        if raw.get("MixedInstancesPolicy"):
            raise ConfigError(
                f"group {name} uses a mixed instances policy, which amiforge does not roll out (its overrides may "
                "launch from other templates and instance types)",
                fix="give the group a plain launch template (LaunchTemplate, no MixedInstancesPolicy): neither the "
                "canary nor the instance refresh mode rolls out a mixed group",
            )
        if raw.get("LaunchConfigurationName") or not raw.get("LaunchTemplate"):
            raise ConfigError(
                f"group {name} launches from a launch configuration, not a launch template: there are no versions "
                "to roll forward and back between",
                fix=f"migrate it: aws autoscaling update-auto-scaling-group --auto-scaling-group-name {name} "
                "--launch-template LaunchTemplateId=<lt-…>,Version=<number>",
            )
        if group.tags.get(ROLLOUT_TAG) != ROLLOUT_ENABLED:
            raise ConfigError(
                f"group {name} is not tagged {ROLLOUT_TAG}={ROLLOUT_ENABLED}: amiforge only replaces instances of "
                "groups whose owner opted in (the IAM policy for `rollout` allows nothing else)",
                fix=f"aws autoscaling create-or-update-tags --tags ResourceId={name},ResourceType=auto-scaling-group,"
                f"Key={ROLLOUT_TAG},Value={ROLLOUT_ENABLED},PropagateAtLaunch=false",
            )
        spec = raw["LaunchTemplate"]
        version = str(spec.get("Version") or "$Default")
        if version == "$Latest":
            raise ConfigError(
                f"group {name} launches from $Latest of its launch template: the version a rollout creates would "
                "change what the group launches at once, outside the rollout, and $Latest could never be set back "
                "to the old image (rollback impossible)",
                fix=f"pin the group to a version number (or $Default): aws autoscaling update-auto-scaling-group "
                f"--auto-scaling-group-name {name} --launch-template LaunchTemplateId={spec.get('LaunchTemplateId')},"
                "Version=<number>",
            )
        template = find_template(self.session, self.region, template_id=str(spec["LaunchTemplateId"]))
        if version == "$Default":
            source = template.default
        elif VERSION_RE.fullmatch(version) is None:
            raise ConfigError(f"group {name} has launch template version {version!r}", fix="use a version number")
        else:
            source = int(version)
        self._refuse_xen(name, template, source)
        return template, source

    def _refuse_xen(self, name: str, template: Template, source: int) -> None:
        """ConfigError when the group launches a Xen instance type. A new member is judged by the readiness line on
        its console, and EC2 gives the latest console output only on the Nitro hypervisor; on Xen it posts a buffered
        copy shortly after a state change (start, stop, reboot, terminate), which may never show a line written
        later — a good image would be judged not ready and rolled back. Fleet members have no communicator to read
        the line another way, so such a group is refused before anything is replaced. (The instance type is the
        template version's: a mixed instances policy, whose overrides name others, is refused before this.)"""
        version = describe_versions(self.session, self.region, template, {source}).get(source)
        instance_type = str((version or {}).get("LaunchTemplateData", {}).get("InstanceType") or "")
        if not instance_type:  # nothing to judge: the group cannot launch from this version without a type either
            return
        if self._hypervisor(instance_type) == "xen":
            raise ConfigError(
                f"group {name} launches {instance_type} (launch template {template.name} version {source}), a Xen "
                "instance type: EC2 posts its console only around boot, reboot and termination, so the readiness "
                "line a new member writes may never be seen and a good image would be judged not ready",
                fix=f"give the group a Nitro instance type (e.g. t3, m5, m7i or newer; aws ec2 "
                f"describe-instance-types --instance-types {instance_type} shows Hypervisor): create a version of "
                f"{template.name} with another InstanceType and pin the group to it",
            )

    def _hypervisor(self, instance_type: str) -> str:
        """`nitro` or `xen` (DescribeInstanceTypes; '' for bare metal, which runs on the Nitro System without a
        hypervisor). ConfigError for a type EC2 does not offer in the region."""
        if instance_type not in self._hypervisors:
            found = instance_type_info(self.session, self.region, instance_type)
            if found is None:
                raise ConfigError(
                    f"group {self.target} launches {instance_type}, an instance type EC2 does not offer in "
                    f"{self.region}",
                    fix="give the group's launch template an instance type offered in its region",
                )
            self._hypervisors[instance_type] = str(found.get("Hypervisor") or "")
        return self._hypervisors[instance_type]

    def _start(self, group: Group, replacements: Sequence[Replacement], image_id: str) -> list[Claim]:
        """Find what earlier calls did for these tokens; mark and terminate the old members of the others."""
        tokens = [r.token for r in replacements]
        done: dict[str, list[Instance]] = {}
        for instance in self._tagged(TOKEN_TAG, tokens):
            done.setdefault(instance.tags[TOKEN_TAG], []).append(instance)
        marked = {i.tags[REPLACED_BY_TAG]: i for i in self._tagged(REPLACED_BY_TAG, tokens)}
        olds = self._instances([r.member for r in replacements])
        claims = []
        for r in replacements:
            old = olds.get(r.member)
            earlier = marked.get(r.token)
            if earlier is not None and earlier.id != r.member:
                raise StateError(
                    f"token {r.token} already replaced {earlier.id}, not {r.member}",
                    fix="a token belongs to one member: resume with the replacements as they were first asked",
                )
            other = old.tags.get(REPLACED_BY_TAG) if old is not None else None
            if other is not None and other != r.token:
                raise StateError(
                    f"member {r.member} is being replaced under token {other}, not {r.token}",
                    fix="resume with the token it was first asked under; never replace one member twice",
                )
            if r.token in done:
                new = min(done[r.token], key=lambda i: (i.launched_at, i.id))
                if new.image_id != image_id:
                    raise StateError(
                        f"token {r.token} already replaced {r.member} by {new.id} on {new.image_id}, not {image_id}",
                        fix="use a new token for another version (a rollback is a new replacement)",
                    )
                claims.append(Claim(r, True, old, new))
                continue
            if group.present(r.member):
                if other is None:
                    self._tag(
                        r.member, {GROUP_TAG: group.name, REPLACED_BY_TAG: r.token, REPLACED_AT_TAG: self._stamp()}
                    )
                self._terminate(r.member)
                claims.append(Claim(r, True, old))
            else:
                claims.append(Claim(r, earlier is not None or other is not None, old))
        return claims

    def _terminate(self, instance_id: str) -> None:
        def terminate() -> None:
            try:
                self.asg_call(
                    "TerminateInstanceInAutoScalingGroup", InstanceId=instance_id, ShouldDecrementDesiredCapacity=False
                )
            except ConfigError:
                # Auto Scaling answers ValidationError for an instance in no group. It was an active member a moment
                # ago, so it has just left (an earlier attempt whose answer was lost, or the group itself): that is
                # the outcome asked for. Anything else is not swallowed.
                if self._group().present(instance_id):
                    raise

        self._busy_retry(f"terminating {instance_id} in group {self.target}", terminate)

    def _claim(self, claims: list[Claim], image_id: str, version_ref: str) -> None:
        """Tag one new member on `image_id` per claim whose old member we terminated (see the module docstring)."""
        waiting = [c for c in claims if c.new is None and c.ours]
        strays = [c for c in claims if c.new is None and not c.ours]
        if not waiting and not strays:
            return

        def round_() -> bool | None:
            group = self._group()
            instances = self._instances(group.members)
            candidates = sorted(
                (
                    i
                    for i in instances.values()
                    if group.active(i.id)
                    and group.members[i.id].get("HealthStatus") == "Healthy"
                    and i.state in EC2_ALIVE
                    and i.image_id == image_id
                    and TOKEN_TAG not in i.tags
                    and REPLACED_BY_TAG not in i.tags
                ),
                # Newest first: the group launched our replacements after our terminations; an older untagged
                # instance on the image (a scale-out) is taken only when nothing newer is left.
                key=lambda i: (i.launched_at, i.id),
                reverse=True,
            )
            for claim in [c for c in waiting if c.new is None]:
                if not candidates:
                    return None
                claim.new = self._take(candidates.pop(0), claim, version_ref)
            for claim in strays:
                if candidates:
                    claim.new = self._take(candidates.pop(0), claim, version_ref)
            return True

        try:
            poll(f"replacements launching in group {self.target}", round_, self.wait)
        except InfraError as e:
            missing = ", ".join(c.replacement.member for c in waiting if c.new is None)
            raise InfraError(
                f"group {self.target} launched no replacement on {image_id} for {missing} within "
                f"{self.wait.deadline:.0f}s",
                retryable=True,
                fix=f"check the group's scaling activities (aws autoscaling describe-scaling-activities "
                f"--auto-scaling-group-name {self.target}); re-running with the same tokens resumes",
            ) from e

    def _take(self, instance: Instance, claim: Claim, version_ref: str) -> Instance:
        tags = {
            TOKEN_TAG: claim.replacement.token,
            VERSION_TAG: version_ref,
            GROUP_TAG: self.target,
            REPLACES_TAG: claim.replacement.member,
        }
        old = claim.old
        if old is not None:
            tags[REPLACED_AT_TAG] = old.tags.get(REPLACED_AT_TAG) or self._stamp()
            if VERSION_TAG in old.tags:
                tags[REPLACED_VERSION_TAG] = old.tags[VERSION_TAG]
        self._tag(instance.id, tags)
        return Instance(instance.id, instance.image_id, instance.state, instance.launched_at, {**instance.tags, **tags})

    def _await(self, claims: list[Claim], version_ref: str, checks: Checks) -> list[Member]:
        decided: dict[str, Member] = {}
        for claim in claims:
            if claim.new is None:
                old = claim.old
                decided[claim.replacement.token] = Member(
                    id=claim.replacement.member,
                    version_ref=old.tags.get(VERSION_TAG) if old is not None else None,
                    location=old.image_id if old is not None else "",
                    state="stopped",
                    launched_at=old.launched_at if old is not None else self._now(),
                    detail="gone before amiforge replaced it (the group replaced it itself) and no new member was "
                    "left to claim: nothing was launched for it",
                )
        pending = {c.replacement.token: c.new.id for c in claims if c.new is not None}

        def round_() -> bool | None:
            group = self._group()
            instances = self._instances(pending.values())
            for token, instance_id in pending.items():
                instance = instances.get(instance_id)
                if token in decided or instance is None:
                    continue
                member = self._judge(instance, group.members.get(instance_id), checks)
                if member.state != "launching":
                    decided[token] = member
            return True if all(t in decided for t in pending) else None

        if pending:
            longest = checks.ready_within + self.console_grace + self.wait.deadline
            poll(f"new members of group {self.target} becoming ready", round_, self.wait.until(longest))
        return [decided[c.replacement.token] for c in claims]

    def _judge(self, instance: Instance, record: Mapping[str, Any] | None, checks: Checks) -> Member:
        """The member as replace() decides it; a decision (ready or failed) is recorded on the instance once."""
        tags = instance.tags
        state: MemberState = "launching"
        time_to_ready: float | None = None
        detail = ""
        lifecycle = str(record.get("LifecycleState")) if record is not None else "gone"
        deadline = instance.launched_at + timedelta(seconds=checks.ready_within + self.console_grace)
        if FAILED_TAG in tags:
            state, detail = "failed", tags[FAILED_TAG]
        elif REPLACED_BY_TAG in tags and lifecycle not in ACTIVE_STATES:
            # Replaced on purpose since (a rollback): it did not fail, it is gone.
            state, detail = "stopped", f"replaced under token {tags[REPLACED_BY_TAG]}"
        elif instance.state not in EC2_ALIVE or lifecycle not in ACTIVE_STATES:
            state, detail = "failed", f"left the group before it was ready (instance {instance.state}, {lifecycle})"
        elif record is not None and record.get("HealthStatus") == "Unhealthy":
            state, detail = "failed", "the group marks it Unhealthy"
        elif READY_TAG in tags:
            state, time_to_ready, detail = "ready", float_or_none(tags[READY_TAG]), f"ready after {tags[READY_TAG]}s"
        else:
            uptime = self._console_uptime(instance.id)
            if uptime is not None and uptime <= checks.ready_within:
                state, time_to_ready, detail = "ready", uptime, f"ready after {uptime:g}s"
                self._tag(instance.id, {READY_TAG: f"{uptime:g}"})
            elif uptime is not None:
                state, detail = "failed", f"ready after {uptime:g}s, more than {checks.ready_within:g}s"
            elif self._now() > deadline:
                state = "failed"
                detail = (
                    f"no AMIFORGE-READY on its console within {checks.ready_within:g}s "
                    f"(+{self.console_grace:g}s for EC2's console delay) of its launch"
                )
                if self._console_lossy(instance.id):
                    detail += " (its console wrote more than EC2's 64 KB window between reads: the line may be lost)"
            else:
                detail = "waiting for AMIFORGE-READY on its console"
        if state == "failed" and FAILED_TAG not in tags:
            self._tag(instance.id, {FAILED_TAG: detail[: TAG_VALUE_MAX - 1], FAILED_AT_TAG: self._stamp()})
        return as_member(instance, state, time_to_ready, detail)

    def _member_now(self, instance: Instance, record: Mapping[str, Any]) -> Member:
        """A member as current() reports it: read only, nothing recorded."""
        tags = instance.tags
        lifecycle = str(record.get("LifecycleState"))
        state: MemberState
        time_to_ready: float | None = None
        if FAILED_TAG in tags:
            state, detail = "failed", tags[FAILED_TAG]
        elif lifecycle not in ACTIVE_STATES or instance.state not in EC2_ALIVE:
            state, detail = "stopped", f"{lifecycle}, instance {instance.state}"
        elif record.get("HealthStatus") == "Unhealthy":
            state, detail = "failed", "the group marks it Unhealthy"
        elif READY_TAG in tags:
            state, time_to_ready, detail = "ready", float_or_none(tags[READY_TAG]), f"ready after {tags[READY_TAG]}s"
        else:
            time_to_ready = self._console_uptime(instance.id)
            if time_to_ready is not None:
                state, detail = "ready", f"ready after {time_to_ready:g}s"
            else:
                state, detail = "launching", "no AMIFORGE-READY on its console yet"
        return as_member(instance, state, time_to_ready, detail)

    # --- reads and writes -----------------------------------------------------------------------------------------

    def asg_call(self, operation: str, **kwargs: Any) -> Any:
        """An Auto Scaling call about this group, through the one error table."""
        return call(self.session.client("autoscaling", self.region), operation, f"group {self.target}", **kwargs)

    def _group(self) -> Group:
        found = [
            g
            for g in paginate(
                self.session.client("autoscaling", self.region),
                "DescribeAutoScalingGroups",
                "AutoScalingGroups",
                f"group {self.target}",
                AutoScalingGroupNames=[self.target],
            )
            if g.get("AutoScalingGroupName") == self.target
        ]
        if not found:
            raise NotFound(
                f"Auto Scaling group {self.target} does not exist in {self.region}",
                fix="check the group name and the region (aws autoscaling describe-auto-scaling-groups)",
            )
        raw = found[0]
        members = {str(i["InstanceId"]): i for i in raw.get("Instances", [])}
        return Group(self.target, raw, members)

    def _describe(self, filters: list[dict[str, Any]], what: str) -> list[Instance]:
        ec2 = self.session.client("ec2", self.region)
        out = []
        for reservation in paginate(ec2, "DescribeInstances", "Reservations", what, Filters=filters):
            for i in reservation.get("Instances", []):
                out.append(
                    Instance(
                        id=str(i["InstanceId"]),
                        image_id=str(i.get("ImageId") or ""),
                        state=str(i.get("State", {}).get("Name") or ""),
                        launched_at=parse_aws_time(i["LaunchTime"]).astimezone(UTC),
                        tags={str(t["Key"]): str(t.get("Value", "")) for t in i.get("Tags", [])},
                    )
                )
        return out

    def _instances(self, ids: Iterable[str]) -> dict[str, Instance]:
        """The instances `ids` by id (a filter, not InstanceIds: an unknown id is then absent, not an error)."""
        wanted = sorted(set(ids))
        out: dict[str, Instance] = {}
        for chunk in chunks(wanted):
            filters = [{"Name": "instance-id", "Values": chunk}]
            out.update((i.id, i) for i in self._describe(filters, f"instances of group {self.target}"))
        return out

    def _tagged(self, key: str | None = None, values: Sequence[str] = ()) -> list[Instance]:
        """The instances this fleet tagged (`amiforge:group`), in any state; with `key`, only those whose tag `key`
        has one of `values` (tokens are looked up within the group: another group's token is not ours)."""
        group = {"Name": f"tag:{GROUP_TAG}", "Values": [self.target]}
        if key is None:
            return self._describe([group], f"instances tagged {GROUP_TAG}={self.target}")
        out: list[Instance] = []
        for chunk in chunks(sorted(set(values))):
            out += self._describe([group, {"Name": f"tag:{key}", "Values": chunk}], f"instances tagged {key}")
        return out

    def _tag(self, instance_id: str, tags: Mapping[str, str]) -> None:
        ec2 = self.session.client("ec2", self.region)
        call(
            ec2,
            "CreateTags",
            instance_id,
            Resources=[instance_id],
            Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
        )

    def _console_uptime(self, instance_id: str) -> float | None:
        """The uptime on the instance's complete readiness line, once its console has shown one (None: not yet).
        Once seen it is kept: the line scrolls out of EC2's 64 KB window as the instance goes on writing."""
        if instance_id in self._ready_seen:
            return self._ready_seen[instance_id]
        log = self._consoles.get(instance_id)
        if log is None:
            log = self._consoles[instance_id] = ConsoleLog(self._console_reader(self.session, self.region, instance_id))
        uptime = ready_uptime(log.read())
        if uptime is not None:
            self._ready_seen[instance_id] = uptime
            del self._consoles[instance_id]  # nothing more to read there
        return uptime

    def _console_lossy(self, instance_id: str) -> bool:
        """Whether the instance's console may have lost text between reads (more than EC2's window at a time)."""
        log = self._consoles.get(instance_id)
        return log is not None and log.lossy

    def _busy_retry(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, again while it fails with a retryable error (a busy group: ScalingActivityInProgress,
        ResourceContention; throttling botocore gave up on), until `wait.deadline`."""
        try:
            return retry(fn, again=lambda e: isinstance(e, InfraError) and e.retryable, wait=self.wait)
        except InfraError as e:
            raise InfraError(f"{what}: {e.message}", retryable=e.retryable, fix=e.fix) from e

    def _stamp(self) -> str:
        return self._now().astimezone(UTC).isoformat(timespec="seconds")


def _timed_out(failure: str) -> bool:
    """Whether a failure `_judge` recorded was readiness not coming in time (M1 counts it as a timeout)."""
    return failure.startswith(("no AMIFORGE-READY", "ready after"))
