"""Declared IAM permissions: the policy document's shape, and the declaration kept in sync with the code.

The sync test runs each operation implemented today under moto with the call counter and checks that every IAM action
it actually called is declared for that operation in `iam.PERMISSIONS`: a new AWS call without a declaration fails.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from asg_emulation import FakeTime, InstanceRefreshEmulation, install_asg_emulation, make_group
from conftest import ACCOUNT, REGION, Aws
from ebs_emulation import EbsEmulation
from gc_fixtures import install_gc_emulation

from amiforge.awsapi.clients import iam_action
from amiforge.errors import ConfigError
from amiforge.model import Artifact
from amiforge.providers.aws.fleet import AsgFleet
from amiforge.providers.aws.gc import apply_gc, plan_gc
from amiforge.providers.aws.iam import (
    DESTRUCTIVE,
    OPERATIONS,
    PERMISSIONS,
    ROLLOUT_GROUP_WRITES,
    Operation,
    actions_for,
    policy_document,
    policy_json,
)
from amiforge.providers.aws.images import describe_image, inventory, resolve_source
from amiforge.providers.aws.provider import AwsProvider
from amiforge.providers.aws.publish import publish, rollback
from amiforge.providers.aws.refresh import refresh_status, roll_back_refresh, start_refresh
from amiforge.providers.aws.snapshot import open_ami
from amiforge.providers.interface import Replacement
from amiforge.recipe import Checks, OwnersSource, SsmSource
from amiforge.settings import Settings
from amiforge.signing.kms import KmsSigner, KmsVerifier

# IAM actions that are not API operations of their own (ReEncrypt needs both; PassRole guards RunInstances).
_IAM_ONLY = {"kms:ReEncryptFrom", "kms:ReEncryptTo", "iam:PassRole"}
# IAM service prefix → botocore service name, for the services declared.
_BOTOCORE = {
    "ec2": "ec2",
    "ebs": "ebs",
    "ssm": "ssm",
    "kms": "kms",
    "sts": "sts",
    "iam": "iam",
    "autoscaling": "autoscaling",
    "cloudwatch": "cloudwatch",
}


def test_every_declared_action_is_a_real_operation() -> None:
    assert set(PERMISSIONS) == set(OPERATIONS)
    loader = botocore.session.get_session()
    operations: dict[str, set[str]] = {}
    for op, actions in PERMISSIONS.items():
        assert actions, op
        for action in actions - _IAM_ONLY:
            service, name = action.split(":", 1)
            if service not in operations:
                operations[service] = set(loader.get_service_model(_BOTOCORE[service]).operation_names)
            assert name in operations[service], f"{op}: {action} is not an AWS operation"


def test_policy_document_shape() -> None:
    doc = policy_document(OPERATIONS, parameter_prefix="/amiforge", kms_keys=["arn:aws:kms:eu-west-1:1:key/k"])
    assert doc["Version"] == "2012-10-17"
    statements = doc["Statement"]
    sids = [s["Sid"] for s in statements]
    assert len(sids) == len(set(sids))
    granted: set[str] = set()
    for s in statements:
        assert s["Effect"] == "Allow"
        assert s["Action"] == sorted(set(s["Action"])), "sorted and unique"
        assert len({a.split(":")[0] for a in s["Action"]}) == 1, "one service per statement"
        assert not any("*" in a for a in s["Action"])
        granted |= set(s["Action"])
    assert granted == actions_for(OPERATIONS)
    by_sid = {s["Sid"]: s for s in statements}
    managed = by_sid["Ec2Managed"]
    assert set(managed["Action"]) == DESTRUCTIVE & granted
    assert managed["Condition"] == {"StringEquals": {"aws:ResourceTag/amiforge:managed": "true"}}
    assert managed["Resource"] == "*"
    assert by_sid["Ec2Any"]["Resource"] == "*" and "Condition" not in by_sid["Ec2Any"]
    assert not DESTRUCTIVE & set(by_sid["Ec2Any"]["Action"])
    assert by_sid["SsmScoped"] == {
        "Sid": "SsmScoped",
        "Effect": "Allow",
        "Action": ["ssm:AddTagsToResource", "ssm:PutParameter"],
        "Resource": ["arn:aws:ssm:*:*:parameter/amiforge/*"],
    }
    assert by_sid["KmsScoped"]["Resource"] == ["arn:aws:kms:eu-west-1:1:key/k"]
    assert by_sid["IamConditional"]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    # Deterministic, so a generated policy diffs cleanly.
    assert policy_json(list(reversed(OPERATIONS)), kms_keys=["arn:aws:kms:eu-west-1:1:key/k"]) == policy_json(
        OPERATIONS, kms_keys=["arn:aws:kms:eu-west-1:1:key/k"]
    )


def test_least_privilege_for_a_narrow_set() -> None:
    doc = policy_document(["inventory"])
    assert doc["Statement"] == [{"Sid": "Ec2Any", "Effect": "Allow", "Action": ["ec2:DescribeImages"], "Resource": "*"}]
    signing = policy_document(["sign-kms"])["Statement"]
    assert [s["Action"] for s in signing] == [["kms:DescribeKey", "kms:GetPublicKey", "kms:Sign"]]
    assert signing[0]["Resource"] == "*"  # no keys given: the key is only known at run time
    publishing = policy_document(["publish"], parameter_prefix="/golden/")["Statement"]
    (writes,) = [s for s in publishing if "ssm:PutParameter" in s["Action"]]
    assert writes["Resource"] == ["arn:aws:ssm:*:*:parameter/golden/*"]


def test_unknown_operation_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as error:
        policy_document(["inventory", "launch-missiles"])
    assert "launch-missiles" in error.value.message and error.value.fix is not None and "publish" in error.value.fix


# --- the declaration kept in sync with the code --------------------------------------------------------------------


def _images(aws: Aws) -> dict[str, str]:
    ec2: Any = aws.ec2()
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    managed = [{"ResourceType": "image", "Tags": [{"Key": "amiforge:managed", "Value": "true"}]}]
    ids = {
        name: str(ec2.create_image(InstanceId=instance, Name=f"web-{name}", TagSpecifications=managed)["ImageId"])
        for name in ("a", "b")
    }
    ec2.create_launch_template(LaunchTemplateName="web-fleet", LaunchTemplateData={"ImageId": ids["a"]})
    aws.session.client("ssm").put_parameter(Name="/src/debian", Value=ids["a"], Type="String", Overwrite=True)
    return ids


def _resolve(aws: Aws, ids: dict[str, str]) -> None:
    resolve_source(OwnersSource(owners=[ACCOUNT], name="web-*"), aws.session, REGION)
    resolve_source(SsmSource(ssm_parameter="/src/debian"), aws.session, REGION)


def _inventory(aws: Aws, ids: dict[str, str]) -> None:
    assert len(inventory(aws.session, REGION)) == 2


def _publish(aws: Aws, ids: dict[str, str]) -> None:
    common: dict[str, Any] = {"region": REGION, "name": "web", "channel": "prod", "run_id": "r"}
    publish(aws.session, image_id=ids["a"], launch_template="web-fleet", **common)  # new parameter, tags, no-op LT
    publish(aws.session, image_id=ids["b"], launch_template="web-fleet", **common)  # overwrite, new LT version
    publish(aws.session, image_id=ids["b"], launch_template="web-fleet", **common)  # no-op: history


def _rollback(aws: Aws, ids: dict[str, str]) -> None:
    common: dict[str, Any] = {"region": REGION, "name": "web", "channel": "prod", "run_id": "r"}
    publish(aws.session, image_id=ids["b"], launch_template="web-fleet", **common)
    aws.calls.reset()  # only the rollback's own calls
    rollback(aws.session, to_image_id=ids["a"], launch_template="web-fleet", to_lt_version=1, **common)


def _sign(aws: Aws, ids: dict[str, str]) -> None:
    kms: Any = aws.session.client("kms")
    key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    aws.calls.reset()
    signer = KmsSigner(key, REGION, client=kms)
    signer.sign(b"manifest")
    signer.public_key_pem()


def _verify(aws: Aws, ids: dict[str, str]) -> None:
    kms: Any = aws.session.client("kms")
    key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    aws.calls.reset()
    KmsVerifier(REGION, kms).public_key_pem("kms:" + key)


def _gc(aws: Aws, ids: dict[str, str]) -> None:
    """Leftovers of one of each kind from a finished run, planned and removed."""
    with pytest.MonkeyPatch.context() as patch:
        install_gc_emulation(aws.paging, patch)  # DescribeVolumes paging, the snapshot-id image filter
        ec2: Any = aws.ec2()
        tags = [{"Key": "amiforge:managed", "Value": "true"}, {"Key": "amiforge:run", "Value": "gc-run"}]
        spec = [{"ResourceType": "instance", "Tags": tags}]
        instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, TagSpecifications=spec)
        image = ec2.create_image(
            InstanceId=instance["Instances"][0]["InstanceId"],
            Name="gc-leftover",
            TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
        )["ImageId"]
        image_snapshot = ec2.describe_images(ImageIds=[image])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]
        ec2.create_tags(Resources=[image_snapshot["SnapshotId"]], Tags=tags)
        volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
        ec2.create_snapshot(VolumeId=volume, TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}])
        ec2.create_volume(
            Size=1, AvailabilityZone=f"{REGION}a", TagSpecifications=[{"ResourceType": "volume", "Tags": tags}]
        )
        aws.calls.reset()
        plan = plan_gc(
            aws.session,
            REGION,
            registered_images=set(ids.values()),
            run_state=lambda run: "finished" if run == "gc-run" else "unknown",
            now=datetime(2100, 1, 1, tzinfo=UTC),  # everything is old enough
        )
        assert sorted(o.kind for o in plan.orphans) == ["image", "instance", "snapshot", "snapshot", "volume"]
        assert apply_gc(aws.session, plan).ok


def _scan(aws: Aws, ids: dict[str, str]) -> None:
    """An AMI's root snapshot read through the EBS direct APIs and mounted, as `amiforge scan` does."""
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        ebs = EbsEmulation()
        ebs.install(patch)
        tree = Path(tmp) / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/hostname").write_text("scan\n")
        raw = Path(tmp) / "root.raw"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw), "8M"], check=True)
        image_id = ebs.register_ami(aws.ec2(), "scan-me", raw)
        aws.calls.reset()
        image = describe_image(aws.session, REGION, image_id)
        with open_ami(aws.session, REGION, image, Path(tmp) / "scratch") as view:
            assert (view.root / "etc/hostname").read_text() == "scan\n"


