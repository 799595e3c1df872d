"""The emulations of asg_emulation.py behave as the API reference documents and refuse what AWS refuses: instance
refresh (status names, preferences, instances set apart, skip matching, bake time, RollbackInstanceRefresh's three
refusals and no AutoRollback needed), composite alarms and DescribeAlarms' AlarmTypes, and launch template versions
(inherited block device mappings, client tokens, unknown source versions)."""

from __future__ import annotations

import math
from typing import Any

import botocore.session
import pytest
from asg_emulation import (
    REFRESH_STATUSES,
    AlarmEmulation,
    InstanceRefreshEmulation,
    install_asg_emulation,
    make_group,
    make_images,
)
from botocore.exceptions import ClientError
from conftest import REGION, Aws

from amiforge.providers.interface import REFRESH_ACTIVE, REFRESH_ROLLBACK, REFRESH_TERMINAL

# --- instance refresh -------------------------------------------------------------------------------------------


def _code(caught: pytest.ExceptionInfo[ClientError]) -> str:
    return str(caught.value.response["Error"]["Code"])


def test_refresh_statuses_are_the_service_models() -> None:
    model = botocore.session.get_session().get_service_model("autoscaling")
    enum = set(model.shape_for("InstanceRefreshStatus").enum)
    assert enum == REFRESH_STATUSES
    assert enum >= REFRESH_ACTIVE | REFRESH_ROLLBACK | REFRESH_TERMINAL  # what the code under test names


class Refreshes:
    """A group "g" of `size` on image A (template version 1, t3.micro) and version 2 of its template on image B."""

    def __init__(
        self,
        aws: Aws,
        monkeypatch: pytest.MonkeyPatch,
        *,
        size: int = 4,
        version: str | None = "1",
        warmup: int | None = None,
    ) -> None:
        install_asg_emulation(monkeypatch)
        self.emulation = InstanceRefreshEmulation(seconds_per_look=60.0)
        self.emulation.install(monkeypatch)
        self.aws = aws
        self.ec2: Any = aws.ec2()
        self.asg: Any = aws.session.client("autoscaling")
        self.image_a, self.image_b = make_images(self.ec2, "a", "b")
        self.template = make_group(aws.session, "g", self.image_a, size=size, version=version, warmup=warmup)
        self.ec2.create_launch_template_version(
            LaunchTemplateId=self.template, SourceVersion="1", LaunchTemplateData={"ImageId": self.image_b}
        )

    def desired(self, version: str = "2") -> dict[str, Any]:
        return {"LaunchTemplate": {"LaunchTemplateId": self.template, "Version": version}}

    def start(self, **preferences: Any) -> str:
        return str(
            self.asg.start_instance_refresh(
                AutoScalingGroupName="g", DesiredConfiguration=self.desired(), Preferences=preferences
            )["InstanceRefreshId"]
        )

    def look(self) -> dict[str, Any]:
        return dict(self.asg.describe_instance_refreshes(AutoScalingGroupName="g")["InstanceRefreshes"][0])

    def follow(self, limit: int = 200) -> list[dict[str, Any]]:
        seen = [self.look()]
        while seen[-1]["Status"] in REFRESH_ACTIVE:
            assert len(seen) < limit, seen[-3:]
            seen.append(self.look())
        return seen

    def members(self) -> dict[str, dict[str, Any]]:
        group = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=["g"])["AutoScalingGroups"][0]
        return {i["InstanceId"]: i for i in group["Instances"]}

    def image(self, instance_id: str) -> str:
        found = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        return str(found["ImageId"])

    def images(self) -> list[str]:
        return sorted(self.image(i) for i, m in self.members().items() if m["LifecycleState"] == "InService")

    def progress(self, refresh: dict[str, Any]) -> tuple[str, int, int]:
        return refresh["Status"], refresh["PercentageComplete"], refresh["InstancesToUpdate"]

    def launch_hook(self, result: str, heartbeat: int = 180) -> None:
        self.asg.put_lifecycle_hook(
            LifecycleHookName="register", AutoScalingGroupName="g", HeartbeatTimeout=heartbeat,
            LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING", DefaultResult=result,
        )  # fmt: skip


