"""Publishing a channel on AWS (SSM parameter + launch-template default version), and back again, on moto.

moto 5.2.5 here: DataType=aws:ec2:image is stored at once and echoed by GetParameter (never validated; the tests
marked so run with ssm_emulation.SsmImageValidation, which validates asynchronously as AWS does); Tags together
with Overwrite are refused as on AWS; CreateLaunchTemplateVersion ignores SourceVersion (the new version holds only
the ImageId we pass) and ClientToken (a repeated call makes another version), so these tests check the ImageId only
and the no-duplicate guarantee is amiforge's own read-before-write.
"""

from __future__ import annotations

from typing import Any

import pytest
from asg_emulation import FakeTime
from botocore.exceptions import ClientError
from conftest import ACCOUNT, REGION, Aws
from moto.ec2.models import ec2_backends
from moto.ssm.models import ssm_backends
from ssm_emulation import VALIDATION_FAILED, SsmImageValidation

from amiforge.errors import ConfigError, InfraError, NotFound, StateError
from amiforge.providers.aws.publish import IMAGE_DATA_TYPE, Publication, publish

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


@pytest.fixture
def validation(monkeypatch: pytest.MonkeyPatch) -> SsmImageValidation:
    """SSM validating aws:ec2:image values asynchronously: two SSM requests see the previous state."""
    emulation = SsmImageValidation(reads=2)
    emulation.install(monkeypatch)
    return emulation


