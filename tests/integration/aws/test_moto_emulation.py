"""The test-side emulation of what moto lacks is itself tested: paging, the tag-lookup shim, fault injection, and the
Auto Scaling / launch template / console emulation of asg_emulation.py."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from asg_emulation import InstanceRefreshEmulation, install_asg_emulation, make_group, make_images
from botocore.config import Config
from botocore.exceptions import ClientError
from conftest import REGION, Aws
from moto.ec2.models.core import TaggedEC2Resource
from moto_emulation import FaultInjector, PagingEmulation, no_backoff, shared_images

from amiforge.awsapi.clients import AwsSession

SIZES = [1, 2, 7, 1000]
TAG = [{"ResourceType": "image", "Tags": [{"Key": "amiforge:managed", "Value": "true"}]}]


def _instance(ec2: Any) -> str:
    return str(ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])


def _images(ec2: Any, n: int) -> list[str]:
    instance = _instance(ec2)
    return [
        str(ec2.create_image(InstanceId=instance, Name=f"img-{i:03}", TagSpecifications=TAG)["ImageId"])
        for i in range(n)
    ]


def _pages(ec2: Any, operation: str, key: str, size: int, **kwargs: Any) -> tuple[list[Any], int]:
    pages = list(ec2.get_paginator(operation).paginate(PaginationConfig={"PageSize": size}, **kwargs))
    return [item for page in pages for item in page[key]], len(pages)


@pytest.mark.parametrize("cap", [False, True], ids=["max-results", "server-cap"])
def test_images_and_snapshots_page_identically(aws: Aws, cap: bool) -> None:
    ec2: Any = aws.ec2()
    _images(ec2, 17)
    whole_images = ec2.describe_images(Owners=["self"])["Images"]
    whole_snapshots = ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert len(whole_images) == 17 and len(whole_snapshots) >= 17
    for size in SIZES:
        if cap:
            aws.paging.page_cap = size
        images, n_images = _pages(ec2, "describe_images", "Images", 1000 if cap else size, Owners=["self"])
        snaps, _ = _pages(ec2, "describe_snapshots", "Snapshots", 1000 if cap else size, OwnerIds=["self"])
        assert [i["ImageId"] for i in images] == [i["ImageId"] for i in whole_images]
        assert [s["SnapshotId"] for s in snaps] == [s["SnapshotId"] for s in whole_snapshots]
        assert n_images == -(-17 // size)


@pytest.mark.parametrize("size", SIZES)
def test_instances_page_identically(aws: Aws, size: int) -> None:
    ec2: Any = aws.ec2()
    ec2.run_instances(ImageId="ami-12345678", MinCount=9, MaxCount=9)
    for _ in range(4):
        ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)
    whole = [i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    # moto's own paging would stop at 100 reservations and use its own token; the emulation replaces it.
    aws.paging.page_cap = size
    reservations, pages = _pages(ec2, "describe_instances", "Reservations", 1000)
    assert [i["InstanceId"] for r in reservations for i in r["Instances"]] == whole
    assert pages == -(-5 // size)


def test_launch_templates_and_their_versions_page_like_ec2(aws: Aws) -> None:
    """moto alone would answer 15 at most and no NextToken (its default MaxResults)."""
    ec2: Any = aws.ec2()
    for n in range(20):
        ec2.create_launch_template(LaunchTemplateName=f"lt-{n:02d}", LaunchTemplateData={"ImageId": "ami-12345678"})
    template = ec2.describe_launch_templates(LaunchTemplateNames=["lt-00"])["LaunchTemplates"][0]["LaunchTemplateId"]
    for _ in range(19):
        ec2.create_launch_template_version(LaunchTemplateId=template, LaunchTemplateData={"ImageId": "ami-12345678"})
    assert len(ec2.describe_launch_templates()["LaunchTemplates"]) == 20  # no MaxResults: everything
    templates, pages = _pages(ec2, "describe_launch_templates", "LaunchTemplates", 7)
    assert len({t["LaunchTemplateId"] for t in templates}) == 20 and pages == 3
    versions, pages = _pages(ec2, "describe_launch_template_versions", "LaunchTemplateVersions", 7,
                             LaunchTemplateId=template)  # fmt: skip
    assert [v["VersionNumber"] for v in versions] == list(range(1, 21)) and pages == 3


def test_short_pages_are_not_the_last(aws: Aws) -> None:
    """With a server cap below MaxResults, a full-looking short page still carries a NextToken."""
    ec2: Any = aws.ec2()
    _images(ec2, 3)
    aws.paging.page_cap = 2
    first = ec2.describe_images(Owners=["self"], MaxResults=1000)
    assert len(first["Images"]) == 2 and "NextToken" in first
    rest = ec2.describe_images(Owners=["self"], MaxResults=1000, NextToken=first["NextToken"])
    assert len(rest["Images"]) == 1 and "NextToken" not in rest


def test_token_is_bound_to_its_request_and_ids_refuse_paging(aws: Aws) -> None:
    ec2: Any = aws.ec2()
    ids = _images(ec2, 3)
    token = ec2.describe_images(Owners=["self"], MaxResults=1)["NextToken"]
    with pytest.raises(ClientError) as caught:
        ec2.describe_images(Owners=["amazon"], MaxResults=1, NextToken=token)
    assert caught.value.response["Error"]["Code"] == "InvalidParameterValue"
    with pytest.raises(ClientError) as caught:
        ec2.describe_images(Owners=["self"], MaxResults=1, NextToken="garbage")
    assert caught.value.response["Error"]["Code"] == "InvalidParameterValue"
    with pytest.raises(ClientError) as caught:
        ec2.describe_images(ImageIds=ids[:1], MaxResults=5)
    assert caught.value.response["Error"]["Code"] == "InvalidParameterCombination"
    # Without MaxResults, everything in one answer, as EC2 does.
    assert len(ec2.describe_images(Owners=["self"])["Images"]) == 3


def test_tag_shim_answers_like_moto(aws: Aws) -> None:
    ec2: Any = aws.ec2()
    ids = _images(ec2, 4)
    ec2.create_tags(Resources=ids[:2], Tags=[{"Key": "team", "Value": "web"}, {"Key": "x", "Value": ""}])
    from moto.ec2.models import ec2_backends

    backend = ec2_backends["123456789012"][REGION]
    shimmed = {i: backend.amis[i].get_tags() for i in ids}
    # moto's own TaggedEC2Resource.get_tags is exactly this scan of every tag in the region.
    assert {i: backend.describe_tags(filters={"resource-id": [i]}) for i in ids} == shimmed
    assert TaggedEC2Resource.get_tags.__name__ == "get_tags"
    assert shimmed[ids[0]][0]["resource_type"] == "image"


def test_paging_emulation_object_is_inert_without_install() -> None:
    assert PagingEmulation().page_cap is None


# --- fault injection ------------------------------------------------------------------------------------------


def test_throttling_goes_through_botocore_retries(faulty: Aws) -> None:
    assert faulty.faults is not None
    ec2: Any = faulty.ec2()
    for _ in range(40):
        response = ec2.describe_images(Owners=["self"])
        assert response["Images"] == []
    injected = faulty.faults.injected["RequestLimitExceeded"]
    # About 30 % of sends are throttled (seeded, so this is exact run to run), each retried by botocore.
    assert 8 <= injected <= 25
    assert faulty.faults.sends == 40 + injected
    assert faulty.calls["ec2.DescribeImages"] == 40  # before-call counts calls, not attempts


def test_persistent_throttling_surfaces_after_max_attempts(
    moto: PagingEmulation, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays = no_backoff(monkeypatch)
    boto = boto3.Session(region_name=REGION)
    faults = FaultInjector(rate=1.0)
    faults.install(boto.events)
    ec2 = boto.client("ec2", config=Config(retries={"mode": "standard", "total_max_attempts": 3}))
    with pytest.raises(ClientError) as caught:
        ec2.describe_images(Owners=["self"])
    assert caught.value.response["Error"]["Code"] == "RequestLimitExceeded"
    assert faults.sends == 3  # total_max_attempts counts the first attempt (max_attempts would not)
    assert len(delays) == 2 and all(d >= 0 for d in delays)  # standard mode chose (jittered) backoffs


def test_not_found_right_after_create_only_once(faulty: Aws) -> None:
    assert faulty.faults is not None
    faulty.faults.rate = 0.0
    ec2: Any = faulty.ec2()
    image_id = ec2.create_image(InstanceId=_instance(ec2), Name="fresh")["ImageId"]
    with pytest.raises(ClientError) as caught:
        ec2.describe_images(ImageIds=[image_id])
    assert caught.value.response["Error"]["Code"] == "InvalidAMIID.NotFound"
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["ImageId"] == image_id


def test_a_throttled_create_creates_nothing(faulty: Aws) -> None:
    """botocore runs every before-send handler; the injector keeps moto from executing the faulted send."""
    assert faulty.faults is not None
    ec2: Any = faulty.ec2()
    instance = _instance(ec2)
    names = [f"img-{i:02}" for i in range(30)]
    for name in names:
        ec2.create_image(InstanceId=instance, Name=name)
    assert faulty.faults.injected["RequestLimitExceeded"] > 0
    faulty.faults.rate = 0.0
    assert sorted(i["Name"] for i in ec2.describe_images(Owners=["self"])["Images"]) == names


def test_shared_images_are_visible_to_the_account_they_are_shared_with(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared_images(monkeypatch)
    other = "111122223333"
    session = AwsSession(
        REGION, role_arns={other: f"arn:aws:iam::{other}:role/amiforge"}, boto_session=aws.session.boto_session
    )
    ec2: Any = aws.ec2()
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    shared, private = (ec2.create_image(InstanceId=instance, Name=n)["ImageId"] for n in ("shared", "private"))
    ec2.modify_image_attribute(ImageId=shared, LaunchPermission={"Add": [{"UserId": other}]})
    theirs: Any = session.as_account(other).client("ec2")
    assert [i["ImageId"] for i in theirs.describe_images(ImageIds=[shared])["Images"]] == [shared]
    with pytest.raises(ClientError):
        theirs.describe_images(ImageIds=[private])
    assert {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]} == {shared, private}


def test_auto_scaling_throttling_is_answered_in_its_own_protocol(
    moto: PagingEmulation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Auto Scaling speaks the query protocol (XML errors): a throttled call is retried, then surfaces as Throttling."""
    no_backoff(monkeypatch)
    boto = boto3.Session(region_name=REGION)
    faults = FaultInjector(rate=1.0)
    faults.install(boto.events)
    asg = boto.client("autoscaling", config=Config(retries={"mode": "standard", "total_max_attempts": 2}))
    with pytest.raises(ClientError) as caught:
        asg.describe_auto_scaling_groups()
    assert caught.value.response["Error"]["Code"] == "Throttling"
    assert faults.sends == 2 and faults.injected["Throttling"] == 2


