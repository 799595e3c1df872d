"""The boundary between the pipeline (lifecycle/) and the places images are made and run (providers/).

The lifecycle verbs only ever see these types; each provider lives in its own folder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, ParamSpec, Protocol, TypeVar, runtime_checkable

from amiforge.errors import AmiforgeError
from amiforge.model import Artifact, BootReport, LayerRecord, Leftover, RemovedFile
from amiforge.model import BootSignal as BootSignal
from amiforge.model import Member as Member
from amiforge.model import MemberState as MemberState
from amiforge.model import SignalKind as SignalKind

P = ParamSpec("P")
R = TypeVar("R")
logger = logging.getLogger(__name__)

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


class Cleanups(ExitStack):
    """The cleanups of one run, registered the moment each resource exists and run in reverse order when the run ends,
    on failure too (docs/architecture.md §3, step 2). A cleanup never raises — that would hide the error that caused the
    unwinding, and skip the cleanups after it: when one fails, what it left behind is kept in `leftovers` (all of them)
    for the run to report and record."""

    def __init__(self) -> None:
        super().__init__()
        self.leftovers: list[Leftover] = []

    def add(self, leftover: Leftover, remove: Callable[[], object]) -> None:
        """Run `remove` at the end of the run; if it fails, `leftover` (with the error) says what stayed behind."""

        def guarded() -> None:
            logger.info("cleanup: removing %s %s", leftover.what, leftover.where)
            try:
                remove()
            except Exception as e:
                self.leftovers.append(replace(leftover, error=f"{type(e).__name__}: {e}"))
                logger.info("cleanup failed (the command reports it): %s", self.leftovers[-1].describe())
            except BaseException as e:  # Ctrl-C, SIGTERM: this one is left (and said so); the rest still run
                self.leftovers.append(replace(leftover, error=f"interrupted ({type(e).__name__})"))
                logger.info("cleanup interrupted: %s", self.leftovers[-1].describe())
                raise

        super().callback(guarded)

    def callback(self, callback: Callable[P, R], /, *args: P.args, **kwds: P.kwargs) -> Callable[P, R]:
        """A cleanup that does not describe what it removes; guarded like `add`, and described by the call."""
        name = getattr(callback, "__name__", repr(callback))
        leftover = Leftover("what a cleanup removes", f"{name}{args!r}", "see the error; `amiforge gc` lists leftovers")
        self.add(leftover, lambda: callback(*args, **kwds))
        return callback


@dataclass(frozen=True)
class Release:
    """What a machine is told it runs, for software on it to read (/etc/amiforge/release, guest.release_file): the
    version it was baked as, or is booted as. An AMI carries it from its bake. A local image is content-addressed
    and may serve several versions, so it carries none: a local guest is given its release at boot (fw_cfg)."""

    image: str
    version: str  # NAME@N
    recipe_digest: str
    built_at: datetime  # when the version's bake started
    # The artifact's digest; None while the artifact is being baked (an AMI's digest is of what EC2 registers after
    # the bake: its id is in the instance's metadata instead).
    digest: str | None = None

    # Registry values are of this shape. The file is sourced by sh: anything else would need quoting that a
    # reader may not expect, so it is refused here, before anything is launched with it.
    VALUE: ClassVar[re.Pattern[str]] = re.compile(r"[A-Za-z0-9@._:+-]{1,200}")

    def __post_init__(self) -> None:
        if self.built_at.tzinfo is None:
            raise ValueError("built_at must be timezone-aware")
        values = {
            "image": self.image,
            "version": self.version,
            "recipe_digest": self.recipe_digest,
            "digest": self.digest,
        }
        bad = [k for k, v in values.items() if v is not None and not self.VALUE.fullmatch(v)]
        if bad:
            raise ValueError(f"release values not of the expected shape: {', '.join(bad)}")


@dataclass
class RunContext:
    """What a provider needs from its caller while it works.

    `cleanup` is where every temporary resource registers its removal the moment it exists (docs/architecture.md §3,
    step 2); the caller closes it, on failure too. `log` receives the human-readable build log kept with the version.
    """

    run_id: str
    cleanup: Cleanups
    release: Release | None = None  # a bake: the version it makes; a boot test: the version it boots
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
    # Filled when the view closes: what its cleanup could not remove (a scratch copy of the disk), for the caller.
    leftovers: list[Leftover] = field(default_factory=list)


@dataclass(frozen=True)
class BakeResult:
    artifact: Artifact
    layers: tuple[LayerRecord, ...]
    generalised: tuple[RemovedFile, ...] = ()  # what generalisation deleted that a step had written


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

# Members and their signals are domain data (the strategy judges them too): they live in model.py.


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
        self, replacements: Sequence[Replacement], artifact: Artifact, release: Release, checks: Checks
    ) -> list[Member]:
        """Launch one new member per replacement on `artifact` as `release` (at most as many booting at once as the
        fleet allows), wait until each is ready or failed (`checks` as the boot test runs them), then stop the
        members they replace. Returns the new members in the order asked. Idempotent per token; an old member
        already gone is fine."""
        ...

    def signals(self, since: datetime) -> list[BootSignal]:
        """Members' launch/ready/failed/replaced/heartbeat signals since `since`, oldest first."""
        ...

    def observe(self, since: datetime) -> tuple[list[Member], list[BootSignal]]:
        """`current()` and `signals(since)` as one reading of the fleet (telemetry's collector): where both come
        from the same source (a local member's console), it is read once, and the two agree."""
        ...

    def alarms_firing(self, names: Sequence[str]) -> list[str]:
        """Which of the named alarms are firing now (a gate of the strategy). A fleet with no alarms refuses names."""
        ...


