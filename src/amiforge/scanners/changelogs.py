"""What each installed package's Debian changelog says it fixed: the CVE ids its entries name, read from the image.

Every Debian package ships `/usr/share/doc/<binary>/changelog.Debian.gz` (a native package, one with no Debian
revision such as apt or dpkg: `changelog.gz`), the changelog of its *source* package, and a security upload names the
CVEs it fixes there ("* CVE-2024-5535: …"). Reading it needs no database at all, so
`images diff` can say what an upgrade fixed from the two images alone (`cves_between`).

Choices:
- One changelog per source package: every binary of a source ships the same file (or a doc directory that is a
  symlink to another binary's of that source, Debian Policy 12.5). The binaries are tried newest version first, and the
  first whose changelog names the source at its top is used: a doc directory pointing at another source's changelog,
  or a non-native package's upstream changelog.gz, is passed over.
- BinNMU changelogs (`changelog.Debian.<arch>.gz`) are not read: a binary-only upload rebuilds the same source ("no
  source changes"), so it never fixes a CVE; the versions compared are the *source* versions dpkg records.
- Only entries naming a CVE are kept (newest first). A source whose changelog was read but names none maps to `()`;
  a source with no readable changelog (dpkg's path-exclude of /usr/share/doc in minimal images, a removed doc
  directory) has no key: "nothing named" and "nothing to read" stay distinct.
- The image may be hostile: paths are resolved inside it (`imagefs`), only regular files are opened, each file's
  decompressed size is capped (a gzip bomb), and so are the number of files and the bytes read in all. A changelog
  that cannot be read or parsed is skipped with a logged warning; it never fails the scan.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import re
import stat
import zlib
from collections.abc import Sequence
from pathlib import Path

from debian.changelog import Changelog, ChangelogParseError, VersionError

from amiforge.errors import ConfigError
from amiforge.imagefs import inside
from amiforge.inputs import MIB
from amiforge.model import ChangelogEntry, Package
from amiforge.scanners.vulns import dpkg_compare, is_dpkg_version

logger = logging.getLogger(__name__)

# The largest changelog.Debian in Debian 12 (gcc's, glibc's) is about 3.5 MiB decompressed.
MAX_CHANGELOG_BYTES = 8 * MIB
# A Debian system has a few hundred source packages; a full desktop about 2,000.
MAX_CHANGELOG_FILES = 4096
# All changelogs of a Debian 12 system with 700 packages come to about 20 MiB.
MAX_TOTAL_BYTES = 256 * MIB

CVE_RE = re.compile(r"\bCVE-\d{4}-\d{4,}")
# Debian Policy 5.6.7; a name from a hostile dpkg database ("../..") never becomes part of a path.
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


class _Unreadable(Exception):
    """This changelog is skipped; the message says why."""


def read_changelogs(
    root: Path,
    packages: Sequence[Package],
    *,
    max_bytes: int = MAX_CHANGELOG_BYTES,
    max_files: int = MAX_CHANGELOG_FILES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> dict[str, tuple[ChangelogEntry, ...]]:
    """Source package -> the entries of its changelog in the image at `root` that name CVE ids, newest first.

    A source whose changelog names no CVE maps to `()`; one with no readable changelog is left out (see the module's
    docstring). `max_bytes` caps one file's decompressed size (a larger one is skipped), `max_files` the files opened
    and `max_total_bytes` the bytes decompressed in all, give or take one file (past either, the rest are left out,
    with a warning).
    """
    by_source: dict[str, list[Package]] = {}
    for pkg in packages:
        by_source.setdefault(pkg.source_name, []).append(pkg)
    found: dict[str, tuple[ChangelogEntry, ...]] = {}
    opened = 0
    total = 0
    for source in sorted(by_source):
        for pkg, path in _candidates(source, by_source[source]):
            if opened >= max_files or total >= max_total_bytes:
                logger.warning(
                    "changelogs: stopped after %d files (%d bytes): the limit of %d files or %d bytes was reached; "
                    "the rest of the image's changelogs were not read",
                    opened,
                    total,
                    max_files,
                    max_total_bytes,
                )
                return found
            try:
                data = _read_gzip(root, path, max_bytes)
            except (FileNotFoundError, NotADirectoryError):
                continue  # no doc directory or no changelog: normal in minimal images
            except _Unreadable as e:
                opened += 1
                logger.warning("changelogs: skipped %s in the image: %s", path, e)
                continue
            opened += 1
            total += len(data)
            try:
                entries = _parse(data, source)
            except _Unreadable as e:
                logger.warning("changelogs: skipped %s in the image: %s", path, e)
                continue
            if entries is None:
                logger.debug("changelogs: %s (package %s) is not the changelog of source %s", path, pkg.name, source)
                continue
            found[source] = entries
            break
    return found


def _candidates(source: str, binaries: Sequence[Package]) -> list[tuple[Package, str]]:
    """The binaries of `source` and their changelog paths, in the order they are tried: the newest source version
    first (its changelog holds every older entry too), then the binary named like the source, then by name."""

    def newest_first(a: Package, b: Package) -> int:
        va, vb = a.source_version or a.version, b.source_version or b.version
        by_version = dpkg_compare(vb, va) if is_dpkg_version(va) and is_dpkg_version(vb) else 0
        return by_version or (a.name != source) - (b.name != source) or (a.name > b.name) - (a.name < b.name)

    paths = []
    for pkg in sorted(binaries, key=functools.cmp_to_key(newest_first)):
        if _PACKAGE_NAME.fullmatch(pkg.name) is None:
            continue
        paths.append((pkg, f"/usr/share/doc/{pkg.name}/changelog.Debian.gz"))
        if "-" not in (pkg.source_version or pkg.version):
            # A native package (no Debian revision: apt, dpkg, base-files) ships its Debian changelog as changelog.gz.
            paths.append((pkg, f"/usr/share/doc/{pkg.name}/changelog.gz"))
    return paths


def _read_gzip(root: Path, image_path: str, limit: int) -> bytes:
    """The decompressed bytes of a gzip file of the image, at most `limit` of them (_Unreadable past that)."""
    try:
        host = inside(root, image_path)
    except ConfigError as e:  # a symlink loop, or a path climbing out of the image
        raise _Unreadable(str(e)) from None
    try:
        # O_NOFOLLOW: `inside` resolved every symlink; O_NONBLOCK: a FIFO must not block the scan (refused below).
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as e:
        raise _Unreadable(e.strerror or str(e)) from None
    with os.fdopen(fd, "rb") as raw:
        if not stat.S_ISREG(os.fstat(raw.fileno()).st_mode):
            raise _Unreadable("not a regular file")
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as unpacked:
                # Decompressed in bounded steps: a small file that inflates to gigabytes stops at limit + 1.
                data = unpacked.read(limit + 1)
        except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt, or an I/O error
            raise _Unreadable(f"cannot decompress: {e}") from None
    if len(data) > limit:
        raise _Unreadable(f"larger than {limit} bytes decompressed")
    return data


def _parse(data: bytes, source: str) -> tuple[ChangelogEntry, ...] | None:
    """The entries of the changelog text `data` that name CVE ids, newest first; None if it is another source's."""
    try:
        # Decoded here, leniently: a stray Latin-1 byte in a decades-old entry must not lose the whole file.
        changelog = Changelog(data.decode("utf-8", errors="replace"), strict=True)
        if changelog.package != source:
            return None
        entries: list[ChangelogEntry] = []
        for block in changelog:
            cves = tuple(dict.fromkeys(CVE_RE.findall("\n".join(block.changes()))))
            if not cves:
                continue
            version = str(block.version)
            if not is_dpkg_version(version):
                # cves_between could not place it among the versions.
                raise _Unreadable(f"entry version {version!r} is not a Debian version")
            entries.append(ChangelogEntry(version, cves))
    except (ChangelogParseError, VersionError, ValueError) as e:
        raise _Unreadable(f"not a Debian changelog: {e}") from None
    return tuple(entries)


def cves_between(entries: Sequence[ChangelogEntry], old: str, new: str) -> tuple[str, ...]:
    """The CVE ids named by the entries with `old` < version <= `new` in dpkg order, each once, in the entries' order
    (newest first): what an upgrade from source version `old` to `new` says it fixed."""
    named: dict[str, None] = {}
    for entry in entries:
        if not is_dpkg_version(entry.version):
            continue  # read_changelogs keeps none such; entries from elsewhere may
        if dpkg_compare(entry.version, old) > 0 and dpkg_compare(entry.version, new) <= 0:
            named.update(dict.fromkeys(entry.cves))
    return tuple(named)
