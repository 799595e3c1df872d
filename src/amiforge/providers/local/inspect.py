"""Read-only access to what a local artifact actually contains.

Scans must look at the bytes that ship, not at the layer cache they came from: the qcow2 is converted to a raw
image in a scratch dir and mounted read-only (`ro,noload`: not even the journal is replayed) from a loop device
inside a private mount namespace held by a child process (overlay.held_mount, as for the overlay views), so
nothing can leak a mount. The raw-bytes secret scan reads the free blocks of the raw copy (`free_ranges`): live
files are the tree scan's business, deleted data lies in free blocks.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from amiforge.errors import InfraError
from amiforge.model import Artifact
from amiforge.providers.interface import ImageView
from amiforge.providers.local.overlay import held_mount
from amiforge.providers.local.tools import run


@contextmanager
def open_image(artifact: Artifact, scratch_parent: Path) -> Iterator[ImageView]:
    disk = Path(artifact.location)
    if not disk.is_file():
        raise InfraError(f"the artifact's disk {disk} is missing from the local image store")
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="amiforge-inspect-", dir=scratch_parent))
    try:
        raw = scratch / "disk.raw"
        run(["qemu-img", "convert", "-O", "raw", disk, raw], what="qemu-img convert (for inspection)")
        mnt = scratch / "root"
        mnt.mkdir()
        mount = f"mount -o ro,loop,noload -t ext4 {shlex.quote(str(raw))} {shlex.quote(str(mnt))}"
        with held_mount(mount, mnt, f"{disk} read-only for inspection") as root:
            yield ImageView(root, raw, free_ranges(raw))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def free_ranges(raw: Path) -> tuple[tuple[int, int], ...]:
    """Byte ranges of an ext4 image's free blocks, from dumpe2fs (no mount needed)."""
    out = run(["dumpe2fs", raw], what="dumpe2fs (free blocks)")
    block = 4096
    ranges: list[tuple[int, int]] = []
    for line in out.splitlines():
        text = line.strip()
        if text.startswith("Block size:"):
            block = int(text.split(":", 1)[1])
        elif text.startswith("Free blocks:") and text[len("Free blocks:") :].strip()[:1].isdigit():
            for part in text.split(":", 1)[1].split(","):
                first, _, last = part.strip().partition("-")
                ranges.append((int(first) * block, (int(last or first) + 1) * block))
    return tuple(ranges)
