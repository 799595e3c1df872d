"""Source image resolution (owner-pinned, docs/architecture.md §8) and the inventory of managed images, on moto."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import ACCOUNT, REGION, Aws
from moto.ec2.models import ec2_backends
from moto_emulation import shared_images

from amiforge.awsapi.clients import AwsSession, eventually
from amiforge.errors import ConfigError, NotFound, StateError
from amiforge.providers.aws.images import SourceImage, describe_image, inventory, resolve_source
from amiforge.providers.aws.provider import AwsProvider
from amiforge.recipe import OwnersSource, SsmSource
from amiforge.settings import Settings

SQUATTER = "666666666666"
PARAM = "/amiforge/test/debian/12/latest/amd64"  # moto reserves /aws/service/ (AccessDenied), so a path of our own
BASE = datetime(2024, 1, 1, tzinfo=UTC)
MANAGED = [{"ResourceType": "image", "Tags": [{"Key": "amiforge:managed", "Value": "true"}]}]


def _instance(ec2: Any) -> str:
    return str(ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])


def _image(ec2: Any, instance: str, name: str, *, day: int, owner: str | None = None, tags: Any = ()) -> str:
    image_id = str(ec2.create_image(InstanceId=instance, Name=name, TagSpecifications=list(tags))["ImageId"])
    ami = ec2_backends[ACCOUNT][REGION].amis[image_id]
    # moto stamps "now" at one-second resolution; the tests need a known order.
    ami.creation_date = BASE + timedelta(days=day)
    if owner is not None:
        # A public image published by another account, visible to ours (moto keeps accounts apart otherwise).
        ami.owner_id = owner
        ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"Group": "all"}]})
    return image_id


@pytest.fixture
def debian(aws: Aws) -> dict[str, str]:
    """Three releases of ours, a squatter's newer look-alike, and an unrelated image."""
    ec2: Any = aws.ec2()
    instance = _instance(ec2)
    return {
        "old": _image(ec2, instance, "debian-12-amd64-20240101", day=0),
        "new": _image(ec2, instance, "debian-12-amd64-20240301", day=60),
        "mid": _image(ec2, instance, "debian-12-amd64-20240201", day=30),
        "squat": _image(ec2, instance, "debian-12-amd64-29990101", day=900, owner=SQUATTER),
        "other": _image(ec2, instance, "ubuntu-24-amd64", day=1000),
    }


def _resolve_all(aws: Aws, ids: dict[str, str]) -> list[SourceImage]:
    aws.session.client("ssm").put_parameter(
        Name=PARAM, Value=ids["mid"], Type="String", DataType="aws:ec2:image", Overwrite=True
    )
    return [
        resolve_source(OwnersSource(owners=[ACCOUNT], name="debian-12-amd64-*"), aws.session, REGION),
        resolve_source(OwnersSource(owners=["self"], name="debian-12-amd64-*"), aws.session, REGION),
        resolve_source(OwnersSource(owners=[SQUATTER], name="debian-12-*"), aws.session, REGION),
        resolve_source(SsmSource(ssm_parameter=PARAM), aws.session, REGION),
    ]


def test_owners_newest_wins_and_other_owners_are_never_matched(aws: Aws, debian: dict[str, str]) -> None:
    mine, self_alias, squatter, from_ssm = _resolve_all(aws, debian)
    assert mine.image_id == debian["new"] and mine.owner == ACCOUNT
    assert mine.name == "debian-12-amd64-20240301" and mine.creation_date == BASE + timedelta(days=60)
    assert mine.architecture == "x86_64"
    assert self_alias == mine  # the squatter's newer look-alike is not ours
    assert squatter.image_id == debian["squat"]  # only when that owner is pinned
    assert from_ssm.image_id == debian["mid"]


