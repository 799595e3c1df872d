"""The instance-refresh mode (providers/aws/refresh.py) on moto, with instance refresh emulated (asg_emulation.py):
checkpoints to Successful, idempotency per token, rollback mid-way (asked and on an alarm), every refusal, and the
same run under 30 % throttling; what a batch may take, read from the group; and the rollout controller
(lifecycle/refresh.py) on a group whose batches take a lifecycle hook and a warm-up, on the emulation's clock: a slow
refresh that keeps moving is not rolled back, one that stops moving is."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asg_emulation import FakeTime, InstanceRefreshEmulation, install_asg_emulation, make_group, make_images
from conftest import REGION, Aws

from amiforge.errors import AmiforgeError, ConfigError, GateFailed, NotFound, StateError
from amiforge.lifecycle import refresh as refresh_controller
from amiforge.lifecycle.controller import Controls
from amiforge.lifecycle.refresh import STALL_BATCHES, drive_refresh
from amiforge.model import Artifact, Rollout, Status
from amiforge.providers.aws.asg_records import ROLLOUT_ENABLED, ROLLOUT_TAG
from amiforge.providers.aws.fleet import AsgFleet
from amiforge.providers.aws.refresh import RefreshStatus, refresh_status, roll_back_refresh, start_refresh
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from amiforge.strategy import Strategy

GROUP = "web"
ALARM = "web-5xx"


@dataclass
class Env:
    aws: Aws
    refreshes: InstanceRefreshEmulation
    image_a: str
    image_b: str

    @property
    def asg(self) -> Any:
        return self.aws.session.client("autoscaling")

    @property
    def ec2(self) -> Any:
        return self.aws.session.client("ec2")

    def fleet(self, group: str = GROUP) -> AsgFleet:
        time = FakeTime()
        return AsgFleet(self.aws.session, REGION, group, wait=time.wait(), now=time.now)

    def artifact(self, image_id: str) -> Artifact:
        return Artifact(provider="aws", region=REGION, location=image_id, digest="sha256:x", size_bytes=0)

    def start(self, token: str = "t-1", group: str = GROUP, **kwargs: Any) -> str:
        options: dict[str, Any] = {"checkpoints": [25, 50, 100], "checkpoint_delay": 120, "alarms": [ALARM]}
        options.update(kwargs)
        return start_refresh(self.fleet(group), self.artifact(self.image_b), "web@2", token=token, **options)

    def group(self, name: str = GROUP) -> dict[str, Any]:
        return dict(self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0])

    def images(self, name: str = GROUP) -> list[str]:
        """The AMI of each member of the group."""
        ids = [i["InstanceId"] for i in self.group(name)["Instances"]]
        found = self.ec2.describe_instances(InstanceIds=ids)["Reservations"]
        return sorted(i["ImageId"] for r in found for i in r["Instances"])

    def versions(self, name: str = GROUP) -> int:
        spec = self.group(name)["LaunchTemplate"]
        answer = self.ec2.describe_launch_template_versions(LaunchTemplateId=spec["LaunchTemplateId"])
        return len(answer["LaunchTemplateVersions"])

    def follow(self, refresh_id: str, *, until: Callable[[RefreshStatus], bool] | None = None) -> list[RefreshStatus]:
        """refresh_status until the refresh is no longer active (or `until(status)` holds); every status seen."""
        seen: list[RefreshStatus] = []
        for _ in range(200):
            status = refresh_status(self.fleet(), refresh_id)
            seen.append(status)
            if not status.active or (until is not None and until(status)):
                return seen
        raise AssertionError(f"refresh {refresh_id} never ended: {seen[-3:]}")


def _env(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Env:
    install_asg_emulation(monkeypatch)
    refreshes = InstanceRefreshEmulation(seconds_per_look=60.0)
    refreshes.install(monkeypatch)
    image_a, image_b = make_images(aws.session.client("ec2"), "a", "b")
    make_group(aws.session, GROUP, image_a, size=4)
    cloudwatch: Any = aws.session.client("cloudwatch")
    cloudwatch.put_metric_alarm(
        AlarmName=ALARM, MetricName="HTTPCode_Target_5XX_Count", Namespace="AWS/ApplicationELB", Statistic="Sum",
        Period=60, EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanOrEqualToThreshold",
    )  # fmt: skip
    aws.calls.reset()
    return Env(aws, refreshes, image_a, image_b)


@pytest.fixture
def env(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Env:
    return _env(aws, monkeypatch)


def _completes(env: Env) -> None:
    refresh_id = env.start()
    (recorded,) = env.refreshes.refreshes
    assert recorded.desired["Version"] == "2"  # the numeric version made for the AMI, never $Latest
    assert recorded.preferences == {
        "CheckpointPercentages": [25, 50, 100],
        "CheckpointDelay": 120,
        "MinHealthyPercentage": 90,
        "AutoRollback": True,
        "SkipMatching": True,
        "ScaleInProtectedInstances": "Ignore",
        "StandbyInstances": "Ignore",
        "AlarmSpecification": {"Alarms": [ALARM]},
    }
    seen = env.follow(refresh_id)
    statuses = [s.status for s in seen]
    assert statuses[-1] == "Successful" and seen[-1].percentage_complete == 100 and seen[-1].instances_to_update == 0
    # Two checkpoints below 100, each waited 120 s = two looks after the one that reached it, still InProgress.
    waits = Counter(s.percentage_complete for s in seen if s.status == "InProgress")
    assert waits[25] == waits[50] == 1 + 2 and "Baking" not in statuses
    percentages = [s.percentage_complete for s in seen]
    assert percentages == sorted(percentages) and {25, 50} <= set(percentages)
    assert env.images() == [env.image_b] * 4
    assert env.group()["LaunchTemplate"]["Version"] == "2"  # AWS points the group at the desired version
    assert env.versions() == 2


def test_checkpoints_then_successful_with_every_instance_on_the_new_image(env: Env) -> None:
    _completes(env)
    assert env.aws.calls["autoscaling.StartInstanceRefresh"] == 1


def test_the_same_token_finds_its_refresh_instead_of_starting_another(env: Env) -> None:
    refresh_id = env.start()
    env.follow(refresh_id, until=lambda s: s.percentage_complete >= 25)
    assert env.start() == refresh_id  # in progress
    env.follow(refresh_id)
    assert env.start() == refresh_id  # Successful, the group on its version
    assert len(env.refreshes.refreshes) == 1 and env.aws.calls["autoscaling.StartInstanceRefresh"] == 1
    assert env.aws.calls["ec2.CreateLaunchTemplateVersion"] == 1 and env.versions() == 2


def test_rolled_back_mid_way_puts_every_instance_back_on_the_old_image(env: Env) -> None:
    refresh_id = env.start()
    env.follow(refresh_id, until=lambda s: s.percentage_complete >= 50)
    assert env.images().count(env.image_b) == 2
    first = roll_back_refresh(env.fleet(), refresh_id)
    assert first.status == "RollbackInProgress"
    again = roll_back_refresh(env.fleet(), refresh_id)  # idempotent: no second RollbackInstanceRefresh
    assert again.status.startswith("Rollback") and env.aws.calls["autoscaling.RollbackInstanceRefresh"] == 1
    assert env.follow(refresh_id)[-1].status == "RollbackSuccessful"
    assert roll_back_refresh(env.fleet(), refresh_id).status == "RollbackSuccessful"
    assert env.images() == [env.image_a] * 4
    assert env.group()["LaunchTemplate"]["Version"] == "1"


def test_an_alarm_rolls_the_refresh_back_on_its_own(env: Env) -> None:
    refresh_id = env.start()
    env.follow(refresh_id, until=lambda s: s.percentage_complete >= 25)
    cloudwatch: Any = env.aws.session.client("cloudwatch")
    cloudwatch.set_alarm_state(AlarmName=ALARM, StateValue="ALARM", StateReason="test")
    seen = env.follow(refresh_id)
    assert seen[-1].status == "RollbackSuccessful" and ALARM in seen[0].status_reason
    assert env.images() == [env.image_a] * 4


def test_without_auto_rollback_an_alarm_fails_the_refresh_where_it_is(env: Env) -> None:
    """A roll-forward starts from the bad version: AWS must not roll it back to that one. Asked without AutoRollback,
    the refresh stops where it is and the group keeps what it has (the controller says so and what to do)."""
    refresh_id = env.start(auto_rollback=False)
    (recorded,) = env.refreshes.refreshes
    assert recorded.preferences["AutoRollback"] is False
    env.follow(refresh_id, until=lambda s: s.percentage_complete >= 25)
    cloudwatch: Any = env.aws.session.client("cloudwatch")
    cloudwatch.set_alarm_state(AlarmName=ALARM, StateValue="ALARM", StateReason="test")
    seen = env.follow(refresh_id)
    assert seen[-1].status == "Failed" and "RollbackInProgress" not in {s.status for s in seen}
    assert sorted(env.images()) == sorted([env.image_a] * 3 + [env.image_b])


def test_a_finished_refresh_cannot_be_rolled_back_and_unknown_ids_are_not_found(env: Env) -> None:
    refresh_id = env.start(checkpoints=[], checkpoint_delay=0)
    assert env.follow(refresh_id)[-1].status == "Successful"
    with pytest.raises(StateError) as caught:
        roll_back_refresh(env.fleet(), refresh_id)
    assert caught.value.fix is not None and "roll forward" in caught.value.fix
    with pytest.raises(NotFound):
        refresh_status(env.fleet(), "00000000-0000-0000-0000-000000000000")


def test_a_group_already_on_the_image_without_a_refresh_is_refused(env: Env) -> None:
    make_group(env.aws.session, "done", env.image_b, size=2)
    with pytest.raises(StateError) as caught:
        env.start(group="done")
    assert "nothing to refresh" in caught.value.message


def test_protected_and_standby_instances_keep_the_old_image_and_never_hold_the_refresh(env: Env) -> None:
    """AWS's default for both is Wait: an hour per refresh, then it fails (and rolls back). amiforge ignores them."""
    protected, standby = sorted(i["InstanceId"] for i in env.group()["Instances"])[:2]
    env.asg.set_instance_protection(AutoScalingGroupName=GROUP, InstanceIds=[protected], ProtectedFromScaleIn=True)
    env.asg.enter_standby(AutoScalingGroupName=GROUP, InstanceIds=[standby], ShouldDecrementDesiredCapacity=True)
    refresh_id = env.start()
    seen = env.follow(refresh_id)
    assert seen[-1].status == "Successful" and len(seen) < 20
    members = {i["InstanceId"]: i["LifecycleState"] for i in env.group()["Instances"]}
    assert members[protected] == "InService" and members[standby] == "Standby"
    assert env.images() == sorted([env.image_a, env.image_a, env.image_b, env.image_b])  # those two kept theirs