# --- asg_emulation.py ---------------------------------------------------------------------------------------------


def test_a_new_template_version_inherits_its_source_and_honours_its_client_token(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_asg_emulation(monkeypatch)
    ec2: Any = aws.ec2()
    data = {"ImageId": "ami-11111111", "InstanceType": "t3.micro", "UserData": "ZWNobyBoaQ=="}
    lt = ec2.create_launch_template(LaunchTemplateName="lt", LaunchTemplateData=data)["LaunchTemplate"]
    kw: dict[str, Any] = {"LaunchTemplateId": lt["LaunchTemplateId"], "SourceVersion": "1"}
    first = ec2.create_launch_template_version(**kw, LaunchTemplateData={"ImageId": "ami-22222222"}, ClientToken="a")
    again = ec2.create_launch_template_version(**kw, LaunchTemplateData={"ImageId": "ami-22222222"}, ClientToken="a")
    assert first["LaunchTemplateVersion"]["VersionNumber"] == again["LaunchTemplateVersion"]["VersionNumber"] == 2
    assert first["LaunchTemplateVersion"]["LaunchTemplateData"] == {**data, "ImageId": "ami-22222222"}
    with pytest.raises(ClientError) as caught:
        ec2.create_launch_template_version(**kw, LaunchTemplateData={"ImageId": "ami-33333333"}, ClientToken="a")
    assert caught.value.response["Error"]["Code"] == "IdempotentParameterMismatch"
    plain = ec2.create_launch_template_version(
        LaunchTemplateId=lt["LaunchTemplateId"], LaunchTemplateData={"ImageId": "ami-44444444"}
    )
    assert plain["LaunchTemplateVersion"]["LaunchTemplateData"] == {"ImageId": "ami-44444444"}  # no source: as is
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=lt["LaunchTemplateId"])["LaunchTemplateVersions"]
    assert sorted(v["VersionNumber"] for v in versions) == [1, 2, 3]


