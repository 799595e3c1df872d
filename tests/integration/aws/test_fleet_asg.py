"""The Auto Scaling fleet on moto: waves, idempotency per token, kill-and-resume after every API call, a bad image,
throttling, refusals, current() and signals(), paging. What moto lacks is emulated in asg_emulation.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asg_emulation import BOOT_LOG, AsgEmulations, FakeTime, install_asg_emulation, make_group, make_images
from conftest import ACCOUNT, REGION, Aws
from distribute_fixtures import Crash, Crashed
from moto_emulation import _NOWHERE, error_response
from runcommand_emulation import XenConsole

from amiforge.errors import ConfigError, InfraError, NotFound, StateError
from amiforge.model import Artifact
from amiforge.providers.aws.asg_records import (
    FAILED_TAG,
    READY_TAG,
    REPLACED_BY_TAG,
    TOKEN_TAG,
    VERSION_TAG,
    parse_group_target,
)
from amiforge.providers.aws.console import CONSOLE_WINDOW
from amiforge.providers.aws.fleet import AsgFleet
from amiforge.providers.interface import Member, Release, Replacement
from amiforge.recipe import Checks

CHECKS = Checks(ready_within=90.0)
GROUP = "web"


@dataclass
class Env:
    aws: Aws
    emulations: AsgEmulations
    crash: Crash
    hooks: Hooks
    time: FakeTime
    image_a: str
    image_b: str

    @property
    def asg(self) -> Any:
        return self.aws.session.client("autoscaling")

    @property
    def ec2(self) -> Any:
        return self.aws.session.client("ec2")

    def fleet(self, group: str = GROUP, time: FakeTime | None = None) -> AsgFleet:
        """A fleet with its own fake time (its `now()` follows the real clock plus what it slept, so moto's
        LaunchTime of the instances it launches stays comparable)."""
        self.time = time or FakeTime()
        return AsgFleet(self.aws.session, REGION, group, wait=self.time.wait(), now=self.time.now)

    def artifact(self, image_id: str, region: str = REGION) -> Artifact:
        return Artifact(provider="aws", region=region, location=image_id, digest="sha256:x", size_bytes=0)

    def group(self, name: str = GROUP) -> dict[str, Any]:
        return dict(self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0])

    def members(self, name: str = GROUP) -> list[str]:
        """The group's instance ids in launch order (moto launches in id order within one call)."""
        return [i["InstanceId"] for i in self.group(name)["Instances"]]

    def instances(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        found = self.ec2.describe_instances(InstanceIds=list(ids))["Reservations"]
        return {i["InstanceId"]: i for r in found for i in r["Instances"]}

    def tags(self, instance_id: str) -> dict[str, str]:
        instance = self.instances([instance_id])[instance_id]
        return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}

    def replace(
        self,
        pairs: Sequence[tuple[str, str]],
        image_id: str,
        ref: str = "web@2",
        group: str = GROUP,
        time: FakeTime | None = None,
    ) -> list[Member]:
        replacements = [Replacement(member, token) for member, token in pairs]
        return self.fleet(group, time).replace(replacements, self.artifact(image_id), release(ref), CHECKS)


def release(ref: str) -> Release:
    return Release(ref.partition("@")[0], ref, "ab" * 32, datetime(2026, 1, 2, tzinfo=UTC))


WEB2 = release("web@2")


class Hooks:
    """A test's own `before-send` answers and `after-call` actions, by operation name. botocore copies a session's
    handlers into each client when it is made, so these (like Crash) are installed before any client exists."""

    def __init__(self) -> None:
        self.answers: dict[str, Callable[[Any], Any]] = {}
        self.after: dict[str, Callable[[], None]] = {}

    def install(self, events: Any) -> None:
        events.register_first("before-send", self._before_send)
        events.register("after-call", self._after_call)

    def _before_send(self, request: Any, event_name: str, **_: Any) -> Any:
        answer = self.answers.get(event_name.rsplit(".", 1)[-1])
        return answer(request) if answer is not None else None

    def _after_call(self, model: Any, **_: Any) -> None:
        action = self.after.get(model.name)
        if action is not None:
            action()


def _env(aws: Aws, monkeypatch: pytest.MonkeyPatch, *, size: int = 4) -> Env:
    emulations = install_asg_emulation(monkeypatch)
    crash, hooks = Crash(), Hooks()
    crash.install(aws.session.boto_session.events)
    hooks.install(aws.session.boto_session.events)
    image_a, image_b = make_images(aws.session.client("ec2"), "a", "b")
    make_group(aws.session, GROUP, image_a, size=size)
    return Env(aws, emulations, crash, hooks, FakeTime(), image_a, image_b)


