"""CreateImage's snapshot TagSpecifications as EC2 documents them (create_image_emulation.py): the snapshots are
tagged when CreateImage answers, the image keeps its own tags, and any other ResourceType fails the request."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from conftest import REGION, Aws
from create_image_emulation import SnapshotTagsAtCreation


def _instance(aws: Aws) -> str:
    return str(aws.ec2().run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])


def test_snapshots_are_tagged_at_creation(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    emulation = SnapshotTagsAtCreation()
    emulation.install(monkeypatch)
    ec2 = aws.ec2()
    specs = [
        {"ResourceType": "image", "Tags": [{"Key": "amiforge:managed", "Value": "true"}]},
        {
            "ResourceType": "snapshot",
            "Tags": [{"Key": "amiforge:managed", "Value": "true"}, {"Key": "k", "Value": "v"}],
        },
    ]
    image_id = ec2.create_image(InstanceId=_instance(aws), Name="tagged", TagSpecifications=specs)["ImageId"]
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    assert image["Tags"] == [{"Key": "amiforge:managed", "Value": "true"}]
    (snapshot,) = [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"] if "Ebs" in m]
    tags = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]["Tags"]
    assert sorted((t["Key"], t["Value"]) for t in tags) == [("amiforge:managed", "true"), ("k", "v")]
    assert emulation.tagged == [snapshot]


def test_another_resource_type_fails_the_request(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    SnapshotTagsAtCreation().install(monkeypatch)
    ec2 = aws.ec2(REGION)
    volume = [{"ResourceType": "volume", "Tags": [{"Key": "k", "Value": "v"}]}]
    with pytest.raises(ClientError) as refused:
        ec2.create_image(InstanceId=_instance(aws), Name="refused", TagSpecifications=volume)
    assert refused.value.response["Error"]["Code"] == "InvalidParameterValue"
    assert ec2.describe_images(Owners=["self"])["Images"] == []
