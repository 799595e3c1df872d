"""What the Auto Scaling fleet (providers/aws/fleet.py) needs from EC2, Auto Scaling and CloudWatch that moto 5.2.5
lacks, emulated in-process as the API reference documents it; tested in test_moto_emulation.py and
test_asg_emulation.py (each emulation also refuses what AWS refuses).

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
  is lost and ASG launches get InstanceType "") and ignores ClientToken (the same token twice makes two versions);
  a SourceVersion of 0 or below answers the latest version (Python's negative index).
- GetConsoleOutput always answers the same fixed Xen boot log of 2006 for any instance (base64 on the wire, which
  botocore decodes, as it does AWS's): never an `AMIFORGE-READY` line, and never the answer without Output that EC2
  gives before it has captured anything (right after a launch).
- Health: instances are InService/Healthy at once; SetInstanceHealth(Unhealthy) is recorded and shown, but the group
  never replaces an unhealthy instance (AWS would). Not emulated: the fleet reports an Unhealthy member as failed, which
  is all the tests need.
- DescribeAutoScalingGroups honours MaxRecords/NextToken (default 50, more than 100 is a server error), and
  DescribeScalingActivities records nothing.
- CreateAutoScalingGroup ignores DefaultInstanceWarmup (UpdateAutoScalingGroup too: it is never shown) and turns a
  HealthCheckGracePeriod of 0, or none, into 300 (AWS's default is 0). PutLifecycleHook and DescribeLifecycleHooks
  work (HeartbeatTimeout 3600 and DefaultResult ABANDON by default, as documented); CompleteLifecycleAction does not.
- CloudWatch: PutCompositeAlarm raises NotImplementedError; DescribeAlarms ignores AlarmTypes (AWS answers metric
  alarms only unless AlarmTypes asks for the others) and answers any composite alarm moto holds.

The emulations, each as small as the fleet's tests need:

- `LaunchTemplateEmulation` (CreateLaunchTemplateVersion): a new version inherits its SourceVersion's data, the
  fields passed replacing whole top-level keys, and the snapshot ids of the inherited block device mappings dropped
  ("Snapshots applied to the block device mapping are ignored when creating a new version unless they are explicitly
  included"); an unknown SourceVersion is InvalidLaunchTemplateId.VersionNotFound. A ClientToken is the account's and
  region's (not the template's): the same token for the same request answers the version it made first, under
  another request (another template included) IdempotentParameterMismatch.
- `AsgEmulation`: TerminateInstanceInAutoScalingGroup as on AWS: an instance in no group is a ValidationError; the
  instance is terminated in EC2 (tags kept) and stays in the group as `Terminating` for `launch_after` observations of
  the group (DescribeAutoScalingGroups or DescribeAutoScalingInstances calls); then it leaves the group and, unless
  the capacity was decremented, exactly one replacement is launched from the group's current version. The group's
  DefaultInstanceWarmup is kept and shown (-1 removes it), and its HealthCheckGracePeriod is what was given, else 0.
- `AlarmEmulation`: PutCompositeAlarm stores the alarm with its AlarmRule (ALARM/OK/INSUFFICIENT_DATA("name or
  ARN"), TRUE, FALSE, AND, OR, NOT, parentheses; anything else is a ValidationError); its state is what its rule gives,
  evaluated when it is created and whenever one of its children changed state since (so a SetAlarmState on it holds
  until a child changes, as the SetAlarmState reference says). DescribeAlarms answers MetricAlarms only unless
  AlarmTypes asks for CompositeAlarm (or LogAlarm: none exist here).
- `InstanceRefreshEmulation`: moto 5.2.5 raises NotImplementedError for StartInstanceRefresh,
  DescribeInstanceRefreshes, RollbackInstanceRefresh and CancelInstanceRefresh (checked). Emulated, with the status
  names of the service model's InstanceRefreshStatus (`REFRESH_STATUSES`, checked against botocore's model):
  - Start refuses what the RefreshPreferences reference refuses (ValidationError): CheckpointDelay without
    CheckpointPercentages, percentages not ascending and unique in 1..100, MaxHealthyPercentage without
    MinHealthyPercentage or more than 100 above it, a ScaleInProtectedInstances/StandbyInstances value outside the
    enum; AutoRollback with no DesiredConfiguration (the message AWS gives), or for a group from which a rollback is
    not supported (below; AWS documents that it is unsupported, not the error code: ValidationError is assumed).
    A second refresh while one is active: InstanceRefreshInProgress.
  - Time is the emulation's clock: a test's (`time=FakeTime`, the one the code under test sleeps on), else
    `seconds_per_look` per DescribeInstanceRefreshes. Every DescribeInstanceRefreshes of the group moves each active
    refresh on to that time: Pending → InProgress; InProgress launches the next batch (at most what
    MinHealthyPercentage of the desired capacity allows, never past the next checkpoint; at most one batch per look,
    the look's interval standing for EC2 starting the instances) by terminating the instances in EC2 and launching
    replacements from the desired template version. A batch counts — PercentageComplete, InstancesToUpdate — only
    "when the instance's health status changes to healthy and the specified warm-up time passes" (InstanceRefresh
    reference), and the next batch waits for it: first the group's launch lifecycle hooks (instances Pending:Wait
    until the longest HeartbeatTimeout; nobody completes the action, so each hook's DefaultResult applies: CONTINUE
    puts them in service, ABANDON terminates them and launches as many again — a refresh that never gets further),
    then the warm-up (InstanceWarmup, else the group's DefaultInstanceWarmup, else its HealthCheckGracePeriod, as the
    RefreshPreferences reference says). At a checkpoint below 100 it *stays InProgress* (with a StatusReason) for
    CheckpointDelay (default 3600 s; the look that ends the wait launches nothing): `Baking` is only the BakeTime
    after the last replacement, as the InstanceRefresh reference defines it. Then `Successful`, and the group is
    pointed at the desired configuration.
  - Instances set apart: protected from scale in (ScaleInProtectedInstances: Refresh replaces them, Ignore leaves
    them, Wait — the default — replaces the others first, then waits one hour for the protection to be lifted
    and fails: "waits one hour for you to remove scale-in protection. Otherwise, the instance refresh will fail")
    and in Standby (StandbyInstances: Terminate terminates them, Ignore leaves them, Wait likewise).
  - SkipMatching skips instances launched from the desired template version (the emulation records which version
    each instance was launched from; one it did not see launch is not matching).
  - A named alarm (metric or composite) in ALARM, or a Wait that ran out, fails the refresh, or with AutoRollback
    starts its rollback.
  - RollbackInstanceRefresh: no active refresh (or one already rolling back) is ActiveInstanceRefreshNotFound; it is
    IrreversibleInstanceRefresh when the refresh has no DesiredConfiguration, or the group's configuration at the start
    is not a numbered launch template version ($Latest, $Default, none, a launch configuration) or takes its ImageId
    from a Systems Manager parameter — the three cases the reference lists; AutoRollback is *not* required. Then
    `RollbackInProgress` (RollbackDetails; PercentageComplete goes back down, InstancesToUpdate stays what it was),
    whose looks put each instance the refresh launched back on the previous version, batch by batch (each through
    the hooks and warm-up, an assumption: AWS documents the batches, not their timing), then `RollbackSuccessful`.
  Not emulated: Cancel, health checks (instances are healthy at once), terminate lifecycle hooks and load balancer
  draining (a replacement's old instance is gone at once), MaxRecords/NextToken, mixed instances policies.
- `ConsoleEmulation`: GetConsoleOutput answers nothing for the first `delay_reads` reads of each instance (EC2's
  console delay), then a boot log ending in `AMIFORGE-READY <uptime>`, the uptime per AMI (`uptime`, else
  `default_uptime`); an AMI in `never_ready` boots to a log without that line, like an image whose services hang.
"""