@pytest.fixture
def env(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Env:
    return _env(aws, monkeypatch)


def _template(env: Env, group: str = GROUP) -> dict[str, Any]:
    spec = env.group(group)["LaunchTemplate"]
    lt = env.ec2.describe_launch_templates(LaunchTemplateIds=[spec["LaunchTemplateId"]])["LaunchTemplates"][0]
    versions = env.ec2.describe_launch_template_versions(LaunchTemplateId=spec["LaunchTemplateId"])
    return {
        "group_version": spec.get("Version"),
        "default": lt["DefaultVersionNumber"],
        "versions": {
            v["VersionNumber"]: (v["LaunchTemplateData"].get("ImageId"), v["LaunchTemplateData"].get("InstanceType"))
            for v in versions["LaunchTemplateVersions"]
        },
    }


_TIMES = ("amiforge:replaced-at", "amiforge:failed-at")


def _state(env: Env, originals: list[str], group: str = GROUP) -> dict[str, Any]:
    """Everything replace() changes in a group, with per-group ids replaced by placeholders."""
    names = {image: name for name, image in (("A", env.image_a), ("B", env.image_b))}
    names.update({instance: f"orig-{n}" for n, instance in enumerate(originals)})
    raw = env.group(group)
    ids = [i["InstanceId"] for i in raw["Instances"]]
    by_tag = env.ec2.describe_instances(Filters=[{"Name": "tag:amiforge:group", "Values": [group]}])["Reservations"]
    everything = set(ids) | set(originals) | {i["InstanceId"] for r in by_tag for i in r["Instances"]}
    instances = env.instances(sorted(everything))

    def describe(instance_id: str) -> tuple[Any, ...]:
        i = instances[instance_id]
        tags = {
            t["Key"]: names.get(t["Value"], t["Value"])
            for t in i.get("Tags", [])
            if t["Key"].startswith("amiforge:") and t["Key"] not in _TIMES
        }
        if tags.get("amiforge:group") == group:
            tags["amiforge:group"] = "<group>"
        return (names.get(instance_id, "new"), names[i["ImageId"]], i["State"]["Name"], sorted(tags.items()))

    template = _template(env, group)
    return {
        "desired": raw["DesiredCapacity"],
        "members": sorted(describe(i) for i in ids),
        "others": sorted(describe(i) for i in everything - set(ids)),
        "group_version": template["group_version"],
        "default": template["default"],
        "versions": {n: (names.get(img, img), t) for n, (img, t) in template["versions"].items()},
    }


# --- waves --------------------------------------------------------------------------------------------------------


def test_wave_one_replaces_exactly_one_instance(env: Env) -> None:
    originals = env.members()
    assert len(originals) == 4
    env.aws.calls.reset()
    (member,) = env.replace([(originals[0], "t1")], env.image_b)
    assert member.state == "ready" and member.location == env.image_b and member.version_ref == "web@2"
    assert member.time_to_ready == 8.5 and member.id not in originals
    group = env.group()
    assert group["DesiredCapacity"] == 4 and len(group["Instances"]) == 4
    assert originals[0] not in env.members() and set(originals[1:]) < set(env.members())
    instances = env.instances([*env.members(), originals[0]])
    assert instances[originals[0]]["State"]["Name"] == "terminated"
    on_b = [i for i in env.members() if instances[i]["ImageId"] == env.image_b]
    assert on_b == [member.id]
    tags = env.tags(member.id)
    assert tags[TOKEN_TAG] == "t1" and tags[VERSION_TAG] == "web@2"
    assert "amiforge:managed" not in tags  # the group's instance, not amiforge's: IAM allows no such tag (iam.py)
    assert tags[READY_TAG] == "8.5" and tags["amiforge:replaces"] == originals[0]
    assert env.tags(originals[0])[REPLACED_BY_TAG] == "t1"
    # The group points at a version number holding B (inheriting the rest of version 1); the default did not move.
    assert _template(env) == {
        "group_version": "2",
        "default": 1,
        "versions": {1: (env.image_a, "t3.micro"), 2: (env.image_b, "t3.micro")},
    }
    assert env.aws.calls["autoscaling.TerminateInstanceInAutoScalingGroup"] == 1
    assert env.aws.calls["ec2.CreateLaunchTemplateVersion"] == 1
    assert env.aws.calls["autoscaling.UpdateAutoScalingGroup"] == 1
    assert env.emulations.groups.launched[GROUP] == 1


def test_the_same_token_again_changes_nothing(env: Env) -> None:
    originals = env.members()
    first = env.replace([(originals[0], "t1")], env.image_b)
    before = _state(env, originals)
    env.aws.calls.reset()
    again = env.replace([(originals[0], "t1")], env.image_b)
    assert again == first
    assert _state(env, originals) == before
    writes = (
        "ec2.CreateLaunchTemplateVersion",
        "autoscaling.UpdateAutoScalingGroup",
        "autoscaling.TerminateInstanceInAutoScalingGroup",
        "ec2.CreateTags",
    )
    assert [env.aws.calls[w] for w in writes] == [0, 0, 0, 0]


def test_later_waves_use_the_same_version(env: Env) -> None:
    originals = env.members()
    env.replace([(originals[0], "t1")], env.image_b)
    env.aws.calls.reset()
    wave = env.replace([(originals[1], "t2"), (originals[2], "t3")], env.image_b)
    assert [m.state for m in wave] == ["ready", "ready"] and len({m.id for m in wave}) == 2
    assert (
        env.aws.calls["ec2.CreateLaunchTemplateVersion"] == 0
        and env.aws.calls["autoscaling.UpdateAutoScalingGroup"] == 0
    )
    assert env.aws.calls["autoscaling.TerminateInstanceInAutoScalingGroup"] == 2
    instances = env.instances(env.members())
    assert sorted(instances[i]["ImageId"] == env.image_b for i in env.members()) == [False, True, True, True]
    assert _template(env)["versions"] == {1: (env.image_a, "t3.micro"), 2: (env.image_b, "t3.micro")}


# --- kill -9 between any two calls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_and_resume_after_every_call(aws: Aws, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """Killed before (the call never happens) or after (it happened, its answer is lost) the K-th API call of a wave
    of two, for every K; re-run with the same tokens, each group ends exactly like the clean run's: no instance lost,
    none replaced twice, no second template version."""
    env = _env(aws, monkeypatch)
    crash = env.crash
    originals = env.members()
    aws.calls.reset()
    env.replace([(originals[0], "t1"), (originals[1], "t2")], env.image_b)
    calls = sum(aws.calls.counts.values())
    clean = _state(env, originals)
    assert calls >= 15
    assert [m[1] for m in clean["members"]].count("B") == 2 and clean["desired"] == 4
    crashed: set[str] = set()
    for k in range(1, calls + 1):
        group = f"crash-{k}"
        make_group(aws.session, group, env.image_a)
        olds = env.members(group)
        pairs = [(olds[0], "t1"), (olds[1], "t2")]
        crash.arm(at=k, when=when)
        with pytest.raises(Crashed):
            env.replace(pairs, env.image_b, group=group)
        crash.disarm()
        resumed = env.replace(pairs, env.image_b, group=group)
        assert [m.state for m in resumed] == ["ready", "ready"], (k, crash.crashed)
        assert _state(env, olds, group) == clean, (k, crash.crashed)
        assert env.emulations.groups.launched[group] == 2, (k, crash.crashed)  # exactly two terminations
        crashed.add(str(crash.crashed))
    assert crashed >= {
        "DescribeImages",
        "DescribeAutoScalingGroups",
        "DescribeLaunchTemplates",
        "DescribeLaunchTemplateVersions",
        "CreateLaunchTemplateVersion",
        "UpdateAutoScalingGroup",
        "DescribeInstances",
        "CreateTags",
        "TerminateInstanceInAutoScalingGroup",
        "GetConsoleOutput",
    }


def test_a_crash_right_after_the_group_replaced_the_instance_is_claimed_on_resume(env: Env) -> None:
    """Killed after the termination, before anything else: on resume the group has launched the replacement, which
    was never tagged; the resumed call claims it instead of terminating another instance."""
    originals = env.members()

    def die() -> None:
        raise Crashed("killed right after the termination")

    env.hooks.after["TerminateInstanceInAutoScalingGroup"] = die
    with pytest.raises(Crashed):
        env.replace([(originals[0], "t1")], env.image_b)
    del env.hooks.after["TerminateInstanceInAutoScalingGroup"]
    env.members()
    env.members()  # the group has launched the replacement by now: untagged
    env.aws.calls.reset()
    (member,) = env.replace([(originals[0], "t1")], env.image_b)
    assert member.state == "ready" and env.aws.calls["autoscaling.TerminateInstanceInAutoScalingGroup"] == 0
    assert env.emulations.groups.launched[GROUP] == 1 and len(env.members()) == 4


# --- a bad image, and rolling back --------------------------------------------------------------------------------


def test_a_bad_image_is_reported_failed_and_rolled_back_by_replacing_it(env: Env) -> None:
    """B never gets ready: the new member is failed (the group already terminated the old one to make room); the
    controller's rollback replaces the failed member with the old version under a new token."""
    env.emulations.console.never_ready.add(env.image_b)
    originals = env.members()
    (failed,) = env.replace([(originals[0], "t1")], env.image_b)
    assert failed.state == "failed" and failed.location == env.image_b
    assert "no AMIFORGE-READY" in failed.detail and "90s" in failed.detail
    assert env.tags(failed.id)[FAILED_TAG] == failed.detail
    assert originals[0] not in env.members() and failed.id in env.members() and env.group()["DesiredCapacity"] == 4
    # Decided once: asked again, the same answer without waiting again.
    env.aws.calls.reset()
    assert env.replace([(originals[0], "t1")], env.image_b) == [failed]
    assert env.aws.calls["ec2.GetConsoleOutput"] == 0 and env.time.sleeps == 0
    (back,) = env.replace([(failed.id, "rollback-1")], env.image_a, ref="web@1")
    assert back.state == "ready" and back.location == env.image_a and back.version_ref == "web@1"
    instances = env.instances(env.members())
    assert all(i["ImageId"] == env.image_a for i in instances.values()) and len(instances) == 4
    template = _template(env)
    assert template["group_version"] == "3" and template["versions"][3] == (env.image_a, "t3.micro")


def test_too_slow_and_unhealthy_members_fail(env: Env) -> None:
    env.emulations.console.uptime[env.image_b] = 120.0  # ready, but later than ready_within (90 s)
    originals = env.members()
    (slow,) = env.replace([(originals[0], "t1")], env.image_b)
    assert slow.state == "failed" and slow.detail == "ready after 120s, more than 90s"
    env.emulations.console.uptime.pop(env.image_b)
    env.emulations.console.delay_reads = 3
    time = FakeTime()

    def unhealthy() -> None:
        for instance_id, tags in ((i, env.tags(i)) for i in env.members()):
            if tags.get(TOKEN_TAG) == "t2":
                env.asg.set_instance_health(InstanceId=instance_id, HealthStatus="Unhealthy")

    time.on_sleep = unhealthy
    (sick,) = env.replace([(originals[1], "t2")], env.image_b, time=time)
    assert sick.state == "failed" and sick.detail == "the group marks it Unhealthy"


# --- refusals -------------------------------------------------------------------------------------------------------


def _writes(env: Env) -> list[int]:
    names = (
        "ec2.CreateLaunchTemplateVersion",
        "autoscaling.UpdateAutoScalingGroup",
        "autoscaling.TerminateInstanceInAutoScalingGroup",
        "ec2.CreateTags",
    )
    return [env.aws.calls[n] for n in names]


def test_groups_it_does_not_handle_are_refused_before_anything_is_written(env: Env) -> None:
    asg = env.asg
    zones = [f"{REGION}a"]
    asg.create_launch_configuration(LaunchConfigurationName="lc", ImageId=env.image_a, InstanceType="t3.micro")
    asg.create_auto_scaling_group(
        AutoScalingGroupName="lc-group",
        MinSize=0,
        MaxSize=2,
        DesiredCapacity=1,
        LaunchConfigurationName="lc",
        AvailabilityZones=zones,
    )
    template = env.group()["LaunchTemplate"]["LaunchTemplateId"]
    asg.create_auto_scaling_group(
        AutoScalingGroupName="mixed",
        MinSize=0,
        MaxSize=2,
        DesiredCapacity=1,
        AvailabilityZones=zones,
        MixedInstancesPolicy={
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateId": template, "Version": "1"},
                "Overrides": [{"InstanceType": "t3.micro"}, {"InstanceType": "t3.small"}],
            }
        },
    )
    make_group(env.aws.session, "latest", env.image_a, size=1, version="$Latest")
    make_group(env.aws.session, "not-opted-in", env.image_a, size=1, opted_in=False)
    opt_in = {"Key": "amiforge:rollout", "Value": "enabled", "ResourceType": "auto-scaling-group"}
    for group in ("lc-group", "mixed"):  # opted in: refused for what they are, not for a missing tag
        asg.create_or_update_tags(Tags=[{**opt_in, "ResourceId": group, "PropagateAtLaunch": False}])
    env.aws.calls.reset()
    expected = {
        "lc-group": "launch configuration",
        "mixed": "mixed instances",
        "latest": "$Latest",
        "not-opted-in": "amiforge:rollout=enabled",
    }
    for group, words in expected.items():
        member = env.members(group)[0]
        with pytest.raises(ConfigError) as refused:
            env.replace([(member, "t1")], env.image_b, group=group)
        assert words in refused.value.message and refused.value.fix, group
    assert _writes(env) == [0, 0, 0, 0]
    with pytest.raises(NotFound):
        env.replace([(env.members()[0], "t1")], env.image_b, group="no-such-group")


