"""retire on EC2 (moto, with retire_emulation.py for what moto lacks): every reference source keeps its image, a source
that fails stops every change in its region, page sizes do not change the plan, protection and its cool-down are
waited out, snapshots follow their image, a kill at any step resumes without a second deregistration, and the
emulation itself refuses what EC2 refuses."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from conftest import ACCOUNT, REGION, Aws
from gc_fixtures import install_gc_emulation
from moto.ec2.models import ec2_backends
from moto_emulation import THROTTLE_CODES, FaultInjector
from retire_emulation import ImageLifecycle

from amiforge.errors import NotFound
from amiforge.lifecycle import retire
from amiforge.lifecycle.retire_plan import CHANGES, RetirePlan
from amiforge.model import Artifact, Status
from amiforge.policy.retention import Retention
from amiforge.providers.aws.provider import AwsProvider
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from tests.retire_rules import EAGER

OTHER = "111111111111"  # a synthetic account the images are shared with
READER = "222222222222"  # one whose role amiforge may assume to look


class Clock:
    """Now, moved on by `later` (the registry keeps its own time: only what this clock is given moves)."""

    def __init__(self) -> None:
        self.later = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.later


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Faults:
    """Refusals and kills, by operation, switched on by a test: installed before any client exists (a botocore
    client copies its session's handlers when it is made)."""

    def __init__(self) -> None:
        self.refuse: dict[str, str] = {}  # operation → the error code AWS answers
        self.kill_after: set[str] = set()  # operations after whose answer the process dies
        self.throttle: set[str] = set()  # operations every send of which is throttled (retries included)
        self.throttled: Counter[str] = Counter()

    def install(self, events: Any) -> None:
        events.register_first("before-call", self._before)
        events.register("after-call", self._after)
        events.register_first("before-send", self._send)

    def _send(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        _before, service, operation = event_name.split(".", 2)
        if operation not in self.throttle:
            return None
        self.throttled[operation] += 1
        return FaultInjector._answer(request, service, THROTTLE_CODES.get(service, "ThrottlingException"))

    def _before(self, model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, Any] | None:
        code = self.refuse.get(model.name)
        if code is None:
            return None
        error = {"Error": {"Code": code, "Message": "refused by the test"}, "ResponseMetadata": {}}
        return AWSResponse(str(params.get("url", "")), 403 if code == "AccessDenied" else 400, {}, None), error

    def _after(self, model: Any, **_: Any) -> None:
        if model.name in self.kill_after:
            raise Killed


class Killed(BaseException):
    pass


@pytest.fixture
def faults(aws: Aws) -> Faults:
    found = Faults()
    found.install(aws.session.boto_session.events)
    return found


@pytest.fixture
def lifecycle(aws: Aws, monkeypatch: pytest.MonkeyPatch, clock: Clock, faults: Faults) -> ImageLifecycle:
    emulation = ImageLifecycle(now=clock)
    emulation.install(monkeypatch, aws.session.boto_session.events)
    install_gc_emulation(aws.paging, monkeypatch)  # the DescribeImages filter block-device-mapping.snapshot-id
    return emulation


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(f"sqlite:///{tmp_path}/r.db") as s:
        yield s


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", actor="tester@unit",
                    aws_roles={READER: f"arn:aws:iam::{READER}:role/amiforge-reader"})  # fmt: skip


class World:
    """Images of the registry (one version each, labelled), and the things in the account that use them."""

    def __init__(self, aws: Aws, store: SqlStore) -> None:
        self.aws, self.store = aws, store
        self.ec2: Any = aws.ec2()
        self.backend = ec2_backends[ACCOUNT][REGION]
        self.base = str(self.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
                        ["InstanceId"])  # fmt: skip
        self.images: dict[str, str] = {}
        self.refs: dict[str, str] = {}

    def version(self, label: str) -> str:
        image = str(self.ec2.create_image(InstanceId=self.base, Name=f"web-{label}")["ImageId"])
        self.images[label] = image
        v = self.store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="aws",
                                      tags={}, parent=None)  # fmt: skip
        self.store.add_artifact(v.id, Artifact("aws", REGION, image, "d" * 64, 8))
        status = Status.BUILT
        self.store.transition(v.id, status, expect=Status.BAKING, digest="d" * 64, size_bytes=8)
        for step in (Status.TESTED, Status.SCANNED, Status.SIGNED):
            self.store.transition(v.id, step, expect=status)
            status = step
        self.refs[label] = v.ref
        return image

    def snapshot_of(self, label: str) -> str:
        return str(self.backend.amis[self.images[label]].ebs_snapshot.id) if self.images[label] in \
            self.backend.amis else ""  # fmt: skip


