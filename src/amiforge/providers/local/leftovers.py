"""What local runs left behind: the temporary directories of layer and base builds, disk builds, scans and boot tests
that a run could not remove (its cleanup failed and it recorded an `orphaned` event) or never got to remove (amiforge
was killed with -9, the machine went down). `plan_local_gc()` finds them; `apply_local_gc()` removes them.

Only directories in the places amiforge makes them, with the prefixes it gives them, are ever candidates: an
`orphaned` event naming any other path (a damaged or hand-edited registry) is kept and says why, never removed. A
directory any process still uses — its working directory, its root (a chroot), an open file, a mount under it — is
kept whatever its age, and so is one another user owns; one nobody uses is an orphan once it is older than `min_age`
(never less than ten minutes), whether an event recorded it or a killed run left it unrecorded.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from amiforge.durations import format_duration
from amiforge.errors import ConfigError, GateFailed, GateFailure
from amiforge.model import Leftover
from amiforge.providers.interface import LOCAL_GC_REGION, GcOutcome, GcPlan, GcResult, Orphan, RunState
from amiforge.providers.local.tools import remove_tree
from amiforge.settings import Settings

LOCAL = LOCAL_GC_REGION
# No run keeps a temporary directory of its own idle longer than its longest step allows; gc never goes below this.
MIN_AGE = timedelta(minutes=10)


@dataclass(frozen=True)
class TempPlace:
    """A folder where runs make temporary directories, and the prefix they give them."""

    parent: Path
    prefix: str
    made_by: str

    def holds(self, path: Path) -> bool:
        return path.parent == self.parent and path.name.startswith(self.prefix)


def temp_places(settings: Settings) -> tuple[TempPlace, ...]:
    """Every place the local provider (and the AWS provider's local work) makes temporary directories."""
    cache = settings.cache_dir
    tmp = Path(tempfile.gettempdir())
    return (
        TempPlace(cache / "layers", ".tmp-", "a layer build"),
        TempPlace(cache / "base", ".tmp-", "a base build"),
        TempPlace(cache, "amiforge-disk-", "a disk build"),
        TempPlace(cache / "scratch", "amiforge-inspect-", "a scan"),
        TempPlace(cache / "scratch", "amiforge-ami-", "a scan of an AMI snapshot"),
        TempPlace(tmp, "amiforge-boot-", "a boot test"),
        TempPlace(tmp, "amiforge-step-", "an EC2 bake step"),
    )


def _processes() -> Iterator[Path]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield Path(entry.path)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040 …)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points(mountinfo: bytes) -> list[str]:
    """The mount points of a /proc/PID/mountinfo, unescaped and decoded as the file system names them."""
    return [_unescape(os.fsdecode(f[4])) for f in (line.split() for line in mountinfo.splitlines()) if len(f) > 4]


def paths_in_use() -> list[str]:
    """Every path some process on this machine uses now: working directories, roots, open files, mount points (as
    seen from each process's own mount namespace: an overlay in a private namespace counts)."""
    used: list[str] = []
    for proc in _processes():
        try:
            for link in ("cwd", "root"):
                used.append(os.readlink(proc / link))
            used += [os.readlink(fd.path) for fd in os.scandir(proc / "fd")]
            used += mount_points((proc / "mountinfo").read_bytes())
        except OSError:
            continue  # the process ended, or is not ours to read
    return used


def _in_use(path: Path, used: Sequence[str]) -> bool:
    root = str(path)
    return any(u == root or u.startswith(root + "/") for u in used)


