"""The EBS direct APIs (ListSnapshotBlocks, GetSnapshotBlock) on moto 5.2.5 for the snapshots of an AMI, emulated
in-process (tested in test_snapshot.py).

moto's `ebs` backend only knows snapshots written through its own StartSnapshot/PutSnapshotBlock: the snapshot of an
image made by EC2 RegisterImage or CreateImage has no blocks there. `EbsEmulation.seed()` gives an EC2 snapshot the
blocks of a raw disk file (its non-zero 512 KiB blocks, as AWS lists only written blocks), and `register_ami()` makes
an AMI whose root device is such a snapshot.

Where moto deviates from AWS, and what the emulation does about it:

1. Block size: moto's EBSSnapshot has 512-byte blocks; AWS answers BlockSize 524288 (512 KiB). Seeded snapshots have
   524288-byte blocks.
2. Checksums: moto returns whatever checksum the writer passed to PutSnapshotBlock (none if none) and never checks
   it; AWS returns a base64 SHA256 of every block it serves. Seeded blocks carry their real SHA256. `corrupt()`
   damages a block's bytes in transit (checksum kept) for a given number of reads.
3. Paging: moto ignores MaxResults, NextToken and StartingBlockIndex and answers every block at once. Emulated: at
   most MaxResults blocks per page (botocore enforces AWS's minimum of 100; without MaxResults the emulation uses
   the maximum, 10,000, as AWS documents no default), from StartingBlockIndex unless a NextToken is given (AWS then
   ignores StartingBlockIndex), and a NextToken (base64, bound to the snapshot) while blocks remain. `page_cap`
   makes the "server" answer shorter pages than asked for, as AWS may: callers must follow NextToken.
4. Order: moto lists blocks in insertion order; AWS in ascending BlockIndex. Emulated: ascending.
5. Unknown snapshot: moto raises KeyError (an HTTP 500 in server mode); AWS answers ResourceNotFoundException
   (404). Emulated.
6. Block tokens: moto's are UUIDs, which do not match AWS's pattern `^[A-Za-z0-9+/=]+$`, and GetSnapshotBlock ignores
   the token it is given. Seeded blocks get base64 tokens, and a token that is not the block's (or a block that does
   not exist) is answered with ValidationException (Reason INVALID_BLOCK_TOKEN, one of AWS's documented reasons).
7. ExpiryTime: missing from moto's ListSnapshotBlocks answer; emulated as now + 7 days (AWS's block token lifetime).
8. RegisterImage: moto ignores BlockDeviceMappings, RootDeviceName and Architecture and makes its own 15 GiB snapshot
   (notes/moto.md). `register_ami()` applies what it sent to moto's image (root device, mappings as sent, root
   snapshot), so DescribeImages answers like EC2.

Not emulated (amiforge does not rely on it): snapshot status (AWS serves only `completed` snapshots; seeded ones are
`completed`), encryption and KMS, public-snapshot refusal, ListChangedBlocks paging, throttling (use moto_emulation's
FaultInjector).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from moto.core.exceptions import JsonRESTError
from moto.core.responses import ActionResult
from moto.ebs.models import EBSSnapshot, ebs_backends
from moto.ebs.responses import EBSResponse
from moto.ec2.models import ec2_backends
from moto.ec2.models.amis import Ami

AWS_BLOCK_SIZE = 512 * 1024
GIB = 1 << 30
MOTO_ACCOUNT = "123456789012"  # moto's default account
LIST_MAX = 10_000  # ListSnapshotBlocks' MaxResults ceiling
TOKEN_LIFETIME = timedelta(days=7)


class _Error(JsonRESTError):
    """An EBS error answer (REST-JSON): botocore reads the code from `__type`."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(code, message)
        self.code = status


