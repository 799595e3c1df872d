"""From layers to a bootable artifact: kernel + initrd + ext4 root (mkfs.ext4 -d, no loop device) → qcow2
in the local image store, `<data>/regions/<region>/<name>/<digest>.{qcow2,vmlinuz,initrd}`.

A filesystem made from a directory never carries deleted data, and with a UUID, hash seed and timestamps
derived from the layer key the same layers give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from amiforge.inputs import file_sha256
from amiforge.model import Artifact
from amiforge.providers.interface import PhaseUpdate, RunContext
from amiforge.providers.local.initrd import build_initrd, find_kernel
from amiforge.providers.local.overlay import overlay_view
from amiforge.providers.local.tools import run, temporary_dir, tree_size, write_atomic

# Fixed timestamp for everything mkfs writes (e2fsprogs honours E2FSPROGS_FAKE_TIME).
EPOCH = "1700000000"
MIN_DISK = 2 << 30


@dataclass(frozen=True)
class DiskImage:
    qcow2: Path
    kernel: Path
    initrd: Path
    digest: str
    size_bytes: int

    def artifact(self, region: str) -> Artifact:
        return Artifact(
            provider="local",
            region=region,
            location=str(self.qcow2),
            digest=self.digest,
            size_bytes=self.size_bytes,
            kernel=str(self.kernel),
            initrd=str(self.initrd),
        )


def _timed(ctx: RunContext, name: str, started: float, detail: str = "") -> None:
    ctx.phase_done(name, time.monotonic() - started, detail)


def cached_image(cache: Path, top_key: str, log: Callable[[str], None]) -> DiskImage | None:
    """The image already made from exactly these layers, if its files are still in the store with the bytes they
    were made with. Anything else — no record, a damaged record, a missing file, a file whose bytes changed since
    (bit rot, a hand edit, tampering) — is a cache miss, and the disk is built again, never reused as it is."""
    record = cache / "images" / f"{top_key}.json"
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        image = DiskImage(
            Path(data["qcow2"]), Path(data["kernel"]), Path(data["initrd"]), data["digest"], int(data["size_bytes"])
        )
        expected = {image.qcow2: image.digest, image.kernel: data["kernel_digest"], image.initrd: data["initrd_digest"]}
    except (ValueError, KeyError, TypeError):
        # Damaged, or written before the kernel and initrd digests were recorded: build again.
        log(f"disk cache record {record.name} is unreadable or incomplete; building the disk again")
        return None
    for path, digest in expected.items():
        if not path.is_file():
            return None
        if file_sha256(path) != digest:
            log(f"cached {path} no longer has the bytes it was made with (sha256 {digest[:16]}…); building it again")
            return None
    return image


def build_disk(lowers: Sequence[Path], top_key: str, cache: Path, store_dir: Path, ctx: RunContext) -> DiskImage:
    """Make the disk image of the merged layers and put it in `store_dir` (one image name in one region)."""
    scratch = temporary_dir(ctx.cleanup, "amiforge-disk-", cache)
    fs_uuid = str(uuid.UUID(top_key[:32]))
    with overlay_view(lowers, scratch) as root:
        started = time.monotonic()
        ctx.progress(PhaseUpdate("initrd", "start"))
        kernel_src, version = find_kernel(root)
        shutil.copyfile(kernel_src, scratch / "vmlinuz")
        modules = build_initrd(root, scratch / "initrd")
        _timed(ctx, "initrd", started, f"kernel {version}, {len(modules)} modules")

        started = time.monotonic()
        ctx.progress(PhaseUpdate("mkfs", "start"))
        used = tree_size(root)
        disk_size = max(MIN_DISK, (used * 2 + (256 << 20)) // (1 << 20) * (1 << 20))
        raw = scratch / "root.raw"
        run(
            [
                "mkfs.ext4", "-q", "-F", "-d", root, "-L", "root", "-U", fs_uuid,
                "-E", f"hash_seed={fs_uuid}", "-b", "4096", raw, str(disk_size // 1024) + "k",
            ],
            log=ctx.log,
            env={"E2FSPROGS_FAKE_TIME": EPOCH},
            what="mkfs.ext4",
        )  # fmt: skip
        _timed(ctx, "mkfs", started, f"{used >> 20} MiB used of {disk_size >> 20} MiB")

    started = time.monotonic()
    ctx.progress(PhaseUpdate("convert", "start"))
    qcow2 = scratch / "root.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2], log=ctx.log, what="qemu-img convert")
    raw.unlink()
    digest = file_sha256(qcow2)
    _timed(ctx, "convert", started, f"sha256:{digest[:12]}")

    store_dir.mkdir(parents=True, exist_ok=True)
    image = DiskImage(
        store_dir / f"{digest}.qcow2",
        store_dir / f"{digest}.vmlinuz",
        store_dir / f"{digest}.initrd",
        digest,
        qcow2.stat().st_size,
    )
    # Kernel and initrd first, the disk last: a present .qcow2 means a complete artifact.
    os.replace(scratch / "vmlinuz", image.kernel)
    os.replace(scratch / "initrd", image.initrd)
    os.replace(qcow2, image.qcow2)
    for p in (image.qcow2, image.kernel, image.initrd):
        p.chmod(0o444)  # artifacts are never written; every boot runs on a throw-away overlay
    record = cache / "images" / f"{top_key}.json"
    write_atomic(
        record,
        json.dumps(
            {
                "qcow2": str(image.qcow2),
                "kernel": str(image.kernel),
                "initrd": str(image.initrd),
                "digest": digest,
                "size_bytes": image.size_bytes,
                "kernel_digest": file_sha256(image.kernel),
                "initrd_digest": file_sha256(image.initrd),
            }
        ),
    )
    return image