def plan_local_gc(
    settings: Settings,
    *,
    recorded: Sequence[tuple[str | None, Leftover]],
    run_state: Callable[[str], RunState],
    min_age: timedelta,
    now: datetime,
    used: Sequence[str] | None = None,
) -> GcPlan:
    """The local leftovers gc would remove, and the ones it keeps, with reasons. No side effects.

    A candidate is a directory in one of the places runs make them, owned by this user, that no process uses, and
    older than `min_age` (never less than MIN_AGE): whether an `orphaned` event recorded it (its run's cleanup failed)
    or not (a killed run). `recorded`: (run id, leftover) of every `orphaned` event; `used`: paths in use (default:
    read from /proc)."""
    if now.tzinfo is None:
        raise ConfigError("gc needs a timezone-aware `now`", fix="pass datetime.now(UTC)")
    places = temp_places(settings)
    in_use = paths_in_use() if used is None else used
    floor = max(min_age, MIN_AGE)
    recorded_runs = {Path(leftover.where): run for run, leftover in recorded if leftover.what == "temporary directory"}
    found = set(recorded_runs)
    for where in places:
        if where.parent.is_dir():
            found.update(entry for entry in where.parent.iterdir() if where.holds(entry))
    orphans: list[Orphan] = []
    kept: list[tuple[str, str]] = []
    for path in sorted(found):
        place = next((p for p in places if p.holds(path)), None)
        if place is None:
            kept.append((str(path), "an orphaned event names it, but amiforge never makes directories there"))
            continue
        try:
            info = path.lstat()
        except OSError:
            continue  # recorded, but gone since
        if not stat.S_ISDIR(info.st_mode):
            continue  # a file or a symlink where amiforge makes directories: not one of ours
        run = recorded_runs.get(path)
        created = datetime.fromtimestamp(info.st_mtime, UTC)
        if info.st_uid != os.geteuid():
            kept.append((str(path), f"owned by uid {info.st_uid}, not by this user"))
        elif _in_use(path, in_use):
            kept.append((str(path), "in use by a running process"))
        elif run is not None and run_state(run) == "active":
            kept.append((str(path), f"its run {run} is still active"))
        elif now - created < floor:
            kept.append((str(path), f"younger than {format_duration(floor.total_seconds())}: a run may still use it"))
        else:
            why = "its run's cleanup failed (orphaned event)" if run is not None else "unused (a killed run)"
            reason = f"temporary directory of {place.made_by}, {why}"
            orphans.append(Orphan("directory", str(path), LOCAL, run, reason, "present", created))
    return GcPlan(region=LOCAL, orphans=tuple(orphans), kept=tuple(kept))


def apply_local_gc(settings: Settings, plan: GcPlan, *, max_deletions: int) -> GcResult:
    """Remove the plan's directories; refuses (before removing any) more than `max_deletions`. A directory that came
    into use since the plan, or left the places amiforge makes directories, is skipped."""
    if len(plan.orphans) > max_deletions:
        raise GateFailed(
            "blast radius",
            [GateFailure(f"{o.kind} {o.id}", o.reason) for o in plan.orphans],
            fix=f"{len(plan.orphans)} leftovers exceed the cap of {max_deletions}: review the plan, then pass --max",
        )
    places = temp_places(settings)
    used = paths_in_use()
    outcomes: list[GcOutcome] = []
    for orphan in plan.orphans:
        path = Path(orphan.id)
        if not any(p.holds(path) for p in places):
            outcomes.append(GcOutcome(orphan, "skipped", "not in a place amiforge makes temporary directories"))
        elif not path.exists() and not path.is_symlink():
            outcomes.append(GcOutcome(orphan, "gone", "already removed"))
        elif path.is_symlink() or not path.is_dir() or path.lstat().st_uid != os.geteuid():
            outcomes.append(GcOutcome(orphan, "skipped", "no longer a directory of this user's"))
        elif _in_use(path, used):
            outcomes.append(GcOutcome(orphan, "skipped", "a process started using it since the plan"))
        else:
            try:
                remove_tree(path)
                outcomes.append(GcOutcome(orphan, "deleted", "removed"))
            except OSError as e:
                outcomes.append(GcOutcome(orphan, "failed", f"{type(e).__name__}: {e}"))
    return GcResult(region=plan.region, outcomes=tuple(outcomes))
