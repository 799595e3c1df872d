"""Walking an image's root filesystem safely, and what each file there is checked for.

The walk never follows a symlink, skips /proc, /sys, /dev and /run, and reads only regular files, opened with
O_NOFOLLOW | O_NONBLOCK (a file swapped for a symlink or a FIFO between walk and open leads nowhere); paths the
image names (/etc/passwd, homes, expected authorized_keys) resolve through the image's own symlinks, never the
host's. A file that cannot be read is an `unreadable` finding: a scan that could not look is not a clean scan.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path, PurePosixPath

from amiforge.errors import ConfigError, NotFound
from amiforge.imagefs import resolve_inside
from amiforge.inputs import MIB
from amiforge.model import Finding
from amiforge.scanners.secrets.content import CONTENT_RULES
from amiforge.scanners.secrets.findings import RULES, Hit, dedupe, line_of, make_finding
from amiforge.scanners.secrets.paths import PathRule, path_rule
from amiforge.scanners.secrets.raw import scan_raw

__all__ = ["DEFAULT_MAX_FILE_BYTES", "scan_tree"]

DEFAULT_MAX_FILE_BYTES = 2 * MIB

# Kernel and runtime filesystems: mount points in a running system, never content of an image.
_SKIP_TOP = frozenset({"proc", "sys", "dev", "run"})


def _inside(root: Path, image_path: str) -> Path | None:
    """Host path of an image path, following the image's own symlinks; None if the image's links are broken."""
    try:
        return resolve_inside(root, image_path)
    except (ConfigError, OSError):
        return None


def _home_dirs(root: Path) -> tuple[frozenset[Path], frozenset[Path]]:
    """(homes, home parents): /root, every home in /etc/passwd, and /home (whose children are homes)."""
    homes: set[Path] = set()
    for image_path in ["/root", *_passwd_homes(root)]:
        host = _inside(root, image_path)
        if host is not None:
            homes.add(host)
    parent = _inside(root, "/home")
    return frozenset(homes), frozenset({parent} if parent is not None else ())


def _passwd_homes(root: Path) -> list[str]:
    passwd = _inside(root, "/etc/passwd")
    if passwd is None:
        return []
    try:
        data = _read_regular(passwd, MIB)
    except OSError:
        return []
    if data is None:
        return []
    homes = []
    for line in data.decode("latin-1").splitlines():
        fields = line.split(":")
        # Daemons use "/" or /nonexistent; "/" would make every dot-file at the root a history candidate.
        if len(fields) >= 6 and fields[5].startswith("/") and fields[5] not in ("/", "/nonexistent"):
            homes.append(fields[5])
    return homes


def _read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file, opened without following a symlink; None if it is not a regular file."""
    # O_NOFOLLOW: a file swapped for a symlink between walk and open must not lead outside the tree.
    # O_NONBLOCK: a FIFO that appeared in the meantime must not hang the scan.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        remaining = limit
        while remaining > 0:
            chunk = fh.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