def test_bad_requests_are_refused(env: Env) -> None:
    member, other = env.members()[:2]
    fleet = env.fleet()
    with pytest.raises(ConfigError, match="not aws in"):
        fleet.replace([Replacement(member, "t1")], env.artifact(env.image_b, region="us-east-1"), WEB2, CHECKS)
    with pytest.raises(ConfigError, match="asked twice"):
        fleet.replace([Replacement(member, "t1"), Replacement(other, "t1")], env.artifact(env.image_b), WEB2, CHECKS)
    with pytest.raises(ConfigError, match="asked twice"):
        fleet.replace([Replacement(member, "t1"), Replacement(member, "t2")], env.artifact(env.image_b), WEB2, CHECKS)
    with pytest.raises(NotFound):
        fleet.replace([Replacement(member, "t1")], env.artifact("ami-0123456789abcdef0"), WEB2, CHECKS)
    assert fleet.replace([], env.artifact(env.image_b), WEB2, CHECKS) == []
    assert _writes(env) == [0, 0, 0, 0]


def test_a_token_and_a_member_belong_to_each_other(env: Env) -> None:
    first, second, third = env.members()[:3]
    env.replace([(first, "t1")], env.image_b)
    with pytest.raises(StateError, match="already replaced"):
        env.replace([(second, "t1")], env.image_b)  # a used token for another member
    with pytest.raises(StateError, match="not ami-"):
        env.replace([(first, "t1")], env.image_a)  # a used token for another image
    # Killed right after the old member was marked for t2: asked again under another token, it is refused.

    def die() -> None:
        raise Crashed("killed after marking")

    env.hooks.after["CreateTags"] = die
    with pytest.raises(Crashed):
        env.replace([(third, "t2")], env.image_b)
    del env.hooks.after["CreateTags"]
    with pytest.raises(StateError, match="being replaced under token t2"):
        env.replace([(third, "t3")], env.image_b)
    assert third in env.members()


