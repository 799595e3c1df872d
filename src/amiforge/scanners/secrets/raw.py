"""Key material in the raw bytes of a disk image, including blocks a filesystem has freed: deleted is not erased.

Meant for images imported from elsewhere; amiforge's own bakes make a fresh filesystem with `mkfs.ext4 -d`, which
never carries deleted data. The walk also uses `scan_raw()` for a file too big to read whole. Reads are
sequential chunks that overlap just enough for a marker across a boundary to be found exactly once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from amiforge.errors import ConfigError, InfraError, NotFound
from amiforge.inputs import MIB
from amiforge.model import Finding, Severity
from amiforge.scanners.secrets.content import KEY_LABEL
from amiforge.scanners.secrets.findings import make_finding, redact

__all__ = ["DEFAULT_RAW_CHUNK", "data_extents", "intersect_ranges", "scan_raw"]

DEFAULT_RAW_CHUNK = 8 * MIB


# Each pattern has a literal prefix so the engine searches it at memory speed; a single alternation would be
# several times slower. Lengths are bounded (see _RAW_MAX_MATCH) so that chunk overlap can be exact.
_RAW_PEM = re.compile(
    rb"-----BEGIN (?P<label>" + KEY_LABEL.encode() + rb")-----[ \t]{0,8}"
    rb"(?:\r?\n(?:[^\r\n]{0,100}\r?\n){0,4}?|(?:\\r)?\\n)[A-Za-z0-9+/]{40}"
)
_RAW_AWS = (re.compile(rb"AKIA[A-Z0-9]{16}(?![A-Z0-9])"), re.compile(rb"ASIA[A-Z0-9]{16}(?![A-Z0-9])"))
# A binary OpenSSH key (as ssh-keygen writes it before base64, or as it sits in memory dumped to swap): the magic,
# then the length-prefixed cipher name. ssh binaries also hold the bare magic string; they never hold this.
_RAW_OPENSSH = re.compile(rb"openssh-key-v1\x00\x00\x00\x00[\x04-\x20](?:none|aes|chacha|3des)")
_RAW_MAX_MATCH = 1024  # longest possible match of the patterns above, with its lookahead
_RAW_LEAD = 64  # bytes kept before a buffer's owned region, so a match's lookbehind check sees real data
# Smallest block a filesystem puts file data on (a 512-byte sector; ext4 uses 4096 on a 4096-aligned partition).
_RAW_FILE_ALIGN = 512


def _raw_hits(buf: bytes, base: int) -> Iterator[tuple[int, str, Severity, str]]:
    """(offset in buf, rule id, severity, redacted) of every marker in `buf`, which starts at file offset `base`."""
    for m in _RAW_PEM.finditer(buf):
        # A file's data starts on a block boundary; a key inside a file follows text. A header that does neither
        # but follows a NUL is a C string in a binary (libgnutls compiles in self-test keys), not a key file.
        at = m.start()
        if (base + at) % _RAW_FILE_ALIGN != 0 and buf[at - 1 : at] == b"\x00":
            continue
        yield at, "private-key", Severity.CRITICAL, f"-----BEGIN {m['label'].decode()}----- …"
    for pattern in _RAW_AWS:
        for m in pattern.finditer(buf):
            key_id = m.group().decode()
            before = buf[m.start() - 1 : m.start()]
            if (before and (before.isupper() or before.isdigit())) or key_id.endswith("EXAMPLE"):
                continue
            yield m.start(), "aws-access-key", Severity.HIGH, redact(key_id)
    for m in _RAW_OPENSSH.finditer(buf):
        yield m.start(), "private-key", Severity.CRITICAL, "openssh-key-v1 (binary OpenSSH private key) …"


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of `path` that hold data (holes of a sparse file are skipped)."""
    extents: list[tuple[int, int]] = []
    with path.open("rb") as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        try:
            while pos < size:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = os.lseek(fd, start, os.SEEK_HOLE)
                extents.append((start, end))
                pos = end
        except OSError:  # no more data (ENXIO), or a filesystem without SEEK_DATA: treat as all data
            if not extents and pos == 0:
                return [(0, size)]
    return extents


def scan_raw(
    path: Path, *, chunk: int = DEFAULT_RAW_CHUNK, ranges: Sequence[tuple[int, int]] | None = None
) -> list[Finding]:
    """Key material anywhere in the raw bytes of a disk image file, including freed blocks.

    Markers: a PEM/PGP private-key header followed by a key body, AWS access key ids (AKIA/ASIA), and binary
    OpenSSH keys (`openssh-key-v1\\0`). Sequential `chunk`-sized reads; consecutive reads overlap so a marker across a
    boundary is found exactly once. Findings have path f"{path}@{offset}" and source "raw-disk".
    `ranges` limits the scan to those [start, end) byte ranges (e.g. a filesystem's free blocks, where deleted files
    leave their data); by default every data extent of the file (holes of a sparse file hold nothing).
    Reads a raw image or an uncompressed qcow2 (compressed clusters and encrypted images show nothing).
    Raises NotFound for a missing file, InfraError if it cannot be read.
    """
    overlap = _RAW_MAX_MATCH + _RAW_LEAD
    if chunk <= overlap:
        raise ConfigError(f"scan_raw chunk must be larger than {overlap} bytes, got {chunk}")
    findings: list[Finding] = []
    try:
        extents = data_extents(path)
        # Holes of a sparse file hold only zeros: scan the data extents, within `ranges` when given.
        regions = extents if ranges is None else intersect_ranges(sorted(ranges), extents)
        with path.open("rb") as fh:
            for start, end in regions:
                fh.seek(start)
                findings += _scan_region(fh, path, start, end, chunk)
    except FileNotFoundError as e:
        raise NotFound(f"disk image {path} does not exist", fix="pass the path of a raw or qcow2 file") from e
    except OSError as e:
        raise InfraError(f"cannot read disk image {path}: {e.strerror}", retryable=False) from e
    return findings


def intersect_ranges(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted lists of disjoint [start, end) ranges."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _scan_region(fh: BinaryIO, path: Path, start: int, end: int, chunk: int) -> list[Finding]:
    findings: list[Finding] = []
    buf = b""
    base = start  # file offset of buf[0]
    pos = start
    while True:
        data = fh.read(min(chunk, end - pos))
        pos += len(data)
        final = pos >= end or not data
        buf += data
        # This buffer owns matches starting in [own_from, own_to); the next one starts at own_to - lead.
        own_from = 0 if base == start else _RAW_LEAD
        own_to = len(buf) if final else len(buf) - _RAW_MAX_MATCH
        for offset, rule_id, severity, redacted in sorted(_raw_hits(buf, base)):
            if own_from <= offset < own_to:
                findings.append(
                    make_finding(
                        rule_id,
                        f"{path}@{base + offset}",
                        line=None,
                        redacted=redacted,
                        severity=severity,
                        source="raw-disk",
                    )
                )
        if final:
            return findings
        keep_from = own_to - _RAW_LEAD
        base += keep_from
        buf = buf[keep_from:]