def test_a_version_with_the_image_but_another_field_is_not_reused(env: Env) -> None:
    template = env.group()["LaunchTemplate"]["LaunchTemplateId"]
    data = {"ImageId": env.image_b, "InstanceType": "t3.large"}  # someone's version 2: our image, another type
    env.ec2.create_launch_template_version(LaunchTemplateId=template, SourceVersion="1", LaunchTemplateData=data)
    refresh_id = env.start()
    (recorded,) = env.refreshes.refreshes
    assert recorded.desired["Version"] == "3"
    made = env.ec2.describe_launch_template_versions(LaunchTemplateId=template, Versions=["3"])
    assert made["LaunchTemplateVersions"][0]["LaunchTemplateData"] == {
        "ImageId": env.image_b,
        "InstanceType": "t3.micro",
    }
    assert env.start() == refresh_id and env.versions() == 3  # and version 3, ours, is found again


def test_a_version_an_interrupted_run_made_is_reused_though_it_lost_its_snapshot_ids(env: Env) -> None:
    """EC2 drops inherited block device mappings' snapshot ids: the version made from the group's is still an exact
    copy of what would be created, and is reused."""
    template = env.group()["LaunchTemplate"]["LaunchTemplateId"]
    volume = {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-0000000000test01", "VolumeSize": 20}}
    env.ec2.create_launch_template_version(
        LaunchTemplateId=template, SourceVersion="1", LaunchTemplateData={"BlockDeviceMappings": [volume]}
    )  # version 2: the group's, with a root volume from a snapshot
    env.asg.update_auto_scaling_group(
        AutoScalingGroupName=GROUP, LaunchTemplate={"LaunchTemplateId": template, "Version": "2"}
    )
    env.ec2.create_launch_template_version(  # version 3: what an interrupted run made from it
        LaunchTemplateId=template, SourceVersion="2", LaunchTemplateData={"ImageId": env.image_b}
    )
    env.aws.calls.reset()
    env.start()
    (recorded,) = env.refreshes.refreshes
    assert recorded.desired["Version"] == "3" and env.aws.calls["ec2.CreateLaunchTemplateVersion"] == 0


# --- refusals: nothing written --------------------------------------------------------------------------------------


def _launch_configuration(env: Env) -> str:
    env.asg.create_launch_configuration(LaunchConfigurationName="lc", ImageId=env.image_a, InstanceType="t3.micro")
    env.asg.create_auto_scaling_group(
        AutoScalingGroupName="lc-group", LaunchConfigurationName="lc", MinSize=0, MaxSize=4, DesiredCapacity=2,
        AvailabilityZones=[f"{REGION}a"],
        Tags=[{"Key": ROLLOUT_TAG, "Value": ROLLOUT_ENABLED, "PropagateAtLaunch": False}],
    )  # fmt: skip
    return "lc-group"


def _on(version: str | None) -> Callable[[Env], str]:
    def make(env: Env) -> str:
        make_group(env.aws.session, "g2", env.image_a, size=2, version=version)
        return "g2"

    return make


def _ssm_image(env: Env) -> str:
    make_group(env.aws.session, "ssm", "resolve:ssm:/golden/web", size=2)
    return "ssm"


def _xen_type(env: Env) -> str:
    """New instances are judged by the readiness line on their consoles, which a Xen type's console may never show."""
    make_group(env.aws.session, "old-types", env.image_a, size=2, instance_type="t2.micro")
    return "old-types"


def _not_opted_in(env: Env) -> str:
    make_group(env.aws.session, "mine", env.image_a, size=2, opted_in=False)
    return "mine"


def _someone_elses_refresh_to_our_image(env: Env) -> str:
    """Someone's refresh to a version with the image asked for but another instance type: not ours."""
    template = env.group()["LaunchTemplate"]["LaunchTemplateId"]
    data = {"ImageId": env.image_b, "InstanceType": "t3.large"}
    env.ec2.create_launch_template_version(LaunchTemplateId=template, SourceVersion="1", LaunchTemplateData=data)
    env.asg.start_instance_refresh(
        AutoScalingGroupName=GROUP,
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}},
    )
    return GROUP