from __future__ import annotations

import copy
import json
import math
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pytest
from moto.autoscaling.exceptions import AutoscalingClientError, ValidationError
from moto.autoscaling.models import (
    AutoScalingBackend,
    FakeAutoScalingGroup,
    InstanceState,
    TerminateInstanceActivity,
    autoscaling_backends,
)
from moto.autoscaling.responses import AutoScalingResponse
from moto.cloudwatch.exceptions import ValidationError as AlarmValidationError
from moto.cloudwatch.models import CloudWatchBackend, cloudwatch_backends
from moto.cloudwatch.responses import CloudWatchResponse
from moto.core.responses import ActionResult
from moto.core.types import Base64EncodedString
from moto.core.utils import utcnow
from moto.ec2.exceptions import EC2ClientError, InvalidLaunchTemplateVersionNotFound
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
_SSM_IMAGE: Final = "resolve:ssm:"


class LaunchTemplateEmulation:
    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], tuple[str, int]] = {}  # (account, region, token) → (request, version)
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
            description = resp._get_param("VersionDescription")
            request = json.dumps([template.id, source, data, description], sort_keys=True, default=str)
            token = resp._get_param("ClientToken")
            key = (resp.current_account, resp.region, str(token))
            with emulation._lock:
                if token and key in emulation._tokens:
                    earlier, number = emulation._tokens[key]
                    if earlier != request:
                        raise EC2ClientError("IdempotentParameterMismatch", "token reused for another request")
                    return ActionResult({"LaunchTemplateVersion": _version_answer(resp, template, number)})
                if source:
                    inherited = _inherited(template, str(source))
                    inherited.update(data)  # the fields passed replace whole top-level keys, as EC2 does
                    version = template.create_version(inherited, description)
                    result = ActionResult({"LaunchTemplateVersion": _version_answer(resp, template, version.number)})
                else:
                    result = original(resp)
                    version = template.latest_version()
                if token:
                    emulation._tokens[key] = (request, version.number)
                return result

        monkeypatch.setattr(LaunchTemplates, "create_launch_template_version", create_launch_template_version)


def _inherited(template: Any, source: str) -> dict[str, Any]:
    """What a version created from `source` inherits: its data without the block device mappings' snapshot ids."""
    if not (source.isdigit() and int(source) >= 1) and source.lower() not in ("$latest", "$default"):
        raise InvalidLaunchTemplateVersionNotFound(source, template.id)  # moto would index from the end
    data: dict[str, Any] = copy.deepcopy(dict(template.get_version(source).data))  # unknown: VersionNotFound
    for mapping in data.get("BlockDeviceMappings") or []:
        if isinstance(mapping.get("Ebs"), dict):
            mapping["Ebs"].pop("SnapshotId", None)
    return data


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

        create_group = AutoScalingResponse.create_auto_scaling_group
        update_group = AutoScalingResponse.update_auto_scaling_group

        def create_auto_scaling_group(resp: AutoScalingResponse) -> ActionResult:
            result = create_group(resp)
            group = resp.autoscaling_backend.autoscaling_groups[resp._get_param("AutoScalingGroupName")]
            group.health_check_grace_period = resp._get_int_param("HealthCheckGracePeriod") or 0  # AWS's default: 0
            _set_default_warmup(group, resp._get_int_param("DefaultInstanceWarmup"))
            return result

        def update_auto_scaling_group(resp: AutoScalingResponse) -> ActionResult:
            result = update_group(resp)
            warmup = resp._get_int_param("DefaultInstanceWarmup")
            if warmup is not None:  # left out: unchanged
                group = resp.autoscaling_backend.autoscaling_groups[resp._get_param("AutoScalingGroupName")]
                _set_default_warmup(group, warmup)
            return result

        monkeypatch.setattr(AutoScalingBackend, "terminate_instance", terminate_instance)
        monkeypatch.setattr(AutoScalingResponse, "create_auto_scaling_group", create_auto_scaling_group)
        monkeypatch.setattr(AutoScalingResponse, "update_auto_scaling_group", update_auto_scaling_group)
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