def _gib(raw: Path) -> int:
    """`raw`'s size in whole GiB, rounded up (EBS volumes are sized in GiB)."""
    return max(1, -(-raw.stat().st_size // GIB))


def data_blocks(raw: Path, block_size: int = AWS_BLOCK_SIZE) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of every `block_size` block of `raw` that is not all zeros; holes are skipped unread."""
    size = raw.stat().st_size
    zeros = bytes(block_size)
    fd = os.open(raw, os.O_RDONLY)
    try:
        index = 0
        while index * block_size < size:
            try:
                data_at = os.lseek(fd, index * block_size, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                return
            index = max(index, data_at // block_size)
            data = os.pread(fd, block_size, index * block_size)
            if data.ljust(block_size, b"\0") != zeros:
                yield index, data.ljust(block_size, b"\0")
            index += 1
    finally:
        os.close(fd)


class EbsEmulation:
    """ListSnapshotBlocks and GetSnapshotBlock on moto the way AWS answers them, for seeded EC2 snapshots."""

    def __init__(self, *, account: str = MOTO_ACCOUNT) -> None:
        self.account = account
        self.page_cap: int | None = None  # the "server" answers at most this many blocks per page
        self.list_calls: list[dict[str, Any]] = []  # the parameters of every ListSnapshotBlocks, in order
        self._mappings: dict[str, list[dict[str, Any]]] = {}
        self._corrupt: dict[tuple[str, int], int] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self
        original_mappings: Any = Ami.block_device_mappings  # a property: its getter is .fget

        def list_snapshot_blocks(resp: Any) -> ActionResult:
            return emulation._list(resp)

        def get_snapshot_block(resp: Any) -> ActionResult:
            return emulation._get(resp)

        def block_device_mappings(ami: Any) -> list[dict[str, Any]]:
            mapped = emulation._mappings.get(ami.id)
            return mapped if mapped is not None else list(original_mappings.fget(ami))

        monkeypatch.setattr(EBSResponse, "list_snapshot_blocks", list_snapshot_blocks)
        monkeypatch.setattr(EBSResponse, "get_snapshot_block", get_snapshot_block)
        monkeypatch.setattr(Ami, "block_device_mappings", property(block_device_mappings))

    # --- seeding ---------------------------------------------------------------------------------------------------

    def seed(self, raw: Path, snapshot_id: str, region: str, *, volume_gib: int | None = None) -> EBSSnapshot:
        """Give the EC2 snapshot `snapshot_id` (in moto's ec2 backend) the non-zero 512 KiB blocks of `raw`, as the
        EBS direct APIs serve it; its VolumeSize is `volume_gib`, by default `raw`'s size rounded up to whole GiB."""
        snapshot = ec2_backends[self.account][region].snapshots[snapshot_id]
        ebs = EBSSnapshot(self.account, snapshot)
        ebs.volume_size = volume_gib if volume_gib is not None else _gib(raw)
        ebs.block_size = AWS_BLOCK_SIZE
        ebs.status = "completed"
        for index, data in data_blocks(raw):
            checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
            ebs.put_block(index, data, checksum, "SHA256", len(data))
            token = base64.b64encode(hashlib.sha256(f"{snapshot_id}/{index}/{checksum}".encode()).digest())
            ebs.blocks[index].block_token = token.decode()
        ebs_backends[self.account][region].snapshots[snapshot_id] = ebs
        return ebs

    def snapshot_from_file(self, ec2: Any, raw: Path) -> str:
        """A new EC2 snapshot (of a new volume of `raw`'s size in GiB) seeded with `raw`'s blocks."""
        region = ec2.meta.region_name
        volume = ec2.create_volume(Size=_gib(raw), AvailabilityZone=f"{region}a", VolumeType="gp3")
        snapshot_id = str(
            ec2.create_snapshot(VolumeId=volume["VolumeId"], Description=f"root of {raw.name}")["SnapshotId"]
        )
        ec2.delete_volume(VolumeId=volume["VolumeId"])
        self.seed(raw, snapshot_id, region)
        return snapshot_id

    def register_ami(
        self,
        ec2: Any,
        name: str,
        root: Path,
        *,
        root_device: str = "/dev/xvda",
        others: Mapping[str, Path] | None = None,
    ) -> str:
        """RegisterImage of an EBS-backed image whose root device is a snapshot of `root` (and each other device in
        `others` a snapshot of its file), then make moto's image say what was registered (moto ignores it)."""
        region = ec2.meta.region_name
        devices = {root_device: root, **(others or {})}
        mappings: list[dict[str, Any]] = []
        for device, raw in devices.items():
            snapshot_id = self.snapshot_from_file(ec2, raw)
            ebs = {"SnapshotId": snapshot_id, "VolumeSize": _gib(raw), "VolumeType": "gp3", "DeleteOnTermination": True}
            mappings.append({"DeviceName": device, "Ebs": ebs})
        image_id = str(
            ec2.register_image(
                Name=name,
                Architecture="x86_64",
                VirtualizationType="hvm",
                EnaSupport=True,
                RootDeviceName=root_device,
                BlockDeviceMappings=mappings,
            )["ImageId"]
        )
        backend = ec2_backends[self.account][region]
        ami = backend.amis[image_id]
        own = ami.ebs_snapshot  # the 15 GiB snapshot moto made up; the image no longer uses it
        ami.ebs_snapshot = backend.snapshots[mappings[0]["Ebs"]["SnapshotId"]]
        backend.snapshots.pop(own.id, None)
        ami.root_device_name = root_device
        ami.root_device_type = "ebs"
        ami.architecture = "x86_64"
        ami.virtualization_type = "hvm"
        self._mappings[image_id] = mappings
        return image_id

    def corrupt(self, snapshot_id: str, index: int, *, reads: int = 1_000_000) -> None:
        """The next `reads` GetSnapshotBlock answers for this block carry damaged bytes (with the right checksum)."""
        self._corrupt[(snapshot_id, index)] = reads

    # --- answers ---------------------------------------------------------------------------------------------------

    def _snapshot(self, resp: EBSResponse) -> EBSSnapshot:
        snapshot_id = str(resp._get_param("SnapshotId"))
        snapshot = resp.ebs_backend.snapshots.get(snapshot_id)
        if snapshot is None:
            raise _Error("ResourceNotFoundException", f"The snapshot '{snapshot_id}' does not exist.", 404)
        return snapshot

    def _list(self, resp: EBSResponse) -> ActionResult:
        snapshot = self._snapshot(resp)
        max_results = resp._get_param("MaxResults")
        token = resp._get_param("NextToken")
        starting = resp._get_param("StartingBlockIndex")
        self.list_calls.append({"MaxResults": max_results, "NextToken": token, "StartingBlockIndex": starting})
        size = min(int(max_results) if max_results is not None else LIST_MAX, LIST_MAX)
        if self.page_cap is not None:
            size = min(size, self.page_cap)
        start = int(starting or 0)
        if token is not None:  # AWS: NextToken wins over StartingBlockIndex
            try:
                decoded = json.loads(base64.b64decode(str(token)))
                start, bound = int(decoded["from"]), str(decoded["snapshot"])
            except (ValueError, KeyError, TypeError) as e:
                raise _Error("ValidationException", "The pagination token is invalid.", 400) from e
            if bound != snapshot.snapshot_id:
                raise _Error("ValidationException", "The pagination token is invalid.", 400)
        remaining = [i for i in sorted(snapshot.blocks) if i >= start]
        page = remaining[:size]
        answer: dict[str, Any] = {
            "Blocks": [{"BlockIndex": i, "BlockToken": snapshot.blocks[i].block_token} for i in page],
            "ExpiryTime": datetime.now(UTC) + TOKEN_LIFETIME,
            "VolumeSize": snapshot.volume_size,
            "BlockSize": snapshot.block_size,
        }
        if len(remaining) > len(page):
            following = {"from": remaining[len(page)], "snapshot": snapshot.snapshot_id}
            answer["NextToken"] = base64.b64encode(json.dumps(following).encode()).decode()
        return ActionResult(answer)

    def _get(self, resp: EBSResponse) -> ActionResult:
        snapshot = self._snapshot(resp)
        index = int(resp._get_param("BlockIndex"))
        token = resp._get_param("BlockToken")
        block = snapshot.blocks.get(index)
        if block is None or token != block.block_token:
            raise _Error("ValidationException", "The block token is invalid (INVALID_BLOCK_TOKEN).", 400)
        data = block.block_data
        left = self._corrupt.get((snapshot.snapshot_id, index), 0)
        if left > 0:
            self._corrupt[(snapshot.snapshot_id, index)] = left - 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return ActionResult(
            {
                "DataLength": block.data_length,
                "BlockData": data,
                "Checksum": block.checksum,
                "ChecksumAlgorithm": block.checksum_algorithm,
            }
        )