def _someone_elses_refresh(env: Env) -> str:
    template = env.group()["LaunchTemplate"]["LaunchTemplateId"]
    env.asg.start_instance_refresh(
        AutoScalingGroupName=GROUP,
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": template, "Version": "1"}},
    )
    return GROUP


# case → (make the group it refuses, the error, words its message names)
REFUSALS: dict[str, tuple[Callable[[Env], str], type[AmiforgeError], str]] = {
    "launch-configuration": (_launch_configuration, ConfigError, "launch configuration"),
    "latest": (_on("$Latest"), ConfigError, "$Latest"),
    "default": (_on("$Default"), ConfigError, "$Default"),
    "no-version": (_on(None), ConfigError, "$Default"),
    "ssm-image": (_ssm_image, ConfigError, "resolve:ssm:/golden/web"),
    "not-opted-in": (_not_opted_in, ConfigError, ROLLOUT_TAG),
    "xen-type": (_xen_type, ConfigError, "launches t2.micro"),
    "refresh-in-progress": (_someone_elses_refresh, StateError, "not one amiforge started"),
    "refresh-to-our-image": (_someone_elses_refresh_to_our_image, StateError, "not one amiforge started"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_come_with_a_fix_before_anything_is_written(env: Env, case: str) -> None:
    make, error, words = REFUSALS[case]
    group = make(env)
    before = len(env.refreshes.refreshes)
    env.aws.calls.reset()
    with pytest.raises(error) as caught:
        env.start(group=group)
    assert words in caught.value.message and caught.value.fix
    writes = [op for (_, op) in env.aws.calls.counts if not op.startswith("Describe")]
    assert writes == [], writes
    assert len(env.refreshes.refreshes) == before


def test_bad_requests_are_refused(env: Env) -> None:
    for kwargs in ({"checkpoints": [50, 25, 100]}, {"checkpoints": [25, 50]}, {"checkpoint_delay": -1}):
        with pytest.raises(ConfigError):
            env.start(**kwargs)
    with pytest.raises(ConfigError) as caught:
        env.start(alarms=["no-such-alarm"])
    assert "no-such-alarm" in caught.value.message
    assert env.refreshes.refreshes == [] and env.aws.calls["ec2.CreateLaunchTemplateVersion"] == 0


# --- throttling -----------------------------------------------------------------------------------------------------


def test_under_throttling_the_refresh_and_its_rollback_end_the_same(
    faulty: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert faulty.faults is not None
    faulty.faults.not_found_reads = 0  # the images were baked long ago
    env = _env(faulty, monkeypatch)
    _completes(env)
    assert env.start() == env.refreshes.refreshes[0].id
    make_group(env.aws.session, "other", env.image_a, size=4)
    refresh_id = env.start(group="other")
    while refresh_status(env.fleet("other"), refresh_id).percentage_complete < 25:
        pass
    assert roll_back_refresh(env.fleet("other"), refresh_id).status.startswith("Rollback")
    while refresh_status(env.fleet("other"), refresh_id).active:
        pass
    assert refresh_status(env.fleet("other"), refresh_id).status == "RollbackSuccessful"
    assert env.images("other") == [env.image_a] * 4
    assert faulty.faults.injected["Throttling"] > 10


# --- what one batch may take, as the group says --------------------------------------------------------------------


def test_a_batch_time_is_read_from_the_group_its_hooks_and_its_load_balancers(env: Env) -> None:
    """Warm-up, the longest launch and terminate hook, and the longest health check and draining of its target
    groups and classic load balancers (whether attached as such or as traffic sources)."""
    assert AsgFleet(env.aws.session, REGION, GROUP).refresh_batch_time() == {"instance warm-up": 0.0}
    asg, ec2 = env.asg, env.ec2
    asg.update_auto_scaling_group(AutoScalingGroupName=GROUP, DefaultInstanceWarmup=240, HealthCheckGracePeriod=900)
    for name, transition, timeout in (("a", "LAUNCHING", 200), ("b", "LAUNCHING", 400), ("c", "TERMINATING", None)):
        asg.put_lifecycle_hook(
            LifecycleHookName=name, AutoScalingGroupName=GROUP,
            LifecycleTransition=f"autoscaling:EC2_INSTANCE_{transition}",
            **({} if timeout is None else {"HeartbeatTimeout": timeout}),
        )  # fmt: skip
    elbv2: Any = env.aws.session.client("elbv2")
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    fast = elbv2.create_target_group(
        Name="fast", Protocol="HTTP", Port=80, VpcId=vpc, HealthyThresholdCount=3, HealthCheckIntervalSeconds=10
    )["TargetGroups"][0]["TargetGroupArn"]
    elbv2.modify_target_group_attributes(
        TargetGroupArn=fast, Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "120"}]
    )
    default = elbv2.create_target_group(Name="default", Protocol="HTTP", Port=80, VpcId=vpc)["TargetGroups"][0]
    elb: Any = env.aws.session.client("elb")
    elb.create_load_balancer(
        LoadBalancerName="classic", AvailabilityZones=[f"{REGION}a"],
        Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 80}],
    )  # fmt: skip
    elb.configure_health_check(
        LoadBalancerName="classic",
        HealthCheck={
            "Target": "HTTP:80/",
            "Interval": 20,
            "Timeout": 5,
            "UnhealthyThreshold": 2,
            "HealthyThreshold": 3,
        },
    )
    elb.modify_load_balancer_attributes(
        LoadBalancerName="classic",
        LoadBalancerAttributes={"ConnectionDraining": {"Enabled": True, "Timeout": 500}},
    )
    asg.attach_load_balancer_target_groups(
        AutoScalingGroupName=GROUP, TargetGroupARNs=[fast, default["TargetGroupArn"]]
    )
    asg.attach_load_balancers(AutoScalingGroupName=GROUP, LoadBalancerNames=["classic"])
    expected = {
        "instance warm-up": 240.0,  # DefaultInstanceWarmup, not the grace period
        "launch lifecycle hooks": 400.0,
        "terminate lifecycle hooks": 3600.0,  # PutLifecycleHook's default
        "load balancer health checks": 150.0,  # the default target group: 5 checks 30 s apart
        "load balancer draining": 500.0,  # the classic load balancer's connection draining
    }
    assert AsgFleet(env.aws.session, REGION, GROUP).refresh_batch_time() == expected

    moved: list[str] = []

    def as_traffic_sources(parsed: dict[str, Any], **_: Any) -> None:
        """The same load balancers attached with AttachTrafficSources (which moto lacks): listed there only."""
        for group in parsed.get("AutoScalingGroups", []):
            moved.append(group["AutoScalingGroupName"])
            group["TrafficSources"] = [{"Identifier": a, "Type": "elbv2"} for a in group.pop("TargetGroupARNs")] + [
                {"Identifier": n, "Type": "elb"} for n in group.pop("LoadBalancerNames")
            ]

    client = env.aws.session.client("autoscaling", REGION)  # the one the fleet uses: the session keeps its clients
    client.meta.events.register("after-call.auto-scaling.DescribeAutoScalingGroups", as_traffic_sources)
    assert AsgFleet(env.aws.session, REGION, GROUP).refresh_batch_time() == expected and moved == [GROUP]


