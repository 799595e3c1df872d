"""The busybox initrd: modules.dep parsing, load order, the newc writer (checked with the real GNU cpio) and
build_initrd against a fake image root."""

from __future__ import annotations

import gzip
import lzma
import stat
import subprocess
from pathlib import Path

import pytest

from amiforge.errors import InfraError
from amiforge.providers.guest import guest_file
from amiforge.providers.local.initrd import (
    ROOT_MODULES,
    NewcArchive,
    build_initrd,
    find_kernel,
    load_order,
    module_name,
    parse_modules_dep,
)
from amiforge.providers.local.tools import STATIC_BUSYBOX
from tests.conftest import required_or_skip

CPIO = Path("/usr/bin/cpio")


@pytest.fixture
def cpio_present() -> None:
    required_or_skip(CPIO.is_file(), "GNU cpio is not installed", "scripts/bootstrap.sh installs it (package cpio)")


@pytest.fixture
def busybox_present() -> None:
    required_or_skip(
        STATIC_BUSYBOX.is_file(), "no static busybox at /bin/busybox", "scripts/bootstrap.sh installs busybox-static"
    )


# Skipped where the tool is missing, failed in CI (tests/conftest.py).
needs_cpio = pytest.mark.usefixtures("cpio_present")
needs_busybox = pytest.mark.usefixtures("busybox_present")

