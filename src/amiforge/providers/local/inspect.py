"""Read-only access to what a local artifact actually contains.

Scans must look at the bytes that ship, not at the layer cache they came from: the qcow2 is converted to a raw
image in a scratch dir and mounted read-only (`ro,noload`: not even the journal is replayed) from a loop device
inside a private mount namespace held by a child process (overlay.held_mount, as for the overlay views), so
nothing can leak a mount. The raw-bytes secret scan reads the free blocks of the raw copy (`free_ranges`): live
files are the tree scan's business, deleted data lies in free blocks.

`ext4_view` and `free_ranges` also serve the AWS provider (aws/snapshot.py), whose raw disk comes from an EBS snapshot
and may hold the ext4 root in a partition: both take the filesystem's byte offset in the raw file.
"""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from amiforge.errors import InfraError
from amiforge.model import Artifact, Leftover
from amiforge.providers.interface import ImageView
from amiforge.providers.local.overlay import held_mount
from amiforge.providers.local.tools import remove_or_report, run


@contextmanager
def open_image(artifact: Artifact, scratch_parent: Path) -> Iterator[ImageView]:
    disk = Path(artifact.location)
    if not disk.is_file():
        raise InfraError(
            f"the artifact's disk {disk} is missing from the local image store",
            fix="it was removed outside amiforge; bake the recipe again (a new version) to get a disk to scan",
        )
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="amiforge-inspect-", dir=scratch_parent))
    leftovers: list[Leftover] = []
    try:
        raw = scratch / "disk.raw"
        run(["qemu-img", "convert", "-O", "raw", disk, raw], what="qemu-img convert (for inspection)")
        mnt = scratch / "root"
        mnt.mkdir()
        with ext4_view(raw, mnt, f"{disk} read-only for inspection") as view:
            yield replace(view, leftovers=leftovers)
    except BaseException as e:
        remove_or_report(scratch, leftovers, in_flight=e)  # a raw copy of the whole disk: never left unsaid
        raise
    remove_or_report(scratch, leftovers)


@contextmanager
def ext4_view(raw: Path, mnt: Path, what: str, *, offset: int = 0, size: int | None = None) -> Iterator[ImageView]:
    """The ext4 filesystem starting `offset` bytes into the raw disk `raw` (`size` bytes long, or to the end),
    mounted read-only (`ro,noload`) at `mnt` inside a held private mount namespace, with its free blocks as byte
    ranges of `raw`. `what` names the disk in a mount error."""
    options = "ro,loop,noload"
    if offset:
        options += f",offset={offset}"
    if size is not None:
        options += f",sizelimit={size}"
    mount = f"mount -o {options} -t ext4 {shlex.quote(str(raw))} {shlex.quote(str(mnt))}"
    with held_mount(mount, mnt, what) as root:
        yield ImageView(root, raw, free_ranges(raw, offset=offset))


def free_ranges(raw: Path, *, offset: int = 0) -> tuple[tuple[int, int], ...]:
    """Byte ranges of `raw` that are free blocks of the ext4 filesystem starting `offset` bytes into it, from
    dumpe2fs (no mount needed; e2fsprogs reads a filesystem inside a larger file through its `?offset=` option)."""
    device = f"{raw}?offset={offset}" if offset else str(raw)
    out = run(["dumpe2fs", device], what="dumpe2fs (free blocks)")
    block = 4096
    ranges: list[tuple[int, int]] = []
    for line in out.splitlines():
        text = line.strip()
        if text.startswith("Block size:"):
            block = int(text.split(":", 1)[1])
        elif text.startswith("Free blocks:") and text[len("Free blocks:") :].strip()[:1].isdigit():
            for part in text.split(":", 1)[1].split(","):
                first, _, last = part.strip().partition("-")
                ranges.append((offset + int(first) * block, offset + (int(last or first) + 1) * block))
    return tuple(ranges)