# --- the controller on a real group's timing: warm-up and lifecycle hooks, on one clock -----------------------------

WARMUP = 600  # the group's DefaultInstanceWarmup
HEARTBEAT = 300  # its launch lifecycle hook's HeartbeatTimeout (nobody completes the action: it times out)
CONSOLE_GRACE = 300.0  # AsgFleet's default
# What the controller allows one batch: readiness (ready_within 90 s + console grace), the hook, the warm-up.
BATCH = 90.0 + CONSOLE_GRACE + HEARTBEAT + WARMUP
SLOW = Strategy(mode="refresh", waves=["10%", "50%", "100%"], bake_time=120.0)


@dataclass
class Controlled:
    """A group of 10 on image A at 90 % min healthy (one instance at a time), whose launches wait HEARTBEAT for a
    lifecycle hook and then WARMUP to warm up — 900 s a batch, 10 batches: two and a half hours — driven to image B by
    the rollout controller, the emulation on the controller's clock."""

    env: Env
    time: FakeTime
    store: SqlStore
    rollout: Rollout
    artifact: Artifact
    seen: list[tuple[float, str, int]]  # (time, status, percentage) whenever the refresh's changed

    def hook(self, result: str) -> None:
        self.env.asg.put_lifecycle_hook(
            LifecycleHookName="register", AutoScalingGroupName="slow", HeartbeatTimeout=HEARTBEAT,
            LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING", DefaultResult=result,
        )  # fmt: skip

    def drive(self) -> Rollout:
        fleet = AsgFleet(self.env.aws.session, REGION, "slow", wait=self.time.wait(), now=self.time.now)
        drive_refresh(
            self.store.get_rollout(self.rollout.id), fleet, self.store.get_version("web@1"), self.artifact, SLOW,
            store=self.store, settings=Settings(data_dir=Path("unused"), actor="test"),
            controls=Controls(sleep=self.time.sleep, clock=self.time.clock),
        )  # fmt: skip
        return self.store.get_rollout(self.rollout.id)

    def when(self, status: str, percentage: int | None = None) -> float:
        """When the refresh was first seen `status` (at `percentage`)."""
        return next(t for t, s, p in self.seen if s == status and percentage in (None, p))