def _set_default_warmup(group: FakeAutoScalingGroup, seconds: int | None) -> None:
    """A group's DefaultInstanceWarmup as DescribeAutoScalingGroups shows it (moto answers the attribute by that name);
    -1 removes it ("To remove a value that you previously set, include the property but specify -1")."""
    setattr(group, "default_instance_warmup", None if seconds is None or seconds == -1 else seconds)  # noqa: B010


class AlarmEmulation:
    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        put_metric_alarm = CloudWatchResponse.put_metric_alarm
        describe_alarms = CloudWatchResponse.describe_alarms
        set_alarm_state = CloudWatchResponse.set_alarm_state

        def put_composite_alarm(resp: Any) -> ActionResult:
            backend: CloudWatchBackend = resp.cloudwatch_backend
            name, rule = resp._get_param("AlarmName"), str(resp._get_param("AlarmRule") or "")
            _rule_children(rule)  # ValidationError for a rule that does not parse
            earlier = backend.alarms.get(name)
            result = put_metric_alarm(resp)  # moto keeps AlarmRule: an alarm with a rule is a composite to it
            alarm = backend.alarms[name]
            if earlier is not None:  # an update leaves the state as it was (and re-evaluates the new rule)
                alarm.state_value, alarm.state_reason = earlier.state_value, earlier.state_reason
            settle_composites(backend)
            return result

        def describe(resp: Any) -> ActionResult:
            settle_composites(resp.cloudwatch_backend)
            answer = describe_alarms(resp).result
            assert isinstance(answer, dict)
            types = set(resp._get_param("AlarmTypes") or ["MetricAlarm"])  # omitted: metric alarms only
            return ActionResult({f"{kind}s": answer.get(f"{kind}s", []) if kind in types else [] for kind in _TYPES})

        def set_state(resp: Any) -> ActionResult:
            result = set_alarm_state(resp)  # an unknown alarm: ResourceNotFound (moto's own)
            alarm = resp.cloudwatch_backend.alarms[resp._get_param("AlarmName")]
            if alarm.rule is not None:  # holds until one of its children changes state
                setattr(alarm, _SEEN, _children_states(resp.cloudwatch_backend, alarm.rule))
            settle_composites(resp.cloudwatch_backend)  # every change of a child re-evaluates its parents
            return result

        monkeypatch.setattr(CloudWatchResponse, "put_composite_alarm", put_composite_alarm, raising=False)
        monkeypatch.setattr(CloudWatchResponse, "describe_alarms", describe)
        monkeypatch.setattr(CloudWatchResponse, "set_alarm_state", set_state)


_TYPES: Final = ("MetricAlarm", "CompositeAlarm", "LogAlarm")
_SEEN: Final = "_amiforge_children_seen"  # the children's states a composite alarm's state was last set against
_RULE_TOKEN: Final = re.compile(
    r'\s*(?:(?P<fn>ALARM|OK|INSUFFICIENT_DATA)\s*\(\s*(?:"(?P<quoted>[^"]+)"|(?P<bare>[^()"\s]+))\s*\)'
    r"|(?P<word>AND|OR|NOT|TRUE|FALSE)\b|(?P<paren>[()]))"
)


def _rule_tokens(rule: str) -> list[tuple[str, str, str]]:
    """(kind, value, alarm name) per token of an AlarmRule; ValidationError for anything else."""
    tokens, at = [], 0
    while rule[at:].strip():
        found = _RULE_TOKEN.match(rule, at)
        if found is None:
            raise AlarmValidationError(f"AlarmRule does not parse at {rule[at : at + 20]!r}")
        if found["fn"]:
            name = found["quoted"] or found["bare"]
            tokens.append(("fn", found["fn"], name.split(":alarm:", 1)[-1]))  # a name or an alarm's ARN
        else:
            tokens.append(("word", found["word"] or found["paren"], ""))
        at = found.end()
    return tokens


def _rule_children(rule: str) -> set[str]:
    _evaluate(rule, lambda _name: "")  # the syntax is checked whatever the states
    return {name for kind, _, name in _rule_tokens(rule) if kind == "fn"}


def _evaluate(rule: str, state_of: Callable[[str], str]) -> bool:
    """The rule's truth: NOT binds tighter than AND, AND tighter than OR; ValidationError when it does not parse."""
    tokens, at = _rule_tokens(rule), 0

    def take() -> tuple[str, str, str]:
        nonlocal at
        if at >= len(tokens):
            raise AlarmValidationError("AlarmRule ends too early")
        at += 1
        return tokens[at - 1]

    def peek(word: str) -> bool:
        return at < len(tokens) and tokens[at][:2] == ("word", word)

    def either() -> bool:
        value = both()
        while peek("OR"):
            take()
            value = both() or value
        return value

    def both() -> bool:
        value = single()
        while peek("AND"):
            take()
            value = single() and value
        return value

    def single() -> bool:
        kind, value, name = take()
        if kind == "fn":
            return state_of(name) == value
        if value == "NOT":
            return not single()
        if value in ("TRUE", "FALSE"):
            return value == "TRUE"
        if value == "(":
            inner = either()
            if take()[1] != ")":
                raise AlarmValidationError("AlarmRule has an unclosed parenthesis")
            return inner
        raise AlarmValidationError(f"AlarmRule has {value} where an alarm function was expected")

    result = either()
    if at != len(tokens):
        raise AlarmValidationError("AlarmRule has more after its expression")
    return result


