"""scan_raw limited to byte ranges (free blocks) and sparse-file holes."""

from __future__ import annotations

from pathlib import Path

from amiforge.scanners.secrets import data_extents, scan_raw
from amiforge.scanners.secrets.raw import intersect_ranges

KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ" * 8 + b"\n"


def test_intersect_of_sorted_ranges() -> None:
    assert intersect_ranges([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
    assert intersect_ranges([(0, 10)], [(10, 20)]) == []
    assert intersect_ranges([(0, 100)], [(10, 20), (30, 40)]) == [(10, 20), (30, 40)]


def test_only_the_given_ranges_are_scanned(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 8192 + KEY + b"\0" * 8192)
    at = 8192
    assert len(scan_raw(disk)) == 1
    assert len(scan_raw(disk, ranges=[(0, 8192)])) == 0  # the key's block is "allocated": not ours to scan
    (hit,) = scan_raw(disk, ranges=[(4096, 4096 * 4)])
    assert hit.path == f"{disk}@{at}"


def test_holes_of_a_sparse_file_are_skipped(tmp_path: Path) -> None:
    disk = tmp_path / "sparse.raw"
    with open(disk, "wb") as fh:
        fh.seek(64 << 20)
        fh.write(KEY)
        fh.truncate(128 << 20)
    extents = data_extents(disk)
    assert sum(end - start for start, end in extents) < (1 << 20)  # only the written block(s) hold data
    (hit,) = scan_raw(disk)
    assert hit.path is not None and hit.path.endswith(f"@{64 << 20}")


def test_a_key_inside_a_file_too_big_to_read_whole_is_still_found(tmp_path: Path) -> None:
    from amiforge.scanners.secrets import scan_tree

    root = tmp_path / "root"
    (root / "opt/app").mkdir(parents=True)
    (root / "opt/app/bundle.json").write_bytes(b"{" + b" " * (3 << 20) + b"\n" + KEY + b"}")
    (hit,) = scan_tree(root, max_file_bytes=2 << 20)
    assert hit.id == "private-key" and hit.path is not None and hit.path.startswith("/opt/app/bundle.json@")
