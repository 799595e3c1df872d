"""Reading what each package's Debian changelog says it fixed, from an image root built in tmp_path.

The changelogs are written in the real deb-changelog(5) format and gzipped as Debian ships them; the package names are
real (openssl, zlib, apt), the CVE ids are synthetic (CVE-2999-NNNN / CVE-2998-NNNN: no such CVEs exist).
"""

from __future__ import annotations

import gzip
import logging
import os
import tracemalloc
from pathlib import Path

import pytest

from amiforge.model import ChangelogEntry, Package
from amiforge.scanners.changelogs import MAX_CHANGELOG_BYTES, cves_between, read_changelogs

DOC = "usr/share/doc"
OPENSSL = Package("openssl", "3.0.13-1~deb12u1", "amd64")
LIBSSL3 = Package("libssl3", "3.0.13-1~deb12u1", "amd64", source="openssl")
ZLIB = Package("zlib1g", "1:1.2.13.dfsg-1", "amd64", source="zlib")


def changelog(source: str, *entries: tuple[str, str]) -> str:
    """A changelog.Debian of `source`: (version, change lines) per entry, newest first."""
    blocks = [
        f"{source} ({version}) bookworm-security; urgency=medium\n\n{changes}\n\n"
        f" -- Test Maintainer <test@example.invalid>  Mon, 05 Feb 2024 10:00:00 +0100\n"
        for version, changes in entries
    ]
    return "\n".join(blocks)


# Synthetic CVE ids throughout (CVE-2999-…): no real CVE is named.
OPENSSL_LOG = changelog(
    "openssl",
    ("3.0.13-1~deb12u1", "  * CVE-2999-0002 (synthetic): fix a thing.\n  * CVE-2999-0003, and CVE-2999-0002 again."),
    ("3.0.11-1~deb12u2", "  * Import 3.0.11 (no CVE named)."),
    ("3.0.11-1~deb12u1", "  * Fix CVE-2999-0001 (synthetic)."),
)
OPENSSL_ENTRIES = (
    ChangelogEntry("3.0.13-1~deb12u1", ("CVE-2999-0002", "CVE-2999-0003")),
    ChangelogEntry("3.0.11-1~deb12u1", ("CVE-2999-0001",)),
)
ZLIB_LOG = changelog("zlib", ("1:1.2.13.dfsg-1", "  * New upstream release."))


def put(root: Path, image_path: str, data: bytes | str, *, compress: bool = True) -> Path:
    """Write a file into the image at `root` (gzipped unless `compress` is False)."""
    raw = data.encode() if isinstance(data, str) else data
    path = root / image_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def test_each_source_maps_to_its_cve_entries_newest_first(tmp_path: Path) -> None:
    put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", OPENSSL_LOG)
    put(tmp_path, f"{DOC}/zlib1g/changelog.Debian.gz", ZLIB_LOG)
    no_doc = Package("bash", "5.2.15-2+b2", "amd64", source="bash", source_version="5.2.15-2")
    assert read_changelogs(tmp_path, [OPENSSL, ZLIB, no_doc]) == {
        "openssl": OPENSSL_ENTRIES,  # the entry naming no CVE is left out; CVE-2999-0002 once in its entry
        "zlib": (),  # read, named none
        # bash: no /usr/share/doc/bash at all (dpkg path-exclude): no key
    }


def test_a_doc_dir_symlinked_to_another_binary_of_the_source_is_followed_inside_the_image(tmp_path: Path) -> None:
    put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", OPENSSL_LOG)
    (tmp_path / DOC / "libssl3").symlink_to("openssl")  # relative, as Debian ships them
    assert read_changelogs(tmp_path, [LIBSSL3]) == {"openssl": OPENSSL_ENTRIES}
    (tmp_path / DOC / "libssl3").unlink()
    (tmp_path / DOC / "libssl3").symlink_to("/usr/share/doc/openssl")  # absolute: the image's /, not the host's
    assert read_changelogs(tmp_path, [LIBSSL3]) == {"openssl": OPENSSL_ENTRIES}


