"""Frozen domain types shared by every layer, and the version state machine.

Pydantic stays at the edges (recipe files, settings, HTTP payloads); inside, everything is one of these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from amiforge.errors import StateError


class Status(StrEnum):
    BAKING = "baking"
    BUILT = "built"
    TESTED = "tested"
    SCANNED = "scanned"
    SIGNED = "signed"
    DEPRECATED = "deprecated"
    RETIRED = "retired"
    FAILED = "failed"
    REVOKED = "revoked"


# Which state may follow which. A boot test may run again on a built, tested or failed version (a failed
# version that has a disk can pass a later test, e.g. after a timeout on a busy machine); everything that
# is not listed is refused. Retired is terminal.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.BAKING: frozenset({Status.BUILT, Status.FAILED}),
    Status.BUILT: frozenset({Status.TESTED, Status.FAILED, Status.REVOKED, Status.DEPRECATED}),
    Status.TESTED: frozenset({Status.TESTED, Status.SCANNED, Status.FAILED, Status.REVOKED, Status.DEPRECATED}),
    Status.SCANNED: frozenset({Status.SIGNED, Status.FAILED, Status.REVOKED, Status.DEPRECATED}),
    Status.SIGNED: frozenset({Status.REVOKED, Status.DEPRECATED}),
    Status.DEPRECATED: frozenset({Status.RETIRED, Status.REVOKED}),
    Status.FAILED: frozenset({Status.TESTED, Status.RETIRED}),
    Status.REVOKED: frozenset({Status.RETIRED}),
    Status.RETIRED: frozenset(),
}


def check_transition(current: Status, target: Status) -> None:
    """Raise StateError unless `current -> target` is a legal step of the state machine."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (terminal state)"
        raise StateError(
            f"a version in state '{current}' cannot become '{target}'",
            fix=f"from '{current}' the allowed next states are: {allowed}",
        )


@dataclass(frozen=True)
class ImageVersion:
    """One bake of one recipe: NAME@N."""

    id: int
    name: str
    number: int
    status: Status
    recipe_digest: str
    recipe_path: str
    provider: str
    created_at: datetime
    updated_at: datetime
    digest: str | None = None  # sha256 of the disk image; None until built
    size_bytes: int | None = None
    parent: str | None = None  # ref of the version this one succeeds (ancestry)
    tags: Mapping[str, str] = field(default_factory=dict)
    log: str = ""
    recipe: str = ""  # the recipe as baked, canonical JSON

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"


@dataclass(frozen=True)
class Artifact:
    """One physical copy of a version: a qcow2 (+ kernel, initrd) in a local region, or an AMI."""

    provider: str
    region: str
    location: str  # local: path of the disk image; aws: ami id
    digest: str
    size_bytes: int
    kernel: str | None = None
    initrd: str | None = None
    id: int | None = None
    version_id: int | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class LayerRecord:
    """One layer of a bake: the base, or one recipe step. `hit` says whether the cache served it."""

    index: int
    key: str
    description: str
    hit: bool
    seconds: float
    size_bytes: int


@dataclass(frozen=True)
class CheckResult:
    name: str  # e.g. "unit nginx", "command nginx -t", "http :80/"
    kind: str  # ready | unit | command | http | tcp
    passed: bool
    detail: str


@dataclass(frozen=True)
class BootReport:
    passed: bool
    time_to_ready: float | None  # seconds from QEMU start to the AMIFORGE-READY marker; None if never ready
    checks: tuple[CheckResult, ...]
    console: str
    accel: str  # tcg | kvm
    started_at: datetime
    duration: float
    id: int | None = None
    version_id: int | None = None


@dataclass(frozen=True)
class Event:
    """Append-only audit record. `hash` covers every field plus the previous event's hash."""

    seq: int
    at: datetime
    actor: str
    kind: str
    ref: str | None
    data: Mapping[str, object]
    prev_hash: str
    hash: str