def test_terminating_in_a_group_is_asynchronous_and_launches_one_replacement_from_its_version(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulations = install_asg_emulation(monkeypatch, launch_after=1)
    ec2: Any = aws.ec2()
    asg: Any = aws.session.client("autoscaling")
    image_a, image_b = make_images(ec2, "a", "b")
    template = make_group(aws.session, "g", image_a, size=3)
    ec2.create_launch_template_version(
        LaunchTemplateId=template, SourceVersion="1", LaunchTemplateData={"ImageId": image_b}
    )
    asg.update_auto_scaling_group(
        AutoScalingGroupName="g", LaunchTemplate={"LaunchTemplateId": template, "Version": "2"}
    )

    def members() -> dict[str, str]:
        group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["g"])["AutoScalingGroups"][0]
        assert group["DesiredCapacity"] == 3
        return {i["InstanceId"]: i["LifecycleState"] for i in group["Instances"]}

    old = sorted(members())[0]
    asg.terminate_instance_in_auto_scaling_group(InstanceId=old, ShouldDecrementDesiredCapacity=False)
    first = members()  # the first look: still a member, Terminating; no replacement yet
    assert first[old] == "Terminating" and len(first) == 3 and emulations.groups.launched["g"] == 0
    now = members()  # the next: gone, and its replacement launched
    assert old not in now and len(now) == 3 and emulations.groups.launched["g"] == 1
    (new,) = set(now) - set(first)
    described = ec2.describe_instances(InstanceIds=[old, new])["Reservations"]
    by_id = {i["InstanceId"]: i for r in described for i in r["Instances"]}
    assert by_id[old]["State"]["Name"] == "terminated"
    assert {"Key": "aws:autoscaling:groupName", "Value": "g"} in by_id[old]["Tags"]  # kept, as on AWS
    assert by_id[new]["ImageId"] == image_b and by_id[new]["InstanceType"] == "t3.micro"  # the group's version
    # An instance in no group, or already gone: ValidationError, as on AWS (moto raises StopIteration).
    for instance in (old, "i-0123456789abcdef0"):
        with pytest.raises(ClientError) as caught:
            asg.terminate_instance_in_auto_scaling_group(InstanceId=instance, ShouldDecrementDesiredCapacity=False)
        assert caught.value.response["Error"]["Code"] == "ValidationError"
    # Decrementing: no replacement, one fewer wanted.
    asg.terminate_instance_in_auto_scaling_group(InstanceId=sorted(now)[0], ShouldDecrementDesiredCapacity=True)
    members_after = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["g"])["AutoScalingGroups"][0]
    assert members_after["DesiredCapacity"] == 2
    asg.describe_auto_scaling_groups(AutoScalingGroupNames=["g"])
    assert emulations.groups.launched["g"] == 1