def _import(aws: Aws, ids: dict[str, str]) -> None:
    AwsProvider(Settings(), boto_session=aws.session.boto_session).adopt(REGION, ids["a"])


def _rollout(aws: Aws, ids: dict[str, str]) -> None:
    """A wave of one on an Auto Scaling group (replace), then current() and signals(); then an instance refresh
    started, looked at and rolled back: what a rollout calls, in either mode."""
    with pytest.MonkeyPatch.context() as patch:
        install_asg_emulation(patch)  # console readiness, Auto Scaling's asynchronous termination, LT inheritance
        make_group(aws.session, "web-asg", ids["a"], size=2)
        make_group(aws.session, "web-refresh", ids["a"], size=2)  # for the instance-refresh mode
        InstanceRefreshEmulation().install(patch)
        _alarm(aws, "web-5xx", "OK")
        aws.calls.reset()
        time = FakeTime()
        fleet = AsgFleet(aws.session, REGION, "web-asg", wait=time.wait(), now=time.now)
        member = fleet.current()[0].id
        image = Artifact(provider="aws", region=REGION, location=ids["b"], digest="sha256:x", size_bytes=0)
        (new,) = fleet.replace([Replacement(member, "token-1")], image, "web@2", Checks())
        assert new.state == "ready"
        assert {m.id for m in fleet.current()} >= {new.id}
        assert {s.kind for s in fleet.signals(datetime(2000, 1, 1, tzinfo=UTC))} == {"launch", "ready", "replaced"}
        assert fleet.alarms_firing(["web-5xx"]) == []
        # The instance-refresh mode (refresh.py) on a second group: start, a look, rollback.
        refreshed = AsgFleet(aws.session, REGION, "web-refresh", wait=time.wait(), now=time.now)
        refresh_id = start_refresh(
            refreshed, image, "web@2", checkpoints=[50, 100], checkpoint_delay=600, alarms=["web-5xx"], token="r-1"
        )
        assert refresh_status(refreshed, refresh_id).status == "InProgress"
        assert roll_back_refresh(refreshed, refresh_id).status.startswith("Rollback")