def test_default_version_is_resolved_and_pinned(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(aws, monkeypatch)
    make_group(aws.session, "follows-default", env.image_a, size=2, version=None)
    (member,) = env.replace([(env.members("follows-default")[0], "t1")], env.image_b, group="follows-default")
    assert member.state == "ready"
    template = _template(env, "follows-default")
    assert template["group_version"] == "2" and template["default"] == 1


def test_a_member_already_gone_is_fine(env: Env) -> None:
    """Gone before amiforge got to it: the group replaced it itself. On the old version nothing is launched for it
    (and nothing else terminated); on the new version its replacement is claimed."""
    originals = env.members()
    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=originals[0], ShouldDecrementDesiredCapacity=False)
    env.members()
    env.members()  # the group has launched its replacement (on A)
    env.aws.calls.reset()
    (gone,) = env.replace([(originals[0], "t1")], env.image_b)
    assert gone.state == "stopped" and gone.id == originals[0] and "nothing was launched" in gone.detail
    assert env.aws.calls["autoscaling.TerminateInstanceInAutoScalingGroup"] == 0 and len(env.members()) == 4
    # Now the group launches B: the one it launches for a vanished member is claimed for that member's token.
    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=originals[1], ShouldDecrementDesiredCapacity=False)
    env.members()
    env.members()
    (claimed,) = env.replace([(originals[1], "t2")], env.image_b)
    assert claimed.state == "ready" and claimed.location == env.image_b
    assert env.tags(claimed.id)[TOKEN_TAG] == "t2"


