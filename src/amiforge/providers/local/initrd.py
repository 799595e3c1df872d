"""A 1 MB busybox initrd built from the image's own kernel modules.

It loads just what mounting /dev/vda needs, in the dependency order read from the image's modules.dep
(never hard-coded: the order changed between 6.1 kernel builds), and switch_roots into the image.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from amiforge.errors import InfraError
from amiforge.imagefs import inside, read_inside
from amiforge.providers.guest import guest_file
from amiforge.providers.local.tools import STATIC_BUSYBOX, require

# What the initrd must load to see the root disk; their dependencies are added from modules.dep.
ROOT_MODULES = ("virtio_pci", "virtio_blk")


def _version_key(name: str) -> list[int | str]:
    # Digit runs compare as numbers: 6.1.0-10 is newer than 6.1.0-9 (a plain string sort says the opposite).
    # re.split with a group alternates text and digits, so equal positions always hold equal types.
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def find_kernel(rootfs: Path) -> tuple[Path, str]:
    """The image's kernel and its version (the newest, if several are installed)."""
    boot = inside(rootfs, "/boot")
    names = sorted((p.name for p in boot.glob("vmlinuz-*")), key=_version_key)
    # Each resolved within the image: a vmlinuz symlink to a host file must not be copied into the store.
    found = [(n, inside(rootfs, f"/boot/{n}")) for n in names]
    kernels = [(n, k) for n, k in found if k.is_file() and not k.is_symlink()]
    if not kernels:
        raise InfraError(
            "the image has no kernel in /boot",
            fix="keep linux-image-cloud-amd64 installed (the base layer includes it)",
        )
    name, kernel = kernels[-1]
    return kernel, name.removeprefix("vmlinuz-")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep lines: `path/name.ko: dep1.ko dep2.ko` -> {path: [deps]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            return base.removesuffix(suffix).replace("-", "_")
    return base


def load_order(deps: dict[str, list[str]], wanted: Iterable[str]) -> list[str]:
    """Module paths in an order where every module comes after all of its dependencies."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            # Built into the kernel (=y) rather than a module: nothing to load.
            continue
        visit(by_name[name])
    return order


def _read_module(path: str, data: bytes) -> bytes:
    # busybox insmod cannot decompress; newer Debian kernels ship .ko.xz.
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        raise InfraError(f"zstd-compressed kernel modules are not supported yet ({path.rsplit('/', 1)[-1]})")
    return data


class NewcArchive:
    """Writes a cpio archive in the `newc` format the kernel unpacks, with fixed metadata (reproducible)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        namez = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
        header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        self.buf.write(header + namez)
        self.buf.write(b"\0" * (-(len(header) + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initrd(rootfs: Path, out: Path) -> list[str]:
    """Write a gzip'd newc initrd for the image at `rootfs` to `out`; return the modules it loads."""
    require("busybox")
    if not STATIC_BUSYBOX.is_file():
        raise InfraError("a static busybox is needed at /bin/busybox", fix="apt-get install busybox-static")
    _, version = find_kernel(rootfs)
    moddir = f"/lib/modules/{version}"
    try:
        dep_text = read_inside(rootfs, f"{moddir}/modules.dep").decode()
    except (FileNotFoundError, NotADirectoryError):
        dep_text = None
    if dep_text is None:
        raise InfraError(f"the image has no modules.dep for kernel {version}")
    order = load_order(parse_modules_dep(dep_text), ROOT_MODULES)
    archive = NewcArchive()
    for d in ("bin", "modules", "proc", "sys", "dev", "newroot"):
        archive.dir(d)
    archive.file("bin/busybox", STATIC_BUSYBOX.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", guest_file("init"), 0o755)
    names = []
    for path in order:
        name = module_name(path) + ".ko"
        names.append(name)
        if path.startswith("/") or ".." in path.split("/"):
            raise InfraError(f"modules.dep names {path!r}, outside the kernel's module directory")
        archive.file(f"modules/{name}", _read_module(path, read_inside(rootfs, f"{moddir}/{path}")))
    archive.file("modules.order", ("\n".join(names) + "\n").encode())
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    os.replace(tmp, out)
    return [module_name(p) for p in order]
