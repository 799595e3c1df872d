"""Reading an image's files never follows a symlink out of the image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amiforge.errors import ConfigError
from amiforge.imagefs import read_inside
from amiforge.providers.local.initrd import find_kernel
from amiforge.scanners.sbom import read_dpkg_status

HOST_SECRET = "TEST-host-only-content"


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    outside = tmp_path / "host" / "credentials"
    outside.parent.mkdir()
    outside.write_text(HOST_SECRET)
    return outside


def test_an_absolute_symlink_resolves_inside_the_image(tmp_path: Path, host_file: Path) -> None:
    root = tmp_path / "root"
    (root / "var/lib/dpkg").mkdir(parents=True)
    # Inside the image this points at the image's own copy of that path, which does not exist.
    os.symlink(str(host_file), root / "var/lib/dpkg/status")
    with pytest.raises(ConfigError) as e:
        read_dpkg_status(root)
    assert HOST_SECRET not in e.value.diagnostics()
    # The same absolute path inside the image is what a read would see.
    inner = root / str(host_file).lstrip("/")
    inner.parent.mkdir(parents=True)
    inner.write_text("Package: x\nStatus: install ok installed\nVersion: 1\nArchitecture: all\n")
    assert [p.name for p in read_dpkg_status(root)] == ["x"]


def test_a_relative_symlink_climbing_out_is_refused(tmp_path: Path, host_file: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("../../host/credentials", root / "etc/creds")
    with pytest.raises(ConfigError):
        read_inside(root, "/etc/creds")


def test_a_kernel_symlink_to_a_host_file_is_not_a_kernel(tmp_path: Path, host_file: Path) -> None:
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    os.symlink(str(host_file), root / "boot/vmlinuz-9.9.9-test")
    with pytest.raises(Exception) as e:
        find_kernel(root)
    assert "no kernel" in str(e.value)
    (root / "boot/vmlinuz-6.1.0-test").write_bytes(b"TEST kernel")
    kernel, version = find_kernel(root)
    assert version == "6.1.0-test" and kernel.read_bytes() == b"TEST kernel"
