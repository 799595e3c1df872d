"""The host programs the local provider runs, how to install each, and one way to run them.

Every external command goes through `run()`, so a missing tool or a failing one always becomes an
InfraError/ToolMissing with the tail of its output, never a raw CalledProcessError.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from amiforge.errors import InfraError, ToolMissing
from amiforge.model import Leftover
from amiforge.providers.interface import Cleanups, ToolStatus

logger = logging.getLogger(__name__)

# tool -> Debian package that provides it. The one list `doctor`, `scripts/bootstrap` and the errors agree on.
TOOLS: Mapping[str, str] = {
    "mmdebstrap": "mmdebstrap",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "busybox": "busybox-static",
    "cpio": "cpio",
    "dumpe2fs": "e2fsprogs",
    "unshare": "util-linux",
    "chroot": "coreutils",
}

# busybox-static installs a statically linked busybox here; the dynamic `busybox` package would not work
# inside an initrd that has no libc.
STATIC_BUSYBOX = Path("/bin/busybox")


def which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def require(tool: str) -> str:
    path = which(tool)
    if path is None:
        raise ToolMissing(tool, TOOLS.get(tool, tool))
    return path


def tool_report() -> list[ToolStatus]:
    return [ToolStatus(tool, pkg, which(tool)) for tool, pkg in TOOLS.items()]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    argv: Sequence[str | Path],
    *,
    log: Callable[[str], None] | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> str:
    """Run a host command to completion; return its combined output. Failure -> InfraError with the tail."""
    args = [str(a) for a in argv]
    exe = require(args[0])
    full_env = {**os.environ, **(env or {})}
    logger.debug("running %s (%s), %d argument(s)", exe, what or args[0], len(args) - 1)  # never the arguments
    try:
        proc = subprocess.run(
            [exe, *args[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
            env=full_env,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise InfraError(f"{what or args[0]} timed out after {timeout:.0f}s", retryable=True) from e
    if log is not None and proc.stdout:
        for line in proc.stdout.splitlines():
            log(line)
    logger.debug("%s exited %d", what or args[0], proc.returncode)
    if proc.returncode != 0:
        raise InfraError(
            f"{what or args[0]} failed (exit {proc.returncode}):\n{_tail(proc.stdout)}",
            retryable=False,
        )
    return proc.stdout


def tree_size(path: Path) -> int:
    """Bytes allocated under `path` (like du), without following symlinks."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def publish_cache_entry(tmp: Path, final: Path, content: str) -> int:
    """Move a finished cache entry (`tmp`, holding `content`) to `final`, recording its size; return the size.

    Entries are built aside and renamed into place only when complete, so a half-built one is never trusted.
    If a concurrent bake published the same key first, theirs is kept: same key, same content."""
    size = tree_size(tmp / content)
    (tmp / "size").write_text(str(size))
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / content).is_dir():
            raise
    return size


def cached_size(entry: Path) -> int:
    size_file = entry / "size"
    return int(size_file.read_text()) if size_file.is_file() else 0


def end_process(proc: subprocess.Popen[Any], *, grace: float) -> None:
    """Wait up to `grace` seconds for `proc` to exit, then kill it; always reaps it."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def remove_tree(path: Path) -> None:
    """rm -rf that says when it could not (a busy mount, a permission): a silent partial removal would hide a
    leftover. A tree already gone is fine (a finished cache entry was renamed into place)."""
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


def remove_or_report(path: Path, leftovers: list[Leftover], *, in_flight: BaseException | None = None) -> None:
    """Remove a temporary directory now; if that fails, add it to `leftovers` and, when an error is on its way out
    (`in_flight`), note it there too — never silently."""
    try:
        remove_tree(path)
    except OSError as e:
        leftover = Leftover("temporary directory", str(path), _removal(path), f"{type(e).__name__}: {e}")
        leftovers.append(leftover)
        if in_flight is not None:
            in_flight.add_note(leftover.describe())


def _removal(path: Path) -> str:
    return f"amiforge gc --region local --apply (or: rm -rf -- {shlex.quote(str(path))})"


def temporary_dir(cleanup: Cleanups, prefix: str, parent: Path | None = None) -> Path:
    """A new temporary directory whose removal is registered at once on the run's cleanups; should it fail, the
    run reports the directory with the command that removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    cleanup.add(Leftover("temporary directory", str(path), _removal(path)), lambda: remove_tree(path))
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that a reader sees the old content or the new, never half (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
