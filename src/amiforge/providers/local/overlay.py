"""Overlay mounts that cannot leak.

Every mount lives in a private mount namespace owned by one child process (`unshare --mount`). When that
process ends — normally, on error, on Ctrl-C, or because amiforge itself was killed — the kernel drops the
namespace and every mount in it. Nothing is ever mounted in the host namespace, so there is nothing to unmount.

Two shapes:
- `run_in_chroot()`: a step runs in a chroot on an overlay (lowers read-only, one writable upper dir).
- `overlay_view()`: a read-only merged view held open by a waiting child; the host reads it through
  /proc/<pid>/root, which resolves paths inside that child's namespace. The child exits when its stdin closes,
  i.e. as soon as we close it or our process dies.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from amiforge.errors import InfraError
from amiforge.providers.local.tools import end_process, require, run

# Chroot environment for steps: no host variables leak into the image build.
CHROOT_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LC_ALL=C.UTF-8",
    "DEBIAN_FRONTEND=noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN=true",
)


def _lowerdir(lowers: Sequence[Path]) -> str:
    """overlayfs wants the topmost lower first; callers pass bottom (base) first."""
    return ":".join(str(p) for p in reversed(lowers))


def run_in_chroot(
    *,
    lowers: Sequence[Path],
    upper: Path,
    work: Path,
    merged: Path,
    stage: Path,
    command: Sequence[str],
    log: Callable[[str], None],
    timeout: float,
    what: str,
    drop_resolv_conf: bool = False,
) -> None:
    """Mount lowers+upper at `merged`, bind /proc /sys /dev, the host's resolv.conf (for apt) and `stage`
    (at /run/amiforge, on a tmpfs so nothing of it reaches the layer), stop daemons from starting with a
    policy-rc.d, and run `command` inside the chroot. All mounts die with the namespace.
    `drop_resolv_conf` removes the image's resolv.conf afterwards (generalisation: no host DNS in images)."""
    require("unshare")
    m = shlex.quote(str(merged))
    cmd = " ".join(shlex.quote(c) for c in command)
    env = " ".join(shlex.quote(e) for e in CHROOT_ENV)
    options = f"lowerdir={_lowerdir(lowers)},upperdir={upper},workdir={work}"
    script = f"""
set -eu
mount -t overlay overlay -o {shlex.quote(options)} {m}
mount -t proc proc {m}/proc
mount --rbind /sys {m}/sys
mount --rbind /dev {m}/dev
mount -t tmpfs -o mode=0755 tmpfs {m}/run
mkdir -p {m}/run/amiforge
mount --bind {shlex.quote(str(stage))} {m}/run/amiforge
created_resolv=0
if [ ! -e {m}/etc/resolv.conf ] && [ ! -L {m}/etc/resolv.conf ]; then : > {m}/etc/resolv.conf; created_resolv=1; fi
if [ -f /etc/resolv.conf ] && [ ! -L {m}/etc/resolv.conf ]; then
    # Read-only: a step that rewrites its resolv.conf must not rewrite the host's.
    mount --bind /etc/resolv.conf {m}/etc/resolv.conf && mount -o remount,bind,ro {m}/etc/resolv.conf
fi
# Written inside the chroot, so a symlink in the image cannot point the write at a host file.
chroot {m} /bin/sh -c "rm -f /usr/sbin/policy-rc.d && printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d \\
    && chmod 0755 /usr/sbin/policy-rc.d"
rc=0
chroot {m} /usr/bin/env -i {env} {cmd} || rc=$?
chroot {m} /bin/rm -f /usr/sbin/policy-rc.d
umount {m}/etc/resolv.conf 2>/dev/null || true
if [ "$created_resolv" = 1 ] || [ {int(drop_resolv_conf)} = 1 ]; then rm -f {m}/etc/resolv.conf; fi
exit $rc
"""
    run(
        ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private", "sh", "-c", script],
        log=log,
        timeout=timeout,
        what=what,
    )


@contextmanager
def held_mount(mount: str, target: Path, what: str) -> Iterator[Path]:
    """Run the shell `mount` command (which mounts at `target`) in a private mount namespace held by a waiting
    child, and yield `target` as seen from inside it (/proc/<pid>/root/…). The child exits, and the kernel drops
    the mount, when its stdin closes: on leaving the context, or when this process dies."""
    proc = subprocess.Popen(
        [require("unshare"), "--mount", "--propagation", "private", "sh", "-c",
         f"set -e; {mount}; echo mounted; read _ || true"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = proc.stdout.readline().strip()
        if first != "mounted":
            raise InfraError(
                f"cannot mount {what}: {first} {proc.stdout.read()}".strip(),
                fix="amiforge mounts as root in a private namespace: run it as root (`amiforge doctor` checks), and "
                "check the disk is an image amiforge made",
            )
        yield Path(f"/proc/{proc.pid}/root") / str(target).lstrip("/")
    finally:
        proc.stdin.close()
        end_process(proc, grace=10)
        proc.stdout.close()


@contextmanager
def overlay_view(lowers: Sequence[Path], scratch: Path) -> Iterator[Path]:
    """A read-only merged view of `lowers` while the context is open."""
    merged = Path(tempfile.mkdtemp(prefix="view-", dir=scratch))
    try:
        # A lowerdir-only overlay is read-only by construction: nothing can write into a cached layer.
        mount = f"mount -t overlay overlay -o lowerdir={shlex.quote(_lowerdir(lowers))} {shlex.quote(str(merged))}"
        with held_mount(mount, merged, "the image's merged view") as view:
            yield view
    finally:
        merged.rmdir()
