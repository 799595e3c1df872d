"""What gc needs from EC2 that moto 5.2.5 lacks, emulated in-process for test_gc.py and test_iam.py.

- DescribeVolumes paging: moto ignores MaxResults/NextToken there too. The same `PagingEmulation` that pages images,
  snapshots and instances (moto_emulation.py) pages volumes, page cap included.
- The DescribeImages filter `block-device-mapping.snapshot-id` raises FilterNotImplementedError in moto. The
  emulation answers it from the image's block device mappings, as EC2 does (an image matches when any of its
  snapshots is among the values, images with several snapshots included).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from moto.core.responses import ActionResult
from moto.ec2.models.amis import Ami
from moto.ec2.responses.elastic_block_store import ElasticBlockStore
from moto_emulation import PagingEmulation

SNAPSHOT_FILTER = "block-device-mapping.snapshot-id"


class AnyOf:
    """An image's snapshot ids as moto's filter matcher should see them: equal to each of them.

    moto's matcher compares a list value by subset/superset with the filter's values, which is not EC2's "any of the
    image's snapshots is among the values" for an image with several snapshots. This value is not iterable, so the
    matcher falls back to `value in filter_values`, which asks `AnyOf.__eq__` about each filter value."""

    # Unhashable, as its own __eq__ makes it anyway; typeshed declares object.__hash__ a method (hence the ignore).
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = frozenset(ids)

    def __eq__(self, other: object) -> bool:
        return other in self.ids


def install_gc_emulation(paging: PagingEmulation, monkeypatch: pytest.MonkeyPatch) -> None:
    volumes = ElasticBlockStore.describe_volumes
    filter_value = Ami.get_filter_value

    def describe_volumes(resp: Any) -> ActionResult:
        paging._check(resp, "VolumeIds")
        return paging._page(resp, "Volumes", volumes(resp).result)

    def get_filter_value(ami: Any, filter_name: str, method_name: str | None = None) -> Any:
        if filter_name == SNAPSHOT_FILTER:
            return AnyOf(
                m["Ebs"]["SnapshotId"] for m in ami.block_device_mappings if m.get("Ebs", {}).get("SnapshotId")
            )
        return filter_value(ami, filter_name, method_name)

    monkeypatch.setattr(ElasticBlockStore, "describe_volumes", describe_volumes)
    monkeypatch.setattr(Ami, "get_filter_value", get_filter_value)