def _publish(
    aws: Aws, image_id: str, *, template: str | None = TEMPLATE, run: str = "r1", time: FakeTime | None = None
) -> Publication:
    return publish(
        aws.session,
        region=REGION,
        name="web",
        channel="prod",
        image_id=image_id,
        launch_template=template,
        run_id=run,
        wait=(time or FakeTime()).wait(deadline=120.0),
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
    # What AWS would hold after CreateLaunchTemplateVersion(SourceVersion=1, ImageId=a): version 1's data with the
    # image replaced. moto ignores SourceVersion, so the inherited fields are passed explicitly.
    ec2.create_launch_template_version(
        LaunchTemplateName=TEMPLATE,
        SourceVersion="1",
        LaunchTemplateData={"ImageId": world["a"], "InstanceType": "t3.micro"},
    )
    aws.calls.reset()
    pub = _publish(aws, world["a"])
    assert (pub.launch_template_version, pub.previous_lt_version) == (2, 1)
    assert aws.calls["ec2.CreateLaunchTemplateVersion"] == 0
    assert _state(aws)["latest"] == 2 and _state(aws)["default"] == 2


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
    """publish a, publish b, publish b again, then back to what that replaced (a channel goes back by publishing the
    previous version again): publications and end state, with image ids as labels."""
    ids = _world(aws)
    label = {v: k for k, v in ids.items()}
    pubs = [_publish(aws, ids["a"]), _publish(aws, ids["b"]), _publish(aws, ids["b"])]
    assert pubs[1].previous_image_id is not None
    pubs.append(_publish(aws, pubs[1].previous_image_id, run="r9"))
    summary = [
        (p.version, label.get(p.previous_image_id or ""), p.launch_template_version, p.previous_lt_version, p.changed)
        for p in pubs
    ]
    state = _state(aws)
    state["value"], state["default_image"] = label[state["value"]], label[state["default_image"]]
    return summary, state


EXPECTED = (
    [(1, None, 2, 1, True), (2, "a", 3, 2, True), (2, "a", 3, None, False), (3, "b", 4, 3, True)],
    {"value": "a", "version": 3, "data_type": IMAGE_DATA_TYPE, "default": 4, "latest": 4, "default_image": "a"},
)


def test_scenario(aws: Aws) -> None:
    assert _scenario(aws) == EXPECTED


def test_same_end_state_when_ssm_validates_asynchronously(aws: Aws, validation: SsmImageValidation) -> None:
    assert _scenario(aws) == EXPECTED
    assert len(validation.events) == 3 and validation.pending(ACCOUNT, REGION) == []


def test_same_end_state_under_throttling(faulty: Aws, validation: SsmImageValidation) -> None:
    assert faulty.faults is not None
    # Publishing reads images made long before; eventual consistency after a create is not the subject here.
    faulty.faults.not_found_reads = 0
    assert _scenario(faulty) == EXPECTED
    assert faulty.faults.injected["ThrottlingException"] > 0 and faulty.faults.injected["RequestLimitExceeded"] > 0


# --- SSM validates aws:ec2:image values asynchronously ------------------------------------------------------------


def _parameter(aws: Aws) -> tuple[str, int] | None:
    """(value, version) as GetParameter answers now, or None for ParameterNotFound."""
    try:
        parameter = aws.session.client("ssm").get_parameter(Name=PARAM)["Parameter"]
    except ClientError as e:
        assert e.response["Error"]["Code"] == "ParameterNotFound"
        return None
    return str(parameter["Value"]), int(parameter["Version"])


def _put(aws: Aws, image_id: str, **kw: Any) -> int:
    ssm: Any = aws.session.client("ssm")
    return int(ssm.put_parameter(Name=PARAM, Value=image_id, Type="String", DataType=IMAGE_DATA_TYPE, **kw)["Version"])


def _deregister_after_put(aws: Aws, image_id: str) -> None:
    """The image goes away right after PutParameter answered: SSM's later validation cannot find it."""

    def deregister(**_: Any) -> None:
        ec2_backends[ACCOUNT][REGION].deregister_image(image_id)

    aws.session.client("ssm").meta.events.register("after-call.ssm.PutParameter", deregister)


def test_ssm_emulation_takes_a_valid_image_after_some_reads(
    aws: Aws, world: dict[str, str], validation: SsmImageValidation
) -> None:
    ssm: Any = aws.session.client("ssm")
    assert _put(aws, world["a"]) == 1  # a version number at once…
    assert _parameter(aws) is None  # …but no parameter yet,
    with pytest.raises(ClientError) as untaggable:  # so nothing to tag either
        ssm.add_tags_to_resource(ResourceType="Parameter", ResourceId=PARAM, Tags=[{"Key": "k", "Value": "v"}])
    assert untaggable.value.response["Error"]["Code"] == "InvalidResourceId"
    assert _parameter(aws) == (world["a"], 1)  # validated
    assert _put(aws, world["b"], Overwrite=True) == 2
    assert _parameter(aws) == (world["a"], 1)
    assert [p["Version"] for p in ssm.describe_parameters()["Parameters"]] == [1]
    assert _parameter(aws) == (world["b"], 2)
    assert [h["Value"] for h in ssm.get_parameter_history(Name=PARAM)["Parameters"]] == [world["a"], world["b"]]
    assert [e["operation"] for e in validation.events] == ["Create", "Update"]
    assert not any("exception" in e for e in validation.events)
    # Other data types are validated synchronously, as before.
    ssm.put_parameter(Name="/amiforge/text", Value="hello", Type="String")
    assert ssm.get_parameter(Name="/amiforge/text")["Parameter"]["Value"] == "hello"


def test_ssm_emulation_refuses_what_ssm_refuses(
    aws: Aws, world: dict[str, str], validation: SsmImageValidation
) -> None:
    """A value naming no image, a malformed one, an image that is not available, one deregistered after the put:
    PutParameter answers 200 and a version each time; the parameter is never created or never changes."""
    missing = "ami-0123456789abcdef0"
    assert _put(aws, missing) == 1
    assert [_parameter(aws) for _ in range(5)] == [None] * 5
    assert aws.session.client("ssm").describe_parameters()["Parameters"] == []

    assert _put(aws, world["a"]) == 1 and [_parameter(aws) for _ in range(3)][-1] == (world["a"], 1)
    ec2_backends[ACCOUNT][REGION].amis[world["base"]].state = "pending"
    for refused in ("not-an-ami", missing, world["base"]):
        assert _put(aws, refused, Overwrite=True) == 2
        assert [_parameter(aws) for _ in range(4)] == [(world["a"], 1)] * 4
    _deregister_after_put(aws, world["b"])
    assert _put(aws, world["b"], Overwrite=True) == 2
    assert [_parameter(aws) for _ in range(4)] == [(world["a"], 1)] * 4
    failed = [e for e in validation.events if e.get("exception") == VALIDATION_FAILED]
    assert [e["operation"] for e in failed] == ["Create", "Update", "Update", "Update", "Update"]


def test_publish_returns_only_once_ssm_holds_the_image(
    aws: Aws, world: dict[str, str], validation: SsmImageValidation
) -> None:
    """Before, the first publish tagged a parameter SSM had not created yet (InvalidResourceId), and a later one
    returned while GetParameter still answered the previous image."""
    time = FakeTime()
    first = _publish(aws, world["a"], template=None, run="run-7", time=time)
    assert (first.version, first.previous_image_id) == (1, None)
    assert validation.pending(ACCOUNT, REGION) == [] and time.sleeps >= 1
    tags = aws.session.client("ssm").list_tags_for_resource(ResourceType="Parameter", ResourceId=PARAM)["TagList"]
    assert {t["Key"]: t["Value"] for t in tags} == {"amiforge:managed": "true", "amiforge:run": "run-7"}
    second = _publish(aws, world["b"], run="r2", time=time)
    assert (second.version, second.previous_image_id, second.launch_template_version) == (2, world["a"], 2)
    assert _parameter(aws) == (world["b"], 2)  # the very next read: publish waited for it


def test_publish_of_an_image_ssm_refuses_fails_and_changes_nothing_else(
    aws: Aws, world: dict[str, str], validation: SsmImageValidation
) -> None:
    validation.reads = 0  # the setup validates at the next request, so that it does not depend on the subject
    _publish(aws, world["a"])
    validation.reads = 2
    before = _state(aws)
    _deregister_after_put(aws, world["b"])
    aws.calls.reset()
    with pytest.raises(InfraError) as refused:
        _publish(aws, world["b"], run="r2")
    message, fix = refused.value.message, refused.value.fix or ""
    assert world["b"] in message and f"still holds {world['a']} (version 1)" in message
    assert "be available" in fix and "visible to this account" in fix and "ec2:DescribeImages" in fix
    assert _state(aws) == before  # no launch template version, the default unmoved, the parameter unchanged
    assert aws.calls["ec2.CreateLaunchTemplateVersion"] == 0 and aws.calls["ec2.ModifyLaunchTemplate"] == 0


def test_publish_of_a_new_parameter_ssm_refuses_creates_nothing(
    aws: Aws, world: dict[str, str], validation: SsmImageValidation
) -> None:
    _deregister_after_put(aws, world["a"])
    with pytest.raises(InfraError, match="the parameter does not exist"):
        _publish(aws, world["a"], template=None)
    assert aws.session.client("ssm").describe_parameters()["Parameters"] == []
    assert aws.calls["ssm.AddTagsToResource"] == 0


def _tags(aws: Aws) -> dict[str, str]:
    answer = aws.session.client("ssm").list_tags_for_resource(ResourceType="Parameter", ResourceId=PARAM)
    return {t["Key"]: t["Value"] for t in answer["TagList"]}


def test_a_rerun_tags_the_parameter_a_timed_out_run_left_untagged(
    aws: Aws, world: dict[str, str], validation: SsmImageValidation
) -> None:
    """The first run gives up waiting for SSM after PutParameter (a run killed there is the same); SSM validates the
    image later and creates the parameter, untagged. The rerun finds it at the image and writes nothing but its tags."""
    with pytest.raises(InfraError, match="SSM did not take"):
        publish(
            aws.session,
            region=REGION,
            name="web",
            channel="prod",
            image_id=world["a"],
            run_id="r1",
            wait=FakeTime().wait(deadline=0.0),
        )
    for _look in range(100):  # SSM finishes the validation on its own, after a few requests
        if _parameter(aws) is not None:
            break
    assert _parameter(aws) == (world["a"], 1) and _tags(aws) == {}
    aws.calls.reset()
    again = _publish(aws, world["a"], template=None, run="r2")
    assert (again.changed, again.version) == (False, 1)
    assert _tags(aws) == {"amiforge:managed": "true", "amiforge:run": "r2"}  # the run that found it untagged
    assert aws.calls["ssm.PutParameter"] == 0 and aws.calls["ssm.AddTagsToResource"] == 1
    # Tags that are there are kept: a later run neither rewrites them nor names itself.
    aws.calls.reset()
    _publish(aws, world["b"], template=None, run="r3")
    assert aws.calls["ssm.AddTagsToResource"] == 0 and aws.calls["ssm.ListTagsForResource"] == 1  # one read
    assert _tags(aws) == {"amiforge:managed": "true", "amiforge:run": "r2"}


def test_overwriting_a_parameter_without_tags_adds_only_the_missing_ones(aws: Aws, world: dict[str, str]) -> None:
    """A parameter someone made (or a killed run left) without amiforge's run tag: publishing another image adds the
    missing tag and keeps the one that is there."""
    ssm: Any = aws.session.client("ssm")
    ssm.put_parameter(Name=PARAM, Value=world["a"], Type="String", DataType=IMAGE_DATA_TYPE)
    ssm.add_tags_to_resource(
        ResourceType="Parameter", ResourceId=PARAM, Tags=[{"Key": "amiforge:managed", "Value": "true"}]
    )
    pub = _publish(aws, world["b"], template=None, run="r4")
    assert (pub.previous_image_id, pub.version) == (world["a"], 2)
    assert _tags(aws) == {"amiforge:managed": "true", "amiforge:run": "r4"}


def test_publish_refuses_when_another_writer_moved_the_parameter_on(
    aws: Aws, world: dict[str, str], validation: SsmImageValidation
) -> None:
    validation.reads = 0
    _publish(aws, world["a"], template=None)
    validation.reads = 2

    def someone_else_writes(**_: Any) -> None:
        backend: Any = ssm_backends[ACCOUNT][REGION]  # a plain text write, through moto's own backend
        backend.put_parameter(PARAM, None, world["base"], "String", None, None, True, [], "text", None, None)

    aws.session.client("ssm").meta.events.register("after-call.ssm.PutParameter", someone_else_writes)
    with pytest.raises(StateError, match="moved on to version 3"):
        _publish(aws, world["b"], template=None)