@dataclass(frozen=True)
class MemberDetail:
    """A member of a kept fleet as an operator looks at it: the protocol's view plus where to reach it."""

    member: Member
    pid: int | None
    ports: Mapping[int, int]  # guest port → host port on 127.0.0.1
    console: str  # the path of its console log
    replaces: str | None


@dataclass(frozen=True)
class FleetDetail:
    name: str
    created: datetime
    where: str  # the folder holding its records and consoles
    members: list[MemberDetail]


@runtime_checkable
class FleetKeeper(Protocol):
    """A provider that makes and ends fleets itself (local: long-running QEMU guests that outlive the command).
    An Auto Scaling group is made outside amiforge and is only ever rolled out to."""

    def create_fleet(
        self,
        name: str,
        size: int,
        artifact: Artifact,
        release: Release,
        checks: Checks,
        *,
        progress: Callable[[PhaseUpdate], None],
    ) -> FleetDetail:
        """Boot `size` members of `artifact` as `release` and wait for each; members that fail stay, as failed. A
        failure midway (or an interruption) leaves no half-made fleet behind."""
        ...

    def fleet_detail(self, name: str) -> FleetDetail:
        """The fleet as it is now (reconciled with the running machines); NotFound if there is none."""
        ...

    def fleet_names(self) -> list[str]: ...

    def destroy_fleet(self, name: str) -> list[str]:
        """Stop every member and remove the fleet; the members that were running. Idempotent."""
        ...


# Statuses an instance refresh reports (AWS Auto Scaling's names): still running (one per group), rolling back or
# rolled back, and ended.
REFRESH_ACTIVE = frozenset({"Pending", "InProgress", "Baking", "Cancelling", "RollbackInProgress"})
REFRESH_ROLLBACK = frozenset({"RollbackInProgress", "RollbackSuccessful", "RollbackFailed"})
REFRESH_TERMINAL = frozenset({"Successful", "Failed", "Cancelled", "RollbackSuccessful", "RollbackFailed"})


@dataclass(frozen=True)
class RefreshStatus:
    """Where a fleet's own replacement of its machines (an instance refresh) stands."""

    refresh_id: str
    status: str  # Pending|InProgress|Baking|Successful|Failed|Cancelling|Cancelled|RollbackInProgress|RollbackFailed|…
    percentage_complete: int
    instances_to_update: int
    status_reason: str

    @property
    def active(self) -> bool:
        return self.status in REFRESH_ACTIVE


