"""Read-only access to the bytes an AMI ships, read from its root snapshot through the EBS direct APIs.

Why these APIs: the scanners then read exactly the bytes the image ships — every file *and* the free blocks where
deleted data lingers — with no instance to boot, no volume to create and attach, and nothing to clean up in the
account. It works for any image whose snapshot the caller may read, including images amiforge did not bake.

How: `ListSnapshotBlocks` (paged by NextToken; botocore has no paginator for it, so the loop is here) names every block
that holds written data, with a token each; `GetSnapshotBlock` returns one block's bytes with a base64 SHA256
checksum, verified before the bytes are kept (a block that fails is fetched again, then the scan fails naming it).
Blocks are fetched by a thread pool (`workers`, a bounded number in flight) and written at index × BlockSize into a
sparse raw file of the volume's size in a scratch dir; unlisted blocks stay holes, which read as the zeros AWS would
serve. The root filesystem — ext4 on the whole disk, or the largest ext4 partition of a GPT or MBR table (Debian's
cloud images: 1 root, 14 BIOS boot, 15 EFI) — is then mounted read-only exactly as the local provider mounts its
images (local/inspect.py `ext4_view`), and its free blocks are reported as byte ranges of the raw file. Other root
filesystems (XFS: Amazon Linux, RHEL) are refused for now, by name.

Cost: one `GetSnapshotBlock` per 512 KiB block of *written* data (a root with 2 GiB written: 4,096 requests, about
2 GiB transferred) plus one `ListSnapshotBlocks` per 10,000 blocks; both are billed per request (EBS pricing page),
empty space costs nothing. Throttling (RequestThrottledException) is retried by botocore's standard mode (clients.py).

AWS limits: only `completed` snapshots can be read (wait for the image to be `available`); public snapshots are not
served at all — copy a public image into the account first (CopyImage) and scan the copy. Block tokens live 7 days and
page tokens 60 minutes, far longer than a listing takes.

IAM: `ebs:ListSnapshotBlocks` and `ebs:GetSnapshotBlock` on the snapshot (arn:aws:ec2:<region>::snapshot/<id>), plus
`kms:Decrypt` on the snapshot's KMS key when it is encrypted.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError

from amiforge.awsapi.clients import AwsSession, call
from amiforge.errors import ConfigError, InfraError, NotFound
from amiforge.model import Leftover
from amiforge.providers.interface import ImageView
from amiforge.providers.local.inspect import ext4_view
from amiforge.providers.local.tools import remove_or_report, run

__all__ = ["BLOCK_SIZE", "open_ami", "root_filesystem", "root_snapshot"]

# EBS direct APIs' block size (ListSnapshotBlocks answers it; this is what AWS has always answered).
BLOCK_SIZE = 512 * 1024
_GIB = 1 << 30
# ListSnapshotBlocks' MaxResults ceiling: the fewest listing calls.
_LIST_PAGE = 10_000
# Fetches in flight per worker: keeps every worker busy while capping memory at about workers × 4 × 512 KiB.
_IN_FLIGHT_PER_WORKER = 4
# Tries per block when the bytes arrive damaged (checksum mismatch, broken stream); botocore retries the call itself.
_BLOCK_ATTEMPTS = 3
_SECTOR = 512  # partx reports partition starts and sizes in 512-byte sectors

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Listing:
    snapshot_id: str
    volume_bytes: int
    block_size: int
    blocks: tuple[tuple[int, str], ...]  # (index, token), ascending


def root_snapshot(image: Mapping[str, Any]) -> str:
    """The snapshot behind the root device of `image` (a DescribeImages entry)."""
    image_id = str(image.get("ImageId") or "the image")
    root = image.get("RootDeviceName")
    mappings = image.get("BlockDeviceMappings") or []
    devices = ", ".join(str(m.get("DeviceName")) for m in mappings) or "none"
    if not root:
        raise NotFound(f"{image_id} names no root device (RootDeviceName)", fix="describe the image again")
    for mapping in mappings:
        if mapping.get("DeviceName") == root:
            snapshot = (mapping.get("Ebs") or {}).get("SnapshotId")
            if not snapshot:
                raise NotFound(
                    f"{image_id}'s root device {root} has no EBS snapshot (an instance-store image?)",
                    fix="only EBS-backed images can be read through the EBS direct APIs",
                )
            return str(snapshot)
    raise NotFound(
        f"{image_id} has no block device mapping for its root device {root} (mapped devices: {devices})",
        fix="describe the image again; an image without its root mapping cannot be scanned",
    )


def _list_blocks(client: Any, snapshot_id: str) -> _Listing:
    """Every written block of the snapshot, following NextToken until AWS sends none (a page may be short or empty)."""
    blocks: list[tuple[int, str]] = []
    volume_gib = block_size = None
    token: str | None = None
    while True:
        paging = {"NextToken": token} if token else {}
        page = call(client, "ListSnapshotBlocks", snapshot_id, SnapshotId=snapshot_id, MaxResults=_LIST_PAGE, **paging)
        if volume_gib is None:
            volume_gib, block_size = page.get("VolumeSize"), page.get("BlockSize")
        blocks += [(int(b["BlockIndex"]), str(b["BlockToken"])) for b in page.get("Blocks", [])]
        following = page.get("NextToken")
        if not following:
            break
        if following == token:
            raise InfraError(
                f"ebs:ListSnapshotBlocks on {snapshot_id} answered the same NextToken twice", retryable=True
            )
        token = following
    if not volume_gib or not block_size or int(volume_gib) <= 0 or int(block_size) <= 0:
        raise InfraError(
            f"ebs:ListSnapshotBlocks on {snapshot_id} answered VolumeSize={volume_gib!r} BlockSize={block_size!r}",
            fix="AWS answered no usable volume or block size; report it",
        )
    volume_bytes, size = int(volume_gib) * _GIB, int(block_size)
    outside = [index for index, _ in blocks if index < 0 or (index + 1) * size > volume_bytes]
    if outside:
        raise InfraError(f"{snapshot_id} lists block {outside[0]}, outside its {volume_gib} GiB volume")
    return _Listing(snapshot_id, volume_bytes, size, tuple(sorted(blocks)))


def _fetch_block(client: Any, snapshot_id: str, index: int, token: str, block_size: int) -> bytes:
    """One block's bytes, verified against the SHA256 checksum AWS sends with them."""
    where = f"block {index} of {snapshot_id}"
    problem = ""
    for _attempt in range(_BLOCK_ATTEMPTS):
        answer = call(client, "GetSnapshotBlock", where, SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
        body = answer["BlockData"]
        try:
            data = bytes(body.read())
        except BotoCoreError as e:  # the connection broke while the body streamed: worth another try
            problem = f"the transfer broke ({type(e).__name__}: {e})"
            continue
        finally:
            body.close()
        algorithm, checksum = answer.get("ChecksumAlgorithm"), answer.get("Checksum")
        if algorithm != "SHA256" or not checksum:
            # AWS always sends one; bytes that cannot be verified are not scanned as if they were the image.
            raise InfraError(
                f"{where}: no SHA256 checksum in the answer (algorithm {algorithm!r}), so its bytes cannot be verified",
                fix="report it: GetSnapshotBlock is documented to return a base64 SHA256 checksum for every block",
            )
        length = answer.get("DataLength")
        actual = base64.b64encode(hashlib.sha256(data).digest()).decode()
        if length is not None and len(data) != int(length):
            problem = f"{len(data)} bytes arrived, DataLength says {length}"
        elif len(data) > block_size:
            problem = f"{len(data)} bytes arrived for a {block_size}-byte block"
        elif actual != checksum:
            problem = f"checksum mismatch (SHA256 {actual}, AWS says {checksum})"
        else:
            return data
    raise InfraError(
        f"{where}: {problem}, {_BLOCK_ATTEMPTS} times",
        retryable=True,
        fix="re-run the scan; if the same block fails again, the snapshot cannot be read intact: report it to AWS",
    )


def _download(client: Any, listing: _Listing, raw: Path, workers: int, progress: Progress | None) -> None:
    """Write every listed block into `raw` (already the volume's size, sparse). Workers fetch and verify; this thread
    writes, so no file descriptor is shared with a thread that might outlive the download."""
    total = len(listing.blocks)
    done = 0
    zeros = bytes(listing.block_size)
    if progress is not None:
        progress(0, total)
    pending: set[Future[tuple[int, bytes]]] = set()

    def fetch(index: int, token: str) -> tuple[int, bytes]:
        return index, _fetch_block(client, listing.snapshot_id, index, token, listing.block_size)

    def write(finished: set[Future[tuple[int, bytes]]]) -> None:
        nonlocal done
        for future in finished:
            index, data = future.result()
            if data != zeros[: len(data)]:  # a block of zeros stays a hole: same bytes, no disk used
                os.pwrite(fd, data, index * listing.block_size)
            done += 1
            if progress is not None:
                progress(done, total)

    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="amiforge-ebs")
    fd = os.open(raw, os.O_WRONLY)
    try:
        for index, token in listing.blocks:
            if len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                write(finished)
            pending.add(executor.submit(fetch, index, token))
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            write(finished)
    finally:
        # On an error or Ctrl-C: queued fetches are dropped, running ones finish (one call each), then nothing
        # is left that could touch the file.
        executor.shutdown(wait=True, cancel_futures=True)
        os.close(fd)