@pytest.fixture
def controlled(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Controlled]:
    # A look every 30 s instead of 5: the same verdicts, a sixth of the calls.
    monkeypatch.setattr(refresh_controller, "POLL_SECONDS", 30.0)
    time = FakeTime()
    env.refreshes.time = time
    make_group(env.aws.session, "slow", env.image_a, size=10, warmup=WARMUP)
    with open_store(f"sqlite:///{tmp_path}/r.db") as store:
        version = store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="aws",
                                       tags={}, parent=None, recipe='{"checks": {}}')  # fmt: skip
        artifact = env.artifact(env.image_b)
        store.add_artifact(version.id, artifact)
        store.transition(version.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=1)
        rollout = store.create_rollout(
            f"aws:{REGION}/slow", version.id, strategy=SLOW.model_dump(mode="json"), waves=[1, 4, 5], actor="t"
        )
        world = Controlled(env, time, store, rollout, artifact, [])

        def look() -> None:
            for r in env.refreshes.refreshes:
                if not world.seen or world.seen[-1][1:] != (r.status, r.percentage()):
                    world.seen.append((time.clock(), r.status, r.percentage()))

        time.on_sleep = look
        world.hook("CONTINUE")
        yield world


def test_a_slow_refresh_that_keeps_moving_is_not_rolled_back(controlled: Controlled) -> None:
    """Each batch takes the hook's timeout and the warm-up (900 s): the whole refresh far longer than a readiness
    grace per batch allowed (the old deadline: about 105 min here), but never still for three batch times."""
    rollout = controlled.drive()
    assert rollout.state == "succeeded", rollout.detail
    assert controlled.env.images("slow") == [controlled.env.image_b] * 10
    assert controlled.time.clock() > 10 * (HEARTBEAT + WARMUP)  # it really took that long
    assert rollout.detail["batch_time"] == {
        "readiness": 90.0 + CONSOLE_GRACE,
        "instance warm-up": WARMUP,
        "launch lifecycle hooks": HEARTBEAT,
    }
    percentages = [p for _, _, p in controlled.seen]  # as the controller's sleeps saw it (the last look, 100 %, not)
    assert percentages == sorted(percentages) and sorted(set(percentages)) == list(range(0, 100, 10))  # one by one