@runtime_checkable
class RefreshingFleet(Fleet, Protocol):
    """A fleet whose cloud replaces the machines itself (an Auto Scaling group's instance refresh): the controller
    starts the refresh, judges the new machines with its gates at each poll and rolls the refresh back on a failed
    gate (lifecycle/refresh.py). `token` makes starting idempotent: a resumed controller finds its own refresh."""

    region: str
    console_grace: float  # seconds the cloud takes to publish a machine's console, added to `ready_within`

    def now(self) -> datetime:
        """The cloud's clock (launch times are the cloud's wall-clock times)."""
        ...

    def start_refresh(
        self,
        artifact: Artifact,
        version_ref: str,
        *,
        checkpoints: Sequence[int],
        checkpoint_delay: int,
        alarms: Sequence[str],
        token: str,
        min_healthy_percentage: int = 90,
        auto_rollback: bool = True,
    ) -> str:
        """Start (or find, by `token`) the refresh of the whole fleet to `artifact`; its id. `auto_rollback`: the
        cloud rolls a failing refresh back to what the fleet ran at its start — off for a roll-forward, which starts
        from the bad version."""
        ...

    def refresh_status(self, refresh_id: str) -> RefreshStatus: ...

    def roll_back_refresh(self, refresh_id: str) -> RefreshStatus:
        """Roll an active refresh back; idempotent. StateError for one that has ended (roll forward instead)."""
        ...

    def refresh_batch_time(self) -> dict[str, float]:
        """What replacing one batch may take on the cloud's side, by part, in seconds (warm-up, lifecycle hooks,
        load balancer health checks and draining), as the fleet's configuration says; the controller adds the
        machines' own readiness allowance and judges a refresh stuck by it. Read only."""
        ...


@runtime_checkable
class FleetProvider(Protocol):
    """A provider whose targets can be rolled out to: `name` is the provider's own target name (a local fleet's
    name; `REGION/GROUP` for an Auto Scaling group)."""

    def fleet(self, name: str) -> Fleet: ...

    def fleet_region(self, name: str) -> str:
        """The region whose artifact of a version the fleet runs."""
        ...


# --- doctor: can this provider work here? ------------------------------------------------------------------


@dataclass(frozen=True)
class ToolStatus:
    tool: str
    package: str  # the Debian package that provides it
    path: str | None  # None: missing


@dataclass(frozen=True)
class HostReport:
    """What a provider that runs on this machine needs from it: host tools and the accelerator."""

    tools: list[ToolStatus]
    kvm_usable: bool
    kvm_why: str


@runtime_checkable
class HostChecker(Protocol):
    def host_report(self) -> HostReport:
        """Look at this machine without changing it (a KVM probe boots a cached kernel, if there is one)."""
        ...


# ok: ready; warn: works, with a caveat or something a static read cannot decide; fail: the operation would fail;
# skipped: not relevant here (no recipe, the recipe does not ask for it, the region is not enabled).
CheckStatus = Literal["ok", "warn", "fail", "skipped"]


@dataclass(frozen=True)
class AccountCheck:
    """One day-one check of an account (`doctor --aws`): what was checked and where, how it came out, the fix."""

    name: str
    status: CheckStatus
    detail: str
    fix: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class AccountReport:
    """Who amiforge is in a cloud account, which regions it can use, the least-privilege policy it needs, and the
    day-one checks (for a recipe, when one is given)."""

    account: str
    arn: str
    region: str
    regions: tuple[str, ...]
    policy: dict[str, Any]
    checks: tuple[AccountCheck, ...] = ()
    region_from: str = ""  # why `region` is the home region (asked for, the recipe's, configured, the default)
    policy_notes: tuple[AccountCheck, ...] = ()  # where the policy allows more than it could, and how to narrow it


@dataclass(frozen=True)
class PolicyScope:
    """What narrows the least-privilege policy an account report prints: the roles amiforge may give the instances
    it launches (AWS: iam:PassRole), and the signing keys (AWS: KMS key ARNs). Empty: allowed on any, and said so."""

    pass_roles: tuple[str, ...] = ()
    signing_keys: tuple[str, ...] = ()


@runtime_checkable
class AccountChecker(Protocol):
    def account_report(
        self, region: str | None, spec: ProviderSpec | None = None, *, scope: PolicyScope = PolicyScope()
    ) -> AccountReport:
        """Ask the cloud, read-only, from `region` (the home region; None: the provider picks one and says which in
        the report); with a recipe's provider section, also check what that recipe needs (its regions, network,
        encryption keys, sharing and quotas). `scope` narrows the policy the report prints."""
        ...


# --- gc: what finished runs left behind ------------------------------------------------------------------------

# This machine's leftovers are collected under this name, whatever AMIFORGE_REGION says: `gc --region local`.
LOCAL_GC_REGION = "local"