class _TreeScan:
    def __init__(self, rootfs: Path, max_file_bytes: int, expected_authorized_keys: Collection[str]) -> None:
        # Absolute, never resolve(): a scan's root is often /proc/<pid>/root/… (an image mounted in another mount
        # namespace), and resolving that magic link would land on the empty host directory instead.
        self.root = Path(os.path.abspath(rootfs))
        self.max_file_bytes = max_file_bytes
        self.homes, self.home_parents = _home_dirs(self.root)
        self.expected_keys = {p for p in (_inside(self.root, e) for e in expected_authorized_keys) if p is not None}
        self.findings: list[Finding] = []

    def run(self) -> list[Finding]:
        if not self.root.is_dir():
            raise NotFound(f"image root {self.root} is not a directory", fix="pass the directory of a root filesystem")
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False, onerror=self._walk_error):
            here = Path(dirpath)
            rel = here.relative_to(self.root).as_posix()
            image_dir = PurePosixPath("/" if rel == "." else "/" + rel)
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d not in _SKIP_TOP]
            dirnames.sort()
            if str(image_dir) == "/var/lib/cloud":
                self._cloud_instance_dir(here, image_dir, "instance")
            elif str(image_dir) == "/var/lib/cloud/instances":
                for d in dirnames:
                    self._cloud_instance_dir(here, image_dir, d)
            for name in sorted(filenames):
                self._file(here / name, image_dir / name)
        return dedupe(self.findings)

    def _walk_error(self, err: OSError) -> None:
        where = self._image_path(Path(err.filename)) if err.filename else "/"
        self.findings.append(
            make_finding(
                "unreadable", where, line=None, redacted=None, title=f"directory could not be read: {err.strerror}"
            )
        )

    def _image_path(self, host: Path) -> str:
        rel = host.relative_to(self.root).as_posix()
        return "/" if rel == "." else "/" + rel

    def _cloud_instance_dir(self, here: Path, image_dir: PurePosixPath, name: str) -> None:
        try:
            st = os.lstat(here / name)
        except FileNotFoundError:
            return
        # /var/lib/cloud/instance is normally a symlink to instances/<id>, which is reported itself.
        if stat.S_ISDIR(st.st_mode):
            self.findings.append(make_finding("cloud-init-state", str(image_dir / name), line=None, redacted=None))

    def _file(self, host: Path, ipath: PurePosixPath) -> None:
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            return  # removed while we walked
        except OSError as e:
            self._unreadable(ipath, e)
            return
        if not stat.S_ISREG(st.st_mode):
            return  # symlinks (never followed), devices, sockets, FIFOs
        in_home = host.parent in self.homes or host.parent.parent in self.home_parents
        by_path = path_rule(ipath, in_home)
        if st.st_size > self.max_file_bytes:
            # Too big to read whole and match line by line, but not skipped: key material is looked for in
            # overlapping chunks, as on a raw disk (binaries' compiled-in PEM strings are told apart the same way).
            for chunk_hit in scan_raw(host):
                offset = (chunk_hit.path or "").rsplit("@", 1)[-1]
                self.findings.append(replace(chunk_hit, path=f"{ipath}@{offset}", source="secrets"))
            if by_path is None:
                return
        data: bytes | None = None
        if st.st_size <= self.max_file_bytes:
            try:
                data = _read_regular(host, self.max_file_bytes)
            except FileNotFoundError:
                return
            except OSError as e:
                self._unreadable(ipath, e)
                return
            if data is None:
                return
        text: str | None = None if data is None else data.decode("latin-1")
        path_hits: list[Hit] = []
        content_hits: list[Hit] = []
        claimed = False
        if by_path is not None:
            path_hits, claimed = self._path_hits(by_path, host, st.st_size, text)
        if text is not None and data is not None and not claimed:
            for rule in CONTENT_RULES:
                if not any(g.search(data) for g in rule.gates):
                    continue
                found = list(rule.find(text))
                if found and rule.claims_file:
                    content_hits = found
                    break
                content_hits.extend(found)
        for hit in path_hits + content_hits:
            line = None if hit.pos is None or text is None else line_of(text, hit.pos)
            self.findings.append(
                make_finding(
                    hit.rule, str(ipath), line=line, redacted=hit.redacted, title=hit.title, severity=hit.severity
                )
            )

    def _path_hits(self, rule: PathRule, host: Path, size: int, text: str | None) -> tuple[list[Hit], bool]:
        if rule.rule == "unexpected-authorized-keys" and host in self.expected_keys:
            return [], False
        if rule.rule == "machine-id":
            # systemd treats "uninitialized" like an empty file: a fresh id on first boot.
            if text is not None and text.strip() in ("", "uninitialized"):
                return [], False
        elif rule.find is None:
            if size == 0:
                return [], False
        elif text is None:
            # Too big to read: a file at this path is treated as what its path says (fail closed).
            title = f"{RULES[rule.rule].title} (not read: larger than {self.max_file_bytes} bytes)"
            return [Hit(rule.rule, None, None, title)], rule.claims_file
        else:
            found = list(rule.find(text))
            return found, rule.claims_file and bool(found)
        return [Hit(rule.rule, None, None)], rule.claims_file

    def _unreadable(self, ipath: PurePosixPath, err: OSError) -> None:
        self.findings.append(
            make_finding(
                "unreadable", str(ipath), line=None, redacted=None, title=f"file could not be read: {err.strerror}"
            )
        )


def scan_tree(
    rootfs: Path,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    expected_authorized_keys: Collection[str] = (),
) -> list[Finding]:
    """Secrets and residue in the root filesystem at `rootfs`, sorted by path and line.

    Symlinks are never followed; /proc, /sys, /dev and /run are skipped, and so are device nodes, sockets and
    FIFOs. Files larger than `max_file_bytes` are not read, but a file whose path alone makes it a finding
    (a history, a host key, ~/.aws/credentials, …) is still reported. `expected_authorized_keys` lists the image
    paths of authorized_keys files the recipe put there on purpose (resolved through the image's own symlinks);
    any other non-empty authorized_keys is a finding. A file that cannot be read is an `unreadable` finding: a
    scan that could not look is not a clean scan. Raises NotFound if `rootfs` is not a directory.
    """
    return _TreeScan(rootfs, max_file_bytes, expected_authorized_keys).run()
