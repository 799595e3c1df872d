"""CreateImage's TagSpecifications for snapshots, which moto 5.2.5 does not implement (NotImplementedError).

EC2 API reference, CreateImage, TagSpecifications: "The tags to apply to the AMI and snapshots on creation. You can
tag the AMI, the snapshots, or both. To tag the AMI, the value for ResourceType must be image. To tag the snapshots
that are created of the root volume and of other Amazon EBS volumes that are attached to the instance, the value for
ResourceType must be snapshot. The same tag is applied to all of the snapshots that are created. If you specify other
values for ResourceType, the request fails."

`SnapshotTagsAtCreation` takes the snapshot specifications out of the request, lets moto create the image (and its
one snapshot) with the rest — so any other ResourceType still fails as moto fails it, InvalidParameterValue — and
tags the image's snapshots with them before CreateImage answers, so no caller sees them untagged. The bake then runs
as on AWS (`tag_snapshots_at_creation`, its default), and IAM's tag-on-create authorisation sees the snapshot tags.
Tested in test_create_image_emulation.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from moto.ec2.models.amis import Ami, AmiBackend


class SnapshotTagsAtCreation:
    def __init__(self) -> None:
        self.tagged: list[str] = []  # the snapshots tagged at creation

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        create_image = AmiBackend.create_image
        emulation = self

        def create(
            backend: Any, instance_id: str, name: str, description: str, tag_specifications: list[dict[str, Any]]
        ) -> Ami:
            snapshots = [s for s in tag_specifications if s.get("ResourceType") == "snapshot"]
            others = [s for s in tag_specifications if s.get("ResourceType") != "snapshot"]
            ami = create_image(backend, instance_id, name, description, tag_specifications=others)
            for spec in snapshots:
                tags = {str(t["Key"]): str(t["Value"]) for t in spec.get("Tags", [])}
                backend.create_tags([ami.ebs_snapshot.id], tags)
                emulation.tagged.append(ami.ebs_snapshot.id)
            return ami

        monkeypatch.setattr(AmiBackend, "create_image", create)
