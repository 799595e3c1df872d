"""The boundary between the pipeline (lifecycle/) and the places images are made and run (providers/).

The lifecycle verbs only ever see these types; each provider lives in its own folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

from amiforge.model import Artifact, BootReport, LayerRecord

if TYPE_CHECKING:
    from amiforge.recipe import Checks, Recipe
    from amiforge.recipe import Provider as ProviderSpec

PhaseState = Literal["start", "done", "failed"]


@dataclass(frozen=True)
class PhaseUpdate:
    """Progress of one phase of long work (a layer, mkfs, a boot): shown as a progress row by the CLI."""

    name: str
    state: PhaseState
    detail: str = ""
    seconds: float | None = None


@dataclass
class RunContext:
    """What a provider needs from its caller while it works.

    `cleanup` is the ExitStack every temporary resource registers with the moment it exists (DESIGN §3 rule 5);
    the caller closes it, on failure too. `log` receives the human-readable build log kept with the version.
    """

    run_id: str
    cleanup: ExitStack
    log: Callable[[str], None] = lambda _line: None
    progress: Callable[[PhaseUpdate], None] = lambda _u: None
    phases: dict[str, float] = field(default_factory=dict)

    def phase_done(self, name: str, seconds: float, detail: str = "") -> None:
        self.phases[name] = round(seconds, 3)
        self.progress(PhaseUpdate(name, "done", detail, seconds))


@dataclass(frozen=True)
class ImageView:
    """What a scan reads: the image's files (read-only) and, where the provider has one, its raw disk bytes."""

    root: Path
    raw: Path | None
    # Byte ranges of `raw` that no file uses (free blocks), where deleted data would lie; None: unknown.
    unallocated: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class BakeResult:
    artifact: Artifact
    layers: tuple[LayerRecord, ...]


@dataclass(frozen=True)
class Copy:
    """One distributed copy of an artifact: a new artifact in another region, made from `source`."""

    source: Artifact
    artifact: Artifact
    adopted: bool  # an earlier attempt had made it
    shared_with: tuple[str, ...]


@runtime_checkable
class Distributor(Protocol):
    """A provider whose artifacts can be copied to other regions and shared (the recipe's distribution block)."""

    def distribute(
        self,
        artifact: Artifact,
        spec: ProviderSpec,
        *,
        run_id: str,
        public: bool,
        on_copy: Callable[[Copy], None],
        progress: Callable[[PhaseUpdate], None],
    ) -> list[Copy]:
        """Converge every target region; safe to rerun with the same run id (what exists is adopted).
        `on_copy` is called as each copy is done (from worker threads), so a crash loses none of them."""
        ...


@runtime_checkable
class Adopter(Protocol):
    """A provider that can register an image made by another tool (Packer) as an artifact."""

    def adopt(self, region: str, location: str) -> Artifact:
        """The artifact for an existing, available image; NotFound/StateError otherwise. Reads only."""
        ...


@runtime_checkable
class Publisher(Protocol):
    """A provider that publishes a channel's image where consumers read it (SSM parameters, launch templates)."""

    def publish(
        self, artifacts: list[Artifact], spec: ProviderSpec, *, name: str, channel: str, run_id: str
    ) -> list[dict[str, object]]:
        """Point `name`'s `channel` at these artifacts, one per region; idempotent. Returns one record per
        publication, including what it replaced (the rollback target)."""
        ...


class Provider(Protocol):
    name: ClassVar[str]

    def preflight(self, recipe: Recipe) -> None:
        """Check that the recipe can be baked here (tools present, base resolvable). No side effects."""
        ...

    def bake(self, recipe: Recipe, ctx: RunContext) -> BakeResult:
        """Build the image. Leaves nothing behind on failure (everything temporary is on ctx.cleanup)."""
        ...

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: ProviderSpec) -> BootReport:
        """Boot a throw-away copy of the artifact, wait for readiness, run the checks. Never writes the artifact.
        `spec` is the recipe's provider block as baked (where and on what the test runs).
        Returns the report whatever the outcome; the caller's gate decides."""
        ...

    def inspect(self, artifact: Artifact) -> AbstractContextManager[ImageView]:
        """A read-only view of exactly the bytes the artifact ships (for scans), gone when the context ends."""
        ...

    def current_digest(self, artifact: Artifact) -> str:
        """The digest of the artifact as it exists now, recomputed from its bytes (or the cloud's record)."""
        ...


# --- fleets: what runs images (a local set of QEMU guests, an Auto Scaling group) --------------------------------

MemberState = Literal["launching", "ready", "failed", "stopped"]
SignalKind = Literal["launch", "ready", "failed", "replaced"]


@dataclass(frozen=True)
class Member:
    """One instance of a fleet: a QEMU guest or an EC2 instance, and the version it runs."""

    id: str
    version_ref: str | None  # NAME@N it was launched from (None: not launched by amiforge)
    location: str  # the artifact it runs: a qcow2 path or an AMI id
    state: MemberState
    launched_at: datetime
    time_to_ready: float | None = None  # seconds from launch to AMIFORGE-READY, once ready
    detail: str = ""  # why it failed, or what it is waiting for


@dataclass(frozen=True)
class BootSignal:
    """Something a member did, read from the fleet itself (console lines, instance state), never assumed."""

    member: str
    kind: SignalKind
    at: datetime
    version_ref: str | None
    time_to_ready: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Replacement:
    """Replace `member` by a new member on the new version. `token` makes it idempotent: a fleet asked again with
    the same token (a resumed rollout) finds the member it launched for it instead of launching another."""

    member: str
    token: str


class Fleet(Protocol):
    """A named set of machines running images; the rollout controller's only view of it."""

    target: str

    def current(self) -> list[Member]:
        """What is really running now (reconciled with the machines, not a cache)."""
        ...

    def replace(
        self, replacements: Sequence[Replacement], artifact: Artifact, version_ref: str, checks: Checks
    ) -> list[Member]:
        """Launch one new member per replacement on `artifact` (at most as many booting at once as the fleet allows),
        wait until each is ready or failed (`checks` as the boot test runs them), then stop the members they replace.
        Returns the new members in the order asked. Idempotent per token; an old member already gone is fine."""
        ...

    def signals(self, since: datetime) -> list[BootSignal]:
        """Launch/ready/failed/replaced signals of every member since `since`, oldest first."""
        ...

    def alarms_firing(self, names: Sequence[str]) -> list[str]:
        """Which of the named alarms are firing now (a gate of the strategy). A fleet with no alarms refuses names."""
        ...


@runtime_checkable
class FleetProvider(Protocol):
    """A provider whose targets can be rolled out to: `name` is the provider's own target name (a local fleet's
    name; `REGION/GROUP` for an Auto Scaling group)."""

    def fleet(self, name: str) -> Fleet: ...

    def fleet_region(self, name: str) -> str:
        """The region whose artifact of a version the fleet runs."""
        ...