def _alarm(aws: Aws, name: str, state: str) -> None:
    cloudwatch: Any = aws.session.client("cloudwatch")
    cloudwatch.put_metric_alarm(
        AlarmName=name, MetricName="HTTPCode_Target_5XX_Count", Namespace="AWS/ApplicationELB", Statistic="Sum",
        Period=60, EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanOrEqualToThreshold",
    )  # fmt: skip
    cloudwatch.set_alarm_state(AlarmName=name, StateValue=state, StateReason="test")


# Every operation implemented today, and how to run it. Add a row when an operation gets its AWS code.
IMPLEMENTED: dict[Operation, Callable[[Aws, dict[str, str]], None]] = {
    "resolve-source": _resolve,
    "inventory": _inventory,
    "publish": _publish,
    "rollback": _rollback,
    "sign-kms": _sign,
    "verify-kms": _verify,
    "gc": _gc,
    "scan": _scan,
    "import": _import,
    "rollout": _rollout,
}
# Declared but never called: IAM checks them on behalf of another call (UpdateAutoScalingGroup to a template version
# checks that the caller may launch it and pass its instance profile's role).
_AUTHORISED_ONLY: dict[Operation, set[str]] = {"rollout": {"ec2:RunInstances", "iam:PassRole"}}


@pytest.mark.parametrize("operation", sorted(IMPLEMENTED))
def test_what_each_operation_calls_is_declared(aws: Aws, operation: Operation) -> None:
    ids = _images(aws)
    aws.calls.reset()
    IMPLEMENTED[operation](aws, ids)
    called = {iam_action(aws.session.client(service), name) for (service, name) in aws.calls.counts}
    assert called, "the operation made no AWS call: the check would be vacuous"
    undeclared = called - PERMISSIONS[operation]
    assert not undeclared, f"{operation} calls {sorted(undeclared)} but iam.PERMISSIONS does not declare them"
    if operation in _AUTHORISED_ONLY:
        # Exactly: nothing declared that is neither called nor checked by IAM on behalf of a call.
        assert called == PERMISSIONS[operation] - _AUTHORISED_ONLY[operation]


