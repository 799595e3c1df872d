"""What the Auto Scaling fleet (providers/aws/fleet.py) needs from EC2 and Auto Scaling that moto 5.2.5 lacks, emulated
in-process; tested in test_moto_emulation.py.

What moto does, measured with small scripts against moto 5.2.5 (boto3 1.44.8):

- TerminateInstanceInAutoScalingGroup, ShouldDecrementDesiredCapacity=False: the old instance is detached and
  terminated, and a replacement is launched *synchronously, inside the same call*, from the group's image: moto
  resolves the group's LaunchTemplate.Version (a number, `$Latest` or `$Default`) for the ImageId and InstanceType,
  so an UpdateAutoScalingGroup to version N really makes the next launch use N's AMI. Desired capacity is unchanged.
  Gaps: (1) AWS terminates asynchronously: the instance shows LifecycleState `Terminating` for a while and the
  replacement appears later (Pending, then InService); in moto nothing is ever seen in between. (2) moto deletes the
  `aws:autoscaling:groupName` tag of the terminated instance (AWS keeps its tags until it disappears). (3) An
  instance that is in no group (or already terminated) makes moto raise a bare `StopIteration` out of the boto3
  call; AWS answers `ValidationError` ("Instance Id not found - No managed instance found for instance ID …").
- The rest of a launch from a template comes from the template's *default* version, not the group's: user data,
  key, security groups, block devices and the `aws:ec2launchtemplate:version` tag (always the default number), and
  DescribeAutoScalingGroups reports every instance's LaunchTemplate.Version as the default number. Not emulated: the
  fleet reads the AMI from DescribeInstances and its own tags, never these.
- CreateLaunchTemplateVersion ignores SourceVersion (the new version holds only the fields passed, so InstanceType
  is lost and ASG launches get InstanceType "") and ignores ClientToken (the same token twice makes two versions).
- GetConsoleOutput always answers the same fixed Xen boot log of 2006 for any instance (base64 on the wire, which
  botocore decodes, as it does AWS's): never an `AMIFORGE-READY` line, and never the answer without Output that EC2
  gives before it has captured anything (right after a launch).
- Health: instances are InService/Healthy at once; SetInstanceHealth(Unhealthy) is recorded and shown, but the group
  never replaces an unhealthy instance (AWS would). Not emulated: the fleet reports an Unhealthy member as failed, which
  is all the tests need.
- DescribeAutoScalingGroups honours MaxRecords/NextToken (default 50, more than 100 is a server error), and
  DescribeScalingActivities records nothing.

The emulations, each as small as the fleet's tests need:

- `LaunchTemplateEmulation`: a new version inherits its SourceVersion's data, the fields passed replacing whole
  top-level keys (as EC2 does); the same ClientToken for the same template and request answers the version it made
  first (another request under a used token is IdempotentParameterMismatch).
- `AsgEmulation`: TerminateInstanceInAutoScalingGroup as on AWS: an instance in no group is a ValidationError; the
  instance is terminated in EC2 (tags kept) and stays in the group as `Terminating` for `launch_after` observations of
  the group (DescribeAutoScalingGroups or DescribeAutoScalingInstances calls); then it leaves the group and, unless
  the capacity was decremented, exactly one replacement is launched from the group's current version.
- `InstanceRefreshEmulation`: moto 5.2.5 raises NotImplementedError for StartInstanceRefresh,
  DescribeInstanceRefreshes, RollbackInstanceRefresh and CancelInstanceRefresh (checked). Emulated here: Start
  records a refresh `Pending` (a second one while one is active: InstanceRefreshInProgress); every
  DescribeInstanceRefreshes of the group advances each active refresh one step: Pending → InProgress; InProgress
  replaces the next batch (at most what MinHealthyPercentage allows, never past the next checkpoint) by terminating
  the instances in EC2 and launching replacements from the desired template version; at a checkpoint below 100 it is
  `Baking` for ceil(CheckpointDelay / `seconds_per_look`) looks; after the last batch `Successful`, and the group is
  then pointed at the desired configuration (as AWS does). An instance already on the desired version's AMI is skipped
  with SkipMatching ("matching" is judged by AMI id: moto does not track an instance's template version). A named
  alarm in ALARM (moto's CloudWatch state, set with set_alarm_state) fails the refresh, or with AutoRollback starts
  the rollback. RollbackInstanceRefresh (no active refresh: ActiveInstanceRefreshNotFound; previous version not a
  number: IrreversibleInstanceRefresh) → `RollbackInProgress`, whose looks put each instance the refresh launched back
  on the previous version, batch by batch, then `RollbackSuccessful`. Not emulated: Cancel, InstanceWarmup, health
  checks, MaxRecords/NextToken, mixed instances policies, `$Latest`/`$Default` validation of a desired configuration.
- `ConsoleEmulation`: GetConsoleOutput answers nothing for the first `delay_reads` reads of each instance (EC2's
  console delay), then a boot log ending in `AMIFORGE-READY <uptime>`, the uptime per AMI (`uptime`, else
  `default_uptime`); an AMI in `never_ready` boots to a log without that line, like an image whose services hang.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from moto.autoscaling.exceptions import AutoscalingClientError, ValidationError
from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup, InstanceState, TerminateInstanceActivity
from moto.autoscaling.responses import AutoScalingResponse
from moto.cloudwatch.models import cloudwatch_backends
from moto.core.responses import ActionResult
from moto.core.types import Base64EncodedString
from moto.core.utils import utcnow
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.responses.general import General
from moto.ec2.responses.launch_templates import LaunchTemplates

from amiforge.providers.aws.asg_records import ROLLOUT_ENABLED, ROLLOUT_TAG
from amiforge.waiting import Wait

BOOT_LOG = (
    "[    0.000000] Linux version 6.1.0-amiforge (debian) #1 SMP PREEMPT_DYNAMIC\n"
    "[    1.204511] EXT4-fs (nvme0n1p1): mounted filesystem with ordered data mode\n"
    "[    3.118702] systemd[1]: Reached target multi-user.target - Multi-User System.\n"
)
HUNG_LOG = "[   45.000000] systemd[1]: nginx.service: start operation timed out. Terminating.\n"


class LaunchTemplateEmulation:
    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str, str], tuple[str, int]] = {}
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self
        original = LaunchTemplates.create_launch_template_version

        def create_launch_template_version(resp: Any) -> ActionResult:
            name, template_id = resp._get_param("LaunchTemplateName"), resp._get_param("LaunchTemplateId")
            template = (
                resp.ec2_backend.get_launch_template(template_id)
                if template_id
                else resp.ec2_backend.get_launch_template_by_name(name)
            )
            source = resp._get_param("SourceVersion")
            data = dict(resp._get_param("LaunchTemplateData", {}))
            request = json.dumps([source, data, resp._get_param("VersionDescription")], sort_keys=True, default=str)
            token = resp._get_param("ClientToken")
            key = (resp.current_account, resp.region, template.id, str(token))
            with emulation._lock:
                if token and key in emulation._tokens:
                    earlier, number = emulation._tokens[key]
                    if earlier != request:
                        raise EC2ClientError("IdempotentParameterMismatch", "token reused for another request")
                    return ActionResult({"LaunchTemplateVersion": _version_answer(resp, template, number)})
                if source:
                    inherited = dict(template.get_version(source).data)
                    inherited.update(data)  # the fields passed replace whole top-level keys, as EC2 does
                    version = template.create_version(inherited, resp._get_param("VersionDescription"))
                    result = ActionResult({"LaunchTemplateVersion": _version_answer(resp, template, version.number)})
                else:
                    result = original(resp)
                    version = template.latest_version()
                if token:
                    emulation._tokens[key] = (request, version.number)
                return result

        monkeypatch.setattr(LaunchTemplates, "create_launch_template_version", create_launch_template_version)


def _version_answer(resp: Any, template: Any, number: int) -> dict[str, Any]:
    version = template.get_version(number)
    return {
        "CreateTime": version.create_time,
        "CreatedBy": f"arn:aws:iam::{resp.current_account}:root",
        "DefaultVersion": template.is_default(version),
        "LaunchTemplateData": version.data,
        "LaunchTemplateId": template.id,
        "LaunchTemplateName": template.name,
        "VersionDescription": version.description,
        "VersionNumber": version.number,
    }


@dataclass
class _Terminating:
    group: FakeAutoScalingGroup
    state: InstanceState
    replace: bool
    observations_left: int


class AsgEmulation:
    def __init__(self, *, launch_after: int = 1) -> None:
        self.launch_after = launch_after
        self.launched: Counter[str] = Counter()  # group name -> replacements launched by terminations
        self._terminating: list[_Terminating] = []
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self

        def terminate_instance(backend: AutoScalingBackend, instance_id: str, should_decrement: bool) -> Any:
            with emulation._lock:
                return emulation._terminate(backend, instance_id, should_decrement)

        def observed(name: str) -> Callable[[AutoScalingResponse], ActionResult]:
            original: Callable[[AutoScalingResponse], ActionResult] = getattr(AutoScalingResponse, name)

            def answer(resp: AutoScalingResponse) -> ActionResult:
                emulation.observe()
                return original(resp)

            return answer

        monkeypatch.setattr(AutoScalingBackend, "terminate_instance", terminate_instance)
        for name in ("describe_auto_scaling_groups", "describe_auto_scaling_instances"):
            monkeypatch.setattr(AutoScalingResponse, name, observed(name))

    def _terminate(self, backend: AutoScalingBackend, instance_id: str, should_decrement: bool) -> Any:
        found = [
            (group, state)
            for group in backend.autoscaling_groups.values()
            for state in group.instance_states
            if state.instance.id == instance_id and state.lifecycle_state != "Terminating"
        ]
        if not found:
            raise ValidationError(f"Instance Id not found - No managed instance found for instance ID: {instance_id}")
        group, state = found[0]
        original = group.desired_capacity
        backend.ec2_backend.terminate_instances([instance_id])  # EC2 keeps the instance's tags
        state.lifecycle_state = "Terminating"
        if should_decrement:
            group.desired_capacity = (group.desired_capacity or 0) - 1
        self._terminating.append(_Terminating(group, state, not should_decrement, self.launch_after))
        activity = TerminateInstanceActivity(state.instance, original or 0)
        if self.launch_after == 0:
            self._advance()
        return activity

    def observe(self) -> None:
        """One observation of the groups: terminations due now complete; the others come one step closer."""
        with self._lock:
            self._advance()

    def _advance(self) -> None:
        due = [t for t in self._terminating if t.observations_left <= 0]
        for t in self._terminating:
            t.observations_left -= 1
        self._terminating = [t for t in self._terminating if t not in due]
        for t in due:
            t.group.instance_states = [s for s in t.group.instance_states if s is not t.state]
            if t.replace:
                t.group.replace_autoscaling_group_instances(1, t.group.get_propagated_tags())
                self.launched[t.group.name] += 1


class _RefreshError(AutoscalingClientError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


_REFRESH_ACTIVE = frozenset({"Pending", "InProgress", "Baking", "Cancelling", "RollbackInProgress"})


@dataclass
class _Refresh:
    id: str
    group: FakeAutoScalingGroup
    desired: dict[str, Any]  # {"LaunchTemplateId", "Version"}
    previous: tuple[Any, str, str | None]  # the group's template, resolved version and provided version at the start
    preferences: dict[str, Any]
    to_update: list[str]  # instance ids to replace, in order
    total: int
    started: datetime
    status: str = "Pending"
    reason: str = ""
    ended: datetime | None = None
    replaced: int = 0
    launched: list[str] | None = None  # instance ids the refresh launched (on the desired version)
    bake_left: int = 0

    def percentage(self) -> int:
        return 100 if self.total == 0 else self.replaced * 100 // self.total

    def answer(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "InstanceRefreshId": self.id,
            "AutoScalingGroupName": self.group.name,
            "Status": self.status,
            "StatusReason": self.reason,
            "StartTime": self.started,
            "PercentageComplete": self.percentage(),
            "InstancesToUpdate": self.total - self.replaced,
            "Preferences": self.preferences,
            "DesiredConfiguration": {"LaunchTemplate": self.desired},
        }
        if self.ended is not None:
            out["EndTime"] = self.ended
        return out


class InstanceRefreshEmulation:
    def __init__(self, *, seconds_per_look: float = 60.0) -> None:
        self.seconds_per_look = seconds_per_look
        self.refreshes: list[_Refresh] = []  # oldest first
        self.looks = 0
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self

        def start_instance_refresh(resp: Any) -> ActionResult:
            with emulation._lock:
                return ActionResult({"InstanceRefreshId": emulation._start(resp)})

        def describe_instance_refreshes(resp: Any) -> ActionResult:
            name = resp._get_param("AutoScalingGroupName")
            ids = set(resp._get_param("InstanceRefreshIds", []) or [])
            with emulation._lock:
                emulation.looks += 1
                for refresh in emulation.refreshes:
                    if refresh.group.name == name and refresh.status in _REFRESH_ACTIVE:
                        emulation._step(refresh)
                found = [
                    r.answer()
                    for r in reversed(emulation.refreshes)  # newest first, as AWS lists them
                    if r.group.name == name and (not ids or r.id in ids)
                ]
            return ActionResult({"InstanceRefreshes": found})

        def rollback_instance_refresh(resp: Any) -> ActionResult:
            name = resp._get_param("AutoScalingGroupName")
            with emulation._lock:
                active = [r for r in emulation.refreshes if r.group.name == name and r.status in _REFRESH_ACTIVE]
                if not active or active[0].status in ("RollbackInProgress", "Cancelling"):
                    raise _RefreshError("ActiveInstanceRefreshNotFound", f"no active instance refresh for {name}")
                refresh = active[0]
                if not str(refresh.previous[2] or "").isdigit() or not refresh.preferences.get("AutoRollback", True):
                    raise _RefreshError("IrreversibleInstanceRefresh", "the previous configuration is not a number")
                refresh.status, refresh.reason = "RollbackInProgress", "rollback requested"
                return ActionResult({"InstanceRefreshId": refresh.id})

        for name, fn in (
            ("start_instance_refresh", start_instance_refresh),
            ("describe_instance_refreshes", describe_instance_refreshes),
            ("rollback_instance_refresh", rollback_instance_refresh),
        ):
            monkeypatch.setattr(AutoScalingResponse, name, fn, raising=False)

    def _start(self, resp: Any) -> str:
        name = resp._get_param("AutoScalingGroupName")
        backend: AutoScalingBackend = resp.autoscaling_backend
        if name not in backend.autoscaling_groups:
            raise ValidationError(f"AutoScalingGroup name not found - {name}")
        group = backend.autoscaling_groups[name]
        if any(r.group is group and r.status in _REFRESH_ACTIVE for r in self.refreshes):
            raise _RefreshError("InstanceRefreshInProgress", f"an instance refresh is already in progress for {name}")
        desired = dict((resp._get_param("DesiredConfiguration") or {}).get("LaunchTemplate") or {})
        if not desired:  # the group's own configuration
            if group.ec2_launch_template is None:
                raise ValidationError(f"{name} has no launch template: the emulation refreshes launch templates only")
            desired = {"LaunchTemplateId": group.ec2_launch_template.id, "Version": group.launch_template_version}
        preferences = dict(resp._get_param("Preferences") or {})
        template = backend.ec2_backend.get_launch_template(desired["LaunchTemplateId"])
        image = template.get_version(desired["Version"]).image_id
        skip = bool(preferences.get("SkipMatching"))
        to_update = [
            s.instance.id
            for s in group.instance_states
            if s.lifecycle_state != "Terminating" and not (skip and s.instance.image_id == image)
        ]
        refresh = _Refresh(
            id=str(uuid.uuid4()),
            group=group,
            desired={
                "LaunchTemplateId": template.id,
                "LaunchTemplateName": template.name,
                "Version": desired["Version"],
            },
            previous=(group.ec2_launch_template, group.launch_template_version, group.provided_launch_template_version),
            preferences=preferences,
            to_update=to_update,
            total=len(to_update),
            started=utcnow(),
            launched=[],
        )
        self.refreshes.append(refresh)
        return refresh.id

    def _batch(self, refresh: _Refresh) -> int:
        size = len([s for s in refresh.group.instance_states if s.lifecycle_state != "Terminating"])
        healthy = int(refresh.preferences.get("MinHealthyPercentage", 90))
        return max(1, size - math.ceil(size * healthy / 100))

    def _alarming(self, refresh: _Refresh) -> list[str]:
        names = (refresh.preferences.get("AlarmSpecification") or {}).get("Alarms") or []
        group = refresh.group
        alarms = cloudwatch_backends[group.account_id][group.region].alarms
        return [n for n in names if n in alarms and alarms[n].state_value == "ALARM"]

    def _step(self, refresh: _Refresh) -> None:
        if refresh.status == "Pending":
            refresh.status = "InProgress"
            return
        if refresh.status in ("InProgress", "Baking"):
            firing = self._alarming(refresh)
            if firing:
                if refresh.preferences.get("AutoRollback"):
                    refresh.status, refresh.reason = "RollbackInProgress", f"alarm {', '.join(firing)} in ALARM"
                else:
                    refresh.status, refresh.reason = "Failed", f"alarm {', '.join(firing)} in ALARM"
                    refresh.ended = utcnow()
                return
        if refresh.status == "Baking":
            refresh.bake_left -= 1
            if refresh.bake_left <= 0:
                refresh.status = "InProgress"
            return
        if refresh.status == "InProgress":
            checkpoints = [int(c) for c in refresh.preferences.get("CheckpointPercentages") or []] or [100]
            goal = next((c for c in checkpoints if c > refresh.percentage()), 100)
            wanted = math.ceil(refresh.total * goal / 100)
            count = min(self._batch(refresh), wanted - refresh.replaced)
            victims = refresh.to_update[refresh.replaced : refresh.replaced + count]
            assert refresh.launched is not None
            refresh.launched += self._replace(
                refresh, victims, refresh.desired["LaunchTemplateId"], refresh.desired["Version"]
            )
            refresh.replaced += len(victims)
            if refresh.replaced >= refresh.total:
                refresh.status, refresh.ended = "Successful", utcnow()
                group = refresh.group
                group.ec2_launch_template = group.ec2_backend.get_launch_template(refresh.desired["LaunchTemplateId"])
                group.launch_template_version = group.provided_launch_template_version = refresh.desired["Version"]
            elif refresh.percentage() >= goal:
                delay = int(refresh.preferences.get("CheckpointDelay", 3600))
                refresh.bake_left = math.ceil(delay / self.seconds_per_look)
                if refresh.bake_left > 0:
                    refresh.status = "Baking"
            return
        if refresh.status == "RollbackInProgress":
            assert refresh.launched is not None
            alive = {s.instance.id for s in refresh.group.instance_states}
            back = [i for i in refresh.launched if i in alive][: self._batch(refresh)]
            template, version, _ = refresh.previous
            self._replace(refresh, back, template.id, version)
            refresh.launched = [i for i in refresh.launched if i not in back]
            refresh.replaced = max(0, refresh.replaced - len(back))
            if not [i for i in refresh.launched if i in alive]:
                refresh.status, refresh.ended = "RollbackSuccessful", utcnow()

    @staticmethod
    def _replace(refresh: _Refresh, instance_ids: list[str], template_id: str, version: str) -> list[str]:
        """Terminate `instance_ids` in EC2 and launch as many into the group from the template version given."""
        group = refresh.group
        if not instance_ids:
            return []
        states = [s for s in group.instance_states if s.instance.id in instance_ids]
        group.ec2_backend.terminate_instances([s.instance.id for s in states])
        group.instance_states = [s for s in group.instance_states if s not in states]
        before = {s.instance.id for s in group.instance_states}
        saved = (group.ec2_launch_template, group.launch_template_version)
        group.ec2_launch_template = group.ec2_backend.get_launch_template(template_id)
        group.launch_template_version = version
        try:
            group.replace_autoscaling_group_instances(len(states), group.get_propagated_tags())
        finally:
            group.ec2_launch_template, group.launch_template_version = saved
        return [s.instance.id for s in group.instance_states if s.instance.id not in before]


class ConsoleEmulation:
    def __init__(self, *, delay_reads: int = 1, default_uptime: float = 8.5) -> None:
        self.delay_reads = delay_reads
        self.default_uptime = default_uptime
        self.uptime: dict[str, float] = {}  # AMI id -> the uptime its instances print
        self.never_ready: set[str] = set()  # AMI ids whose instances never print the line
        self.reads: Counter[str] = Counter()
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self

        def get_console_output(resp: Any) -> ActionResult:
            instance = resp.ec2_backend.get_instance(resp._get_param("InstanceId"))  # unknown: InvalidInstanceID
            result: dict[str, Any] = {"InstanceId": instance.id, "Timestamp": utcnow()}
            text = emulation.output(instance.id, str(instance.image_id))
            if text:
                result["Output"] = Base64EncodedString.from_raw_string(text)
            return ActionResult(result)

        monkeypatch.setattr(General, "get_console_output", get_console_output)

    def output(self, instance_id: str, image_id: str) -> str:
        with self._lock:
            self.reads[instance_id] += 1
            if self.reads[instance_id] <= self.delay_reads:
                return ""
        if image_id in self.never_ready:
            return BOOT_LOG + HUNG_LOG
        return BOOT_LOG + f"AMIFORGE-READY {self.uptime.get(image_id, self.default_uptime)}\n"


# --- what the fleet tests build on the emulations --------------------------------------------------------------


@dataclass
class AsgEmulations:
    templates: LaunchTemplateEmulation
    groups: AsgEmulation
    console: ConsoleEmulation


def install_asg_emulation(monkeypatch: pytest.MonkeyPatch, *, launch_after: int = 1) -> AsgEmulations:
    emulations = AsgEmulations(LaunchTemplateEmulation(), AsgEmulation(launch_after=launch_after), ConsoleEmulation())
    emulations.templates.install(monkeypatch)
    emulations.groups.install(monkeypatch)
    emulations.console.install(monkeypatch)
    return emulations


class FakeTime:
    """sleep() only advances the clocks: `clock()` (monotonic) and `now()` (wall clock, from the real time so that
    moto's LaunchTime values stay comparable). `on_sleep` runs before each sleep (a test's way to act mid-wait)."""

    def __init__(self) -> None:
        self.slept = 0.0
        self.sleeps = 0
        self.on_sleep: Callable[[], None] | None = None

    def sleep(self, seconds: float) -> None:
        if self.on_sleep is not None:
            self.on_sleep()
        self.sleeps += 1
        self.slept += seconds

    def clock(self) -> float:
        return self.slept

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.slept)

    def wait(self, deadline: float = 600.0) -> Wait:
        return Wait(first_delay=5.0, max_delay=15.0, deadline=deadline, sleep=self.sleep, clock=self.clock)


def make_images(ec2: Any, *names: str) -> list[str]:
    """One AMI per name (moto's images are `available` at once)."""
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    images = [str(ec2.create_image(InstanceId=instance, Name=f"img-{name}")["ImageId"]) for name in names]
    ec2.terminate_instances(InstanceIds=[instance])
    return images


def make_group(
    session: Any,
    name: str,
    image_id: str,
    *,
    size: int = 4,
    version: str | None = "1",
    opted_in: bool = True,
    region: str = "eu-west-1",
) -> str:
    """A group of `size` instances launching from a new template `<name>-lt` (version 1: `image_id`, t3.micro);
    returns the template id. `version=None` leaves the group's version out ($Default)."""
    ec2 = session.client("ec2", region)
    asg = session.client("autoscaling", region)
    template_id = str(
        ec2.create_launch_template(
            LaunchTemplateName=f"{name}-lt",
            LaunchTemplateData={"ImageId": image_id, "InstanceType": "t3.micro"},
        )["LaunchTemplate"]["LaunchTemplateId"]
    )
    spec: dict[str, str] = {"LaunchTemplateId": template_id}
    if version is not None:
        spec["Version"] = version
    tags = [{"Key": "team", "Value": "web", "PropagateAtLaunch": True}]
    if opted_in:
        tags.append({"Key": ROLLOUT_TAG, "Value": ROLLOUT_ENABLED, "PropagateAtLaunch": False})
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=size * 2,
        DesiredCapacity=size,
        LaunchTemplate=spec,
        AvailabilityZones=[f"{region}a"],
        Tags=tags,
    )
    return template_id