@pytest.fixture
def world(aws: Aws, store: SqlStore, lifecycle: ImageLifecycle) -> World:
    """One image per way of being in use, and two that nothing uses (one protected with a cool-down)."""
    w = World(aws, store)
    ec2, asg, ssm = w.ec2, aws.session.client("autoscaling", REGION), aws.session.client("ssm", REGION)
    w.version("free")
    ec2.enable_image_deregistration_protection(ImageId=w.images["free"])  # as distribute leaves its copies
    w.version("cool")
    ec2.enable_image_deregistration_protection(ImageId=w.images["cool"], WithCooldown=True)
    stopped = ec2.run_instances(ImageId=w.version("instance"), MinCount=1, MaxCount=1)["Instances"][0]
    ec2.stop_instances(InstanceIds=[stopped["InstanceId"]])
    template = ec2.create_launch_template(LaunchTemplateName="edge", LaunchTemplateData={"ImageId": w.version("lt-v1")})
    ec2.create_launch_template_version(LaunchTemplateId=template["LaunchTemplate"]["LaunchTemplateId"],
                                       LaunchTemplateData={"ImageId": "ami-0000000000test01"})  # fmt: skip
    ec2.modify_launch_template(LaunchTemplateId=template["LaunchTemplate"]["LaunchTemplateId"], DefaultVersion="2")
    ssm.put_parameter(Name="/team/golden", Type="String", Value=w.version("parameter"))
    asg.create_launch_configuration(LaunchConfigurationName="legacy", ImageId=w.version("launch-config"),
                                    InstanceType="t3.micro")  # fmt: skip
    asg.create_auto_scaling_group(AutoScalingGroupName="legacy-asg", LaunchConfigurationName="legacy", MinSize=0,
                                  MaxSize=0, AvailabilityZones=[f"{REGION}a"])  # fmt: skip
    ec2.modify_image_attribute(ImageId=w.version("shared"), LaunchPermission={"Add": [{"UserId": OTHER}]})
    return w


def _provider(aws: Aws, settings: Settings, page_size: int = 1000) -> AwsProvider:
    return AwsProvider(settings, boto_session=aws.session.boto_session, retire_page_size=page_size)


def _finder(provider: AwsProvider) -> retire.RetirerFor:
    return lambda kind: provider


def _steps(plan: RetirePlan, world: World) -> dict[str, tuple[str, str]]:
    label = {ref: name for name, ref in world.refs.items()}
    return {label[s.version]: (s.action, s.why) for s in plan.steps()}


