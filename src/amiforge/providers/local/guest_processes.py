"""Fleet members' QEMU processes: starting one detached, finding ours in /proc (pids get reused, so a pid counts only
while its cmdline is our QEMU on that member's disk), stopping them, and when one was first seen gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from amiforge.errors import InfraError
from amiforge.providers.local import qemu

# After SIGTERM, how long QEMU gets before SIGKILL; it exits at once on SIGTERM, so this is only a backstop.
STOP_GRACE = 5.0

PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread

# QEMUs this process started: polled so that an exited one is reaped (a zombie keeps its /proc entry).
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def qemu_args(pid: int) -> list[str] | None:
    """The argv of `pid` if it is a live QEMU system emulator, else None (gone, a zombie, something else)."""
    child = CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:  # ours and not reaped, so the pid cannot have been reused
            return [str(a) for a in child.args] if isinstance(child.args, list) else None
        del CHILDREN[pid]
        return None
    for _ in range(10):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            if raw:
                break
            # Empty: a zombie, a kernel thread, or a process that has just exec'd (for a moment). Wait only
            # for the last.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] in "ZX" or int(fields[6]) & PF_KTHREAD:
                return None
        except (OSError, IndexError, ValueError):
            return None
        time.sleep(0.05)
    args = raw.decode("utf-8", "replace").split("\0")
    return args if os.path.basename(args[0]).startswith("qemu-system") else None


def runs_disk(args: Sequence[str], overlay: Path) -> bool:
    # As QEMU was given it (qemu.GuestSpec.command): a comma in the path doubled.
    return any(a.startswith(f"file={qemu.option_value(overlay)},") for a in args)


def find_guests(where: Path) -> list[int]:
    """Every QEMU whose disk is under `where`: also those whose pid was never recorded."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            args = qemu_args(int(entry))
            if args is not None and any(a.startswith(f"file={qemu.option_value(where)}/") for a in args):
                found.append(int(entry))
    return found


def end_guests(pids: Sequence[int]) -> None:
    """SIGTERM, then SIGKILL whatever still runs after STOP_GRACE; returns once every one is gone."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
        left = [p for p in pids if qemu_args(p) is not None]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if qemu_args(p) is not None]
        if not left:
            return
    raise InfraError(f"QEMU pid(s) {left} survived SIGKILL", retryable=True)


def spawn_guest(spec: qemu.GuestSpec) -> subprocess.Popen[bytes]:
    """Start a fleet member's QEMU, detached: a session of its own (a Ctrl-C or a closing terminal does not reach
    it), stdin /dev/null and the console in a file, so it runs on after the process that started it exits."""
    qemu.prepare(spec)
    with open(spec.workdir / "qemu.log", "wb") as err:
        return subprocess.Popen(
            spec.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=spec.workdir,
            start_new_session=True,
        )


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def first_seen(path: Path, now: datetime) -> datetime:
    """The time recorded in `path`, or `now`, recorded there if nobody did yet (a hard link: the first one wins
    and is never half-written)."""
    seen = seen_at(path)
    if seen is not None:
        return seen
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(now.isoformat())
    try:
        os.link(tmp, path)
        return now
    except FileExistsError:
        return seen_at(path) or now
    finally:
        tmp.unlink(missing_ok=True)


def seen_at(path: Path) -> datetime | None:
    try:
        return datetime.fromisoformat(path.read_text())
    except (OSError, ValueError):
        return None


# --- the fleet ----------------------------------------------------------------------------------------------
