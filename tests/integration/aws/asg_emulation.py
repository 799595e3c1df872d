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
- `ConsoleEmulation`: GetConsoleOutput answers nothing for the first `delay_reads` reads of each instance (EC2's
  console delay), then a boot log ending in `AMIFORGE-READY <uptime>`, the uptime per AMI (`uptime`, else
  `default_uptime`); an AMI in `never_ready` boots to a log without that line, like an image whose services hang.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup, InstanceState, TerminateInstanceActivity
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import ActionResult
from moto.core.types import Base64EncodedString
from moto.core.utils import utcnow
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.responses.general import General
from moto.ec2.responses.launch_templates import LaunchTemplates

from amiforge.providers.aws.bake import Wait
from amiforge.providers.aws.fleet import ROLLOUT_ENABLED, ROLLOUT_TAG

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

        def observed(name: str) -> Any:
            original = getattr(AutoScalingResponse, name)

            def answer(resp: Any) -> ActionResult:
                emulation.observe()
                return original(resp)  # type: ignore[no-any-return]

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
