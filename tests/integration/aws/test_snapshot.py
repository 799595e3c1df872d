"""Reading an AMI's root volume through the EBS direct APIs (providers/aws/snapshot.py) on moto, with the EBS
emulation of ebs_emulation.py (itself tested at the end of this file).

Disks are real: ext4 filesystems made with `mkfs.ext4 -d`, on the whole disk or in a GPT/MBR partition table, inside
sparse 1 GiB volumes (EBS sizes volumes in GiB). Each keeps a synthetic private key that was written and then deleted
(debugfs), so its bytes lie in a free block. Mounting needs root, as the local provider's inspection does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import struct
import subprocess
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import REGION, Aws
from ebs_emulation import AWS_BLOCK_SIZE, EbsEmulation, data_blocks
from moto_emulation import error_response, no_backoff

from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound
from amiforge.providers.aws.snapshot import open_ami, root_filesystem, root_snapshot
from amiforge.providers.interface import ImageView
from amiforge.scanners.secrets import scan_raw
from tests.conftest import require_root


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root("loop mounts")  # skipped locally without root; a failure in CI


GIB = 1 << 30
SECTOR = 512
KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ" * 8 + b"\n"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_START = 16384  # sector of the root partition in the partitioned disks (8 MiB in)


# --- disks ------------------------------------------------------------------------------------------------------


def _rootfs(top: Path) -> Path:
    """A small Debian-looking tree: a few text files and 1.5 MiB of incompressible bytes spanning several blocks."""
    tree = top / "tree"
    for rel, data in {
        "etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n',
        "var/lib/dpkg/status": b"Package: base-files\nStatus: install ok installed\nVersion: 12.4+deb12u5\n\n",
        "usr/share/amiforge-test/blob.bin": hashlib.shake_256(b"amiforge").digest(3 << 19),
        "root/.ssh/id_ed25519": KEY,  # deleted below, after mkfs: its bytes stay in a free block
    }.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    return tree


def _mkfs(tree: Path, image: Path, size: str = "16M") -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(image), size], check=True)
    subprocess.run(["debugfs", "-w", "-R", "rm /root/.ssh/id_ed25519", str(image)], check=True, capture_output=True)


def _file_blocks(image: Path, path: str) -> list[int]:
    out = subprocess.run(["debugfs", "-R", f"blocks {path}", str(image)], check=True, capture_output=True, text=True)
    return [int(b) for b in out.stdout.split()]


def _embed(fs: Path, disk: Path, offset: int) -> None:
    with fs.open("rb") as src, disk.open("r+b") as dst:
        dst.seek(offset)
        shutil.copyfileobj(src, dst)


def _volume(path: Path) -> Path:
    with path.open("wb") as fh:
        fh.truncate(GIB)
    return path


def _write_gpt(disk: Path, parts: list[tuple[int, str, int, int, str]]) -> None:
    """A GPT (protective MBR, both headers, 128 entries) with (number, type GUID, first LBA, last LBA, name)."""
    total = disk.stat().st_size // SECTOR
    entries = bytearray(128 * 128)
    for number, type_guid, first, last, name in parts:
        entry = struct.pack(
            "<16s16sQQQ72s",
            uuid.UUID(type_guid).bytes_le,
            uuid.uuid4().bytes_le,
            first,
            last,
            0,
            name.encode("utf-16-le"),
        )
        entries[(number - 1) * 128 : number * 128] = entry
    disk_guid = uuid.uuid4().bytes_le

    def header(current: int, backup: int, table: int) -> bytes:
        fields = (b"EFI PART", 0x10000, 92, 0, 0, current, backup, 34, total - 34, disk_guid, table, 128, 128)
        head = struct.pack("<8sIIIIQQQQ16sQIII", *fields, zlib.crc32(entries))
        return head[:16] + struct.pack("<I", zlib.crc32(head)) + head[20:]

    mbr = bytearray(SECTOR)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1, min(total - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    with disk.open("r+b") as fh:
        for lba, data in ((0, bytes(mbr)), (1, header(1, total - 1, 2)), (2, bytes(entries))):
            fh.seek(lba * SECTOR)
            fh.write(data)
        fh.seek((total - 33) * SECTOR)
        fh.write(entries)
        fh.seek((total - 1) * SECTOR)
        fh.write(header(total - 1, 1, total - 33))


def _write_mbr(disk: Path, parts: list[tuple[int, int, int]]) -> None:
    """An MBR (DOS) table with (type, first sector, sectors) primary partitions."""
    mbr = bytearray(SECTOR)
    for i, (kind, first, sectors) in enumerate(parts):
        mbr[446 + 16 * i : 462 + 16 * i] = struct.pack(
            "<B3sB3sII", 0, b"\xfe\xff\xff", kind, b"\xfe\xff\xff", first, sectors
        )
    mbr[510:512] = b"\x55\xaa"
    with disk.open("r+b") as fh:
        fh.write(mbr)


@dataclass(frozen=True)
class Disk:
    raw: Path  # the volume as the snapshot holds it
    fs: Path  # the root filesystem image inside it
    offset: int  # where that filesystem starts in `raw`
    tree: Path  # what was put into the filesystem


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Disk]:
    top = tmp_path_factory.mktemp("disks")
    tree = _rootfs(top)
    fs = top / "root.ext4"
    _mkfs(tree, fs)

    whole = _volume(top / "whole.raw")
    _embed(fs, whole, 0)

    # Debian's cloud layout: 1 = root ext4, 14 = BIOS boot, 15 = EFI (vfat); root last on the disk.
    gpt = _volume(top / "gpt.raw")
    total = GIB // SECTOR
    _write_gpt(
        gpt,
        [
            (1, LINUX_FS, ROOT_START, total - 34, "root"),
            (14, BIOS_BOOT, 2048, 4095, "bios"),
            (15, EFI_SYSTEM, 4096, ROOT_START - 1, "efi"),
        ],
    )
    with gpt.open("r+b") as fh:
        fh.seek(2048 * SECTOR)
        fh.write(hashlib.shake_256(b"boot code").digest(SECTOR * 2048))
        fh.seek(4096 * SECTOR + 82)
        fh.write(b"FAT32   ")
    _embed(fs, gpt, ROOT_START * SECTOR)

    # MBR with two ext4 partitions: the larger one is the root.
    mbr = _volume(top / "mbr.raw")
    small = top / "boot.ext4"
    boot_tree = top / "boot-tree"
    (boot_tree / "grub").mkdir(parents=True)
    (boot_tree / "grub/grub.cfg").write_text("set timeout=0\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(boot_tree), str(small), "4M"], check=True)
    _write_mbr(mbr, [(0x83, 2048, 8192), (0x83, 2048 + 8192, total - 2048 - 8192)])
    _embed(small, mbr, 2048 * SECTOR)
    _embed(fs, mbr, (2048 + 8192) * SECTOR)

    return {
        "whole": Disk(whole, fs, 0, tree),
        "gpt": Disk(gpt, fs, ROOT_START * SECTOR, tree),
        "mbr": Disk(mbr, fs, (2048 + 8192) * SECTOR, tree),
    }


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def ebs(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> EbsEmulation:
    emulation = EbsEmulation()
    emulation.install(monkeypatch)
    return emulation


def _image(aws: Aws, ebs: EbsEmulation, raw: Path, **kwargs: Any) -> dict[str, Any]:
    ec2: Any = aws.ec2()
    image_id = ebs.register_ami(ec2, f"scan-{raw.stem}", raw, **kwargs)
    return dict(ec2.describe_images(ImageIds=[image_id])["Images"][0])


def _assert_same_tree(src: Path, view: ImageView) -> None:
    for dirpath, _dirs, files in os.walk(src):
        for name in files:
            rel = Path(dirpath, name).relative_to(src)
            if rel == Path("root/.ssh/id_ed25519"):
                assert not (view.root / rel).exists()  # deleted before the image "shipped"
                continue
            assert (view.root / rel).read_bytes() == Path(dirpath, name).read_bytes(), rel


def _inside(offset: int, ranges: tuple[tuple[int, int], ...] | None) -> bool:
    assert ranges is not None
    return any(start <= offset < end for start, end in ranges)


def _scratch_empty(scratch: Path) -> bool:
    return not scratch.exists() or not any(scratch.iterdir())


# --- the view ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["whole", "gpt", "mbr"])
def test_the_view_is_the_images_root_filesystem_read_only(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path, layout: str
) -> None:
    disk = disks[layout]
    image = _image(aws, ebs, disk.raw)
    scratch = tmp_path / "scratch"
    with open_ami(aws.session, REGION, image, scratch) as view:
        _assert_same_tree(disk.tree, view)
        assert (view.root / "etc/os-release").read_text().startswith('PRETTY_NAME="Debian')
        with pytest.raises(OSError):
            (view.root / "etc/planted").write_text("x")
        with pytest.raises(OSError):
            (view.root / "etc/os-release").open("ab")

        # The raw file is the volume, byte for byte (holes where the snapshot has no block).
        assert view.raw is not None and view.raw.stat().st_size == GIB
        assert list(data_blocks(view.raw)) == list(data_blocks(disk.raw))

        # Free blocks are byte ranges of the raw file: the deleted key lies in one, a live file's blocks in none.
        assert view.unallocated and all(start >= disk.offset for start, _ in view.unallocated)
        key_at = disk.offset + disk.fs.read_bytes().index(KEY[:36])
        with view.raw.open("rb") as fh:
            fh.seek(key_at)
            assert fh.read(len(KEY)) == KEY
        assert _inside(key_at, view.unallocated)
        for block in _file_blocks(disk.fs, "/usr/share/amiforge-test/blob.bin"):
            assert not _inside(disk.offset + block * 4096, view.unallocated)
        (hit,) = scan_raw(view.raw, ranges=view.unallocated)
        assert hit.id == "private-key" and hit.path == f"{view.raw}@{key_at}"
        root = view.root
    assert _scratch_empty(scratch)
    assert not root.exists()  # the mount namespace is gone with its holder


def test_the_root_device_is_picked_among_several_volumes(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path
) -> None:
    # A data volume (no filesystem amiforge could mount) mapped besides the root: only the root is read.
    data = _volume(tmp_path / "data.raw")
    with data.open("r+b") as fh:
        fh.write(b"not a filesystem" * 64)
    image = _image(aws, ebs, disks["whole"].raw, root_device="/dev/sda1", others={"/dev/sdf": data})
    assert [m["DeviceName"] for m in image["BlockDeviceMappings"]] == ["/dev/sda1", "/dev/sdf"]
    with open_ami(aws.session, REGION, image, tmp_path / "scratch") as view:
        assert (view.root / "var/lib/dpkg/status").read_bytes().startswith(b"Package: base-files")
    assert aws.calls["ebs.GetSnapshotBlock"] == len(list(data_blocks(disks["whole"].raw)))


def test_listing_follows_next_token_through_short_pages(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path
) -> None:
    disk = disks["gpt"]
    blocks = len(list(data_blocks(disk.raw)))
    assert blocks > 6
    image = _image(aws, ebs, disk.raw)
    ebs.page_cap = 3  # the "server" answers shorter pages than the 10,000 asked for
    progress: list[tuple[int, int]] = []
    with open_ami(aws.session, REGION, image, tmp_path / "scratch", workers=3, progress=lambda *p: progress.append(p)):
        pass
    pages = -(-blocks // 3)
    assert aws.calls["ebs.ListSnapshotBlocks"] == pages == len(ebs.list_calls)
    assert all(c["MaxResults"] == 10_000 for c in ebs.list_calls)
    assert ebs.list_calls[0]["NextToken"] is None and all(c["NextToken"] for c in ebs.list_calls[1:])
    assert aws.calls["ebs.GetSnapshotBlock"] == blocks
    assert progress[0] == (0, blocks) and progress[-1] == (blocks, blocks)
    assert [done for done, _ in progress] == list(range(blocks + 1))


def test_scratch_is_removed_when_the_caller_fails_inside(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path
) -> None:
    image = _image(aws, ebs, disks["whole"].raw)
    scratch = tmp_path / "scratch"
    with pytest.raises(RuntimeError, match="scanner broke"), open_ami(aws.session, REGION, image, scratch) as view:
        root = view.root
        assert (root / "etc/os-release").exists()
        raise RuntimeError("scanner broke")
    assert _scratch_empty(scratch)
    assert not root.exists()


def test_ctrl_c_during_the_download_leaves_nothing(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path
) -> None:
    image = _image(aws, ebs, disks["gpt"].raw)
    scratch = tmp_path / "scratch"

    def interrupt(done: int, _total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), open_ami(aws.session, REGION, image, scratch, progress=interrupt):
        pytest.fail("the context must not be entered")
    assert _scratch_empty(scratch)
    assert not [t for t in threading.enumerate() if t.name.startswith("amiforge-ebs")]


# --- failures ---------------------------------------------------------------------------------------------------


def test_a_block_that_keeps_failing_its_checksum_names_snapshot_and_block(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path
) -> None:
    image = _image(aws, ebs, disks["whole"].raw)
    snapshot = root_snapshot(image)
    bad = [i for i, _ in data_blocks(disks["whole"].raw)][2]
    ebs.corrupt(snapshot, bad)
    scratch = tmp_path / "scratch"
    with pytest.raises(InfraError) as caught, open_ami(aws.session, REGION, image, scratch):
        pytest.fail("the context must not be entered")
    assert f"block {bad} of {snapshot}" in caught.value.message and "checksum mismatch" in caught.value.message
    assert caught.value.retryable
    assert _scratch_empty(scratch)


def test_a_block_damaged_once_in_transit_is_fetched_again(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path
) -> None:
    image = _image(aws, ebs, disks["whole"].raw)
    first = next(data_blocks(disks["whole"].raw))[0]
    ebs.corrupt(root_snapshot(image), first, reads=2)
    blocks = len(list(data_blocks(disks["whole"].raw)))
    with open_ami(aws.session, REGION, image, tmp_path / "scratch") as view:
        _assert_same_tree(disks["whole"].tree, view)
    assert aws.calls["ebs.GetSnapshotBlock"] == blocks + 2


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (lambda fh: fh.write(b"XFSB" + b"\1" * 508), "whole-disk xfs filesystem"),
        (lambda fh: fh.write(b"\x7fELF just some bytes" * 20), "neither an ext4 filesystem nor a partition table"),
    ],
    ids=["xfs", "garbage"],
)
def test_a_root_that_is_not_ext4_is_refused_clearly(
    aws: Aws, ebs: EbsEmulation, tmp_path: Path, plant: Callable[[Any], object], expected: str
) -> None:
    raw = _volume(tmp_path / "other.raw")
    with raw.open("r+b") as fh:
        plant(fh)
    image = _image(aws, ebs, raw)
    scratch = tmp_path / "scratch"
    with pytest.raises(InfraError) as caught, open_ami(aws.session, REGION, image, scratch):
        pytest.fail("the context must not be entered")
    assert expected in caught.value.message and root_snapshot(image) in caught.value.message
    assert caught.value.fix is not None and "XFS roots (Amazon Linux, RHEL) are not supported yet" in caught.value.fix
    assert _scratch_empty(scratch)


def test_a_partition_table_without_ext4_lists_what_it_holds(tmp_path: Path) -> None:
    raw = _volume(tmp_path / "xfs-gpt.raw")
    total = GIB // SECTOR
    _write_gpt(raw, [(1, LINUX_FS, ROOT_START, total - 34, "root"), (15, EFI_SYSTEM, 2048, ROOT_START - 1, "efi")])
    with raw.open("r+b") as fh:
        fh.seek(ROOT_START * SECTOR)
        fh.write(b"XFSB")
        fh.seek(2048 * SECTOR + 82)
        fh.write(b"FAT32   ")
    with pytest.raises(InfraError, match=r"snap-x has no ext4 partition \(partition 1: xfs; partition 15: vfat\)"):
        root_filesystem(raw, "snap-x")


def test_the_largest_ext4_partition_is_the_root(disks: dict[str, Disk]) -> None:
    disk = disks["mbr"]
    assert root_filesystem(disk.raw, "snap-x") == (disk.offset, GIB - disk.offset)
    assert root_filesystem(disks["whole"].raw, "snap-x") == (0, None)
    # The GPT root ends at the last usable LBA, total - 34 (inclusive).
    assert root_filesystem(disks["gpt"].raw, "snap-x") == (ROOT_START * SECTOR, GIB - (ROOT_START + 33) * SECTOR)


def test_an_unknown_snapshot_is_reported_with_its_id(aws: Aws, ebs: EbsEmulation, tmp_path: Path) -> None:
    ec2: Any = aws.ec2()
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")
    snapshot = ec2.create_snapshot(VolumeId=volume["VolumeId"])["SnapshotId"]  # never seeded: EBS does not know it
    image: dict[str, Any] = {"ImageId": "ami-0123456789abcdef0", "RootDeviceName": "/dev/xvda"}
    image["BlockDeviceMappings"] = [{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot}}]
    with pytest.raises(AmiforgeError) as caught, open_ami(aws.session, REGION, image, tmp_path / "scratch"):
        pytest.fail("the context must not be entered")
    assert f"ebs:ListSnapshotBlocks on {snapshot} failed: ResourceNotFoundException" in caught.value.message


def test_a_missing_permission_names_the_iam_action(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path
) -> None:
    image = _image(aws, ebs, disks["whole"].raw)

    def deny(request: Any, **_: Any) -> Any:
        return error_response(request.url, "ebs", "AccessDeniedException", 403)

    aws.session.boto_session.events.register_first("before-send.ebs.GetSnapshotBlock", deny)
    scratch = tmp_path / "scratch"
    with pytest.raises(ConfigError) as caught, open_ami(aws.session, REGION, image, scratch):
        pytest.fail("the context must not be entered")
    assert caught.value.fix is not None and "grant ebs:GetSnapshotBlock" in caught.value.fix
    assert _scratch_empty(scratch)


def test_throttled_block_reads_are_retried(
    aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    image = _image(aws, ebs, disks["whole"].raw)
    left = [5]
    lock = threading.Lock()

    def throttle(request: Any, **_: Any) -> Any:
        with lock:
            if left[0] <= 0:
                return None
            left[0] -= 1
        return error_response(request.url, "ebs", "RequestThrottledException", 400)

    aws.session.boto_session.events.register_first("before-send.ebs.GetSnapshotBlock", throttle)
    with open_ami(aws.session, REGION, image, tmp_path / "scratch") as view:
        _assert_same_tree(disks["whole"].tree, view)
    assert left == [0]


def test_workers_must_be_positive(aws: Aws, tmp_path: Path) -> None:
    image = {"ImageId": "ami-0123456789abcdef0", "RootDeviceName": "/dev/xvda", "BlockDeviceMappings": []}
    with pytest.raises(ConfigError, match="workers"), open_ami(aws.session, REGION, image, tmp_path, workers=0):
        pytest.fail("the context must not be entered")


# --- root_snapshot ----------------------------------------------------------------------------------------------


def _mapping(device: str, snapshot: str | None = None) -> dict[str, Any]:
    return {"DeviceName": device, "Ebs": {"SnapshotId": snapshot}} if snapshot else {"DeviceName": device}


def test_root_snapshot_is_the_root_devices() -> None:
    image = {
        "ImageId": "ami-0123456789abcdef0",
        "RootDeviceName": "/dev/xvda",
        "BlockDeviceMappings": [_mapping("/dev/sdb", "snap-0bbbbbbbbbbbbbbbb"), _mapping("/dev/xvda", "snap-0aaaa")],
    }
    assert root_snapshot(image) == "snap-0aaaa"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ({"BlockDeviceMappings": [_mapping("/dev/xvda", "snap-0a")]}, "names no root device"),
        ({"RootDeviceName": "/dev/sda1", "BlockDeviceMappings": [_mapping("/dev/xvda", "snap-0a")]}, "mapped devices"),
        ({"RootDeviceName": "/dev/sda1", "BlockDeviceMappings": [_mapping("/dev/sda1")]}, "has no EBS snapshot"),
        ({"RootDeviceName": "/dev/sda1", "RootDeviceType": "instance-store"}, "mapped devices: none"),
    ],
    ids=["no-root-name", "root-not-mapped", "root-without-snapshot", "instance-store"],
)
def test_root_snapshot_refuses_an_image_without_one(image: dict[str, Any], message: str) -> None:
    with pytest.raises(NotFound, match=message):
        root_snapshot({"ImageId": "ami-0123456789abcdef0", **image})


# --- the emulation itself ---------------------------------------------------------------------------------------


def test_emulated_ebs_answers_like_aws(aws: Aws, ebs: EbsEmulation, disks: dict[str, Disk]) -> None:
    disk = disks["gpt"]
    image = _image(aws, ebs, disk.raw)
    assert image["RootDeviceName"] == "/dev/xvda" and image["RootDeviceType"] == "ebs"
    snapshot = root_snapshot(image)
    client: Any = aws.session.client("ebs")
    expected = list(data_blocks(disk.raw))
    assert expected and all(data != bytes(AWS_BLOCK_SIZE) for _, data in expected)

    answer = client.list_snapshot_blocks(SnapshotId=snapshot, MaxResults=100)
    assert answer["BlockSize"] == AWS_BLOCK_SIZE and answer["VolumeSize"] == 1 and "ExpiryTime" in answer
    assert [b["BlockIndex"] for b in answer["Blocks"]] == [i for i, _ in expected]  # ascending, written blocks only
    assert "NextToken" not in answer
    for listed, (index, data) in zip(answer["Blocks"], expected, strict=True):
        got = client.get_snapshot_block(SnapshotId=snapshot, BlockIndex=index, BlockToken=listed["BlockToken"])
        assert got["ChecksumAlgorithm"] == "SHA256" and got["DataLength"] == AWS_BLOCK_SIZE
        body = got["BlockData"].read()
        assert body == data
        assert got["Checksum"] == base64.b64encode(hashlib.sha256(body).digest()).decode()

    # Paging: MaxResults, a server cap, NextToken, StartingBlockIndex (ignored once a NextToken is given).
    ebs.page_cap = 2
    seen, token, pages = [], None, 0
    while True:
        page = client.list_snapshot_blocks(
            SnapshotId=snapshot, MaxResults=100, **({"NextToken": token} if token else {})
        )
        seen += [b["BlockIndex"] for b in page["Blocks"]]
        pages += 1
        token = page.get("NextToken")
        if not token:
            break
    assert seen == [i for i, _ in expected] and pages == -(-len(expected) // 2)
    ebs.page_cap = None
    later = client.list_snapshot_blocks(SnapshotId=snapshot, StartingBlockIndex=expected[2][0])
    assert [b["BlockIndex"] for b in later["Blocks"]] == [i for i, _ in expected[2:]]

    # AWS's errors instead of moto's KeyError; block tokens are checked.
    with pytest.raises(ClientError) as caught:
        client.list_snapshot_blocks(SnapshotId="snap-0123456789abcdef0")
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    with pytest.raises(ClientError) as caught:
        client.get_snapshot_block(SnapshotId=snapshot, BlockIndex=expected[0][0], BlockToken="AAAA")
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(ClientError) as caught:
        client.list_snapshot_blocks(SnapshotId=snapshot, NextToken="bm90IGEgdG9rZW4=")
    assert caught.value.response["Error"]["Code"] == "ValidationException"


def test_emulated_register_image_keeps_the_mappings_it_was_given(aws: Aws, ebs: EbsEmulation, tmp_path: Path) -> None:
    root = _volume(tmp_path / "root.raw")
    image = _image(aws, ebs, root, root_device="/dev/sda1", others={"/dev/sdb": root})
    assert image["Architecture"] == "x86_64" and image["RootDeviceName"] == "/dev/sda1"
    snapshots = [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"]]
    assert len(set(snapshots)) == 2
    ec2: Any = aws.ec2()
    # Only the registered snapshots exist: moto's own 15 GiB one is gone.
    assert sorted(s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]) == sorted(snapshots)
    # An all-zero volume has no written block, as on AWS.
    assert aws.session.client("ebs").list_snapshot_blocks(SnapshotId=snapshots[0])["Blocks"] == []


def test_data_blocks_skips_holes_and_zero_blocks(tmp_path: Path) -> None:
    raw = tmp_path / "sparse.raw"
    with raw.open("wb") as fh:
        fh.truncate(8 * AWS_BLOCK_SIZE + 100)
        fh.seek(AWS_BLOCK_SIZE * 3 + 7)
        fh.write(b"x")
        fh.seek(AWS_BLOCK_SIZE * 5)
        fh.write(bytes(AWS_BLOCK_SIZE))  # written zeros: not data
        fh.seek(8 * AWS_BLOCK_SIZE + 1)
        fh.write(b"tail")  # a short last block is padded to a whole block
    blocks = list(data_blocks(raw))
    assert [i for i, _ in blocks] == [3, 8]
    assert all(len(data) == AWS_BLOCK_SIZE for _, data in blocks)
    assert blocks[1][1][:5] == b"\0tail"


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    assert not [t for t in threading.enumerate() if t.name.startswith("amiforge-ebs")]