def _children_states(backend: CloudWatchBackend, rule: str) -> tuple[tuple[str, str], ...]:
    alarms = backend.alarms
    return tuple(sorted((n, alarms[n].state_value if n in alarms else "") for n in _rule_children(rule)))


def settle_composites(backend: CloudWatchBackend) -> None:
    """Give each composite alarm the state its rule gives, where a child changed state since it was last set (a
    composite of composites settles in a few rounds)."""
    for _ in range(10):
        changed = False
        for alarm in list(backend.alarms.values()):
            if alarm.rule is None:
                continue
            children = _children_states(backend, alarm.rule)
            if getattr(alarm, _SEEN, None) == children:
                continue
            setattr(alarm, _SEEN, children)
            value = "ALARM" if _evaluate(alarm.rule, dict(children).__getitem__) else "OK"
            if value != alarm.state_value:
                alarm.update_state(f"the rule is {value == 'ALARM'}", "{}", value)
                changed = True
        if not changed:
            return


class _RefreshError(AutoscalingClientError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


# The service model's InstanceRefreshStatus names (test_asg_emulation checks them against botocore's model).
PENDING: Final = "Pending"
IN_PROGRESS: Final = "InProgress"
SUCCESSFUL: Final = "Successful"
FAILED: Final = "Failed"
CANCELLING: Final = "Cancelling"
CANCELLED: Final = "Cancelled"
ROLLBACK_IN_PROGRESS: Final = "RollbackInProgress"
ROLLBACK_FAILED: Final = "RollbackFailed"
ROLLBACK_SUCCESSFUL: Final = "RollbackSuccessful"
BAKING: Final = "Baking"
REFRESH_STATUSES: Final = frozenset(
    {PENDING, IN_PROGRESS, SUCCESSFUL, FAILED, CANCELLING, CANCELLED}
    | {ROLLBACK_IN_PROGRESS, ROLLBACK_FAILED, ROLLBACK_SUCCESSFUL, BAKING}
)
_REFRESH_ACTIVE: Final = frozenset({PENDING, IN_PROGRESS, BAKING, CANCELLING, ROLLBACK_IN_PROGRESS})
# RefreshPreferences: the values each set-apart behaviour may take (the default is Wait), and how long Wait waits.
_SET_APART: Final = {
    "ScaleInProtectedInstances": frozenset({"Refresh", "Ignore", "Wait"}),
    "StandbyInstances": frozenset({"Terminate", "Ignore", "Wait"}),
}
_WAIT_SECONDS: Final = 3600
_LAUNCHING: Final = "autoscaling:EC2_INSTANCE_LAUNCHING"


@dataclass
class _Batch:
    """Instances one look launched (a batch of the refresh, or of its rollback), on their way to being counted: in
    their launch lifecycle hooks (Pending:Wait) until `until`, then warming up until `until`."""

    count: int  # the instances it replaces: added to (rollback: taken from) the refresh's count once it is done
    instances: list[str]
    template_id: str
    version: str
    until: float  # the end of the current stage, on the emulation's clock
    hooked: bool  # the current stage is the launch lifecycle hooks


@dataclass
class _Refresh:
    id: str
    group: FakeAutoScalingGroup
    desired: dict[str, Any]  # {"LaunchTemplateId", "LaunchTemplateName", "Version"}
    has_desired: bool  # a DesiredConfiguration was given (a rollback needs one)
    previous: tuple[Any, str, str | None]  # the group's template, resolved version and provided version at the start
    preferences: dict[str, Any]
    to_update: list[str]  # instance ids to replace, in order (those AWS must wait for last)
    to_terminate: list[str]  # Standby instances under StandbyInstances=Terminate
    total: int
    started: datetime
    status: str = PENDING
    reason: str = ""
    ended: datetime | None = None
    replaced: int = 0
    launched: list[str] = field(default_factory=list)  # instance ids the refresh launched (on the desired version)
    warmup: float = 0.0  # InstanceWarmup, else the group's DefaultInstanceWarmup, else its HealthCheckGracePeriod
    batch: _Batch | None = None  # launched, not counted yet
    goal: int = 100  # the checkpoint the current batch aims at
    checkpoint_until: float | None = None  # waiting at a checkpoint until then (InProgress)
    bake_until: float = 0.0  # Baking until then
    wait_since: float | None = None  # waiting for an instance set apart since then (Wait)
    rollback: dict[str, Any] | None = None  # RollbackDetails, once rolling back

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
            # During a rollback: the instances the refresh had not updated yet when it began (they need no rollback).
            "InstancesToUpdate": self.rollback["InstancesToUpdateOnRollback"]
            if self.rollback
            else self.total - self.replaced,
            "Preferences": self.preferences,
        }
        if self.has_desired:
            out["DesiredConfiguration"] = {"LaunchTemplate": self.desired}
        if self.rollback is not None:
            out["RollbackDetails"] = self.rollback
        if self.ended is not None:
            out["EndTime"] = self.ended
        return out