# Shaped like a real 6.1 modules.dep: every dependency is listed (transitively), comments are not a thing, a
# line may have no dependencies at all, and some modules are xz-compressed.
MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/unrelated/unrelated-fs.ko: kernel/drivers/virtio/virtio.ko
"""


# --- modules.dep --------------------------------------------------------------------------------------------


def test_parse_modules_dep_maps_each_module_to_its_dependencies() -> None:
    deps = parse_modules_dep(MODULES_DEP + "\nnot a module line\n")

    assert deps["kernel/drivers/virtio/virtio_ring.ko"] == []
    assert deps["kernel/drivers/virtio/virtio.ko"] == ["kernel/drivers/virtio/virtio_ring.ko"]
    assert deps["kernel/drivers/block/virtio_blk.ko.xz"] == [
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    ]
    assert len(deps) == 7  # the line without ':' is ignored


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/drivers/block/virtio_blk.ko", "virtio_blk"),
        ("kernel/drivers/block/virtio_blk.ko.xz", "virtio_blk"),
        ("kernel/drivers/block/virtio_blk.ko.gz", "virtio_blk"),
        ("kernel/drivers/block/virtio_blk.ko.zst", "virtio_blk"),
        ("kernel/fs/unrelated/unrelated-fs.ko", "unrelated_fs"),  # '-' and '_' are the same to the kernel
        ("virtio_pci.ko", "virtio_pci"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_load_order_puts_every_dependency_before_its_dependants() -> None:
    deps = parse_modules_dep(MODULES_DEP)

    order = load_order(deps, ROOT_MODULES)

    assert [module_name(p) for p in order] == [
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_ring",
        "virtio",
        "virtio_pci",
        "virtio_blk",
    ]
    for i, path in enumerate(order):
        for dep in deps[path]:
            assert order.index(dep) < i, f"{dep} must load before {path}"
    assert "kernel/fs/unrelated/unrelated-fs.ko" not in order  # only what the root disk needs


def test_load_order_lists_a_diamond_dependency_once() -> None:
    # top -> left -> base, top -> right -> base: base is shared.
    deps = {
        "top.ko": ["left.ko", "right.ko"],
        "left.ko": ["base.ko"],
        "right.ko": ["base.ko"],
        "base.ko": [],
    }

    order = load_order(deps, ["top", "left", "right"])

    assert order == ["base.ko", "left.ko", "right.ko", "top.ko"]


def test_load_order_skips_a_built_in_module() -> None:
    # virtio_pci is built into this kernel (=y): modules.dep has no line for it, so nothing is loaded for it.
    deps = {
        "kernel/drivers/virtio/virtio_ring.ko": [],
        "kernel/drivers/block/virtio_blk.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
    }

    order = load_order(deps, ("virtio_pci", "virtio_blk"))

    assert order == ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/block/virtio_blk.ko"]
    assert load_order(deps, ("virtio_pci",)) == []


def test_load_order_matches_wanted_names_to_dashed_module_files() -> None:
    deps = parse_modules_dep("kernel/a/virtio-blk.ko.xz:\n")
    assert load_order(deps, ["virtio_blk"]) == ["kernel/a/virtio-blk.ko.xz"]


# --- the newc writer, checked by GNU cpio -------------------------------------------------------------------


def _cpio(archive: Path, *args: str) -> bytes:
    with archive.open("rb") as fh:
        proc = subprocess.run([str(CPIO), "--quiet", *args], stdin=fh, capture_output=True, check=True, timeout=10)
    return proc.stdout


def _cpio_names(archive: Path) -> list[str]:
    return _cpio(archive, "-t").decode().splitlines()


def _cpio_file(archive: Path, name: str) -> bytes:
    return _cpio(archive, "-i", "--to-stdout", name)


def _entry_modes(data: bytes) -> dict[str, int]:
    """name -> mode, read straight from the newc headers (independent of cpio's rendering)."""
    modes: dict[str, int] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at offset {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return modes
        modes[name] = mode


@needs_cpio
def test_newc_archive_lists_exactly_the_written_entries(tmp_path: Path) -> None:
    archive = NewcArchive()
    archive.dir("bin")
    archive.dir("modules")
    archive.file("bin/busybox", b"\x7fELF fake busybox", 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("modules/a.ko", b"")  # empty file: no data, no padding surprises
    archive.file("modules.order", b"a.ko\n")
    path = tmp_path / "a.cpio"
    data = archive.finish()
    path.write_bytes(data)

    assert _cpio_names(path) == ["bin", "modules", "bin/busybox", "bin/sh", "modules/a.ko", "modules.order"]
    modes = _entry_modes(data)
    assert modes["bin"] == stat.S_IFDIR | 0o755
    assert modes["bin/busybox"] == stat.S_IFREG | 0o755
    assert modes["bin/sh"] == stat.S_IFLNK | 0o777
    assert modes["modules.order"] == stat.S_IFREG | 0o644
    listing = _cpio(path, "-tv").decode()
    assert "bin/sh -> busybox" in listing


@needs_cpio
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 4095, 4097])
def test_newc_file_bytes_round_trip_through_cpio(tmp_path: Path, size: int) -> None:
    # Every length modulo 4 and every name length modulo 4 exercises the padding rules.
    payload = bytes((i * 37 + 11) % 256 for i in range(size))
    archive = NewcArchive()
    archive.file("x", b"before")
    archive.file("dir/payload.bin", payload, 0o600)
    archive.file("abcd", b"after!")
    path = tmp_path / "a.cpio"
    path.write_bytes(archive.finish())

    assert _cpio_file(path, "dir/payload.bin") == payload
    assert _cpio_file(path, "x") == b"before"
    assert _cpio_file(path, "abcd") == b"after!"


def test_newc_is_reproducible() -> None:
    def make() -> bytes:
        a = NewcArchive()
        a.dir("bin")
        a.file("init", b"#!/bin/sh\n", 0o755)
        return a.finish()

    assert make() == make()


# --- find_kernel / build_initrd -----------------------------------------------------------------------------

KVER = "6.1.0-test"


def _fake_rootfs(root: Path) -> dict[str, bytes]:
    """An image root with a kernel and a modules dir; returns module name -> its uncompressed bytes."""
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{KVER}").write_bytes(b"fake kernel")
    moddir = root / "lib" / "modules" / KVER
    modules = {
        "virtio_ring": b"\x7fELF virtio_ring " + bytes(range(256)),
        "virtio": b"\x7fELF virtio",
        "virtio_pci": b"\x7fELF virtio_pci " * 3,
        "virtio_blk": b"\x7fELF virtio_blk, shipped as .ko.xz " + bytes(range(200)),
        "unrelated": b"\x7fELF not needed to mount the root",
    }
    files = {
        "virtio_ring": "kernel/drivers/virtio/virtio_ring.ko",
        "virtio": "kernel/drivers/virtio/virtio.ko",
        "virtio_pci": "kernel/drivers/virtio/virtio_pci.ko",
        "virtio_blk": "kernel/drivers/block/virtio_blk.ko.xz",
        "unrelated": "kernel/fs/unrelated.ko",
    }
    for name, rel in files.items():
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        data = lzma.compress(modules[name]) if rel.endswith(".xz") else modules[name]
        (moddir / rel).write_bytes(data)
    v = "kernel/drivers/virtio"
    (moddir / "modules.dep").write_text(
        f"{v}/virtio_ring.ko:\n"
        f"{v}/virtio.ko: {v}/virtio_ring.ko\n"
        f"{v}/virtio_pci.ko: {v}/virtio.ko {v}/virtio_ring.ko\n"
        f"kernel/drivers/block/virtio_blk.ko.xz: {v}/virtio.ko {v}/virtio_ring.ko\n"
        "kernel/fs/unrelated.ko:\n"
    )
    return modules


def test_find_kernel_picks_the_newest_by_version_not_by_spelling(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    for v in ("6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64", "6.1.0-2-cloud-amd64"):
        (tmp_path / "boot" / f"vmlinuz-{v}").write_bytes(b"k")
    (tmp_path / "boot" / "config-6.1.0-99-cloud-amd64").write_text("not a kernel")

    kernel, version = find_kernel(tmp_path)

    assert version == "6.1.0-10-cloud-amd64"
    assert kernel == tmp_path / "boot" / "vmlinuz-6.1.0-10-cloud-amd64"


def test_find_kernel_without_a_kernel_is_an_infra_error(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(InfraError, match="no kernel"):
        find_kernel(tmp_path)


@needs_cpio
@needs_busybox
def test_build_initrd_from_a_fake_image(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    modules = _fake_rootfs(root)
    out = tmp_path / "initrd"

    loaded = build_initrd(root, out)

    assert loaded == ["virtio_ring", "virtio", "virtio_pci", "virtio_blk"]
    assert not out.with_suffix(".tmp").exists()
    raw = gzip.decompress(out.read_bytes())
    cpio = tmp_path / "initrd.cpio"
    cpio.write_bytes(raw)
    names = _cpio_names(cpio)
    assert names == [
        "bin",
        "modules",
        "proc",
        "sys",
        "dev",
        "newroot",
        "bin/busybox",
        "bin/sh",
        "init",
        "modules/virtio_ring.ko",
        "modules/virtio.ko",
        "modules/virtio_pci.ko",
        "modules/virtio_blk.ko",
        "modules.order",
    ]
    assert _cpio_file(cpio, "modules.order") == b"virtio_ring.ko\nvirtio.ko\nvirtio_pci.ko\nvirtio_blk.ko\n"
    assert _cpio_file(cpio, "init") == guest_file("init")
    assert _cpio_file(cpio, "bin/busybox") == STATIC_BUSYBOX.read_bytes()
    for name in ("virtio_ring", "virtio", "virtio_pci"):
        assert _cpio_file(cpio, f"modules/{name}.ko") == modules[name]
    # busybox insmod cannot decompress: the .ko.xz goes in decompressed.
    assert _cpio_file(cpio, "modules/virtio_blk.ko") == modules["virtio_blk"]
    modes = _entry_modes(raw)
    assert modes["init"] == stat.S_IFREG | 0o755
    assert modes["bin/busybox"] == stat.S_IFREG | 0o755


@needs_busybox
def test_build_initrd_is_reproducible(tmp_path: Path) -> None:
    _fake_rootfs(tmp_path / "rootfs")
    build_initrd(tmp_path / "rootfs", tmp_path / "one")
    build_initrd(tmp_path / "rootfs", tmp_path / "two")
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()


@needs_busybox
def test_build_initrd_without_modules_dep_is_an_infra_error(tmp_path: Path) -> None:
    _fake_rootfs(tmp_path / "rootfs")
    (tmp_path / "rootfs" / "lib" / "modules" / KVER / "modules.dep").unlink()
    with pytest.raises(InfraError, match=f"no modules.dep for kernel {KVER}"):
        build_initrd(tmp_path / "rootfs", tmp_path / "initrd")
    assert not (tmp_path / "initrd").exists()


@needs_busybox
def test_build_initrd_refuses_zstd_modules(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{KVER}").write_bytes(b"k")
    moddir = root / "lib" / "modules" / KVER
    (moddir / "kernel").mkdir(parents=True)
    (moddir / "kernel" / "virtio_blk.ko.zst").write_bytes(b"(zstd)")
    (moddir / "modules.dep").write_text("kernel/virtio_blk.ko.zst:\n")
    with pytest.raises(InfraError, match="zstd"):
        build_initrd(root, tmp_path / "initrd")
