"""The AWS provider in a real (sandbox) account, through the CLI: bake → boot test → scan, KMS signing, distribute
(a copy in a second region, a share with a second account), promote's publication (SSM parameter and launch-template
version) and a rollout on an Auto Scaling group. Skipped unless AMIFORGE_LIVE_AWS=1: it costs money and needs the
internet, which CI does not have. Run it by hand before a release (README, "Live tests"):

    AMIFORGE_LIVE_AWS=1 AMIFORGE_LIVE_REGION=eu-west-1 AMIFORGE_LIVE_SECURITY_GROUP=sg-… \\
        AMIFORGE_LIVE_REGION2=eu-central-1 AMIFORGE_LIVE_SHARE_ACCOUNT=111122223333 \\
        .venv/bin/pytest tests/live -m live

Environment: AMIFORGE_LIVE_REGION (default eu-west-1); AMIFORGE_LIVE_SECURITY_GROUP (required: the Debian source
has no SSM agent, so the builder is reached over SSH: port 22 open to this machine); AMIFORGE_LIVE_SUBNET (default:
the default VPC's subnets); AMIFORGE_LIVE_INSTANCE_PROFILE (optional, given to the builder); AMIFORGE_LIVE_REGION2
(the distribute test, skipped without it); AMIFORGE_LIVE_SHARE_ACCOUNT (the share test, skipped without it). AWS
credentials come from the standard chain (or AMIFORGE_AWS_PROFILE); they need the policy of `amiforge doctor --aws`
plus what the tests create themselves (README).

One version is baked per session (10-20 minutes) and shared; each test brings it to the state it needs (scanned,
signed), so the tests run in any order or alone. Cleanup, whatever happens: each test removes what it created itself
(templates, groups, parameters, keys, images) in finalizers registered the moment each exists; at the end of the
session `amiforge gc --apply`, then every image the registry holds for the recipe, then everything still tagged
`amiforge-live=<session>` (tests/live/aws_live.py). A whole run costs well under a dollar: a few t3.micro
instance-hours, a few GB of snapshots for an hour, one cross-region copy, EBS direct API reads, a KMS key (no charge
while its deletion is pending).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.live.aws_live import (
    LIVE_TAG,
    OPT_IN,
    ROLLOUT_TAG,
    Amiforge,
    Baked,
    LiveConfig,
    delete_group,
    delete_parameters,
    delete_template,
    discard_image,
    ensure_scanned,
    error_code,
    eventually,
    packer_manifest,
    schedule_key_deletion,
)

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(os.environ.get(OPT_IN) != "1", reason=f"{OPT_IN}=1 runs the live suite"),
]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def test_bake_boot_test_and_scan(live: LiveConfig, aws: Any, amiforge: Amiforge, baked: Baked) -> None:
    assert baked.outcome["version"]["status"] == "tested"
    assert baked.outcome["boot_report"]["time_to_ready"] is not None
    (image,) = aws.client("ec2").describe_images(ImageIds=[baked.image_id])["Images"]
    assert tags_of(image)[LIVE_TAG] == live.session and tags_of(image)["amiforge:managed"] == "true"
    ensure_scanned(amiforge, baked.ref)
    shown = amiforge("images", "show", baked.ref)
    assert shown["scan"]["packages"] > 100  # a Debian cloud image with nginx, read from its snapshot's bytes
    assert {"bake.built", "test.passed", "scan.completed"} <= {e["kind"] for e in amiforge("events", baked.ref)}


def test_sign_with_a_kms_key(live: LiveConfig, aws: Any, amiforge: Amiforge, baked: Baked, cleanup: ExitStack) -> None:
    ensure_scanned(amiforge, baked.ref)
    kms = aws.client("kms")
    key = kms.create_key(
        KeySpec="ECC_NIST_P256",
        KeyUsage="SIGN_VERIFY",
        Description=f"amiforge live test {live.session} (scheduled for deletion by the test)",
        Tags=live.tags("TagKey", "TagValue"),
    )["KeyMetadata"]
    cleanup.callback(schedule_key_deletion, kms, key["KeyId"])
    trusted = amiforge("keys", "trust", "--kms-key", key["Arn"], "--kms-region", live.region)
    assert trusted["key_id"] == f"kms:{key['Arn']}" and trusted["added"] is True
    signed = amiforge("sign", baked.ref, "--kms-key", key["Arn"], "--kms-region", live.region)
    assert signed["key_id"] == trusted["key_id"]
    verified = amiforge("verify", baked.ref)
    assert verified["ok"] is True and verified["key_id"] == trusted["key_id"]
    # KMS itself accepts the envelope's signature over DSSE's pre-authentication encoding (computed here, not by
    # amiforge): the bytes are real KMS ECDSA, which moto cannot show (its DIGEST mode hashes twice).
    envelope = json.loads(signed["envelope"])
    payload_type, payload = envelope["payloadType"].encode(), base64.b64decode(envelope["payload"])
    pae = b"DSSEv1 %d %b %d %b" % (len(payload_type), payload_type, len(payload), payload)
    (signature,) = envelope["signatures"]
    answer = kms.verify(
        KeyId=key["Arn"],
        Message=hashlib.sha256(pae).digest(),
        MessageType="DIGEST",
        Signature=base64.b64decode(signature["sig"]),
        SigningAlgorithm="ECDSA_SHA_256",
    )
    assert answer["SignatureValid"] is True


def test_distribute_copies_to_a_second_region(live: LiveConfig, aws: Any, amiforge: Amiforge, signed: str) -> None:
    if live.region2 is None:
        pytest.skip("AMIFORGE_LIVE_REGION2 is not set: no region to copy to")
    source = amiforge.images(signed)[live.region]
    distributed = amiforge("distribute", signed)
    (copy,) = [c for c in distributed["copies"] if c["artifact"]["region"] == live.region2]
    (image,) = aws.client("ec2", region_name=live.region2).describe_images(ImageIds=[copy["artifact"]["location"]])[
        "Images"
    ]
    assert image["State"] == "available" and str(image["DeregistrationProtection"]).startswith("enabled")
    assert tags_of(image)["amiforge:source-image"] == source and tags_of(image)[LIVE_TAG] == live.session
    assert amiforge.images(signed)[live.region2] == image["ImageId"]  # recorded as the version's copy…
    assert amiforge("verify", signed)["ok"] is True  # …so the signature still covers it
    again = amiforge("distribute", signed)  # a rerun converges: the copy is adopted, not made twice
    assert all(c["adopted"] for c in again["copies"])
    assert amiforge.images(signed)[live.region2] == image["ImageId"]


def test_distribute_shares_with_a_second_account(live: LiveConfig, aws: Any, amiforge: Amiforge, signed: str) -> None:
    if live.share_account is None:
        pytest.skip("AMIFORGE_LIVE_SHARE_ACCOUNT is not set: no account to share with")
    distributed = amiforge("distribute", signed)
    assert all(c["shared_with"] == [live.share_account] for c in distributed["copies"])
    for region, image_id in amiforge.images(signed).items():  # the bake's image and every copy
        permissions = aws.client("ec2", region_name=region).describe_image_attribute(
            ImageId=image_id, Attribute="launchPermission"
        )["LaunchPermissions"]
        assert {"UserId": live.share_account} in permissions, (region, image_id, permissions)


def test_promote_publishes_a_parameter_and_a_launch_template_version(
    live: LiveConfig, aws: Any, amiforge: Amiforge, signed: str, cleanup: ExitStack
) -> None:
    images = amiforge.images(signed)  # every region holding the version (copies too, if distribute ran)
    for region in images:
        ec2 = aws.client("ec2", region_name=region)
        ec2.create_launch_template(
            LaunchTemplateName=live.publish_template,
            LaunchTemplateData={"InstanceType": "t3.micro"},
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": live.tags()}],
        )
        cleanup.callback(delete_template, ec2, live.publish_template)
        cleanup.callback(delete_parameters, aws.client("ssm", region_name=region), live.parameter_prefix)
    promoted = amiforge("promote", signed, "--channel", "dev")
    published = {r["region"]: r for r in promoted["published"] if r["account"] is None}
    assert promoted["moved"] is True and set(published) == set(images)
    parameter_name = f"{live.parameter_prefix}/{live.name}/dev"
    for region, image_id in images.items():
        assert published[region]["image_id"] == image_id and published[region]["parameter"] == parameter_name
        parameter = eventually(f"{parameter_name} in {region}", partial(_parameter, aws, region, parameter_name))
        assert parameter["Value"] == image_id and parameter["DataType"] == "aws:ec2:image"
        ec2 = aws.client("ec2", region_name=region)
        (template,) = ec2.describe_launch_templates(LaunchTemplateNames=[live.publish_template])["LaunchTemplates"]
        assert template["DefaultVersionNumber"] == published[region]["launch_template_version"] == 2
        (default,) = ec2.describe_launch_template_versions(
            LaunchTemplateName=live.publish_template, Versions=["$Default"]
        )["LaunchTemplateVersions"]
        # The new default is version 1 with the image: what version 1 said is kept.
        data = default["LaunchTemplateData"]
        assert (data["ImageId"], data["InstanceType"]) == (image_id, "t3.micro")


def _parameter(aws: Any, region: str, name: str) -> dict[str, Any] | None:
    """The parameter, or None while SSM has not made it visible (an aws:ec2:image value is validated first)."""
    try:
        return dict(aws.client("ssm", region_name=region).get_parameter(Name=name)["Parameter"])
    except Exception as e:
        if error_code(e) == "ParameterNotFound":
            return None
        raise


def test_rollout_replaces_the_member_of_a_tagged_auto_scaling_group(
    live: LiveConfig, aws: Any, amiforge: Amiforge, baked: Baked, signed: str, cleanup: ExitStack, tmp_path: Path
) -> None:
    """A one-instance group starts on an image the registry knows as another version of the recipe (a copy of the
    bake, adopted with `import packer`: a rollout refuses members it could not roll back); the rollout puts its
    member on the signed version."""
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    old_image = ec2.copy_image(
        SourceImageId=baked.image_id,
        SourceRegion=live.region,
        Name=f"{live.name}-adopted",
        TagSpecifications=[{"ResourceType": "image", "Tags": live.tags()}],
    )["ImageId"]
    cleanup.callback(discard_image, ec2, old_image)
    ec2.get_waiter("image_available").wait(ImageIds=[old_image], WaiterConfig={"Delay": 15, "MaxAttempts": 120})
    adopted = amiforge(
        "import", "packer", str(packer_manifest(tmp_path / "manifest.json", live.region, old_image)),
        "--recipe", str(baked.recipe),
    )  # fmt: skip
    old_ref = f"{adopted['version']['name']}@{adopted['version']['number']}"

    group = template = f"{live.name}-asg"
    ec2.create_launch_template(
        LaunchTemplateName=template,
        LaunchTemplateData={
            "ImageId": old_image,
            "InstanceType": "t3.micro",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        },
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": live.tags()}],
    )
    cleanup.callback(delete_template, ec2, template)
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=group,
        LaunchTemplate={"LaunchTemplateName": template, "Version": "1"},  # a number: amiforge refuses $Latest
        MinSize=1,
        MaxSize=2,
        DesiredCapacity=1,
        VPCZoneIdentifier=",".join(_subnets(ec2, live)),
        Tags=[
            {"Key": ROLLOUT_TAG, "Value": "enabled", "PropagateAtLaunch": False},
            *({**t, "PropagateAtLaunch": True} for t in live.tags()),
        ],
    )
    cleanup.callback(delete_group, autoscaling, group)  # runs before the template's removal
    assert eventually(f"{group} in service", lambda: _member_images(aws, group) or None) == [old_image]

    rolled = amiforge(
        "rollout", "start", "--target", f"aws:{live.region}/{group}", "--version", signed, "--waves", "1",
        "--bake-time", "0",
    )  # fmt: skip
    assert rolled["rollout"]["state"] == "succeeded", rolled
    (replacement,) = rolled["replacements"]
    assert replacement["old_version"] == old_ref
    assert _member_images(aws, group) == [baked.image_id]  # read from EC2, not from the registry


def _subnets(ec2: Any, live: LiveConfig) -> list[str]:
    if live.subnet:
        return [live.subnet]
    default = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    if not default:
        pytest.fail(f"{live.region} has no default VPC: set AMIFORGE_LIVE_SUBNET", pytrace=False)
    return [s["SubnetId"] for s in default]


def _member_images(aws: Any, group: str) -> list[str]:
    """The images the group's in-service instances run."""
    (found,) = aws.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[group])[
        "AutoScalingGroups"
    ]
    ids = [i["InstanceId"] for i in found["Instances"] if i["LifecycleState"] == "InService"]
    if not ids:
        return []
    reservations = aws.client("ec2").describe_instances(InstanceIds=ids)["Reservations"]
    return [i["ImageId"] for r in reservations for i in r["Instances"]]