class InstanceRefreshEmulation:
    """`time`: a test's FakeTime, so that AWS and the code under test share one clock — the emulation's time is its
    clock() and the instances a refresh launches have its now() as their LaunchTime; without it, every
    DescribeInstanceRefreshes is `seconds_per_look` later than the one before."""

    def __init__(self, *, seconds_per_look: float = 60.0, time: FakeTime | None = None) -> None:
        self.seconds_per_look = seconds_per_look
        self.time = time
        self.refreshes: list[_Refresh] = []  # oldest first
        self.looks = 0
        self.launched_from: dict[str, tuple[str, int]] = {}  # instance id → (template id, version) it launched from
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self
        launch = FakeAutoScalingGroup.replace_autoscaling_group_instances

        def start_instance_refresh(resp: Any) -> ActionResult:
            with emulation._lock:
                return ActionResult({"InstanceRefreshId": emulation._start(resp)})

        def describe_instance_refreshes(resp: Any) -> ActionResult:
            name = resp._get_param("AutoScalingGroupName")
            ids = set(resp._get_param("InstanceRefreshIds", []) or [])
            with emulation._lock:
                emulation.looks += 1
                now = emulation.now()
                for refresh in emulation.refreshes:
                    if refresh.group.name == name and refresh.status in _REFRESH_ACTIVE:
                        emulation._step(refresh, now)
                found = [
                    r.answer()
                    for r in reversed(emulation.refreshes)  # newest first, as AWS lists them
                    if r.group.name == name and (not ids or r.id in ids)
                ]
            return ActionResult({"InstanceRefreshes": found})

        def rollback_instance_refresh(resp: Any) -> ActionResult:
            with emulation._lock:
                return ActionResult({"InstanceRefreshId": emulation._rollback(resp._get_param("AutoScalingGroupName"))})

        def launched(group: FakeAutoScalingGroup, count: int, tags: dict[str, str]) -> None:
            before = {s.instance.id for s in group.instance_states}
            launch(group, count, tags)
            new = [s.instance for s in group.instance_states if s.instance.id not in before]
            if emulation.time is not None:  # launched now on the test's clock, not on the real one
                for instance in new:
                    instance.launch_time = emulation.time.now().replace(tzinfo=None)  # moto keeps naive UTC
            if group.ec2_launch_template is not None:
                version = group.ec2_launch_template.get_version(group.launch_template_version).number
                for instance in new:
                    emulation.launched_from[instance.id] = (group.ec2_launch_template.id, version)

        for name, fn in (
            ("start_instance_refresh", start_instance_refresh),
            ("describe_instance_refreshes", describe_instance_refreshes),
            ("rollback_instance_refresh", rollback_instance_refresh),
        ):
            monkeypatch.setattr(AutoScalingResponse, name, fn, raising=False)
        monkeypatch.setattr(FakeAutoScalingGroup, "replace_autoscaling_group_instances", launched)

    def now(self) -> float:
        """The emulation's time: the FakeTime's clock, else `seconds_per_look` per look so far."""
        return self.time.clock() if self.time is not None else self.looks * self.seconds_per_look

    # --- StartInstanceRefresh -----------------------------------------------------------------------------------

    def _start(self, resp: Any) -> str:
        name = resp._get_param("AutoScalingGroupName")
        backend: AutoScalingBackend = resp.autoscaling_backend
        if name not in backend.autoscaling_groups:
            raise ValidationError(f"AutoScalingGroup name not found - {name}")
        group = backend.autoscaling_groups[name]
        if any(r.group is group and r.status in _REFRESH_ACTIVE for r in self.refreshes):
            raise _RefreshError("InstanceRefreshInProgress", f"an instance refresh is already in progress for {name}")
        preferences = dict(resp._get_param("Preferences") or {})
        spec = dict((resp._get_param("DesiredConfiguration") or {}).get("LaunchTemplate") or {})
        has_desired = bool(spec)
        previous = (  # a group on a launch configuration has neither version attribute in moto
            group.ec2_launch_template,
            getattr(group, "launch_template_version", ""),
            getattr(group, "provided_launch_template_version", None),
        )
        _check_preferences(preferences, has_desired, previous)
        if not spec:  # the group's own configuration
            if group.ec2_launch_template is None:
                raise ValidationError(f"{name} has no launch template: the emulation refreshes launch templates only")
            spec = {"LaunchTemplateId": group.ec2_launch_template.id, "Version": group.provided_launch_template_version}
        ec2 = backend.ec2_backend
        template = (
            ec2.get_launch_template(spec["LaunchTemplateId"])
            if spec.get("LaunchTemplateId")
            else ec2.get_launch_template_by_name(spec["LaunchTemplateName"])
        )
        version = str(spec.get("Version") or "$Default")
        target = (template.id, template.get_version(version).number)
        to_update, waited, to_terminate = [], [], []
        for state in group.instance_states:
            instance_id = state.instance.id
            if state.lifecycle_state.startswith("Terminat"):
                continue
            if preferences.get("SkipMatching") and self.launched_from.get(instance_id) == target:
                continue
            behaviour = self._set_apart(preferences, state)
            if behaviour == "Ignore":
                continue
            if behaviour == "Terminate":
                to_terminate.append(instance_id)
            elif behaviour == "Wait":
                waited.append(instance_id)  # replaced after all the others, once it is no longer set apart
            else:
                to_update.append(instance_id)
        refresh = _Refresh(
            id=str(uuid.uuid4()),
            group=group,
            desired={"LaunchTemplateId": template.id, "LaunchTemplateName": template.name, "Version": version},
            has_desired=has_desired,
            previous=previous,
            preferences=preferences,
            to_update=to_update + waited,
            to_terminate=to_terminate,
            total=len(to_update) + len(waited),
            started=utcnow(),
            warmup=_warmup(preferences, group),
        )
        self.refreshes.append(refresh)
        return refresh.id

    @staticmethod
    def _set_apart(preferences: dict[str, Any], state: InstanceState) -> str | None:
        """What the refresh does with an instance in Standby or protected from scale in (None: not set apart)."""
        if state.lifecycle_state == "Standby":
            return str(preferences.get("StandbyInstances", "Wait"))
        if state.protected_from_scale_in:
            protected = str(preferences.get("ScaleInProtectedInstances", "Wait"))
            return None if protected == "Refresh" else protected
        return None

    # --- RollbackInstanceRefresh --------------------------------------------------------------------------------

    def _rollback(self, name: str) -> str:
        active = [r for r in self.refreshes if r.group.name == name and r.status in _REFRESH_ACTIVE]
        # A rollback already under way (or a cancel) is not rolled back again: what AWS answers is not documented,
        # so the emulation refuses it like no refresh at all (the code under test must not ask).
        if not active or active[0].status in (ROLLBACK_IN_PROGRESS, CANCELLING):
            raise _RefreshError("ActiveInstanceRefreshNotFound", f"no active instance refresh for {name}")
        refresh = active[0]
        why = _irreversible(refresh.previous) or (
            "" if refresh.has_desired else "no desired configuration was specified for the instance refresh"
        )
        if why:
            raise _RefreshError("IrreversibleInstanceRefresh", why)
        self._roll_back(refresh, "rollback requested")
        return refresh.id

    def _roll_back(self, refresh: _Refresh, reason: str) -> None:
        refresh.status, refresh.reason = ROLLBACK_IN_PROGRESS, reason
        refresh.batch = refresh.checkpoint_until = None  # a batch on its way is rolled back with the others
        refresh.rollback = {
            "RollbackReason": reason,
            "RollbackStartTime": utcnow(),
            "PercentageCompleteOnRollback": refresh.percentage(),
            "InstancesToUpdateOnRollback": refresh.total - refresh.replaced,
        }

    def _fail(self, refresh: _Refresh, reason: str) -> None:
        if refresh.preferences.get("AutoRollback"):
            self._roll_back(refresh, reason)
        else:
            refresh.status, refresh.reason, refresh.ended = FAILED, reason, utcnow()

    # --- one look -----------------------------------------------------------------------------------------------

    def _batch(self, refresh: _Refresh) -> int:
        group = refresh.group
        size = group.desired_capacity or len([s for s in group.instance_states if s.lifecycle_state == "InService"])
        healthy = int(refresh.preferences.get("MinHealthyPercentage", 90))
        return max(1, size - math.ceil(size * healthy / 100))

    def _alarming(self, refresh: _Refresh) -> list[str]:
        names = (refresh.preferences.get("AlarmSpecification") or {}).get("Alarms") or []
        group = refresh.group
        backend = cloudwatch_backends[group.account_id][group.region]
        settle_composites(backend)
        return [n for n in names if n in backend.alarms and backend.alarms[n].state_value == "ALARM"]

    def _held(self, refresh: _Refresh, instance_id: str) -> str:
        """Why the refresh must wait before replacing `instance_id` ("" when it need not)."""
        state = next((s for s in refresh.group.instance_states if s.instance.id == instance_id), None)
        if state is None or self._set_apart(refresh.preferences, state) != "Wait":
            return ""
        return "in Standby" if state.lifecycle_state == "Standby" else "protected from scale in"

    def _step(self, refresh: _Refresh, now: float) -> None:
        if refresh.status == PENDING:
            refresh.status = IN_PROGRESS
            self._terminate(refresh, refresh.to_terminate)
            return
        if refresh.status in (IN_PROGRESS, BAKING):
            firing = self._alarming(refresh)
            if firing:
                self._fail(refresh, f"alarm {', '.join(firing)} in ALARM")
                return
        if refresh.status == BAKING:
            if now >= refresh.bake_until:
                self._succeed(refresh)
            return
        if refresh.status == IN_PROGRESS:
            self._advance(refresh, now)
            return
        if refresh.status == ROLLBACK_IN_PROGRESS:
            self._roll_back_step(refresh, now)

    def _advance(self, refresh: _Refresh, now: float) -> None:
        """One look at an InProgress refresh: the batch on its way (hooks, warm-up) is counted once it is done; then,
        unless a checkpoint or an instance set apart holds it, the next batch is launched — at most one per look (the
        interval between looks stands for EC2 starting the instances), counted at once without hooks or warm-up."""
        if refresh.batch is not None:
            if not self._settled(refresh, refresh.batch, now):
                return
            self._count(refresh, now)
            if refresh.status != IN_PROGRESS:
                return
        if refresh.checkpoint_until is not None:
            if now < refresh.checkpoint_until:  # a checkpoint's delay: still InProgress
                return
            refresh.checkpoint_until, refresh.reason = None, ""  # the next batch starts at the next look
            return
        if self._launch_next(refresh, now) and refresh.batch is not None and self._settled(refresh, refresh.batch, now):
            self._count(refresh, now)

    def _count(self, refresh: _Refresh, now: float) -> None:
        """The batch on its way is done: its instances count as updated; then Baking or Successful after the last,
        a checkpoint's delay when the batch reached one."""
        assert refresh.batch is not None
        refresh.replaced += refresh.batch.count
        refresh.batch, refresh.reason = None, ""
        if refresh.replaced >= refresh.total:
            bake = int(refresh.preferences.get("BakeTime", 0))
            if bake > 0:
                refresh.status, refresh.bake_until = BAKING, now + bake
            else:
                self._succeed(refresh)
        elif refresh.percentage() >= refresh.goal:
            delay = int(refresh.preferences.get("CheckpointDelay", 3600))  # the documented default
            if delay > 0:
                refresh.checkpoint_until = now + delay
                refresh.reason = f"Waiting {delay}s at checkpoint {refresh.goal}%"

    def _launch_next(self, refresh: _Refresh, now: float) -> bool:
        """Replace the next batch (at most what MinHealthyPercentage allows, never past the next checkpoint); False
        when an instance set apart holds the refresh (or ended it)."""
        checkpoints = [int(c) for c in refresh.preferences.get("CheckpointPercentages") or []] or [100]
        refresh.goal = next((c for c in checkpoints if c > refresh.percentage()), 100)
        count = min(self._batch(refresh), math.ceil(refresh.total * refresh.goal / 100) - refresh.replaced)
        victims = refresh.to_update[refresh.replaced : refresh.replaced + count]
        held = [(v, why) for v in victims if (why := self._held(refresh, v))]
        if held:
            victims = victims[: victims.index(held[0][0])]
        if held and not victims:
            waiting, why = held[0]
            if refresh.wait_since is None:
                refresh.wait_since = now
            if now - refresh.wait_since >= _WAIT_SECONDS:  # "waits one hour […] Otherwise, the refresh will fail"
                self._fail(refresh, f"instance {waiting} was still {why} after {_WAIT_SECONDS}s")
            else:
                refresh.reason = f"Waiting for instance {waiting}, {why}"
            return False
        refresh.wait_since, refresh.reason = None, ""
        template_id, version = refresh.desired["LaunchTemplateId"], refresh.desired["Version"]
        launched = self._replace(refresh, victims, template_id, version)
        refresh.launched += launched
        refresh.batch = self._batch_of(refresh, len(victims), launched, template_id, version, now)
        return True

    def _roll_back_step(self, refresh: _Refresh, now: float) -> None:
        """One look at a rollback: each instance the refresh launched goes back to the previous version, batch by
        batch, each batch through hooks and warm-up like the refresh's."""
        if refresh.batch is not None:
            if not self._settled(refresh, refresh.batch, now):
                return
            refresh.replaced = max(0, refresh.replaced - refresh.batch.count)
            refresh.batch = None
        alive = {s.instance.id for s in refresh.group.instance_states}
        back = [i for i in refresh.launched if i in alive][: self._batch(refresh)]
        if back:
            template, version, _ = refresh.previous
            launched = self._replace(refresh, back, template.id, version)
            refresh.launched = [i for i in refresh.launched if i not in back]
            batch = self._batch_of(refresh, len(back), launched, template.id, version, now)
            if not self._settled(refresh, batch, now):
                refresh.batch = batch
                return
            refresh.replaced = max(0, refresh.replaced - batch.count)
        if not [i for i in refresh.launched if i in alive]:
            refresh.status, refresh.reason, refresh.ended = ROLLBACK_SUCCESSFUL, "", utcnow()

    # --- a batch on its way: launch lifecycle hooks, then warm-up -------------------------------------------

    def _batch_of(
        self, refresh: _Refresh, count: int, instances: list[str], template_id: str, version: str, now: float
    ) -> _Batch:
        heartbeat = self._launch_hooks(refresh)[0]
        if heartbeat is None:
            return _Batch(count, instances, template_id, version, now + refresh.warmup, hooked=False)
        self._lifecycle(refresh, instances, "Pending:Wait")
        return _Batch(count, instances, template_id, version, now + heartbeat, hooked=True)

    def _settled(self, refresh: _Refresh, batch: _Batch, now: float) -> bool:
        """Move `batch` through what has happened by `now`: its hooks time out (nobody completes the lifecycle action:
        moto has no CompleteLifecycleAction) with their DefaultResult — CONTINUE puts the instances in service and
        starts their warm-up, ABANDON terminates them and launches as many again, into the hooks again — and its
        warm-up passes. Whether it is done (its instances count as updated)."""
        while batch.hooked and now >= batch.until:
            heartbeat, result = self._launch_hooks(refresh)
            if result == "ABANDON" and heartbeat is not None:
                again = self._replace(refresh, batch.instances, batch.template_id, batch.version)
                if set(batch.instances) & set(refresh.launched):  # the refresh's batch (not its rollback's)
                    refresh.launched = [i for i in refresh.launched if i not in batch.instances] + again
                self._lifecycle(refresh, again, "Pending:Wait")
                batch.instances, batch.until = again, batch.until + heartbeat
            else:
                self._lifecycle(refresh, batch.instances, "InService")
                batch.hooked, batch.until = False, batch.until + refresh.warmup
        if now < batch.until:
            waiting = ", ".join(batch.instances)
            refresh.reason = (
                f"Waiting for lifecycle hooks of {waiting}" if batch.hooked else f"Waiting for {waiting} to warm up"
            )
            return False
        return True

    @staticmethod
    def _launch_hooks(refresh: _Refresh) -> tuple[float | None, str]:
        """(the longest HeartbeatTimeout, the result when they time out) of the group's launch lifecycle hooks; (None,
        "") without any. The result is ABANDON when any hook's DefaultResult is (an assumption: AWS documents one
        hook's result, not how several combine)."""
        group = refresh.group
        backend = autoscaling_backends[group.account_id][group.region]
        hooks = [h for h in backend.describe_lifecycle_hooks(group.name) if h.lifecycle_transition == _LAUNCHING]
        if not hooks:
            return None, ""
        heartbeat = float(max(max(int(h.heartbeat_timeout), 1) for h in hooks))
        return heartbeat, "ABANDON" if any(h.default_result == "ABANDON" for h in hooks) else "CONTINUE"

    @staticmethod
    def _lifecycle(refresh: _Refresh, instance_ids: list[str], state: str) -> None:
        for s in refresh.group.instance_states:
            if s.instance.id in instance_ids:
                s.lifecycle_state = state

    @staticmethod
    def _succeed(refresh: _Refresh) -> None:
        refresh.status, refresh.reason, refresh.ended = SUCCESSFUL, "", utcnow()
        group = refresh.group  # AWS points the group at the desired configuration once the refresh succeeds
        group.ec2_launch_template = group.ec2_backend.get_launch_template(refresh.desired["LaunchTemplateId"])
        group.launch_template_version = group.provided_launch_template_version = refresh.desired["Version"]

    @staticmethod
    def _terminate(refresh: _Refresh, instance_ids: list[str]) -> None:
        """Terminate `instance_ids` in EC2 and remove them from the group, launching nothing in their place."""
        group = refresh.group
        states = [s for s in group.instance_states if s.instance.id in instance_ids]
        if states:
            group.ec2_backend.terminate_instances([s.instance.id for s in states])
            group.instance_states = [s for s in group.instance_states if s not in states]

    @classmethod
    def _replace(cls, refresh: _Refresh, instance_ids: list[str], template_id: str, version: str) -> list[str]:
        """Terminate `instance_ids` and launch as many into the group from the template version given."""
        group = refresh.group
        count = len([s for s in group.instance_states if s.instance.id in instance_ids])
        if not count:
            return []
        cls._terminate(refresh, instance_ids)
        before = {s.instance.id for s in group.instance_states}
        saved = (group.ec2_launch_template, getattr(group, "launch_template_version", "$Default"))
        group.ec2_launch_template = group.ec2_backend.get_launch_template(template_id)
        group.launch_template_version = version
        try:
            group.replace_autoscaling_group_instances(count, group.get_propagated_tags())
        finally:
            group.ec2_launch_template, group.launch_template_version = saved
        return [s.instance.id for s in group.instance_states if s.instance.id not in before]