Kind = Literal["instance", "image", "snapshot", "volume", "key-pair", "directory"]
RunState = Literal["active", "finished", "unknown"]
# deleted: removed by this call; gone: already removed (by someone, or an earlier apply); failed: refused or erred;
# skipped: not attempted, because something that must go first did not.
Outcome = Literal["deleted", "gone", "failed", "skipped"]


@dataclass(frozen=True)
class Orphan:
    """One resource a finished run left behind, and why it counts as an orphan.

    `backs` (snapshots only): the orphaned images this snapshot backs; apply deletes it only once all are gone."""

    kind: Kind
    id: str
    region: str
    run_id: str | None
    reason: str
    state: str
    created: datetime | None
    name: str | None = None
    backs: tuple[str, ...] = ()


@dataclass(frozen=True)
class GcPlan:
    """What gc would remove in `region` (in apply order), and what it listed but keeps: (resource id, why kept)."""

    region: str
    orphans: tuple[Orphan, ...]
    kept: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class GcOutcome:
    orphan: Orphan
    outcome: Outcome
    detail: str
    error: AmiforgeError | None = field(default=None, compare=False)


@dataclass(frozen=True)
class GcResult:
    """Every orphan of the plan and what became of it, in the order apply worked."""

    region: str
    outcomes: tuple[GcOutcome, ...]

    def with_outcome(self, outcome: Outcome) -> tuple[GcOutcome, ...]:
        return tuple(o for o in self.outcomes if o.outcome == outcome)

    @property
    def ok(self) -> bool:
        """True when every orphan is gone now (deleted by this call or before it)."""
        return all(o.outcome in ("deleted", "gone") for o in self.outcomes)


@runtime_checkable
class Collector(Protocol):
    """A provider that finds, and only when asked removes, what finished runs left behind in a region: resources a
    failed cleanup recorded as leftovers, or that a killed run never got to remove (docs/architecture.md §8)."""

    def plan_gc(
        self,
        region: str,
        *,
        registered: Collection[str],
        run_state: Callable[[str], RunState],
        recorded: Sequence[tuple[str | None, Leftover]],
        min_age: timedelta,
        now: datetime,
    ) -> GcPlan:
        """What would be removed, and what was listed but kept, with reasons. No side effects. `registered`: the
        locations of every artifact the registry holds (never touched); `run_state(run)`: what the registry knows
        of a run; `recorded`: (run id, leftover) of every `orphaned` event."""
        ...

    def apply_gc(self, plan: GcPlan, *, max_deletions: int) -> GcResult:
        """Remove the plan's orphans (refusing, before any change, more than `max_deletions`)."""
        ...