def test_same_answers_under_throttling(faulty: Aws) -> None:
    """30 % of sends throttled: the same resolutions, through botocore's retries."""
    assert faulty.faults is not None
    # Only throttling here: NotFound-after-create is the eventually() test's subject.
    faulty.faults.not_found_reads = 0
    ec2: Any = faulty.ec2()
    instance = _instance(ec2)
    ids = {
        "old": _image(ec2, instance, "debian-12-amd64-20240101", day=0),
        "new": _image(ec2, instance, "debian-12-amd64-20240301", day=60),
        "mid": _image(ec2, instance, "debian-12-amd64-20240201", day=30),
        "squat": _image(ec2, instance, "debian-12-amd64-29990101", day=900, owner=SQUATTER),
    }
    answers = [_resolve_all(faulty, ids) for _ in range(5)]
    assert faulty.faults.injected["RequestLimitExceeded"] + faulty.faults.injected["ThrottlingException"] > 5
    assert all(a == answers[0] for a in answers)
    assert [a.image_id for a in answers[0]] == [ids["new"], ids["new"], ids["squat"], ids["mid"]], (ids, answers[0])


def test_no_owners_is_refused_at_runtime(aws: Aws) -> None:
    before = sum(aws.calls.counts.values())
    for most_recent in (True, False):
        # model_construct skips the schema, as code building a source by hand would.
        source = OwnersSource.model_construct(owners=[], name="debian-12-*", most_recent=most_recent)
        with pytest.raises(ConfigError, match="whoAMI") as caught:
            resolve_source(source, aws.session, REGION)
        assert caught.value.fix and "owners" in caught.value.fix
    assert sum(aws.calls.counts.values()) == before  # refused before any AWS call


def test_nothing_matches_is_not_found_naming_the_filter(aws: Aws, debian: dict[str, str]) -> None:
    with pytest.raises(NotFound, match=r"debian-13-\*") as caught:
        resolve_source(OwnersSource(owners=["amazon"], name="debian-13-*"), aws.session, REGION)
    assert "amazon" in caught.value.message
    with pytest.raises(NotFound, match=r"architecture=arm64"):
        # Every image here is x86_64: none for a Graviton builder.
        resolve_source(
            OwnersSource(owners=[ACCOUNT], name="debian-12-*"), aws.session, REGION, instance_type="t4g.micro"
        )


def _arm64(image_id: str) -> str:
    ec2_backends[ACCOUNT][REGION].amis[image_id].architecture = "arm64"  # moto's CreateImage is always x86_64
    return image_id


def test_source_resolves_for_the_instance_types_architecture(aws: Aws, debian: dict[str, str]) -> None:
    """`debian-12-*` matches both architectures: the newest image of the *builder's* architecture wins."""
    ec2: Any = aws.ec2()
    newest_arm = _arm64(_image(ec2, _instance(ec2), "debian-12-arm64-20240401", day=90))
    source = OwnersSource(owners=[ACCOUNT], name="debian-12-*")
    assert resolve_source(source, aws.session, REGION).image_id == newest_arm  # the old behaviour: by date alone
    aws.calls.reset()
    x86 = resolve_source(source, aws.session, REGION, instance_type="t3.micro")
    assert (x86.image_id, x86.architecture) == (debian["new"], "x86_64")
    assert aws.calls["ec2.DescribeInstanceTypes"] == 1
    arm = resolve_source(source, aws.session, REGION, instance_type="t4g.micro")
    assert (arm.image_id, arm.architecture) == (newest_arm, "arm64")
    # t2 runs i386 and x86_64: both are asked for, and the x86_64 image is the one there is.
    assert resolve_source(source, aws.session, REGION, instance_type="t2.micro").image_id == debian["new"]


def test_ssm_parameter_of_another_architecture_is_a_config_error(aws: Aws, debian: dict[str, str]) -> None:
    arm = _arm64(debian["mid"])
    aws.session.client("ssm").put_parameter(Name=PARAM, Value=arm, Type="String", DataType="aws:ec2:image")
    assert (
        resolve_source(SsmSource(ssm_parameter=PARAM), aws.session, REGION, instance_type="m7g.large").image_id == arm
    )
    with pytest.raises(ConfigError) as caught:
        resolve_source(SsmSource(ssm_parameter=PARAM), aws.session, REGION, instance_type="t3.micro")
    message = caught.value.message
    assert arm in message and PARAM in message and "arm64" in message and "t3.micro runs x86_64" in message
    assert caught.value.fix and "arm64" in caught.value.fix


