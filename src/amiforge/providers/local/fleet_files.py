"""The files a local fleet is kept in (pydantic at the edge).

Everything about a fleet lives in files under `<data>/fleets/NAME/`; there is no daemon and no cache:

    fleet.json          name, created, member ids in launch order
    .lock               flock'ed while a member is recorded or marked stopped, so a token never launches twice
    g-1a2b3c4d/         one folder per member (kept after it stops, as history, until the fleet is destroyed)
        member.json     id, token, version_ref, artifact location/kernel/initrd, launched_at, stopped_at (+ why),
                        the in-guest checks and the deadline it is judged by, forwarded ports, its release file
        overlay.qcow2   the member's own disk; the artifact is only ever its read-only backing file
        checks.sh       the in-guest checks, passed in by fw_cfg
        release         what the guest is booted as (/etc/amiforge/release in it), passed in by fw_cfg
        console.log     the serial console, written by QEMU: READY and the check results are read from it
        qemu.log        QEMU's own stderr (why it refused to start or stopped)
        qemu.pid        the QEMU pid, written right after the start
        exited          when amiforge first saw this QEMU gone without having asked it to stop
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from amiforge.errors import ConfigError, InfraError
from amiforge.inputs import read_input
from amiforge.providers import guest as in_guest

StopCause = Literal["replaced", "failed"]


class FleetFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    created: datetime
    # Member ids name folders of the fleet's own: never a path that could lead out of it.
    members: list[Annotated[str, StringConstraints(pattern=r"^g-[0-9a-f]{8}$")]]


class MemberFile(BaseModel):
    """member.json: everything needed to judge a member later, by another process, with no other state."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    token: str
    version_ref: str
    location: str
    kernel: str
    initrd: str
    launched_at: datetime
    ready_within: float
    checks: list[in_guest.GuestCheck]
    accel: str
    forwards: dict[int, int]  # guest port -> host port on 127.0.0.1
    replaces: str | None = None
    # /etc/amiforge/release as the guest is given it (image, version, digest, recipe digest, build time);
    # None: recorded by an amiforge that gave none.
    release: str | None = None
    launch_error: str | None = None
    stopped_at: datetime | None = None
    stop_cause: StopCause | None = None
    stop_reason: str = ""
    replaced_by: str | None = None
    failure: str | None = None  # the failure it was stopped for (a failed replacement)


_F = TypeVar("_F", FleetFile, MemberFile)


# fleet.json and member.json are a few KiB; anything bigger is not one of ours.
MAX_STATE_FILE = 1 << 20


def load_state(model: type[_F], path: Path) -> _F:
    """A fleet state file; FileNotFoundError if it is not there, InfraError (naming the file and the way out) if it
    is damaged: not a regular file, too big, not UTF-8 JSON, or not the shape amiforge wrote."""
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(path)
    fix = f"the fleet's files are damaged; `amiforge fleet destroy {path.parent.name}` stops its guests and removes it"
    if path.name == "member.json":
        fix = f"the fleet's files are damaged; `amiforge fleet destroy {path.parent.parent.name}` stops its guests"
    try:
        return model.model_validate_json(read_input(path, what="fleet state file", max_bytes=MAX_STATE_FILE, fix=fix))
    except ConfigError as e:
        raise InfraError(e.message, fix=fix) from e
    except ValidationError as e:
        raise InfraError(f"cannot read {path}: {e.error_count()} problem(s): {e.errors()[0]['msg']}", fix=fix) from e