# --- retire: what uses an image, and the way out -------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """One thing that uses an image (docs/architecture.md §15): a fleet member, an instance, a launch template
    version, a parameter, an account it is shared with. It names the image it holds (`location`, in `region`), or a
    version (`version`, NAME@N: every copy of it), or both."""

    source: str  # the kind of thing: "fleet", "instance", "launch template", "ssm parameter", "share", …
    name: str  # which one, as an operator would look it up: "i-0abc… (stopped)", "fleet web, member g-1a2b3c4d"
    region: str
    location: str | None = None
    version: str | None = None

    def describe(self) -> str:
        return f"{self.source} {self.name}"


@dataclass(frozen=True)
class SourceFailure:
    """A reference source that could not be read completely in a region: nothing is deleted there."""

    region: str
    source: str
    why: str


@dataclass(frozen=True)
class ImageState:
    """An artifact as its provider sees it now."""

    location: str
    present: bool  # False: gone (deregistered, its files removed)
    deprecated_at: datetime | None = None  # the cloud's own deprecation time, where it keeps one
    protection: str | None = None  # deregistration protection: None (off), "enabled", "enabled until …"
    snapshots: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegionSurvey:
    """One reading of a region for retire: everything that uses images there, and the state of the images asked
    about. A source that failed is listed in `failures`, never silently skipped; `calls` counts API calls by
    operation; `notes` are warnings (no Recycle Bin rule covers the region)."""

    region: str
    references: tuple[Reference, ...]
    failures: tuple[SourceFailure, ...]
    images: Mapping[str, ImageState]
    calls: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


Removal = Literal["removed", "gone", "waiting"]


@runtime_checkable
class Retirer(Protocol):
    """A provider whose artifacts can be retired (lifecycle/retire.py): it says what uses images in a region and
    takes each step out. Every step is idempotent: asked again after a kill, it finds the work done and says so."""

    def survey(self, region: str, artifacts: Collection[Artifact]) -> RegionSurvey:
        """Read every reference source of `region`, completely (every page), and the state of `artifacts` (the
        registry's in that region; `images` is keyed by their locations). Reads only. A source that cannot be
        read is a `SourceFailure` in the survey, not an exception."""
        ...

    def deprecate(self, artifact: Artifact, at: datetime) -> tuple[str, ...]:
        """Mark the image deprecated as of `at` (where the provider keeps such a mark); its snapshots."""
        ...

    def deregister(self, artifact: Artifact) -> tuple[Removal, str]:
        """Remove the image, lifting deregistration protection first where it is on: ("removed", ""); ("gone", "")
        if it was gone already; ("waiting", why) when the cloud holds it a while longer (a protection's cool-down)."""
        ...

    def delete_snapshots(self, region: str, snapshots: Sequence[str]) -> list[str]:
        """Delete these snapshots, except any another image still uses (those are returned, kept). Gone is fine."""
        ...

    def restore(self, artifact: Artifact) -> None:
        """Bring a deregistered image back from the Recycle Bin (its snapshots not yet deleted); NotFound when it is
        not there (no rule kept it, or its retention is over)."""
        ...


# --- cache gc: the bake cache's entries no kept version uses --------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    folder: str  # base | layers | images
    key: str
    path: str
    size_bytes: int
    why: str


@dataclass(frozen=True)
class CachePlan:
    cache: str
    entries: tuple[CacheEntry, ...]
    kept: int
    kept_bytes: int

    @property
    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries)


@runtime_checkable
class CacheKeeper(Protocol):
    """A provider with a bake cache on this machine (local: base file systems and step layers)."""

    def plan_cache_gc(self, keep: Collection[str], *, min_age: timedelta, now: datetime) -> CachePlan:
        """Entries no key of `keep` names and older than `min_age`. Reads only."""
        ...

    def apply_cache_gc(self, plan: CachePlan) -> list[CacheEntry]: ...


# --- drift: what runs where -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """A machine that runs an image now: a local guest, an EC2 instance (in an Auto Scaling group or not)."""

    provider: str
    region: str
    target: str  # the fleet or group it belongs to: a local fleet's name, REGION/GROUP; "" for a lone instance
    member: Member
    # Whether the account's Allowed AMIs setting would let it launch its image again: None when the setting is off
    # or cannot judge the image (criteria on watermarks or scan results, which DescribeImages does not show).
    allowed: bool | None = None


@dataclass(frozen=True)
class RunningSurvey:
    machines: tuple[Running, ...]
    failures: tuple[SourceFailure, ...] = ()
    notes: tuple[str, ...] = ()


@runtime_checkable
class CriteriaMaker(Protocol):
    """A provider with an account-level allow-list of images (AWS: the Allowed AMIs setting)."""

    def allowed_criteria(self, region: str, artifacts: Collection[Artifact]) -> list[dict[str, Any]]:
        """Criteria that allow exactly these artifacts' images in the region."""
        ...


@runtime_checkable
class MachineLister(Protocol):
    """A provider that can say what machines run which image (amiforge drift)."""

    def running(self, regions: Collection[str]) -> RunningSurvey:
        """Every machine in these regions (the provider's own, for local), every page read; a region or source that
        cannot be read is a failure in the survey."""
        ...


# --- reports: what images store, and their tags ---------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """What one image keeps in storage now: its snapshots (AWS) or files (local), and the tags it carries there."""

    location: str
    size_bytes: int
    exact: bool  # False: an upper bound (a snapshot's volume size where EC2 gives no stored size)
    tags: Mapping[str, str]
    resources: tuple[tuple[str, str, Mapping[str, str]], ...] = ()  # (kind, id, tags) of each thing it is made of


@runtime_checkable
class StorageReader(Protocol):
    def stored(self, region: str, artifacts: Collection[Artifact]) -> Mapping[str, Stored]:
        """location → what it stores, for each artifact still present (or held in the Recycle Bin)."""
        ...