def test_a_busy_group_is_retried(env: Env) -> None:
    busy = {"left": 2}

    def answer(request: Any) -> Any:
        if busy["left"] > 0:
            busy["left"] -= 1
            response = error_response(request.url, "auto-scaling", "ScalingActivityInProgress")
            request.url = _NOWHERE
            return response
        return None

    env.hooks.answers["TerminateInstanceInAutoScalingGroup"] = answer
    originals = env.members()
    (member,) = env.replace([(originals[0], "t1")], env.image_b)
    assert member.state == "ready" and busy["left"] == 0
    assert env.aws.calls["autoscaling.TerminateInstanceInAutoScalingGroup"] == 3
    assert env.emulations.groups.launched[GROUP] == 1


def test_a_group_that_stays_busy_is_a_retryable_error(env: Env) -> None:
    def answer(request: Any) -> Any:
        response = error_response(request.url, "auto-scaling", "ResourceContention")
        request.url = _NOWHERE
        return response

    env.hooks.answers["TerminateInstanceInAutoScalingGroup"] = answer
    with pytest.raises(InfraError) as error:
        env.replace([(env.members()[0], "t1")], env.image_b)
    assert error.value.retryable and "ResourceContention" in error.value.message


# --- throttling ---------------------------------------------------------------------------------------------------