def test_each_binary_of_the_source_is_tried_until_one_has_a_changelog(tmp_path: Path) -> None:
    put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", OPENSSL_LOG)
    (tmp_path / DOC / "libssl3").mkdir()  # a doc dir with no changelog in it
    # libssl3 sorts first (newer version): tried first, then openssl.
    newer = Package("libssl3", "3.0.14-1~deb12u1", "amd64", source="openssl")
    assert read_changelogs(tmp_path, [OPENSSL, newer]) == {"openssl": OPENSSL_ENTRIES}


def test_a_changelog_of_another_source_is_passed_over(tmp_path: Path) -> None:
    put(tmp_path, f"{DOC}/zlib1g/changelog.Debian.gz", changelog("zlib", ("1:1.3-1", "  * CVE-2999-0009.")))
    put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", OPENSSL_LOG)
    (tmp_path / DOC / "libssl3").symlink_to("zlib1g")  # against Policy 12.5: another source's directory
    newer = Package("libssl3", "3.0.14-1~deb12u1", "amd64", source="openssl")
    assert read_changelogs(tmp_path, [newer]) == {}
    assert read_changelogs(tmp_path, [newer, OPENSSL]) == {"openssl": OPENSSL_ENTRIES}


def test_a_native_package_s_changelog_gz_is_read_and_a_binnmu_changelog_is_not(tmp_path: Path) -> None:
    apt = Package("apt", "2.6.1", "amd64")  # native: no Debian revision, its Debian changelog is changelog.gz
    put(tmp_path, f"{DOC}/apt/changelog.gz", changelog("apt", ("2.6.1", "  * Fix CVE-2999-0030.")))
    bash = Package("bash", "5.2.15-2+b2", "amd64", source="bash", source_version="5.2.15-2")
    put(tmp_path, f"{DOC}/bash/changelog.Debian.gz", changelog("bash", ("5.2.15-2", "  * CVE-2999-0040.")))
    put(tmp_path, f"{DOC}/bash/changelog.Debian.amd64.gz", changelog("bash", ("5.2.15-2+b2", "  * CVE-2999-0041.")))
    # A non-native package's changelog.gz is the upstream one: not read.
    put(tmp_path, f"{DOC}/zlib1g/changelog.gz", changelog("zlib", ("1.2.13", "  * CVE-2999-0050.")))
    assert read_changelogs(tmp_path, [apt, bash, ZLIB]) == {
        "apt": (ChangelogEntry("2.6.1", ("CVE-2999-0030",)),),
        "bash": (ChangelogEntry("5.2.15-2", ("CVE-2999-0040",)),),
    }


def test_an_absolute_symlink_to_the_host_is_not_followed_out_of_the_image(tmp_path: Path) -> None:
    root, host = tmp_path / "image", tmp_path / "host"
    host_doc = put(
        host, f"{DOC}/openssl/changelog.Debian.gz", changelog("openssl", ("3.0.13-1~deb12u1", "  * CVE-2999-0666."))
    )
    # The host's file is readable as a changelog: the control that shows what a followed link would have given.
    assert read_changelogs(host, [OPENSSL]) == {"openssl": (ChangelogEntry("3.0.13-1~deb12u1", ("CVE-2999-0666",)),)}
    (root / DOC).mkdir(parents=True)
    (root / DOC / "openssl").symlink_to(host_doc.parent)  # an absolute host path: re-rooted in the image, absent
    assert read_changelogs(root, [OPENSSL]) == {}
    (root / DOC / "openssl").unlink()
    (root / DOC / "openssl").mkdir()
    (root / DOC / "openssl" / "changelog.Debian.gz").symlink_to(host_doc)  # the file itself
    assert read_changelogs(root, [OPENSSL]) == {}


