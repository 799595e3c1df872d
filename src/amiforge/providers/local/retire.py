"""Retire on this machine: what uses an image of the local store, and removing one.

Two sources say what uses a local image, and both are read completely or reported as failed:

- **fleets**: every member that has not been stopped holds its image, and the member it replaced holds its own (that
  is what a rollback boots again);
- **QEMU**: every QEMU process running on this machine whose kernel is an image's (`-kernel`, read from /proc): a
  boot test, a fleet member, a guest someone started by hand from the store.

An image is three files, `<digest>.qcow2`, `.vmlinuz` and `.initrd`. Deregistering one moves them into the local
Recycle Bin, `<data>/recycle-bin/<region>/`, the disk last (a present disk always means a whole image, as a bake
writes it last); they are the image's "snapshots": deleted once the policy's `snapshot_grace` is over, and until then
`amiforge retire restore` moves them back. Deprecation is the registry's alone.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from pathlib import Path

from amiforge.errors import AmiforgeError, InfraError, NotFound
from amiforge.model import Artifact
from amiforge.providers.interface import (
    ImageState,
    Reference,
    RegionSurvey,
    Running,
    RunningSurvey,
    SourceFailure,
    Stored,
)
from amiforge.providers.local.fleet import list_fleets, open_fleet
from amiforge.providers.local.guest_processes import qemu_args
from amiforge.settings import Settings


def fleet_references(settings: Settings, region: str) -> list[Reference]:
    """Every member not stopped, and each member one of those replaced; InfraError if a fleet cannot be read."""
    found = []
    for name in list_fleets(settings):
        try:
            records = open_fleet(settings, name).records()
        except AmiforgeError as e:
            raise InfraError(f"fleet {name!r}: {e.message}") from e
        by_id = {r.id: r for r in records}
        for rec in records:
            if rec.stopped_at is not None:
                continue
            found.append(Reference("fleet", f"{name}, member {rec.id}", region, rec.location, rec.version_ref))
            old = by_id.get(rec.replaces or "")
            if old is not None:
                found.append(
                    Reference("fleet", f"{name}, member {old.id} (what {rec.id} rolls back to)", region, old.location,
                              old.version_ref)
                )  # fmt: skip
    return found


def qemu_references(artifacts: Sequence[Artifact], region: str) -> list[Reference]:
    """Every running QEMU booted from one of these images' kernels."""
    by_kernel = {a.kernel: a.location for a in artifacts if a.kernel}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        args = qemu_args(int(entry))
        if args is None:
            continue
        for flag, value in itertools.pairwise(args):
            if flag == "-kernel" and value in by_kernel:
                found.append(Reference("qemu", f"pid {entry}", region, by_kernel[value]))
    return found


def survey_local(settings: Settings, region: str, artifacts: Collection[Artifact]) -> RegionSurvey:
    listed = list(artifacts)
    references: list[Reference] = []
    failures: list[SourceFailure] = []
    sources: list[tuple[str, Callable[[], list[Reference]]]] = [
        ("fleets", lambda: fleet_references(settings, region)),
        ("QEMU processes", lambda: qemu_references(listed, region)),
    ]
    for source, read in sources:
        try:
            references += read()
        except (AmiforgeError, OSError) as e:
            failures.append(SourceFailure(region, source, str(e)))
    images = {a.location: ImageState(a.location, present=Path(a.location).is_file()) for a in listed}
    return RegionSurvey(region, tuple(references), tuple(failures), images)


def recycle_bin(settings: Settings, region: str) -> Path:
    return settings.data_dir / "recycle-bin" / region


# The files of an image in the store, as a bake writes them (providers/local/disk.py): <digest>.<suffix>.
_SUFFIXES = (".qcow2", ".vmlinuz", ".initrd")