def test_throttled_end_state_equals_clean(faulty: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    assert faulty.faults is not None
    faulty.faults.not_found_reads = 0  # the images were baked long ago
    env = _env(faulty, monkeypatch)
    make_group(faulty.session, "clean", env.image_a)
    originals, clean_originals = env.members(), env.members("clean")
    faulty.faults.rate = 0.0
    env.replace([(clean_originals[0], "t1"), (clean_originals[1], "t2")], env.image_b, group="clean")
    faulty.faults.rate = 0.3
    wave = env.replace([(originals[0], "t1"), (originals[1], "t2")], env.image_b)
    again = env.replace([(originals[0], "t1"), (originals[1], "t2")], env.image_b)
    assert again == wave and [m.state for m in wave] == ["ready", "ready"]
    faulty.faults.rate = 0.0
    assert _state(env, originals) == _state(env, clean_originals, "clean")
    assert faulty.faults.injected["RequestLimitExceeded"] > 3 and faulty.faults.injected["Throttling"] > 3


# --- current() and signals() ---------------------------------------------------------------------------------------


def test_current_and_signals(env: Env) -> None:
    start = datetime.now(UTC) - timedelta(minutes=1)
    originals = env.members()
    assert env.fleet().signals(start) == []
    # EC2 has no console output for them yet: launching; a moment later the readiness line is there.
    first = env.fleet().current()
    assert {(m.id, m.version_ref, m.location, m.state) for m in first} == {
        (i, None, env.image_a, "launching") for i in originals
    }
    assert all(m.detail == "no AMIFORGE-READY on its console yet" for m in first)
    second = env.fleet().current()
    assert {(m.id, m.state, m.time_to_ready) for m in second} == {(i, "ready", 8.5) for i in originals}
    assert [m.launched_at for m in second] == sorted(m.launched_at for m in second)
    (new,) = env.replace([(originals[0], "t1")], env.image_b)
    (image_c,) = make_images(env.ec2, "c")
    env.emulations.console.never_ready.add(image_c)  # a second wave, with C, that fails
    (bad,) = env.replace([(originals[1], "t2")], image_c, ref="web@3")
    now = env.fleet().current()
    states = {m.id: (m.version_ref, m.location, m.state) for m in now}
    assert states == {
        new.id: ("web@2", env.image_b, "ready"),
        bad.id: ("web@3", image_c, "failed"),
        originals[2]: (None, env.image_a, "ready"),
        originals[3]: (None, env.image_a, "ready"),
    }
    assert next(m for m in now if m.id == new.id).time_to_ready == 8.5
    signals = env.fleet().signals(start)
    summary = [(s.member, s.kind, s.version_ref) for s in signals]
    # All of it happens within a few (fake) seconds here, so only the set and the time order are checked.
    assert sorted(summary) == sorted(
        [
            (originals[0], "replaced", None),
            (new.id, "launch", "web@2"),
            (new.id, "ready", "web@2"),
            (originals[1], "replaced", None),
            (bad.id, "launch", "web@3"),
            (bad.id, "failed", "web@3"),
        ]
    )
    assert [s.at for s in signals] == sorted(s.at for s in signals)
    ready = next(s for s in signals if s.kind == "ready")
    assert ready.time_to_ready == 8.5 and ready.at == new.launched_at + timedelta(seconds=8.5)
    failed = next(s for s in signals if s.kind == "failed")
    assert "no AMIFORGE-READY" in failed.detail
    assert env.fleet().signals(max(s.at for s in signals) + timedelta(seconds=1)) == []


@pytest.mark.parametrize("page", [1, 100])
def test_paging(env: Env, page: int) -> None:
    """DescribeInstances at one and a hundred items per page: the same members, signals and end state."""
    originals = env.members()
    env.aws.paging.page_cap = page
    env.aws.calls.reset()
    (member,) = env.replace([(originals[0], "t1")], env.image_b)
    assert member.state == "ready"
    current = env.fleet().current()
    assert sorted(m.id for m in current) == sorted(env.members()) and len(current) == 4
    kinds = sorted(s.kind for s in env.fleet().signals(datetime(2000, 1, 1, tzinfo=UTC)))
    assert kinds == ["launch", "ready", "replaced"]
    env.aws.paging.page_cap = None
    state = _state(env, originals)
    assert [m[1] for m in state["members"]].count("B") == 1
    if page == 1:
        assert env.aws.calls["ec2.DescribeInstances"] > 12  # several pages per group-wide read


def test_targets_name_a_region_and_a_group() -> None:
    assert parse_group_target("eu-west-1/web") == ("eu-west-1", "web")
    assert parse_group_target("us-gov-west-1/a/b") == ("us-gov-west-1", "a/b")
    for bad in ("web", "eu-west-1/", "/web", "EU/web", "eu-west-1/a:b"):
        with pytest.raises(ConfigError):
            parse_group_target(bad)


def test_a_member_replaced_on_purpose_since_is_stopped_not_failed(env: Env) -> None:
    """Wave 1 went well, then a rollback replaced its member: asked again under the wave's token, the member is
    reported gone (stopped), and nothing records it as failed."""
    originals = env.members()
    (new,) = env.replace([(originals[0], "t1")], env.image_b)
    (back,) = env.replace([(new.id, "rollback-t1")], env.image_a, ref="web@1")
    assert back.state == "ready" and back.location == env.image_a
    (again,) = env.replace([(originals[0], "t1")], env.image_b)
    assert again.id == new.id and again.state == "stopped" and "rollback-t1" in again.detail
    assert FAILED_TAG not in env.tags(new.id)
    kinds = [(s.member, s.kind) for s in env.fleet().signals(datetime(2000, 1, 1, tzinfo=UTC))]
    assert (new.id, "replaced") in kinds and (new.id, "failed") not in kinds


def _alarm(aws: Aws, name: str, state: str) -> None:
    cloudwatch: Any = aws.session.client("cloudwatch")
    cloudwatch.put_metric_alarm(
        AlarmName=name, MetricName="HTTPCode_Target_5XX_Count", Namespace="AWS/ApplicationELB", Statistic="Sum",
        Period=60, EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanOrEqualToThreshold",
    )  # fmt: skip
    cloudwatch.set_alarm_state(AlarmName=name, StateValue=state, StateReason="test")


def test_alarm_gates_read_cloudwatch_and_refuse_unknown_alarms(env: Env) -> None:
    fleet = env.fleet()
    _alarm(env.aws, "web-5xx", "ALARM")
    _alarm(env.aws, "web-latency", "OK")
    assert fleet.alarms_firing([]) == []
    assert fleet.alarms_firing(["web-latency", "web-5xx"]) == ["web-5xx"]
    with pytest.raises(ConfigError, match="web-typo"):
        fleet.alarms_firing(["web-5xx", "web-typo"])


def test_composite_alarms_are_gates_too_and_a_name_found_nowhere_is_still_missing(env: Env) -> None:
    """DescribeAlarms answers metric alarms only unless AlarmTypes asks for the others: a composite alarm named as a
    gate must be read, not reported missing."""
    fleet = env.fleet()
    cloudwatch: Any = env.aws.session.client("cloudwatch")
    _alarm(env.aws, "web-5xx", "OK")
    _alarm(env.aws, "web-latency", "OK")
    cloudwatch.put_composite_alarm(AlarmName="web-slo", AlarmRule='ALARM("web-5xx") OR ALARM("web-latency")')
    env.aws.calls.reset()
    assert fleet.alarms_firing(["web-slo", "web-5xx"]) == []
    cloudwatch.set_alarm_state(AlarmName="web-latency", StateValue="ALARM", StateReason="test")
    assert fleet.alarms_firing(["web-slo", "web-5xx"]) == ["web-slo"]
    with pytest.raises(ConfigError, match="web-typo") as caught:
        fleet.alarms_firing(["web-slo", "web-typo"])
    assert "web-slo" not in caught.value.message
    assert env.aws.calls["cloudwatch.DescribeAlarms"] == 3  # one call reads every type


# --- the console: complete lines, EC2's window, Xen types -------------------------------------------------------


def _script_console(
    env: Env, monkeypatch: pytest.MonkeyPatch, screens: Callable[[int], str], image_id: str
) -> Counter[str]:
    """GetConsoleOutput of the instances on `image_id` answers `screens(n)` at its n-th read (1-based); the others
    answer the emulation's boot log. The reads per instance are returned (they count on as the test goes)."""
    reads: Counter[str] = Counter()
    boot = env.emulations.console.output

    def output(instance_id: str, image: str) -> str:
        if image != image_id:
            return boot(instance_id, image)
        reads[instance_id] += 1
        return screens(reads[instance_id])

    monkeypatch.setattr(env.emulations.console, "output", output)
    return reads


# Application chatter on the console: well over EC2's 64 KB window.
_CHATTER = "".join(f"[{i:6}] web: GET /health 200 ({i % 7} ms)\n" for i in range(4000))


def test_a_readiness_line_still_being_written_does_not_count(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read can end inside the line: `AMIFORGE-READY 1` of `AMIFORGE-READY 150` is not a time-to-ready of 1 s."""
    reads = _script_console(
        env, monkeypatch, lambda n: BOOT_LOG + ("AMIFORGE-READY 1" if n == 1 else "AMIFORGE-READY 150\n"), env.image_b
    )
    (member,) = env.replace([(env.members()[0], "t1")], env.image_b)
    assert member.state == "failed" and member.detail == "ready after 150s, more than 90s"
    assert reads[member.id] == 2


def test_a_readiness_line_seen_once_stays_seen_when_it_scrolls_out_of_ecs_window(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance goes on writing: the line is gone from the 64 KB EC2 answers with, but the fleet read it."""
    first = BOOT_LOG + "AMIFORGE-READY 8.5\n" + _CHATTER[:3000]
    later = (first + _CHATTER[3000:])[-CONSOLE_WINDOW:]
    assert "AMIFORGE-READY" not in later
    _script_console(env, monkeypatch, lambda n: first if n == 1 else later, env.image_a)
    fleet = env.fleet()
    assert {(m.state, m.time_to_ready) for m in fleet.current()} == {("ready", 8.5)}
    # The refresh controller judges the members through current() at every poll: still ready, not launching again.
    assert {(m.state, m.time_to_ready) for m in fleet.current()} == {("ready", 8.5)}


def test_a_console_that_outruns_ecs_window_is_named_when_no_line_was_seen(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every read a full 64 KB window that does not overlap the one before: the line may have been lost in a gap,
    and the failure says so."""
    _script_console(env, monkeypatch, lambda n: f"{n}{_CHATTER}"[-CONSOLE_WINDOW:], env.image_b)
    (member,) = env.replace([(env.members()[0], "t1")], env.image_b)
    assert member.state == "failed" and "no AMIFORGE-READY" in member.detail
    assert "64 KB window between reads" in member.detail


def test_a_group_launching_a_xen_type_is_refused_before_anything_is_written(env: Env) -> None:
    """Its members' consoles show only what EC2 posted around boot: their readiness could never be judged."""
    make_group(env.aws.session, "old-types", env.image_a, size=1, instance_type="t2.micro")
    env.aws.calls.reset()
    with pytest.raises(ConfigError) as refused:
        env.replace([(env.members("old-types")[0], "t1")], env.image_b, group="old-types")
    message, fix = refused.value.message, refused.value.fix or ""
    assert "group old-types" in message and "t2.micro" in message and "Xen" in message
    assert "Nitro" in fix and "InstanceType" in fix
    assert _writes(env) == [0, 0, 0, 0]
    # Bare metal runs on the Nitro System without a hypervisor (DescribeInstanceTypes has none for it): accepted.
    make_group(env.aws.session, "metal", env.image_a, size=1, instance_type="c5.metal")
    (member,) = env.replace([(env.members("metal")[0], "t1")], env.image_b, group="metal")
    assert member.state == "ready"


def test_a_xen_members_console_costs_one_refused_latest_read_for_the_fleets_life(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members of an older Xen type (current() reads any group): EC2 refuses Latest=True for them once; the fleet
    keeps each instance's console reader, so it asks for the buffered output from then on."""
    xen = XenConsole(ACCOUNT, REGION)
    xen.install(aws.session.boto_session.events)  # before any client exists
    env = _env(aws, monkeypatch)
    make_group(env.aws.session, "old-types", env.image_a, size=2, instance_type="t2.micro")
    fleet = env.fleet("old-types")
    assert {m.state for m in fleet.current()} == {"launching"}  # EC2 has captured nothing yet
    assert {(m.state, m.time_to_ready) for m in fleet.current()} == {("ready", 8.5)}
    fleet.current()
    assert xen.refused == 2  # one per instance, not one per read


def test_each_members_latest_cloudwatch_heartbeat_is_a_signal(env: Env) -> None:
    """What the members' reporter sends (guest_files/cloudwatch, the InstanceId series): the latest beat of each
    within the lookback is a heartbeat signal; a member that sent none, or only long ago, has none."""
    originals = env.members()
    (new,) = env.replace([(originals[0], "t1")], env.image_b)
    (other,) = env.replace([(originals[1], "t2")], env.image_b)
    fleet = env.fleet()
    now = fleet.now()
    cloudwatch: Any = env.aws.session.client("cloudwatch")
    for instance, ago in ((new.id, 200), (new.id, 70), (other.id, 3600)):
        cloudwatch.put_metric_data(Namespace="amiforge", MetricData=[{
            "MetricName": "Heartbeat", "Value": 1.0, "Unit": "Count", "Timestamp": now - timedelta(seconds=ago),
            "Dimensions": [{"Name": "InstanceId", "Value": instance}]}])  # fmt: skip
    beats = [s for s in fleet.signals(datetime(2000, 1, 1, tzinfo=UTC)) if s.kind == "heartbeat"]
    assert [(s.member, s.version_ref) for s in beats] == [(new.id, "web@2")]
    # The end of the minute it fell in (moto's minutes start at StartTime): after the beat, within a minute of it.
    assert now - timedelta(seconds=70) < beats[0].at <= now - timedelta(seconds=10)
    # Asked again within the minute (serve collects every 15 s): answered from what was heard, not billed again.
    asked = env.aws.calls["cloudwatch.GetMetricData"]
    assert asked >= 1
    assert [s for s in env.fleet().signals(datetime(2000, 1, 1, tzinfo=UTC)) if s.kind == "heartbeat"] == beats
    assert env.aws.calls["cloudwatch.GetMetricData"] == asked