def test_a_relative_symlink_climbing_out_of_the_image_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, host = tmp_path / "image", tmp_path / "host"
    put(host, f"{DOC}/openssl/changelog.Debian.gz", changelog("openssl", ("3.0.13-1~deb12u1", "  * CVE-2999-0667.")))
    (root / DOC).mkdir(parents=True)
    # image/usr/share/doc/openssl -> ../../../../host/usr/share/doc/openssl: one '..' more than the image has
    (root / DOC / "openssl").symlink_to(Path("../../../..") / "host" / DOC / "openssl")
    assert (root / DOC / "openssl" / "changelog.Debian.gz").is_file()  # on the host, the link does lead there
    put(root, f"{DOC}/zlib1g/changelog.Debian.gz", ZLIB_LOG)
    with caplog.at_level(logging.WARNING, logger="amiforge.scanners.changelogs"):
        assert read_changelogs(root, [OPENSSL, ZLIB]) == {"zlib": ()}
    assert "climb above the image root" in caplog.text


def test_a_gzip_bomb_is_capped_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A valid changelog naming a CVE, padded with change lines to 9.4 MiB: about 10 KiB gzipped.
    padding = ("  " + "x" * 1022 + "\n") * (9400)
    text = changelog("openssl", ("3.0.13-1~deb12u1", "  * CVE-2999-0100.\n" + padding))
    path = put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", text)
    assert path.stat().st_size < 64 * 1024 < MAX_CHANGELOG_BYTES < len(text)
    put(tmp_path, f"{DOC}/zlib1g/changelog.Debian.gz", ZLIB_LOG)
    with caplog.at_level(logging.WARNING, logger="amiforge.scanners.changelogs"):
        assert read_changelogs(tmp_path, [OPENSSL, ZLIB]) == {"zlib": ()}  # skipped; the next one still read
    assert "/usr/share/doc/openssl/changelog.Debian.gz" in caplog.text
    assert f"larger than {MAX_CHANGELOG_BYTES} bytes" in caplog.text
    # The cap is what refused it: with room for it, the same file is read.
    read = read_changelogs(tmp_path, [OPENSSL], max_bytes=16 * MAX_CHANGELOG_BYTES)
    assert read == {"openssl": (ChangelogEntry("3.0.13-1~deb12u1", ("CVE-2999-0100",)),)}


def test_a_gzip_bomb_is_never_decompressed_whole(tmp_path: Path) -> None:
    # 256 MiB of zeros, about 250 KiB gzipped, written in steps so the test itself never holds it.
    path = tmp_path / DOC / "openssl" / "changelog.Debian.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wb", compresslevel=1) as f:
        for _ in range(256):
            f.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        assert read_changelogs(tmp_path, [OPENSSL]) == {}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Read up to the cap and no further: a reader decompressing it all would peak at 256 MiB or more.
    assert peak < 4 * MAX_CHANGELOG_BYTES


@pytest.mark.parametrize(
    ("data", "compress", "why"),
    [
        ("this is not a changelog\n", True, "not a Debian changelog"),
        (OPENSSL_LOG.replace(" -- Test", "Test"), True, "not a Debian changelog"),  # no trailer line
        (OPENSSL_LOG.replace("(3.0.11-1~deb12u1)", "(_bad)"), True, "Invalid version string '_bad'"),
        ("", True, "Empty changelog file"),
        (OPENSSL_LOG, False, "cannot decompress"),  # not gzip at all
    ],
)
def test_a_malformed_changelog_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, data: str, compress: bool, why: str
) -> None:
    put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", data, compress=compress)
    put(tmp_path, f"{DOC}/zlib1g/changelog.Debian.gz", ZLIB_LOG)
    with caplog.at_level(logging.WARNING, logger="amiforge.scanners.changelogs"):
        assert read_changelogs(tmp_path, [OPENSSL, ZLIB]) == {"zlib": ()}
    assert "skipped /usr/share/doc/openssl/changelog.Debian.gz" in caplog.text
    assert why in caplog.text


def test_a_truncated_gzip_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole = gzip.compress(OPENSSL_LOG.encode())
    put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", whole[: len(whole) // 2], compress=False)
    with caplog.at_level(logging.WARNING, logger="amiforge.scanners.changelogs"):
        assert read_changelogs(tmp_path, [OPENSSL]) == {}
    assert "cannot decompress" in caplog.text


def test_a_fifo_in_place_of_the_changelog_does_not_block(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / DOC / "openssl").mkdir(parents=True)
    os.mkfifo(tmp_path / DOC / "openssl" / "changelog.Debian.gz")
    with caplog.at_level(logging.WARNING, logger="amiforge.scanners.changelogs"):
        assert read_changelogs(tmp_path, [OPENSSL]) == {}
    assert "not a regular file" in caplog.text


