"""Retire on this machine: what uses an image of the local store, and removing one.

Two sources say what uses a local image, and both are read completely or reported as failed:

- **fleets**: every member that has not been stopped holds its image, and the member it replaced holds its own (that
  is what a rollback boots again);
- **QEMU**: every QEMU process running on this machine whose kernel is an image's (`-kernel`, read from /proc): a
  boot test, a fleet member, a guest someone started by hand from the store.

An image is three files, `<digest>.qcow2`, `.vmlinuz` and `.initrd`; the disk is removed last, so a present disk
always means a whole image (as a bake writes it first). A local image has no snapshots, and deprecation is the
registry's alone.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from pathlib import Path

from amiforge.errors import AmiforgeError, InfraError
from amiforge.model import Artifact
from amiforge.providers.interface import ImageState, Reference, RegionSurvey, SourceFailure
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


def remove_image(artifact: Artifact) -> bool:
    """Remove the image's files, the disk last; False if the disk was already gone."""
    disk = Path(artifact.location)
    present = disk.is_file()
    for side in (artifact.kernel, artifact.initrd):
        if side:
            Path(side).unlink(missing_ok=True)
    disk.unlink(missing_ok=True)
    return present


def deprecate_local(_artifact: Artifact, _at: datetime) -> tuple[str, ...]:
    """Nothing on disk marks a local image deprecated: the registry does. It has no snapshots."""
    return ()
