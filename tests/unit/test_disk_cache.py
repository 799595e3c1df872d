"""The local provider's disk cache: a cached disk is reused only with the bytes it was made with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from amiforge.providers.local.disk import DiskImage, cached_image

KEY = "f" * 64


def _cached(tmp_path: Path, **record_changes: object) -> tuple[Path, DiskImage]:
    """A disk image in the store and its cache record, as build_disk leaves them."""
    store = tmp_path / "regions" / "local" / "web"
    store.mkdir(parents=True)
    files = {"qcow2": b"qcow2 bytes" * 100, "vmlinuz": b"kernel bytes", "initrd": b"initrd bytes"}
    digests = {suffix: hashlib.sha256(data).hexdigest() for suffix, data in files.items()}
    for suffix, data in files.items():
        (store / f"{digests['qcow2']}.{suffix}").write_bytes(data)
    image = DiskImage(
        store / f"{digests['qcow2']}.qcow2",
        store / f"{digests['qcow2']}.vmlinuz",
        store / f"{digests['qcow2']}.initrd",
        digests["qcow2"],
        len(files["qcow2"]),
    )
    cache = tmp_path / "cache"
    record = {
        "qcow2": str(image.qcow2),
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "digest": image.digest,
        "size_bytes": image.size_bytes,
        "kernel_digest": digests["vmlinuz"],
        "initrd_digest": digests["initrd"],
    } | record_changes
    (cache / "images").mkdir(parents=True)
    (cache / "images" / f"{KEY}.json").write_text(json.dumps(record))
    return cache, image


def test_an_intact_cached_disk_is_reused(tmp_path: Path) -> None:
    cache, image = _cached(tmp_path)
    lines: list[str] = []
    assert cached_image(cache, KEY, lines.append) == image
    assert lines == []


@pytest.mark.parametrize("which", ["qcow2", "kernel", "initrd"])
def test_a_cached_file_whose_bytes_changed_is_a_miss(tmp_path: Path, which: str) -> None:
    cache, image = _cached(tmp_path)
    path = {"qcow2": image.qcow2, "kernel": image.kernel, "initrd": image.initrd}[which]
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF  # one flipped bit: bit rot, a hand edit, a tamper test
    path.write_bytes(bytes(data))
    lines: list[str] = []
    assert cached_image(cache, KEY, lines.append) is None
    assert len(lines) == 1 and str(path) in lines[0] and "building it again" in lines[0]


def test_a_missing_file_or_a_damaged_or_old_record_is_a_miss(tmp_path: Path) -> None:
    cache, image = _cached(tmp_path / "a")
    image.initrd.unlink()
    assert cached_image(cache, KEY, lambda _l: None) is None
    cache, _ = _cached(tmp_path / "b", kernel_digest=None, initrd_digest=None)
    old = json.loads((cache / "images" / f"{KEY}.json").read_text())
    del old["kernel_digest"], old["initrd_digest"]  # written before the digests were recorded
    (cache / "images" / f"{KEY}.json").write_text(json.dumps(old))
    assert cached_image(cache, KEY, lambda _l: None) is None
    (cache / "images" / f"{KEY}.json").write_text("{not json")
    assert cached_image(cache, KEY, lambda _l: None) is None
    assert cached_image(cache, "0" * 64, lambda _l: None) is None  # never made