def test_no_doc_directory_at_all_is_normal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "usr" / "share").mkdir(parents=True)  # dpkg path-exclude=/usr/share/doc/*: nothing there
    with caplog.at_level(logging.DEBUG, logger="amiforge.scanners.changelogs"):
        assert read_changelogs(tmp_path, [OPENSSL, LIBSSL3, ZLIB]) == {}
    assert caplog.records == []


def test_the_number_of_files_read_is_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", OPENSSL_LOG)
    put(tmp_path, f"{DOC}/zlib1g/changelog.Debian.gz", ZLIB_LOG)
    with caplog.at_level(logging.WARNING, logger="amiforge.scanners.changelogs"):
        assert read_changelogs(tmp_path, [OPENSSL, ZLIB], max_files=1) == {"openssl": OPENSSL_ENTRIES}
    assert "stopped after 1 files" in caplog.text
    assert read_changelogs(tmp_path, [OPENSSL, ZLIB], max_files=2) == {"openssl": OPENSSL_ENTRIES, "zlib": ()}


def test_the_bytes_read_in_all_are_capped(tmp_path: Path) -> None:
    put(tmp_path, f"{DOC}/openssl/changelog.Debian.gz", OPENSSL_LOG)
    put(tmp_path, f"{DOC}/zlib1g/changelog.Debian.gz", ZLIB_LOG)
    assert read_changelogs(tmp_path, [OPENSSL, ZLIB], max_total_bytes=len(OPENSSL_LOG)) == {"openssl": OPENSSL_ENTRIES}


# --- cves_between -----------------------------------------------------------------------------------------------

# Synthetic ids. Newest first, as a changelog lists them; "2:" and "1:" are epochs, "~" sorts before anything.
ENTRIES = (
    ChangelogEntry("2:1.0-1", ("CVE-2998-0001",)),
    ChangelogEntry("1:9.0-1", ("CVE-2998-0002",)),
    ChangelogEntry("1.5-1", ("CVE-2998-0003",)),
    ChangelogEntry("1.5~rc1-1", ("CVE-2998-0004",)),
    ChangelogEntry("1.4-1", ("CVE-2998-0005", "CVE-2998-0003")),
)


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        # old excluded (1.4-1), new included (1:9.0-1), 2:1.0-1 beyond new
        ("1.4-1", "1:9.0-1", ("CVE-2998-0002", "CVE-2998-0003", "CVE-2998-0004")),
        # an epoch outranks any upstream version: 9.9-1 < 1:9.0-1 (a string comparison would say the opposite)
        ("9.9-1", "1:9.0-1", ("CVE-2998-0002",)),
        ("1:9.0-1", "2:0.1-1", ()),
        # the tilde: 1.5~rc1-1 < 1.5-1
        ("1.5~rc1-1", "1.5-1", ("CVE-2998-0003",)),
        ("1.4-1", "1.5~rc1-1", ("CVE-2998-0004",)),
        ("1.4-1", "1.5~rc1-0", ()),
        # everything, each id once, in changelog order (CVE-2998-0003 where it first appears)
        ("1.0", "2:1.0-1", ("CVE-2998-0001", "CVE-2998-0002", "CVE-2998-0003", "CVE-2998-0004", "CVE-2998-0005")),
        ("1.5-1", "1.5-1", ()),
        # a binNMU-style suffix above the entry's version: the entry is below it
        ("1.5-1+b1", "1:9.0-1", ("CVE-2998-0002",)),
    ],
)
def test_cves_between_takes_entries_above_old_up_to_new(old: str, new: str, named: tuple[str, ...]) -> None:
    assert cves_between(ENTRIES, old, new) == named


def test_cves_between_passes_over_an_entry_that_is_not_a_debian_version() -> None:
    odd = (ChangelogEntry("not a version!", ("CVE-2998-0099",)), *ENTRIES)
    assert cves_between(odd, "1.5-1", "1:9.0-1") == ("CVE-2998-0002",)
