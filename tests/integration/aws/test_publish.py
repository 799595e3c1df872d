"""Publishing a channel on AWS (SSM parameter + launch-template default version) and rolling it back, on moto.

moto 5.2.5 here: DataType=aws:ec2:image is stored and echoed by GetParameter (but never validated); Tags together
with Overwrite are refused as on AWS; CreateLaunchTemplateVersion ignores SourceVersion (the new version holds only
the ImageId we pass) and ClientToken (a repeated call makes another version), so these tests check the ImageId only
and the no-duplicate guarantee is amiforge's own read-before-write.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import REGION, Aws

from amiforge.errors import ConfigError, NotFound, StateError
from amiforge.providers.aws.publish import IMAGE_DATA_TYPE, Publication, publish, rollback

TEMPLATE = "web-fleet"
PARAM = "/amiforge/web/prod"


def _world(aws: Aws) -> dict[str, str]:
    """Three available images and a launch template at version 1 on the first ("base")."""
    ec2: Any = aws.ec2()
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    ids = {
        label: str(ec2.create_image(InstanceId=instance, Name=f"web-{label}")["ImageId"])
        for label in ("base", "a", "b")
    }
    ec2.create_launch_template(
        LaunchTemplateName=TEMPLATE, LaunchTemplateData={"ImageId": ids["base"], "InstanceType": "t3.micro"}
    )
    return ids


@pytest.fixture
def world(aws: Aws) -> dict[str, str]:
    return _world(aws)


def _publish(aws: Aws, image_id: str, *, template: str | None = TEMPLATE, run: str = "r1") -> Publication:
    return publish(
        aws.session, region=REGION, name="web", channel="prod", image_id=image_id, launch_template=template, run_id=run
    )


def _state(aws: Aws) -> dict[str, Any]:
    ssm: Any = aws.session.client("ssm")
    ec2: Any = aws.ec2()
    parameter = ssm.get_parameter(Name=PARAM)["Parameter"]
    lt = ec2.describe_launch_templates(LaunchTemplateNames=[TEMPLATE])["LaunchTemplates"][0]
    default = ec2.describe_launch_template_versions(LaunchTemplateName=TEMPLATE, Versions=["$Default"])
    return {
        "value": parameter["Value"],
        "version": parameter["Version"],
        "data_type": parameter.get("DataType"),
        "default": lt["DefaultVersionNumber"],
        "latest": lt["LatestVersionNumber"],
        "default_image": default["LaunchTemplateVersions"][0]["LaunchTemplateData"]["ImageId"],
    }


def test_first_publish_creates_a_tagged_image_parameter(aws: Aws, world: dict[str, str]) -> None:
    pub = _publish(aws, world["a"], template=None, run="run-7")
    assert pub == Publication(PARAM, 1, None, None, None, world["a"], REGION, None, True)
    ssm: Any = aws.session.client("ssm")
    parameter = ssm.get_parameter(Name=PARAM)["Parameter"]
    assert parameter["Value"] == world["a"] and parameter["Type"] == "String"
    assert parameter["DataType"] == IMAGE_DATA_TYPE  # moto echoes DataType (it does not validate the value)
    tags = ssm.list_tags_for_resource(ResourceType="Parameter", ResourceId=PARAM)["TagList"]
    assert {t["Key"]: t["Value"] for t in tags} == {"amiforge:managed": "true", "amiforge:run": "run-7"}


def test_second_publish_keeps_the_previous_for_rollback(aws: Aws, world: dict[str, str]) -> None:
    _publish(aws, world["a"], template=None)
    pub = _publish(aws, world["b"], template=None, run="r2")
    assert (pub.version, pub.previous_image_id, pub.image_id) == (2, world["a"], world["b"])
    tags = aws.session.client("ssm").list_tags_for_resource(ResourceType="Parameter", ResourceId=PARAM)["TagList"]
    assert {t["Key"]: t["Value"] for t in tags}["amiforge:run"] == "r1"  # tagged at creation only


def test_launch_template_default_moves_to_a_numeric_version_with_the_image(aws: Aws, world: dict[str, str]) -> None:
    first = _publish(aws, world["a"])
    assert (first.launch_template_version, first.previous_lt_version) == (2, 1)
    assert _state(aws) == {
        "value": world["a"],
        "version": 1,
        "data_type": IMAGE_DATA_TYPE,
        "default": 2,
        "latest": 2,
        "default_image": world["a"],
    }
    aws.calls.reset()
    second = _publish(aws, world["b"])
    assert (second.launch_template_version, second.previous_lt_version, second.previous_image_id) == (3, 2, world["a"])
    assert _state(aws)["default"] == 3 and _state(aws)["default_image"] == world["b"]
    assert aws.calls["ec2.CreateLaunchTemplateVersion"] == 1 and aws.calls["ec2.ModifyLaunchTemplate"] == 1


def test_publishing_the_same_image_twice_is_a_no_op(aws: Aws, world: dict[str, str]) -> None:
    _publish(aws, world["a"])
    _publish(aws, world["b"])
    before = _state(aws)
    aws.calls.reset()
    again = _publish(aws, world["b"], run="r2")
    assert _state(aws) == before
    writes = (
        "ssm.PutParameter",
        "ssm.AddTagsToResource",
        "ec2.CreateLaunchTemplateVersion",
        "ec2.ModifyLaunchTemplate",
    )
    assert [aws.calls[w] for w in writes] == [0, 0, 0, 0]
    # Still says what the rollback target is, from the parameter's history.
    assert (again.changed, again.version, again.previous_image_id) == (False, 2, world["a"])
    assert (again.launch_template_version, again.previous_lt_version) == (3, None)


def test_a_version_left_by_an_interrupted_publish_is_reused(aws: Aws, world: dict[str, str]) -> None:
    ec2: Any = aws.ec2()
    ec2.create_launch_template_version(
        LaunchTemplateName=TEMPLATE, SourceVersion="1", LaunchTemplateData={"ImageId": world["a"]}
    )
    aws.calls.reset()
    pub = _publish(aws, world["a"])
    assert (pub.launch_template_version, pub.previous_lt_version) == (2, 1)
    assert aws.calls["ec2.CreateLaunchTemplateVersion"] == 0
    assert _state(aws)["latest"] == 2 and _state(aws)["default"] == 2


def test_rollback_restores_the_previous(aws: Aws, world: dict[str, str]) -> None:
    _publish(aws, world["a"])
    pub = _publish(aws, world["b"])
    assert pub.previous_image_id is not None and pub.previous_lt_version is not None
    back = rollback(
        aws.session,
        region=REGION,
        name="web",
        channel="prod",
        to_image_id=pub.previous_image_id,
        launch_template=TEMPLATE,
        to_lt_version=pub.previous_lt_version,
        run_id="r3",
    )
    assert (back.launch_template_version, back.previous_lt_version, back.previous_image_id) == (2, 3, world["b"])
    state = _state(aws)
    assert (state["value"], state["default"], state["latest"], state["default_image"]) == (world["a"], 2, 3, world["a"])
    # And rolling the rollback back puts b again on version 3, without a new version.
    rollback(
        aws.session,
        region=REGION,
        name="web",
        channel="prod",
        to_image_id=world["b"],
        launch_template=TEMPLATE,
        to_lt_version=3,
        run_id="r4",
    )
    assert _state(aws)["default"] == 3 and _state(aws)["latest"] == 3 and _state(aws)["value"] == world["b"]


def test_rollback_refuses_a_version_holding_another_image(aws: Aws, world: dict[str, str]) -> None:
    _publish(aws, world["a"])
    kwargs: dict[str, Any] = {
        "region": REGION,
        "name": "web",
        "channel": "prod",
        "run_id": "r",
        "launch_template": TEMPLATE,
    }
    with pytest.raises(StateError, match="holds"):
        rollback(aws.session, to_image_id=world["b"], to_lt_version=2, **kwargs)
    with pytest.raises(NotFound, match="no version 9"):
        rollback(aws.session, to_image_id=world["a"], to_lt_version=9, **kwargs)
    assert _state(aws)["value"] == world["a"] and _state(aws)["default"] == 2


def test_missing_template_or_image_is_refused_before_anything_is_written(aws: Aws, world: dict[str, str]) -> None:
    with pytest.raises(NotFound) as missing:
        _publish(aws, world["a"], template="no-such-template")
    assert missing.value.fix is not None and "create the launch template" in missing.value.fix
    with pytest.raises(NotFound):
        _publish(aws, "ami-0123456789abcdef0")
    with pytest.raises(ConfigError):
        _publish(aws, "not-an-ami")
    with pytest.raises(ConfigError):
        publish(aws.session, region=REGION, name="web", channel="../prod", image_id=world["a"], run_id="r")
    assert aws.session.client("ssm").describe_parameters()["Parameters"] == []


def _scenario(aws: Aws) -> tuple[list[tuple[int, str | None, int | None, int | None, bool]], dict[str, Any]]:
    """publish a, publish b, publish b again, roll back: publications and end state, with image ids as labels."""
    ids = _world(aws)
    label = {v: k for k, v in ids.items()}
    pubs = [_publish(aws, ids["a"]), _publish(aws, ids["b"]), _publish(aws, ids["b"])]
    last = pubs[1]
    assert last.previous_image_id is not None
    pubs.append(
        rollback(
            aws.session,
            region=REGION,
            name="web",
            channel="prod",
            to_image_id=last.previous_image_id,
            launch_template=TEMPLATE,
            to_lt_version=last.previous_lt_version,
            run_id="r9",
        )
    )
    summary = [
        (p.version, label.get(p.previous_image_id or ""), p.launch_template_version, p.previous_lt_version, p.changed)
        for p in pubs
    ]
    state = _state(aws)
    state["value"], state["default_image"] = label[state["value"]], label[state["default_image"]]
    return summary, state


EXPECTED = (
    [(1, None, 2, 1, True), (2, "a", 3, 2, True), (2, "a", 3, None, False), (3, "b", 2, 3, True)],
    {"value": "a", "version": 3, "data_type": IMAGE_DATA_TYPE, "default": 2, "latest": 3, "default_image": "a"},
)


def test_scenario(aws: Aws) -> None:
    assert _scenario(aws) == EXPECTED


def test_same_end_state_under_throttling(faulty: Aws) -> None:
    assert faulty.faults is not None
    # Publishing reads images made long before; eventual consistency after a create is not the subject here.
    faulty.faults.not_found_reads = 0
    assert _scenario(faulty) == EXPECTED
    assert faulty.faults.injected["ThrottlingException"] > 0 and faulty.faults.injected["RequestLimitExceeded"] > 0