def _warmup(preferences: dict[str, Any], group: FakeAutoScalingGroup) -> float:
    """The refresh's InstanceWarmup, else "the value of the DefaultInstanceWarmup property, if defined […], or the
    HealthCheckGracePeriod property otherwise" (RefreshPreferences reference)."""
    if preferences.get("InstanceWarmup") is not None:
        return float(preferences["InstanceWarmup"])
    default = getattr(group, "default_instance_warmup", None)
    return float(default if default is not None else group.health_check_grace_period or 0)


def _irreversible(configuration: tuple[Any, str, str | None]) -> str:
    """Why a refresh cannot roll back to the group's configuration `(template, resolved, provided version)`: not a
    numbered launch template version, or an image from a Systems Manager parameter ("" when it can)."""
    template, _, provided = configuration
    if template is None:
        return "the group launches from a launch configuration, not a numbered launch template version"
    if provided is None or not str(provided).isdigit():
        return f"the group uses version {provided or '$Default'} of its launch template, not a numbered version"
    if str(template.get_version(provided).image_id or "").startswith(_SSM_IMAGE):
        return "the group's launch template version takes its ImageId from a Systems Manager parameter"
    return ""


def _check_preferences(preferences: dict[str, Any], has_desired: bool, previous: tuple[Any, str, str | None]) -> None:
    """StartInstanceRefresh's refusals of its RefreshPreferences (see the module)."""
    points = [int(p) for p in preferences.get("CheckpointPercentages") or []]
    if "CheckpointDelay" in preferences and not points:
        raise ValidationError("CheckpointDelay needs CheckpointPercentages")
    if points and (points != sorted(set(points)) or not all(1 <= p <= 100 for p in points)):
        raise ValidationError(f"CheckpointPercentages {points} must be unique, ascending, 1..100")
    if "MaxHealthyPercentage" in preferences:
        high, low = int(preferences["MaxHealthyPercentage"]), preferences.get("MinHealthyPercentage")
        if low is None or not 100 <= high <= 200 or high - int(low) > 100:
            raise ValidationError("MaxHealthyPercentage needs MinHealthyPercentage, at most 100 below it")
    for key, allowed in _SET_APART.items():
        if key in preferences and preferences[key] not in allowed:
            raise ValidationError(f"{key} must be one of {sorted(allowed)}")
    if preferences.get("AutoRollback"):
        if not has_desired:
            raise ValidationError(
                "The request isn't valid. The AutoRollback parameter cannot be set to true when the "
                "DesiredConfiguration parameter is empty. Set AutoRollback to false or specify a desired "
                "configuration and try again."
            )
        why = _irreversible(previous)
        if why:
            raise ValidationError(f"AutoRollback is not supported: {why}")


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
    alarms: AlarmEmulation