def test_the_console_is_empty_at_first_then_ends_in_the_readiness_line(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulations = install_asg_emulation(monkeypatch)
    console = emulations.console
    ec2: Any = aws.ec2()
    good, slow, bad = make_images(ec2, "good", "slow", "bad")
    console.uptime[slow] = 120.0
    console.never_ready.add(bad)

    def output(image: str) -> list[str]:
        instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        answers = [ec2.get_console_output(InstanceId=instance, Latest=True) for _ in range(2)]
        return [str(a.get("Output") or "") for a in answers]  # base64 on the wire; botocore decodes it

    assert [o.splitlines()[-1:] for o in output(good)] == [[], ["AMIFORGE-READY 8.5"]]
    assert output(slow)[1].endswith("AMIFORGE-READY 120.0\n")
    first, second = output(bad)
    assert first == "" and "AMIFORGE-READY" not in second and "timed out" in second
    with pytest.raises(ClientError) as caught:
        ec2.get_console_output(InstanceId="i-0123456789abcdef0")
    assert caught.value.response["Error"]["Code"] == "InvalidInstanceID.NotFound"


def test_moto_does_not_implement_instance_refresh(aws: Aws) -> None:
    """The reason for InstanceRefreshEmulation: if this starts failing, moto has caught up and it can go."""
    asg: Any = aws.session.client("autoscaling")
    for call in (asg.start_instance_refresh, asg.describe_instance_refreshes, asg.rollback_instance_refresh):
        with pytest.raises(NotImplementedError):
            call(AutoScalingGroupName="g")


def _refresh_env(aws: Aws, monkeypatch: pytest.MonkeyPatch, version: str | None = "1") -> tuple[Any, str, str, str]:
    install_asg_emulation(monkeypatch)
    InstanceRefreshEmulation(seconds_per_look=60.0).install(monkeypatch)
    ec2: Any = aws.ec2()
    image_a, image_b = make_images(ec2, "a", "b")
    template = make_group(aws.session, "g", image_a, size=4, version=version)
    ec2.create_launch_template_version(
        LaunchTemplateId=template, SourceVersion="1", LaunchTemplateData={"ImageId": image_b}
    )
    return aws.session.client("autoscaling"), template, image_a, image_b


def _group_images(aws: Aws, asg: Any) -> list[str]:
    ids = [i["InstanceId"] for i in asg.describe_auto_scaling_groups()["AutoScalingGroups"][0]["Instances"]]
    found = aws.ec2().describe_instances(InstanceIds=ids)["Reservations"]
    return sorted(i["ImageId"] for r in found for i in r["Instances"])


def test_an_instance_refresh_steps_once_per_look_through_its_checkpoints(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    asg, template, _, image_b = _refresh_env(aws, monkeypatch)
    desired = {"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}}
    preferences = {"CheckpointPercentages": [50, 100], "CheckpointDelay": 60, "MinHealthyPercentage": 50}
    refresh_id = asg.start_instance_refresh(
        AutoScalingGroupName="g", DesiredConfiguration=desired, Preferences=preferences
    )["InstanceRefreshId"]
    with pytest.raises(ClientError) as caught:
        asg.start_instance_refresh(AutoScalingGroupName="g", DesiredConfiguration=desired)
    assert caught.value.response["Error"]["Code"] == "InstanceRefreshInProgress"
    seen = []
    for _ in range(4):
        (refresh,) = asg.describe_instance_refreshes(AutoScalingGroupName="g")["InstanceRefreshes"]
        seen.append((refresh["Status"], refresh["PercentageComplete"], refresh["InstancesToUpdate"]))
    # 4 instances, 50 % must stay healthy: batches of 2; at 50 % it waits 60 s = one look, still InProgress (Baking is
    # only the BakeTime after the last replacement).
    assert seen == [("InProgress", 0, 4), ("InProgress", 50, 2), ("InProgress", 50, 2), ("Successful", 100, 0)]
    assert refresh["InstanceRefreshId"] == refresh_id and refresh["DesiredConfiguration"] == {
        "LaunchTemplate": {"LaunchTemplateId": template, "LaunchTemplateName": "g-lt", "Version": "2"}
    }
    assert _group_images(aws, asg) == [image_b] * 4
    assert asg.describe_auto_scaling_groups()["AutoScalingGroups"][0]["LaunchTemplate"]["Version"] == "2"
    with pytest.raises(ClientError) as caught:
        asg.rollback_instance_refresh(AutoScalingGroupName="g")
    assert caught.value.response["Error"]["Code"] == "ActiveInstanceRefreshNotFound"


def test_an_instance_refresh_rolls_back_to_the_previous_version(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    asg, template, image_a, image_b = _refresh_env(aws, monkeypatch)
    desired = {"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}}
    asg.start_instance_refresh(
        AutoScalingGroupName="g", DesiredConfiguration=desired, Preferences={"MinHealthyPercentage": 75}
    )
    for _ in range(3):  # Pending → InProgress, then one instance per look
        asg.describe_instance_refreshes(AutoScalingGroupName="g")
    assert _group_images(aws, asg).count(image_b) == 2
    assert asg.rollback_instance_refresh(AutoScalingGroupName="g")["InstanceRefreshId"]
    statuses = [
        asg.describe_instance_refreshes(AutoScalingGroupName="g")["InstanceRefreshes"][0]["Status"] for _ in range(3)
    ]
    assert statuses == ["RollbackInProgress", "RollbackSuccessful", "RollbackSuccessful"]
    assert _group_images(aws, asg) == [image_a] * 4
    assert asg.describe_auto_scaling_groups()["AutoScalingGroups"][0]["LaunchTemplate"]["Version"] == "1"


def test_a_refresh_from_default_cannot_be_rolled_back(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    asg, template, _, _ = _refresh_env(aws, monkeypatch, version="$Default")
    desired = {"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}}
    asg.start_instance_refresh(AutoScalingGroupName="g", DesiredConfiguration=desired)
    with pytest.raises(ClientError) as caught:
        asg.rollback_instance_refresh(AutoScalingGroupName="g")
    assert caught.value.response["Error"]["Code"] == "IrreversibleInstanceRefresh"