def _files(settings: Settings, artifact: Artifact) -> list[tuple[Path, Path]]:
    """(where each file of the image lives, where it waits in the Recycle Bin), the disk first. Only files a bake
    could have made are ever moved: in this machine's image store (`<regions>/<region>/<image>/`), named
    `<digest>.qcow2|.vmlinuz|.initrd`. A registry row naming anything else — a hand edit, a damaged row — is refused
    (InfraError), whatever it says."""
    if artifact.region != settings.region:
        raise InfraError(
            f"{artifact.location} is recorded in region {artifact.region!r}; this machine's image store is "
            f"{settings.region!r}",
            fix="retire it on the machine that holds it, or set AMIFORGE_REGION",
        )
    store_dir = (settings.regions_dir / settings.region).resolve()
    bin_dir = recycle_bin(settings, settings.region)
    found = []
    for path in [Path(artifact.location)] + [Path(p) for p in (artifact.kernel, artifact.initrd) if p]:
        real = path.resolve()
        if real.parent.parent != store_dir or real.stem != artifact.digest or real.suffix not in _SUFFIXES:
            raise InfraError(
                f"{path} is not a file of {artifact.digest[:12]}… in the local image store ({store_dir}); it is not "
                "touched",
                fix="the registry names a file outside the image store: check its artifacts table",
            )
        found.append((real, bin_dir / real.name))
    return found


def deprecate_local(settings: Settings, artifact: Artifact, _at: datetime) -> tuple[str, ...]:
    """Nothing on disk marks a local image deprecated: the registry does. Its "snapshots" are where its files will
    wait in the Recycle Bin once it is deregistered."""
    return tuple(str(binned) for _, binned in _files(settings, artifact))


def remove_image(settings: Settings, artifact: Artifact) -> bool:
    """Move the image's files into the Recycle Bin, the disk first (a disk in the store always has its kernel and
    initrd beside it; a kill after the disk went leaves the rest for the next run, which moves it); False if the
    disk was already gone."""
    files = _files(settings, artifact)
    present = files[0][0].is_file()
    files[0][1].parent.mkdir(parents=True, exist_ok=True)
    for live, binned in files:
        if live.is_file():
            os.replace(live, binned)
    return present


def delete_binned(settings: Settings, region: str, paths: Sequence[str]) -> list[str]:
    """Delete these files of the Recycle Bin (only files in it: a path anywhere else is refused, whatever the
    registry says). Gone is fine."""
    if region != settings.region:
        raise InfraError(f"region {region!r} is not this machine's ({settings.region!r}); nothing is deleted")
    bin_dir = recycle_bin(settings, settings.region).resolve()
    for path in map(Path, paths):
        if path.resolve().parent != bin_dir:
            raise InfraError(
                f"{path} is not in the Recycle Bin ({bin_dir}); it is not deleted",
                fix="the registry names a file outside the Recycle Bin: check its retirements table",
            )
        path.unlink(missing_ok=True)
    return []


def restore_image(settings: Settings, artifact: Artifact) -> None:
    """Move the image's files back from the Recycle Bin, the disk last. NotFound if its disk is not there."""
    files = _files(settings, artifact)
    disk, binned_disk = files[0]
    if not binned_disk.is_file() and not disk.is_file():
        raise NotFound(
            f"{artifact.location} is in neither the image store nor the Recycle Bin ({binned_disk.parent})",
            fix="its files were deleted (the policy's snapshot_grace was over): bake the recipe again",
        )
    for live, binned in reversed(files):
        if binned.is_file() and not live.exists():
            os.replace(binned, live)
        elif binned.is_file():
            binned.unlink()  # the store has the file again (a later bake of the same bytes): the same content


def running_local(settings: Settings, region: str) -> RunningSurvey:
    """Every member of every fleet on this machine that has not been stopped."""
    machines: list[Running] = []
    failures: list[SourceFailure] = []
    for name in list_fleets(settings):
        try:
            members = open_fleet(settings, name).current()
        except AmiforgeError as e:
            failures.append(SourceFailure(region, f"fleet {name}", e.message))
            continue
        machines += [Running("local", region, name, m) for m in members if m.state != "stopped"]
    return RunningSurvey(tuple(machines), tuple(failures))


def stored_local(settings: Settings, artifacts: Collection[Artifact]) -> dict[str, Stored]:
    """The files of each image, in the store or in the Recycle Bin (local images carry no tags of their own)."""
    found = {}
    for artifact in artifacts:
        try:
            pairs = _files(settings, artifact)
        except InfraError:
            continue  # not an image of this machine's store: nothing of it is stored here
        files = [live if live.is_file() else binned for live, binned in pairs]
        present = [f for f in files if f.is_file()]
        if present:
            size = sum(f.stat().st_size for f in present)
            found[artifact.location] = Stored(artifact.location, size, True, {},
                                              tuple(("file", str(f), {}) for f in present))  # fmt: skip
    return found