def test_unknown_instance_type_is_a_config_error_before_any_image_lookup(aws: Aws, debian: dict[str, str]) -> None:
    aws.calls.reset()
    with pytest.raises(ConfigError, match=r"instance type t9\.nothing is not offered in eu-west-1") as caught:
        resolve_source(
            OwnersSource(owners=[ACCOUNT], name="debian-12-*"), aws.session, REGION, instance_type="t9.nothing"
        )
    assert caught.value.fix and "instance_type" in caught.value.fix
    assert aws.calls["ec2.DescribeImages"] == 0


def test_source_image_knows_its_root_device(aws: Aws, debian: dict[str, str]) -> None:
    """What the builder's root_volume mapping needs: the device name and the snapshot's size (moto: /dev/sda1, 15)."""
    image = resolve_source(OwnersSource(owners=[ACCOUNT], name="debian-12-amd64-*"), aws.session, REGION)
    assert (image.root_device_name, image.root_volume_gib) == ("/dev/sda1", 15)


def test_most_recent_false_wants_exactly_one(aws: Aws, debian: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="3 images match"):
        resolve_source(OwnersSource(owners=[ACCOUNT], name="debian-12-*", most_recent=False), aws.session, REGION)
    exact = OwnersSource(owners=[ACCOUNT], name="debian-12-amd64-20240101", most_recent=False)
    assert resolve_source(exact, aws.session, REGION).image_id == debian["old"]


def test_ssm_problems(aws: Aws, debian: dict[str, str]) -> None:
    ssm = aws.session.client("ssm")
    with pytest.raises(NotFound, match="ParameterNotFound"):
        resolve_source(SsmSource(ssm_parameter="/nope"), aws.session, REGION)
    ssm.put_parameter(Name="/bad", Value="not-an-ami", Type="String")  # moto validates nothing (notes/moto.md)
    with pytest.raises(ConfigError, match="not an image id"):
        resolve_source(SsmSource(ssm_parameter="/bad"), aws.session, REGION)
    ssm.put_parameter(Name="/gone", Value="ami-0123456789abcdef0", Type="String")
    with pytest.raises(NotFound):
        resolve_source(SsmSource(ssm_parameter="/gone"), aws.session, REGION)
    aws.session.client("ec2").disable_image(ImageId=debian["old"])
    ssm.put_parameter(Name="/disabled", Value=debian["old"], Type="String")
    with pytest.raises(StateError, match="disabled"):
        resolve_source(SsmSource(ssm_parameter="/disabled"), aws.session, REGION)


def test_inventory_of_2500_images_costs_3_calls(aws: Aws) -> None:
    ec2: Any = aws.ec2()
    instance = _instance(ec2)
    for i in range(2500):
        ec2.create_image(InstanceId=instance, Name=f"web-{i:04}", TagSpecifications=MANAGED)
    ec2.create_image(InstanceId=instance, Name="unmanaged")
    aws.calls.reset()
    images = inventory(aws.session, REGION)
    assert aws.calls["ec2.DescribeImages"] == 3  # ⌈2500/1000⌉
    assert sum(aws.calls.counts.values()) == 3
    assert len(images) == 2500 and len({i.image_id for i in images}) == 2500
    assert all(i.tag("amiforge:managed") == "true" and i.snapshot_ids for i in images)