def test_every_source_keeps_its_image_and_the_rest_goes_step_by_step(
    aws: Aws, world: World, store: SqlStore, settings: Settings, clock: Clock
) -> None:
    provider = _provider(aws, settings)
    plan = retire.plan(store, EAGER, _finder(provider), now=clock())
    steps = _steps(plan, world)
    assert steps["free"][0] == "deprecate" and steps["cool"][0] == "deprecate"
    assert steps["instance"] == ("keep", f"in use: instance {_instance_of(world, 'instance')} (stopped)")
    assert steps["lt-v1"][0] == "keep" and "launch template edge (" in steps["lt-v1"][1]
    assert steps["lt-v1"][1].endswith("version 1")  # not the default version: every version counts
    assert steps["parameter"] == ("keep", "in use: ssm parameter /team/golden")
    assert "launch configuration legacy" in steps["launch-config"][1]
    assert "auto scaling group legacy-asg (launch configuration legacy)" in steps["launch-config"][1]
    assert steps["shared"] == ("keep", f"in use: share account {OTHER} (no role to look with: judged to use it)")
    assert not plan.failures
    assert any("DescribeImageReferences" in n for n in plan.notes)
    assert any("no Recycle Bin rule" in n for n in plan.notes)

    first = retire.apply(store, EAGER, _finder(provider), actor="t", now=clock())
    assert sorted((o.step.action, o.outcome) for o in first.outcomes) == [("deprecate", "done")] * 2
    assert _attr(world, "free", "deprecation_time") is not None
    assert store.get_version(world.refs["free"]).status is Status.DEPRECATED

    second = retire.apply(store, EAGER, _finder(provider), actor="t", now=clock())
    outcomes = {o.step.version: (o.step.action, o.outcome) for o in second.outcomes}
    assert outcomes[world.refs["free"]] == ("deregister", "done")
    assert outcomes[world.refs["cool"]][1] == "waiting"  # protection lifted: EC2 holds it 24 h more
    assert world.images["free"] not in world.backend.amis
    assert str(_attr(world, "cool", "deregistration_protection")).startswith("disabled after ")
    free_snapshot = next(iter(store.retirements().values())).snapshots
    assert free_snapshot and free_snapshot[0] in world.backend.snapshots  # snapshots go on the next run

    third = retire.apply(store, EAGER, _finder(provider), actor="t", now=clock())
    assert {(o.step.action, o.outcome) for o in third.outcomes} == {("delete-snapshots", "done")}
    assert free_snapshot[0] not in world.backend.snapshots
    assert third.retired == (world.refs["free"],)
    assert _steps(retire.plan(store, EAGER, _finder(provider), now=clock()), world)["cool"][0] == "wait"

    clock.later += timedelta(hours=25)
    fourth = retire.apply(store, EAGER, _finder(provider), actor="t", now=clock())
    assert {(o.step.version, o.step.action, o.outcome) for o in fourth.outcomes} == {
        (world.refs["cool"], "deregister", "done")
    }
    for label in ("instance", "lt-v1", "parameter", "launch-config", "shared"):
        assert world.images[label] in world.backend.amis, label
        assert store.get_version(world.refs[label]).status is Status.SIGNED
    assert not store.verify_events()


def _attr(world: World, label: str, name: str) -> object:
    """What the emulation keeps on moto's image (moto's Ami class has no such attribute of its own)."""
    return getattr(world.backend.amis[world.images[label]], name, None)


def _instance_of(world: World, label: str) -> str:
    reservations = world.ec2.describe_instances(Filters=[{"Name": "image-id", "Values": [world.images[label]]}])
    return str(reservations["Reservations"][0]["Instances"][0]["InstanceId"])


def test_page_sizes_change_the_calls_not_the_plan(aws: Aws, world: World, store: SqlStore, settings: Settings) -> None:
    for n in range(12):  # more images than the small pages hold
        world.version(f"extra-{n}")
    # An image only the last version of the last of several launch templates names (default: its first version).
    for n in range(8):
        world.ec2.create_launch_template(LaunchTemplateName=f"other-{n}",
                                         LaunchTemplateData={"ImageId": "ami-0000000000test02"})  # fmt: skip
    late = world.ec2.create_launch_template(LaunchTemplateName="zz-late",
                                            LaunchTemplateData={"ImageId": "ami-0000000000test02"})  # fmt: skip
    for _ in range(3):
        world.ec2.create_launch_template_version(LaunchTemplateId=late["LaunchTemplate"]["LaunchTemplateId"],
                                                 LaunchTemplateData={"ImageId": "ami-0000000000test02"})  # fmt: skip
    world.ec2.create_launch_template_version(LaunchTemplateId=late["LaunchTemplate"]["LaunchTemplateId"],
                                             LaunchTemplateData={"ImageId": world.images["extra-11"]})  # fmt: skip
    now = datetime.now(UTC)
    plans = {}
    for size in (1, 2, 7, 1000):
        aws.calls.reset()
        plan = retire.plan(store, EAGER, _finder(_provider(aws, settings, size)), now=now)
        plans[size] = sorted((s.version, s.action, s.why) for s in plan.steps())
        extra = _steps(plan, world)["extra-11"]
        assert extra[0] == "keep" and "zz-late" in extra[1] and "version 5" in extra[1], (size, extra)
        assert plan.calls[REGION]["DescribeImages"] == aws.calls["ec2.DescribeImages"]
        if size == 1000:
            images = len(world.backend.amis)
            assert aws.calls["ec2.DescribeImages"] <= math.ceil(images / 1000)
        else:
            assert aws.calls["ec2.DescribeImages"] >= len(world.images) // size
    assert plans[1] == plans[2] == plans[7] == plans[1000]