def test_rollout_group_writes_need_the_groups_opt_in_tag() -> None:
    """Auto Scaling authorises against the group's tags, not the instance's: the group writes get their own statement
    on the owner's opt-in tag, never the Managed one (which would require amiforge:managed=true on the group)."""
    statements = {s["Sid"]: s for s in policy_document(["rollout"])["Statement"]}
    opted_in = statements["AutoscalingOptedIn"]
    assert set(opted_in["Action"]) == ROLLOUT_GROUP_WRITES
    assert opted_in["Condition"] == {"StringEquals": {"aws:ResourceTag/amiforge:rollout": "enabled"}}
    assert statements["AutoscalingAny"]["Action"] == [
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:DescribeInstanceRefreshes",
    ]
    assert not ROLLOUT_GROUP_WRITES & DESTRUCTIVE
    assert "Ec2Managed" not in statements  # a rollout destroys nothing of amiforge's own
    assert "ec2:RunInstances" in statements["Ec2Any"]["Action"]


def test_the_sync_check_catches_an_undeclared_call(aws: Aws) -> None:
    ids = _images(aws)
    aws.calls.reset()
    _publish(aws, ids)
    aws.ec2().describe_instances()
    called = {iam_action(aws.session.client(service), name) for (service, name) in aws.calls.counts}
    assert called - PERMISSIONS["publish"] == {"ec2:DescribeInstances"}