@pytest.mark.parametrize("extra", [None, {"team": "web"}])
def test_inventory_identical_at_every_page_size(aws: Aws, extra: dict[str, str] | None) -> None:
    ec2: Any = aws.ec2()
    instance = _instance(ec2)
    for i in range(23):
        image_id = _image(ec2, instance, f"web-{i:02}", day=i % 5, tags=MANAGED)
        if i % 3 == 0:
            ec2.create_tags(Resources=[image_id], Tags=[{"Key": "team", "Value": "web"}])
    results = {}
    for size in (1, 2, 7, 1000):
        aws.paging.page_cap = size
        aws.calls.reset()
        results[size] = inventory(aws.session, REGION, tag_filters=extra)
        expected = 23 if extra is None else 8
        assert len(results[size]) == expected
        assert aws.calls["ec2.DescribeImages"] == max(1, -(-expected // size))
    assert results[1] == results[2] == results[7] == results[1000]


def test_eventually_waits_out_not_found_after_create_without_sleeping(faulty: Aws) -> None:
    assert faulty.faults is not None
    faulty.faults.not_found_reads = 2
    ec2: Any = faulty.ec2()
    image_id = ec2.create_image(InstanceId=_instance(ec2), Name="fresh")["ImageId"]
    slept: list[float] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    image = eventually(lambda: describe_image(faulty.session, REGION, image_id), sleep=sleep, clock=lambda: now[0])
    assert image["ImageId"] == image_id
    assert faulty.faults.injected["InvalidAMIID.NotFound"] == 2
    assert slept == [1.0, 2.0]


def test_eventually_gives_up_after_timeout() -> None:
    now = [0.0]

    def missing() -> None:
        raise NotFound("still not there")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(NotFound):
        eventually(missing, timeout=10, sleep=sleep, clock=lambda: now[0])
    assert now[0] <= 10


def test_image_digest_covers_identity_not_labels() -> None:
    from amiforge.providers.aws.images import image_digest

    image: dict[str, Any] = {
        "ImageId": "ami-00000000000000001",
        "Name": "web-1",
        "Architecture": "x86_64",
        "RootDeviceName": "/dev/xvda",
        "Description": "first",
        "Tags": [{"Key": "team", "Value": "web"}],
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/xvdb", "Ebs": {"SnapshotId": "snap-00000000000000002", "VolumeSize": 4}},
            {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-00000000000000001", "VolumeSize": 8}},
            {"DeviceName": "/dev/sdc", "VirtualName": "ephemeral0"},
        ],
    }
    digest = image_digest(image, REGION)
    relabelled = {**image, "Description": "second", "Tags": [], "State": "available", "DeprecationTime": "x"}
    reordered = {**image, "BlockDeviceMappings": list(reversed(image["BlockDeviceMappings"]))}
    assert image_digest(relabelled, REGION) == image_digest(reordered, REGION) == digest
    other_snapshot = {
        **image,
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-00000000000000009", "VolumeSize": 8}}
        ],
    }
    assert image_digest(other_snapshot, REGION) != digest
    assert image_digest(image, "us-east-1") != digest
    assert image_digest({**image, "ImageId": "ami-00000000000000002"}, REGION) != digest


def _tag_keys(ec2: Any, resource: str) -> set[str]:
    found = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [resource]}])["Tags"]
    return {str(t["Key"]) for t in found}


def test_adopting_tags_this_accounts_image_and_leaves_a_shared_one_alone(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`import packer` adopts an image: this account's image and its snapshots become amiforge:managed (so distribute
    may share them); an image a build account shared with this one cannot be tagged from here, and adopting it must
    neither try nor fail."""
    shared_images(monkeypatch)
    other = "111122223333"
    session = AwsSession(
        REGION, role_arns={other: f"arn:aws:iam::{other}:role/amiforge"}, boto_session=aws.session.boto_session
    )
    theirs: Any = session.as_account(other).client("ec2")
    build = theirs.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    foreign = theirs.create_image(InstanceId=build, Name="packer-shared")["ImageId"]
    theirs.modify_image_attribute(ImageId=foreign, LaunchPermission={"Add": [{"UserId": ACCOUNT}]})
    ec2: Any = aws.ec2()
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    own = ec2.create_image(InstanceId=instance, Name="packer-own")["ImageId"]
    provider = AwsProvider(Settings(), boto_session=aws.session.boto_session)
    aws.calls.reset()

    adopted = provider.adopt(REGION, foreign)
    assert adopted.location == foreign and aws.calls["ec2.CreateTags"] == 0
    assert "amiforge:managed" not in _tag_keys(theirs, foreign)

    provider.adopt(REGION, own)
    snapshot = ec2.describe_images(ImageIds=[own])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    assert "amiforge:managed" in _tag_keys(ec2, own) and "amiforge:managed" in _tag_keys(ec2, snapshot)