SOURCES = [
    ("ec2", "DescribeImages", "images"),
    ("ec2", "DescribeInstances", "instances"),
    ("ec2", "DescribeLaunchTemplates", "launch templates"),
    ("ec2", "DescribeLaunchTemplateVersions", "launch templates"),
    ("autoscaling", "DescribeAutoScalingGroups", "auto scaling groups"),
    ("autoscaling", "DescribeLaunchConfigurations", "launch configurations"),
    ("ssm", "DescribeParameters", "ssm parameters"),
    ("ssm", "GetParameters", "ssm parameters"),
    ("ec2", "DescribeImageAttribute", "shares"),
]


@pytest.mark.parametrize(("service", "operation", "source"), SOURCES)
def test_a_source_that_cannot_be_read_stops_every_change_in_its_region(
    aws: Aws,
    world: World,
    store: SqlStore,
    settings: Settings,
    faults: Faults,
    service: str,
    operation: str,
    source: str,
) -> None:
    provider = _provider(aws, settings)
    now = datetime.now(UTC)
    whole = retire.plan(store, EAGER, _finder(provider), now=now)
    assert whole.steps(*CHANGES)
    faults.refuse[operation] = "AccessDenied"
    plan = retire.plan(store, EAGER, _finder(provider), now=now)
    assert not plan.steps(*CHANGES), operation
    assert [f.source for f in plan.failures] == [source]
    # What the whole plan would change is blocked (and what a missing source no longer shows in use, too).
    assert {s.artifact_id for s in plan.steps("blocked")} >= {s.artifact_id for s in whole.steps(*CHANGES)}
    outcome = retire.apply(store, EAGER, _finder(provider), actor="t", now=now)
    assert outcome.outcomes == ()
    assert all(_attr(world, label, "deprecation_time") is None for label in world.images)