def test_a_refresh_whose_progress_stalls_is_rolled_back_three_batch_times_after_it_last_moved(
    controlled: Controlled,
) -> None:
    """Half-way, the hook starts abandoning every launch (a handler that broke): AWS replaces the abandoned instances
    for ever and the refresh stays at 50 %. Three batch times (plus the checkpoint delay, 50 % being one) after it got
    there, amiforge rolls it back; the rollback, once the hook is mended, puts the group back on image A."""
    env = controlled.env

    looks = controlled.time.on_sleep
    assert looks is not None

    def break_then_mend() -> None:
        looks()
        (refresh,) = env.refreshes.refreshes
        if refresh.percentage() >= 50 and refresh.status == "InProgress":
            controlled.hook("ABANDON")
        if refresh.status == "RollbackInProgress":
            controlled.hook("CONTINUE")

    controlled.time.on_sleep = break_then_mend
    with pytest.raises(GateFailed) as caught:
        controlled.drive()
    assert "made no progress for" in caught.value.diagnostics()
    stalled_at, rolled_back_at = controlled.when("InProgress", 50), controlled.when("RollbackInProgress")
    allowed = STALL_BATCHES * BATCH + SLOW.bake_time
    assert stalled_at + allowed < rolled_back_at <= stalled_at + allowed + 2 * 30.0
    rollout = controlled.store.get_rollout(controlled.rollout.id)
    assert rollout.state == "failed" and rollout.detail["refresh_status"] == "RollbackSuccessful"
    assert env.images("slow") == [env.image_a] * 10