def install_asg_emulation(monkeypatch: pytest.MonkeyPatch, *, launch_after: int = 1) -> AsgEmulations:
    emulations = AsgEmulations(
        LaunchTemplateEmulation(), AsgEmulation(launch_after=launch_after), ConsoleEmulation(), AlarmEmulation()
    )
    emulations.templates.install(monkeypatch)
    emulations.groups.install(monkeypatch)
    emulations.console.install(monkeypatch)
    emulations.alarms.install(monkeypatch)
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
    instance_type: str = "t3.micro",
    warmup: int | None = None,
) -> str:
    """A group of `size` instances launching from a new template `<name>-lt` (version 1: `image_id`,
    `instance_type`); returns the template id. `version=None` leaves the group's version out ($Default); `warmup`
    is its DefaultInstanceWarmup (None: not set, so an instance refresh warms up for the HealthCheckGracePeriod, 0)."""
    ec2 = session.client("ec2", region)
    asg = session.client("autoscaling", region)
    template_id = str(
        ec2.create_launch_template(
            LaunchTemplateName=f"{name}-lt",
            LaunchTemplateData={"ImageId": image_id, "InstanceType": instance_type},
        )["LaunchTemplate"]["LaunchTemplateId"]
    )
    spec: dict[str, str] = {"LaunchTemplateId": template_id}
    if version is not None:
        spec["Version"] = version
    tags = [{"Key": "team", "Value": "web", "PropagateAtLaunch": True}]
    if opted_in:
        tags.append({"Key": ROLLOUT_TAG, "Value": ROLLOUT_ENABLED, "PropagateAtLaunch": False})
    settings: dict[str, int] = {} if warmup is None else {"DefaultInstanceWarmup": warmup}
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=size * 2,
        DesiredCapacity=size,
        LaunchTemplate=spec,
        AvailabilityZones=[f"{region}a"],
        Tags=tags,
        **settings,
    )
    return template_id
