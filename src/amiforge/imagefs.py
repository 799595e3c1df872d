"""Reading files of an image root without ever leaving it.

An image's root is often reached as /proc/<pid>/root/… (mounted in another mount namespace), where an absolute
symlink inside the image would resolve against the *host's* root: `ln -s /root/.aws/credentials
/var/lib/dpkg/status` in a recipe step must not make a scan print the host's credentials. Every path is resolved
component by component inside the image (`recipe.resolve_inside`), and the final file is opened with O_NOFOLLOW
and must be a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from amiforge.errors import ConfigError
from amiforge.recipe import resolve_inside


def inside(root: Path, image_path: str) -> Path:
    """The host path of `image_path` in the image at `root`, symlinks resolved within the image."""
    return resolve_inside(root, image_path)


def read_inside(root: Path, image_path: str) -> bytes:
    """The bytes of a regular file of the image; FileNotFoundError if absent, ConfigError if not a regular file."""
    host = inside(root, image_path)
    fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{image_path} in the image is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