def test_a_throttle_that_never_clears_is_a_failed_source(
    aws: Aws, world: World, store: SqlStore, settings: Settings, faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto_emulation import no_backoff

    no_backoff(monkeypatch)
    faults.throttle.add("DescribeLaunchTemplateVersions")
    plan = retire.plan(store, EAGER, _finder(_provider(aws, settings)), now=datetime.now(UTC))
    assert [f.source for f in plan.failures] == ["launch templates"] and not plan.steps(*CHANGES)
    assert faults.throttled["DescribeLaunchTemplateVersions"] == settings.aws_max_attempts  # every attempt allowed


def test_an_account_read_through_its_role_keeps_only_what_it_uses(
    aws: Aws, world: World, store: SqlStore, settings: Settings
) -> None:
    used = world.version("used-there")
    unused = world.version("shared-unused")
    for image in (used, unused):
        world.ec2.modify_image_attribute(ImageId=image, LaunchPermission={"Add": [{"UserId": READER}]})
    provider = _provider(aws, settings)
    there = provider.session(REGION).as_account(READER).client("ec2", REGION)
    there.run_instances(ImageId=used, MinCount=1, MaxCount=1)
    steps = _steps(retire.plan(store, EAGER, _finder(provider), now=datetime.now(UTC)), world)
    assert steps["used-there"][0] == "keep" and f"account {READER}: instance" in steps["used-there"][1]
    assert steps["shared-unused"][0] == "deprecate"


@pytest.mark.parametrize("operation", ["EnableImageDeprecation", "DeregisterImage", "DeleteSnapshot"])
def test_killed_right_after_a_step_resumes_without_doing_it_twice(
    aws: Aws, world: World, store: SqlStore, settings: Settings, faults: Faults, operation: str, clock: Clock
) -> None:
    """The process dies just after AWS did the step, before the registry heard of it; the next run converges."""
    provider = _provider(aws, settings)

    before = ["EnableImageDeprecation", "DeregisterImage", "DeleteSnapshot"].index(operation)
    for _ in range(before):
        retire.apply(store, EAGER, _finder(provider), actor="t", now=clock())  # up to the step before
    faults.kill_after.add(operation)
    with pytest.raises(Killed):
        for _ in range(3):
            retire.apply(store, EAGER, _finder(provider), actor="t", now=clock())
    faults.kill_after.clear()
    aws.calls.reset()
    for _ in range(3):
        retire.apply(store, EAGER, _finder(provider), actor="t", now=clock())
    assert world.images["free"] not in world.backend.amis
    assert aws.calls["ec2.DeregisterImage"] <= 1
    assert [e.kind for e in store.events(world.refs["free"])].count("retire.deregistered") == 1
    snapshots = [r.snapshots for r in store.retirements().values() if r.stage == "purged"]
    assert snapshots and all(s not in world.backend.snapshots for ss in snapshots for s in ss)  # none orphaned
    assert store.get_version(world.refs["free"]).status is Status.RETIRED


# --- the emulation refuses what EC2 refuses --------------------------------------------------------------------


def test_the_emulation_refuses_deregistering_a_protected_image_and_a_deprecation_in_the_past(
    aws: Aws, world: World, lifecycle: ImageLifecycle, clock: Clock
) -> None:
    ec2 = world.ec2
    image = world.images["cool"]
    with pytest.raises(ClientError, match="OperationNotPermitted"):
        ec2.deregister_image(ImageId=image)
    ec2.disable_image_deregistration_protection(ImageId=image)
    with pytest.raises(ClientError, match="OperationNotPermitted"):
        ec2.deregister_image(ImageId=image)  # the 24 h cool-down
    with pytest.raises(ClientError, match="InvalidParameterValue"):
        ec2.enable_image_deprecation(ImageId=image, DeprecateAt=clock() - timedelta(days=1))
    with pytest.raises(ClientError, match=r"InvalidAMIID\.NotFound"):
        ec2.enable_image_deprecation(ImageId="ami-0000000000test99", DeprecateAt=clock() + timedelta(days=1))
    with pytest.raises(ClientError, match="InvalidAction"):
        ec2.describe_image_references(ImageIds=[image])


def test_the_recycle_bin_keeps_a_deregistered_image_for_its_retention(
    aws: Aws, world: World, lifecycle: ImageLifecycle, clock: Clock
) -> None:
    rbin = aws.session.client("rbin", REGION)
    with pytest.raises(ClientError, match="ValidationException"):
        rbin.create_rule(ResourceType="EC2_VOLUME", RetentionPeriod={"RetentionPeriodValue": 7,
                                                                      "RetentionPeriodUnit": "DAYS"})  # fmt: skip
    rbin.create_rule(
        ResourceType="EC2_IMAGE", RetentionPeriod={"RetentionPeriodValue": 7, "RetentionPeriodUnit": "DAYS"}
    )
    image = world.version("binned")
    world.ec2.deregister_image(ImageId=image)
    assert image not in world.backend.amis
    assert [i["ImageId"] for i in world.ec2.list_images_in_recycle_bin()["Images"]] == [image]
    world.ec2.restore_image_from_recycle_bin(ImageId=image)
    assert image in world.backend.amis
    world.ec2.deregister_image(ImageId=image)
    clock.later += timedelta(days=8)
    with pytest.raises(ClientError, match=r"InvalidAMIID\.NotFound"):
        world.ec2.restore_image_from_recycle_bin(ImageId=image)


def test_a_deregistered_image_comes_back_from_the_recycle_bin(
    aws: Aws, world: World, store: SqlStore, settings: Settings, clock: Clock
) -> None:
    rbin = aws.session.client("rbin", REGION)
    week_long = {"RetentionPeriodValue": 7, "RetentionPeriodUnit": "DAYS"}
    rbin.create_rule(ResourceType="EC2_IMAGE", RetentionPeriod=week_long,
                     ResourceTags=[{"ResourceTagKey": "team", "ResourceTagValue": "other"}])  # fmt: skip
    plan = retire.plan(store, EAGER, _finder(_provider(aws, settings)), now=clock())
    assert any("no Recycle Bin rule" in n for n in plan.notes)  # a rule for other tags keeps none of ours
    rbin.create_rule(ResourceType="EC2_IMAGE", RetentionPeriod=week_long,
                     ResourceTags=[{"ResourceTagKey": "amiforge:managed", "ResourceTagValue": "true"}])  # fmt: skip
    world.ec2.create_tags(Resources=[world.images["free"]], Tags=[{"Key": "amiforge:managed", "Value": "true"}])
    week = Retention.model_validate({"default": {**EAGER.default.model_dump(mode="json"), "snapshot_grace": "7d"}})
    provider = _provider(aws, settings)
    plan = retire.plan(store, week, _finder(provider), now=clock())
    assert not any("Recycle Bin" in n for n in plan.notes)  # a rule keeps deregistered images here
    for _ in range(2):
        retire.apply(store, week, _finder(provider), actor="t", now=clock())
    image = world.images["free"]
    assert image not in world.backend.amis
    snapshot = next(r.snapshots for r in store.retirements().values() if r.stage == "deregistered")
    assert all(s in world.backend.snapshots for s in snapshot)  # kept: the image can still come back
    restored = retire.restore(store, world.refs["free"], _finder(provider), actor="t")
    assert restored.status is Status.DEPRECATED and image in world.backend.amis
    with pytest.raises(NotFound, match="not in the Recycle Bin"):
        provider.restore(Artifact("aws", REGION, "ami-0000000000test02", "d" * 64, 8))


# --- drift on EC2 ----------------------------------------------------------------------------------------------


def test_drift_names_unmanaged_lagging_and_refused_instances(
    aws: Aws, world: World, store: SqlStore, settings: Settings, lifecycle: ImageLifecycle
) -> None:
    from amiforge.lifecycle.drift import drift

    current = world.version("current")
    store.move_channel("web", "prod", store.get_version(world.refs["current"]).id, expect_current=None, actor="t",
                       reason="test")  # fmt: skip
    world.ec2.run_instances(ImageId=current, MinCount=1, MaxCount=1)
    foreign = world.ec2.register_image(Name="someone-elses", RootDeviceName="/dev/sda1")["ImageId"]
    world.backend.amis[foreign].owner_id = OTHER
    world.ec2.run_instances(ImageId=foreign, MinCount=1, MaxCount=1)
    provider = _provider(aws, settings)
    lifecycle.allowed[(ACCOUNT, REGION)] = ("enabled", [{"ImageProviders": ["amazon"]}, {"ImageNames": ["golden-*"]}])
    report = drift(store, _lister(provider), local_region="local", regions=[REGION])
    rows = {r.image: r for r in report.rows}
    assert rows[current].findings == () and rows[current].channels == ("prod (current)",)
    assert rows[current].allowed is True  # the account's own images are always allowed
    assert rows[foreign].findings == (
        f"unmanaged: the registry knows no version of {foreign}",
        "the account's Allowed AMIs setting would refuse its image",
    )
    stopped = rows[world.images["instance"]]  # the stopped instance of the world: behind prod, in no channel
    assert stopped.findings == ("in no channel", "5 version(s) behind web:prod")  # web@3; web@4..8
    lifecycle.allowed[(ACCOUNT, REGION)] = ("enabled", [{"ImageNames": ["someone-*"]}])
    assert {r.image: r for r in drift(store, _lister(provider), local_region="local").rows}[foreign].allowed is True


def _lister(provider: AwsProvider) -> Any:
    return lambda kind: provider if kind == "aws" else None


# --- reports on EC2 --------------------------------------------------------------------------------------------


def test_cost_and_tags_read_the_images_snapshots(aws: Aws, world: World, store: SqlStore, settings: Settings) -> None:
    from amiforge.lifecycle.reports import cost_report, tag_report
    from amiforge.policy.reporting import DEFAULT_PRICES, TagRules

    provider = _provider(aws, settings)
    owned = world.images["free"]
    world.ec2.create_tags(Resources=[owned], Tags=[{"Key": "owner", "Value": "team-a"},
                                                  {"Key": "cost-center", "Value": "cc-7"}])  # fmt: skip
    report = cost_report(store, lambda _kind: provider, DEFAULT_PRICES, TagRules())
    rows = {r.location: r for r in report.rows}
    volume = world.backend.snapshots[world.snapshot_of("free")].volume.size  # GiB: moto gives no stored size
    assert rows[owned].gb == volume and not rows[owned].exact  # an upper bound, said so
    assert (rows[owned].owner, rows[owned].cost_center) == ("team-a", "cc-7")
    assert rows[owned].price == 0.05 and not rows[owned].regional_price  # eu-west-1 has no price of its own here
    assert report.by_owner["team-a"] == pytest.approx(volume * 0.05)
    assert report.total == pytest.approx(sum(r.monthly for r in report.rows)) and len(report.rows) == len(world.images)
    tagged = tag_report(store, lambda _kind: provider, TagRules(required=("owner",)))
    kinds = {(r.kind, r.id) for r in tagged.rows}
    assert ("image", owned) not in kinds and ("snapshot", world.snapshot_of("free")) in kinds
    assert ("image", world.images["cool"]) in kinds and ("version", world.refs["free"]) in kinds


def test_the_allowed_amis_criteria_allow_exactly_the_channels_versions(
    aws: Aws,
    world: World,
    store: SqlStore,
    settings: Settings,
    lifecycle: ImageLifecycle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import amiforge.providers
    from amiforge.providers.aws.allowed import image_allowed

    provider = _provider(aws, settings)
    monkeypatch.setattr(amiforge.providers, "PROVIDERS", {"aws": lambda _s: provider})
    for label in ("parameter", "shared"):  # previous, then current
        ref = world.refs[label]
        now = store.channels("web", "prod")
        store.move_channel("web", "prod", store.get_version(ref).id,
                           expect_current=store.get_version(now[0].current).id if now else None, actor="t",
                           reason="test")  # fmt: skip
    criteria = retire.allowed_criteria(store, settings)[REGION]
    assert criteria == [{"ImageProviders": [ACCOUNT], "ImageNames": ["web-parameter", "web-shared"]}]
    # As a consumer account sees them: the channels' images allowed, any other of this account's refused.
    consumer = "444455556666"
    images = {i["ImageId"]: i for i in world.ec2.describe_images(Owners=["self"])["Images"]}
    allowed = {label: image_allowed(criteria, images[world.images[label]], consumer, datetime.now(UTC))
               for label in ("parameter", "shared", "free", "instance")}  # fmt: skip
    assert allowed == {"parameter": True, "shared": True, "free": False, "instance": False}


def test_a_launch_template_pinning_a_parameter_version_keeps_that_versions_image(
    aws: Aws, world: World, store: SqlStore, settings: Settings
) -> None:
    ssm = aws.session.client("ssm", REGION)
    world.ec2.create_launch_template(LaunchTemplateName="pinned",
                                     LaunchTemplateData={"ImageId": "resolve:ssm:/team/golden:1"})  # fmt: skip
    ssm.put_parameter(Name="/team/golden", Type="String", Value="ami-0000000000test01", Overwrite=True)
    steps = _steps(retire.plan(store, EAGER, _finder(_provider(aws, settings)), now=datetime.now(UTC)), world)
    action, why = steps["parameter"]
    assert action == "keep" and "launch template pinned (" in why and "(resolve:ssm:/team/golden:1)" in why
    assert "ssm parameter /team/golden" not in why  # its current value is another image now