# Filesystems recognised by their magic, to refuse a root by name: (name, offset, magic).
_MAGICS = (
    ("xfs", 0, b"XFSB"),
    ("btrfs", 0x10040, b"_BHRfS_M"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("LVM2 physical volume", 0x218, b"LVM2 001"),
    ("swap", 4086, b"SWAPSPACE2"),
    ("vfat", 82, b"FAT32   "),
    ("vfat", 54, b"FAT1"),
)
_EXT_MAGIC = (1024 + 56, b"\x53\xef")  # ext2/3/4 superblock s_magic 0xEF53, little-endian
_UNSUPPORTED_FIX = (
    "only ext4 root filesystems can be scanned from a snapshot yet (Debian and Ubuntu images); "
    "XFS roots (Amazon Linux, RHEL) are not supported yet"
)


def _read(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def _is_ext4(fd: int, offset: int) -> bool:
    return _read(fd, offset + _EXT_MAGIC[0], 2) == _EXT_MAGIC[1]


def _filesystem_name(fd: int, offset: int) -> str | None:
    for name, at, magic in _MAGICS:
        if _read(fd, offset + at, len(magic)) == magic:
            return name
    return None


def _partitions(raw: Path) -> list[tuple[int, int, int]]:
    """(number, byte offset, byte size) of every partition in `raw`'s table (GPT or MBR), from util-linux partx."""
    out = run(["partx", "--raw", "--noheadings", "--output", "NR,START,SECTORS", raw], what="partx (partition table)")
    parts = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            number, start, sectors = (int(f) for f in fields)
            parts.append((number, start * _SECTOR, sectors * _SECTOR))
    return parts


def root_filesystem(raw: Path, label: str) -> tuple[int, int | None]:
    """(byte offset, byte size or None for "to the end") of the ext4 root filesystem in the raw disk `raw`.

    Whole-disk ext4 first; else the largest ext4 partition of its partition table. Anything else is refused with
    what was found. `label` names the disk in errors (the snapshot id)."""
    fd = os.open(raw, os.O_RDONLY)
    try:
        if _is_ext4(fd, 0):
            return 0, None
        whole = _filesystem_name(fd, 0)
        if whole is not None:
            raise InfraError(f"{label} holds a whole-disk {whole} filesystem, not ext4", fix=_UNSUPPORTED_FIX)
        if _read(fd, 510, 2) != b"\x55\xaa":
            raise InfraError(
                f"{label} holds neither an ext4 filesystem nor a partition table (GPT or MBR)",
                fix="check that this is the image's root snapshot; " + _UNSUPPORTED_FIX,
            )
        disk_size = os.fstat(fd).st_size
        found: list[str] = []
        candidates: list[tuple[int, int, int]] = []
        for number, offset, size in _partitions(raw):
            if size <= 0 or offset + size > disk_size:
                found.append(f"partition {number}: beyond the end of the disk")
            elif _is_ext4(fd, offset):
                candidates.append((size, offset, number))
            else:
                found.append(f"partition {number}: {_filesystem_name(fd, offset) or 'no filesystem recognised'}")
    finally:
        os.close(fd)
    if not candidates:
        what = "; ".join(found) or "no partitions"
        raise InfraError(f"{label} has no ext4 partition ({what})", fix=_UNSUPPORTED_FIX)
    size, offset, _number = max(candidates)
    return offset, size


@contextmanager
def open_ami(
    session: AwsSession,
    region: str,
    image: Mapping[str, Any],
    scratch_parent: Path,
    *,
    workers: int = 8,
    progress: Progress | None = None,
) -> Iterator[ImageView]:
    """A read-only view of the root filesystem of `image` (a DescribeImages entry in `region`) and of the raw bytes
    of its root volume, read through the EBS direct APIs into a scratch dir under `scratch_parent`.

    The view's `unallocated` ranges are the root filesystem's free blocks as byte ranges of `raw`. Everything is
    gone when the context ends, however it ends. `progress(blocks done, blocks total)` follows the download."""
    if workers < 1:
        raise ConfigError(f"workers is {workers}; it must be at least 1")
    snapshot_id = root_snapshot(image)
    client = session.client("ebs", region)
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="amiforge-ami-", dir=scratch_parent))
    leftovers: list[Leftover] = []
    try:
        listing = _list_blocks(client, snapshot_id)
        raw = scratch / "disk.raw"
        with raw.open("wb") as fh:
            fh.truncate(listing.volume_bytes)  # sparse: only written blocks take space
        _download(client, listing, raw, workers, progress)
        offset, size = root_filesystem(raw, snapshot_id)
        mnt = scratch / "root"
        mnt.mkdir()
        image_id = image.get("ImageId") or "the image"
        with ext4_view(raw, mnt, f"{image_id}'s root ({snapshot_id}) read-only", offset=offset, size=size) as view:
            yield replace(view, leftovers=leftovers)
    except BaseException as e:
        remove_or_report(scratch, leftovers, in_flight=e)  # a raw copy of the whole volume: never left unsaid
        raise
    remove_or_report(scratch, leftovers)