def test_a_manual_rollback_needs_no_auto_rollback(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Refreshes(aws, monkeypatch)
    env.start(AutoRollback=False, MinHealthyPercentage=75)
    for _ in range(3):
        env.look()
    assert env.asg.rollback_instance_refresh(AutoScalingGroupName="g")["InstanceRefreshId"]
    seen = env.follow()
    assert seen[0]["Status"] == "RollbackInProgress" and seen[-1]["Status"] == "RollbackSuccessful"
    details = seen[0]["RollbackDetails"]
    assert details["PercentageCompleteOnRollback"] == 50 and details["InstancesToUpdateOnRollback"] == 2
    assert {s["InstancesToUpdate"] for s in seen} == {2}  # what was not updated yet needs no rollback
    assert [s["PercentageComplete"] for s in seen] == sorted((s["PercentageComplete"] for s in seen), reverse=True)
    assert env.images() == [env.image_a] * 4


def _launch_configuration_group(env: Refreshes) -> None:
    env.asg.create_launch_configuration(LaunchConfigurationName="lc", ImageId=env.image_a, InstanceType="t3.micro")
    env.asg.delete_auto_scaling_group(AutoScalingGroupName="g", ForceDelete=True)
    env.asg.create_auto_scaling_group(
        AutoScalingGroupName="g", LaunchConfigurationName="lc", MinSize=0, MaxSize=4, DesiredCapacity=2,
        AvailabilityZones=[f"{REGION}a"],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("case", "version", "desired"),
    [("no-desired-configuration", "1", False), ("latest", "$Latest", True), ("default", "$Default", True),
     ("no-version", None, True), ("ssm-image", "1", True), ("launch-configuration", "1", True)],
)  # fmt: skip
def test_rollback_refuses_the_three_documented_cases(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, case: str, version: str | None, desired: bool
) -> None:
    env = Refreshes(aws, monkeypatch, version=version)
    if case == "ssm-image":
        env.ec2.create_launch_template_version(
            LaunchTemplateId=env.template, SourceVersion="1", LaunchTemplateData={"ImageId": "resolve:ssm:/golden/web"}
        )  # version 3
        env.asg.update_auto_scaling_group(
            AutoScalingGroupName="g", LaunchTemplate={"LaunchTemplateId": env.template, "Version": "3"}
        )
    if case == "launch-configuration":
        _launch_configuration_group(env)
    kwargs = {"DesiredConfiguration": env.desired()} if desired else {}
    env.asg.start_instance_refresh(AutoScalingGroupName="g", **kwargs)
    env.look()
    with pytest.raises(ClientError) as caught:
        env.asg.rollback_instance_refresh(AutoScalingGroupName="g")
    assert _code(caught) == "IrreversibleInstanceRefresh"
    assert env.look()["Status"] == "InProgress"


def test_rollback_without_an_active_refresh_or_of_a_rollback_is_not_found(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Refreshes(aws, monkeypatch)
    with pytest.raises(ClientError) as caught:
        env.asg.rollback_instance_refresh(AutoScalingGroupName="g")
    assert _code(caught) == "ActiveInstanceRefreshNotFound"
    env.start(MinHealthyPercentage=75)
    env.look()
    env.asg.rollback_instance_refresh(AutoScalingGroupName="g")
    with pytest.raises(ClientError) as again:
        env.asg.rollback_instance_refresh(AutoScalingGroupName="g")
    assert _code(again) == "ActiveInstanceRefreshNotFound"


@pytest.mark.parametrize(
    ("preferences", "words"),
    [({"CheckpointDelay": 60}, "CheckpointPercentages"),
     ({"CheckpointPercentages": [50, 20, 100]}, "ascending"),
     ({"CheckpointPercentages": [50, 50, 100]}, "unique"),
     ({"MaxHealthyPercentage": 150}, "MinHealthyPercentage"),
     ({"MinHealthyPercentage": 20, "MaxHealthyPercentage": 150}, "at most 100"),
     ({"ScaleInProtectedInstances": "Terminate"}, "ScaleInProtectedInstances"),
     ({"StandbyInstances": "Refresh"}, "StandbyInstances")],
)  # fmt: skip
def test_start_refuses_preferences_the_reference_refuses(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, preferences: dict[str, Any], words: str
) -> None:
    env = Refreshes(aws, monkeypatch)
    with pytest.raises(ClientError) as caught:
        env.start(**preferences)
    assert _code(caught) == "ValidationError" and words in str(caught.value)
    assert env.emulation.refreshes == []


def test_auto_rollback_is_refused_where_a_rollback_is_not_supported(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Refreshes(aws, monkeypatch)
    with pytest.raises(ClientError) as caught:  # the answer AWS gives (seen in the wild)
        env.asg.start_instance_refresh(AutoScalingGroupName="g", Preferences={"AutoRollback": True})
    assert _code(caught) == "ValidationError" and "DesiredConfiguration parameter is empty" in str(caught.value)
    env.asg.update_auto_scaling_group(
        AutoScalingGroupName="g", LaunchTemplate={"LaunchTemplateId": env.template, "Version": "$Default"}
    )
    with pytest.raises(ClientError) as default:
        env.start(AutoRollback=True)
    assert _code(default) == "ValidationError" and "$Default" in str(default.value)
    assert env.emulation.refreshes == []


def test_protected_instances_are_waited_for_an_hour_by_default_then_the_refresh_fails(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Refreshes(aws, monkeypatch)
    protected = sorted(env.members())[0]
    env.asg.set_instance_protection(AutoScalingGroupName="g", InstanceIds=[protected], ProtectedFromScaleIn=True)
    env.start(MinHealthyPercentage=50)
    seen = env.follow()
    assert seen[-1]["Status"] == "Failed" and protected in seen[-1]["StatusReason"]
    waiting = [s for s in seen if s["Status"] == "InProgress" and "Waiting for instance" in s["StatusReason"]]
    # One look a minute: those at 0, 60, …, 3540 s of waiting wait; the one an hour after the first fails it.
    assert len(waiting) == 3600 // 60 and {s["PercentageComplete"] for s in waiting} == {75}
    assert env.image(protected) == env.image_a and env.images().count(env.image_b) == 3


def test_lifting_the_protection_lets_a_waiting_refresh_finish(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Refreshes(aws, monkeypatch)
    protected = sorted(env.members())[0]
    env.asg.set_instance_protection(AutoScalingGroupName="g", InstanceIds=[protected], ProtectedFromScaleIn=True)
    env.start(MinHealthyPercentage=50, ScaleInProtectedInstances="Wait")
    for _ in range(6):
        env.look()
    assert "Waiting for instance" in env.look()["StatusReason"]
    env.asg.set_instance_protection(AutoScalingGroupName="g", InstanceIds=[protected], ProtectedFromScaleIn=False)
    assert env.follow()[-1]["Status"] == "Successful" and env.images() == [env.image_b] * 4


@pytest.mark.parametrize(
    ("preference", "expected"), [("Ignore", "kept"), ("Refresh", "replaced")]
)  # fmt: skip
def test_protected_instances_ignored_or_refreshed(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, preference: str, expected: str
) -> None:
    env = Refreshes(aws, monkeypatch)
    protected = sorted(env.members())[0]
    env.asg.set_instance_protection(AutoScalingGroupName="g", InstanceIds=[protected], ProtectedFromScaleIn=True)
    env.start(ScaleInProtectedInstances=preference)
    seen = env.follow()
    assert seen[-1]["Status"] == "Successful" and len(seen) < 10
    assert (protected in env.members()) == (expected == "kept")
    assert env.images().count(env.image_a) == (1 if expected == "kept" else 0)


@pytest.mark.parametrize("preference", ["Wait", "Ignore", "Terminate"])
def test_standby_instances_waited_for_ignored_or_terminated(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, preference: str
) -> None:
    env = Refreshes(aws, monkeypatch)
    standby = sorted(env.members())[0]
    env.asg.enter_standby(AutoScalingGroupName="g", InstanceIds=[standby], ShouldDecrementDesiredCapacity=True)
    env.start(StandbyInstances=preference)
    seen = env.follow()
    instances = env.members()
    if preference == "Wait":
        assert seen[-1]["Status"] == "Failed" and "in Standby" in seen[-1]["StatusReason"]
        assert instances[standby]["LifecycleState"] == "Standby"
    elif preference == "Ignore":
        assert seen[-1]["Status"] == "Successful" and instances[standby]["LifecycleState"] == "Standby"
        assert env.image(standby) == env.image_a
    else:
        assert seen[-1]["Status"] == "Successful" and standby not in instances
    assert env.images().count(env.image_b) == 3  # the three in service were replaced either way


def test_skip_matching_goes_by_template_version_not_by_image(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Refreshes(aws, monkeypatch)
    env.ec2.create_launch_template_version(  # version 3: image A again, another instance type
        LaunchTemplateId=env.template, SourceVersion="1", LaunchTemplateData={"InstanceType": "t3.large"}
    )
    env.asg.start_instance_refresh(
        AutoScalingGroupName="g", DesiredConfiguration=env.desired("3"), Preferences={"SkipMatching": True}
    )
    assert env.look()["InstancesToUpdate"] == 4  # same image, another version: not matching
    env.follow()
    env.asg.start_instance_refresh(
        AutoScalingGroupName="g", DesiredConfiguration=env.desired("3"), Preferences={"SkipMatching": True}
    )
    again = env.look()
    assert again["InstancesToUpdate"] == 0 and env.follow()[-1]["Status"] == "Successful"


def test_bake_time_is_baking_after_the_last_replacement(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Refreshes(aws, monkeypatch, size=2)
    env.start(MinHealthyPercentage=0, BakeTime=120)
    statuses = [(s["Status"], s["PercentageComplete"]) for s in env.follow()]
    assert statuses == [("InProgress", 0), ("Baking", 100), ("Baking", 100), ("Successful", 100)]


def test_a_composite_alarm_in_alarm_rolls_a_refresh_back(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Refreshes(aws, monkeypatch)
    cloudwatch: Any = aws.session.client("cloudwatch")
    _metric_alarm(cloudwatch, "m1")
    cloudwatch.put_composite_alarm(AlarmName="c1", AlarmRule='ALARM("m1")')
    env.start(AutoRollback=True, AlarmSpecification={"Alarms": ["c1"]}, MinHealthyPercentage=75)
    env.look()
    cloudwatch.set_alarm_state(AlarmName="m1", StateValue="ALARM", StateReason="test")
    seen = env.follow()
    assert seen[0]["Status"] == "RollbackInProgress" and "c1" in seen[0]["StatusReason"]
    assert seen[-1]["Status"] == "RollbackSuccessful"


# --- warm-up and launch lifecycle hooks: what a batch waits for before it counts ------------------------------


def test_a_batch_counts_only_once_its_warm_up_has_passed_and_the_next_waits_for_it(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PercentageComplete counts an instance "when the instance's health status changes to healthy and the specified
    warm-up time passes"; the next batch waits. 4 at 50 %: batches of 2, 300 s of warm-up, a look a minute."""
    env = Refreshes(aws, monkeypatch, warmup=300)
    env.start(MinHealthyPercentage=50)
    seen = [env.progress(s) for s in env.follow()]
    # The first look starts it; the second launches batch 1, counted 300 s later, at the look that launches batch 2.
    assert seen == [("InProgress", 0, 4)] * 6 + [("InProgress", 50, 2)] * 5 + [("Successful", 100, 0)]
    assert env.images() == [env.image_b] * 4


def test_while_a_batch_warms_up_its_instances_serve_and_no_others_are_replaced(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Refreshes(aws, monkeypatch, warmup=300)
    env.start(MinHealthyPercentage=50)
    env.look(), env.look()  # started, batch 1 launched
    warming = env.look()
    assert env.progress(warming) == ("InProgress", 0, 4) and "warm up" in warming["StatusReason"]
    assert env.images() == sorted([env.image_a] * 2 + [env.image_b] * 2)  # in service, not counted yet


@pytest.mark.parametrize(
    ("preference", "default_warmup", "grace", "expected"),
    [(120, 300, 600, 120), (None, 300, 600, 300), (None, None, 600, 600), (None, -1, 600, 600), (None, None, None, 0)],
)
def test_the_warm_up_is_the_preference_else_the_default_instance_warmup_else_the_grace_period(
    aws: Aws,
    monkeypatch: pytest.MonkeyPatch,
    preference: int | None,
    default_warmup: int | None,
    grace: int | None,
    expected: int,
) -> None:
    """As the RefreshPreferences reference says; -1 leaves no DefaultInstanceWarmup; no grace period is 0 on AWS."""
    env = Refreshes(aws, monkeypatch, size=2, warmup=default_warmup)
    if grace is not None:
        env.asg.update_auto_scaling_group(AutoScalingGroupName="g", HealthCheckGracePeriod=grace)
    env.start(MinHealthyPercentage=0, **({} if preference is None else {"InstanceWarmup": preference}))
    seen = [env.progress(s) for s in env.follow()]
    # Started at the first look; one batch of both launched at the second (60 s), counted at the first look at least
    # `expected` seconds later.
    assert seen == [("InProgress", 0, 2)] * (1 + math.ceil(expected / 60)) + [("Successful", 100, 0)]


def test_moto_loses_the_warm_up_settings_which_the_emulation_keeps(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason for the group settings in AsgEmulation: if the first half starts failing, moto has caught up."""
    ec2: Any = aws.ec2()
    asg: Any = aws.session.client("autoscaling")
    (image,) = make_images(ec2, "a")

    def created(name: str) -> dict[str, Any]:
        make_group(aws.session, name, image, size=1, warmup=120)
        asg.update_auto_scaling_group(AutoScalingGroupName=name, HealthCheckGracePeriod=0)
        return dict(asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0])

    plain = created("moto")
    assert "DefaultInstanceWarmup" not in plain
    asg.create_auto_scaling_group(
        AutoScalingGroupName="zero", MinSize=0, MaxSize=1, DesiredCapacity=0, HealthCheckGracePeriod=0,
        LaunchTemplate={"LaunchTemplateName": "moto-lt"}, AvailabilityZones=[f"{REGION}a"],
    )  # fmt: skip
    assert (
        asg.describe_auto_scaling_groups(AutoScalingGroupNames=["zero"])["AutoScalingGroups"][0][
            "HealthCheckGracePeriod"
        ]
        == 300
    )
    install_asg_emulation(monkeypatch)
    kept = created("emulated")
    assert kept["DefaultInstanceWarmup"] == 120 and kept["HealthCheckGracePeriod"] == 0
    asg.update_auto_scaling_group(AutoScalingGroupName="emulated", DefaultInstanceWarmup=-1)
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["emulated"])["AutoScalingGroups"][0]
    assert "DefaultInstanceWarmup" not in group


def test_launch_hooks_hold_a_batch_in_pending_wait_until_they_time_out(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody completes the lifecycle action: after HeartbeatTimeout (180 s) its DefaultResult CONTINUE puts the
    instances in service, and only then does their warm-up (120 s) start."""
    env = Refreshes(aws, monkeypatch, size=2, warmup=120)
    env.launch_hook("CONTINUE")
    env.start(MinHealthyPercentage=0)
    env.look(), env.look()  # started; the batch launched into the hook
    hooked = env.look()
    assert "lifecycle hooks" in hooked["StatusReason"]
    assert {m["LifecycleState"] for m in env.members().values()} == {"Pending:Wait"}
    seen = [env.progress(s) for s in env.follow()]
    assert {m["LifecycleState"] for m in env.members().values()} == {"InService"}
    # Launched at 120 s: in the hook until 300 s, warming up until 420 s; the looks at 240, 300 and 360 s wait.
    assert seen == [("InProgress", 0, 2)] * 3 + [("Successful", 100, 0)]
    assert env.images() == [env.image_b] * 2


def test_a_launch_hook_that_abandons_every_launch_holds_the_refresh_where_it_is(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ABANDON (the hook's default result) terminates the instance when the hook times out and the group launches
    another, into the hook again: the refresh stays InProgress at the same percentage for as long as that lasts."""
    env = Refreshes(aws, monkeypatch, size=2)
    env.launch_hook("ABANDON")
    env.start(MinHealthyPercentage=50)
    seen = [env.progress(env.look()) for _ in range(30)]
    assert set(seen) == {("InProgress", 0, 2)}
    launched = [i for i, m in env.members().items() if env.image(i) == env.image_b]
    assert len(launched) == 1 and launched[0] not in env.emulation.refreshes[0].to_update
    assert len(env.emulation.launched_from) > 5  # one launch per 180 s, each abandoned
    env.launch_hook("CONTINUE")  # the handler mended: the refresh goes on
    assert env.progress(env.follow()[-1]) == ("Successful", 100, 0)


# --- CloudWatch alarms ------------------------------------------------------------------------------------------


def _metric_alarm(cloudwatch: Any, name: str) -> None:
    cloudwatch.put_metric_alarm(
        AlarmName=name, MetricName="HTTPCode_Target_5XX_Count", Namespace="AWS/ApplicationELB", Statistic="Sum",
        Period=60, EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanOrEqualToThreshold",
    )  # fmt: skip


def test_moto_does_not_implement_composite_alarms_nor_alarm_types(aws: Aws) -> None:
    """The reason for AlarmEmulation: if this starts failing, moto has caught up."""
    cloudwatch: Any = aws.session.client("cloudwatch")
    _metric_alarm(cloudwatch, "m1")
    with pytest.raises(NotImplementedError):
        cloudwatch.put_composite_alarm(AlarmName="c1", AlarmRule='ALARM("m1")')
    assert [a["AlarmName"] for a in cloudwatch.describe_alarms(AlarmTypes=["CompositeAlarm"])["MetricAlarms"]]


def test_composite_alarms_follow_their_rule_and_are_listed_only_when_asked_for(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    AlarmEmulation().install(monkeypatch)
    cloudwatch: Any = aws.session.client("cloudwatch")
    for name in ("m1", "m2"):
        _metric_alarm(cloudwatch, name)
    arn = cloudwatch.describe_alarms(AlarmNames=["m2"])["MetricAlarms"][0]["AlarmArn"]
    cloudwatch.put_composite_alarm(AlarmName="c1", AlarmRule=f'ALARM("m1") AND (ALARM({arn}) OR FALSE)')

    def composite() -> str:
        answer = cloudwatch.describe_alarms(AlarmNames=["c1", "m1"], AlarmTypes=["CompositeAlarm"])
        assert answer["MetricAlarms"] == []  # only the types asked for
        (alarm,) = answer["CompositeAlarms"]
        return str(alarm["StateValue"])

    plain = cloudwatch.describe_alarms(AlarmNames=["c1", "m1"])  # no AlarmTypes: metric alarms only
    assert [a["AlarmName"] for a in plain["MetricAlarms"]] == ["m1"] and plain["CompositeAlarms"] == []
    assert composite() == "OK"
    cloudwatch.set_alarm_state(AlarmName="m1", StateValue="ALARM", StateReason="test")
    assert composite() == "OK"  # m2 is not in ALARM
    cloudwatch.set_alarm_state(AlarmName="m2", StateValue="ALARM", StateReason="test")
    assert composite() == "ALARM"
    cloudwatch.set_alarm_state(AlarmName="c1", StateValue="OK", StateReason="test")
    assert composite() == "OK"  # set by hand: holds until a child changes
    cloudwatch.set_alarm_state(AlarmName="m1", StateValue="OK", StateReason="test")
    cloudwatch.set_alarm_state(AlarmName="m1", StateValue="ALARM", StateReason="test")
    assert composite() == "ALARM"


@pytest.mark.parametrize(
    "rule", ['ALARM("m1") AND', "ALARM(m1) XOR ALARM(m1)", 'BROKEN("m1")', '(ALARM("m1")', 'ALARM("m1"))']
)
def test_a_composite_rule_that_does_not_parse_is_refused(aws: Aws, monkeypatch: pytest.MonkeyPatch, rule: str) -> None:
    AlarmEmulation().install(monkeypatch)
    cloudwatch: Any = aws.session.client("cloudwatch")
    _metric_alarm(cloudwatch, "m1")
    with pytest.raises(ClientError) as caught:
        cloudwatch.put_composite_alarm(AlarmName="c1", AlarmRule=rule)
    assert _code(caught) == "ValidationError"
    assert cloudwatch.describe_alarms(AlarmTypes=["CompositeAlarm"])["CompositeAlarms"] == []
    with pytest.raises(ClientError) as unknown:
        cloudwatch.set_alarm_state(AlarmName="c1", StateValue="ALARM", StateReason="test")
    assert _code(unknown) == "ResourceNotFound"


# --- launch template versions -----------------------------------------------------------------------------------


def test_inherited_block_device_mappings_lose_their_snapshot_ids(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    install_asg_emulation(monkeypatch)
    ec2: Any = aws.ec2()
    volume = {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-0000000000test01", "VolumeSize": 20}}
    data = {"ImageId": "ami-11111111", "InstanceType": "t3.micro", "BlockDeviceMappings": [volume]}
    template = ec2.create_launch_template(LaunchTemplateName="lt", LaunchTemplateData=data)["LaunchTemplate"]
    kw: dict[str, Any] = {"LaunchTemplateId": template["LaunchTemplateId"], "SourceVersion": "1"}
    inherited = ec2.create_launch_template_version(**kw, LaunchTemplateData={"ImageId": "ami-22222222"})
    mappings = inherited["LaunchTemplateVersion"]["LaunchTemplateData"]["BlockDeviceMappings"]
    assert mappings == [{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 20}}]
    explicit = ec2.create_launch_template_version(**kw, LaunchTemplateData={"BlockDeviceMappings": [volume]})
    assert explicit["LaunchTemplateVersion"]["LaunchTemplateData"]["BlockDeviceMappings"] == [volume]


def test_client_tokens_are_the_accounts_and_unknown_source_versions_are_refused(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_asg_emulation(monkeypatch)
    ec2: Any = aws.ec2()
    ids = [
        ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": "ami-11111111"})[
            "LaunchTemplate"
        ]["LaunchTemplateId"]
        for name in ("one", "two")
    ]
    data = {"ImageId": "ami-22222222"}
    ec2.create_launch_template_version(LaunchTemplateId=ids[0], LaunchTemplateData=data, ClientToken="t")
    with pytest.raises(ClientError) as caught:  # the same token for another template is another request
        ec2.create_launch_template_version(LaunchTemplateId=ids[1], LaunchTemplateData=data, ClientToken="t")
    assert _code(caught) == "IdempotentParameterMismatch"
    for source in ("0", "-1", "7"):
        with pytest.raises(ClientError) as unknown:
            ec2.create_launch_template_version(LaunchTemplateId=ids[0], SourceVersion=source, LaunchTemplateData=data)
        assert _code(unknown) == "InvalidLaunchTemplateId.VersionNotFound"
