"""Reading files of an image root without ever leaving it.

An image's root is often reached as /proc/<pid>/root/… (mounted in another mount namespace), where an absolute
symlink inside the image would resolve against the *host's* root: `ln -s /root/.aws/credentials
/var/lib/dpkg/status` in a recipe step must not make a scan print the host's credentials. Every path is resolved
component by component inside the image (`resolve_inside`), and the final file is opened with O_NOFOLLOW
and must be a regular file.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from pathlib import Path, PurePosixPath

from amiforge.errors import ConfigError, Problem

_MAX_SYMLINK_HOPS = 40  # as Linux's path walk (MAXSYMLINKS)


def resolve_inside(root: Path, dest: str) -> Path:
    """Map the image-absolute path `dest` to a host path under `root`, never leaving it.

    Symlinks inside the image are followed as the image would see them: an absolute target is re-rooted at
    `root`, a relative one is taken from the directory holding the link. Missing components are fine (created
    later). Raises ConfigError for a relative or NUL-containing `dest`, a path that would climb out of
    `root`, or more than 40 symlinks (a loop).
    """

    def refuse(message: str, fix: str) -> ConfigError:
        return ConfigError(
            f"cannot place {dest!r} inside the image: {message}",
            problems=[Problem(message=message, field="dest", fix=fix)],
            fix=fix,
        )

    if "\x00" in dest or not dest.startswith("/"):
        raise refuse("the path must be absolute and contain no NUL", "use an absolute path such as /etc/motd")
    base = Path(os.path.abspath(root))  # not resolve(): see scanners/secrets/tree.py on /proc/<pid>/root
    pending: deque[str] = deque(PurePosixPath(dest).parts[1:])
    inside: list[str] = []  # components under `base`, none of them a symlink
    hops = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not inside:
                raise refuse("'..' would climb above the image root", "use a path that stays inside the image")
            inside.pop()
            continue
        candidate = base.joinpath(*inside, part)
        if candidate.is_symlink():
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise refuse(
                    f"more than {_MAX_SYMLINK_HOPS} symlinks followed (a loop?) at {candidate}",
                    "fix the symlinks in the image",
                )
            target = PurePosixPath(os.readlink(candidate))
            target_parts = list(target.parts)
            if target.is_absolute():
                inside = []  # re-rooted: "/x" inside the image is root/x on the host
                target_parts = target_parts[1:]
            pending.extendleft(reversed(target_parts))
        else:
            inside.append(part)
    return base.joinpath(*inside)


def inside(root: Path, image_path: str) -> Path:
    """The host path of `image_path` in the image at `root`, symlinks resolved within the image."""
    return resolve_inside(root, image_path)


def read_inside(root: Path, image_path: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file of the image; FileNotFoundError if absent, ConfigError if not a regular file
    or larger than `max_bytes` (a file the image's builder chose may be any size)."""
    host = inside(root, image_path)
    fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{image_path} in the image is not a regular file")
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise ConfigError(f"{image_path} in the image is larger than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
