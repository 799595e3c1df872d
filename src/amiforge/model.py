"""Frozen domain types shared by every layer, and the version state machine.

Pydantic stays at the edges (recipe files, settings, HTTP payloads); inside, everything is one of these.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Literal

from amiforge.errors import ConfigError, StateError

# An AWS region name (us-east-1, eu-west-3, us-gov-west-1, ap-southeast-5): the one rule every input is held to
# before boto3 sees it (boto3 would turn a bad one into an unresolvable endpoint host name).
AWS_REGION_PATTERN = r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}"
AWS_REGION_RE = re.compile(AWS_REGION_PATTERN)


def check_aws_region(value: str, *, what: str) -> str:
    """`value` if it is an AWS region name; a ConfigError naming `what` (e.g. "--region") otherwise."""
    if AWS_REGION_RE.fullmatch(value) is None:
        raise ConfigError(f"{what} {value!r} is not an AWS region name", fix="use a region name like eu-west-1")
    return value


# An image name (a recipe's `name`; versions are NAME@N).
IMAGE_NAME_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"


def check_image_name(value: str, *, what: str) -> str:
    """`value` if it is an image name; a ConfigError naming `what` (e.g. "--name") otherwise."""
    if re.fullmatch(IMAGE_NAME_PATTERN, value) is None:
        raise ConfigError(
            f"{what} {value!r} is not an image name",
            fix="image names are lower-case letters, digits and '-', at most 63 characters (e.g. web)",
        )
    return value


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
# is not listed is refused. Retired is left only by `amiforge retire restore`: back to deprecated, or to revoked or
# failed for a version that was.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.BAKING: frozenset({Status.BUILT, Status.FAILED}),
    Status.BUILT: frozenset({Status.TESTED, Status.FAILED, Status.REVOKED, Status.DEPRECATED}),
    Status.TESTED: frozenset({Status.TESTED, Status.SCANNED, Status.FAILED, Status.REVOKED, Status.DEPRECATED}),
    Status.SCANNED: frozenset({Status.SIGNED, Status.FAILED, Status.REVOKED, Status.DEPRECATED}),
    Status.SIGNED: frozenset({Status.REVOKED, Status.DEPRECATED}),
    Status.DEPRECATED: frozenset({Status.RETIRED, Status.REVOKED}),
    Status.FAILED: frozenset({Status.TESTED, Status.RETIRED}),
    Status.REVOKED: frozenset({Status.RETIRED}),
    Status.RETIRED: frozenset({Status.DEPRECATED, Status.REVOKED, Status.FAILED}),
}


def check_transition(current: Status, target: Status) -> None:
    """Raise StateError unless `current -> target` is a legal step of the state machine."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (terminal state)"
        raise StateError(
            f"a version in state '{current}' cannot become '{target}'",
            fix=f"from '{current}' the allowed next states are: {allowed}",
        )


def require_status(version: ImageVersion, allowed: Collection[Status], *, doing: str, fix: str) -> None:
    """Raise StateError (exit 3, like every "wrong state for this command") unless `version` is in an `allowed`
    state. `doing` completes "only … versions can be": e.g. "boot-tested"."""
    if version.status not in allowed:
        states = [s.value for s in Status if s in allowed]
        listed = ", ".join(states[:-1]) + f" or {states[-1]}" if len(states) > 1 else states[0]
        raise StateError(f"{version.ref} is {version.status}; only {listed} versions can be {doing}", fix=fix)


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
class Leftover:
    """Something a run made that its cleanup could not remove: what it is, where, the command that removes it, and
    why the cleanup failed. Shown by the command that left it, recorded as an `orphaned` event, found by `gc`."""

    what: str  # e.g. "temporary directory", "EC2 instance"
    where: str  # a path, or "i-… in eu-west-1"
    remove: str  # a command that removes it
    error: str = ""

    def describe(self) -> str:
        why = f" ({self.error})" if self.error else ""
        return f"left behind: {self.what} {self.where}{why}; remove it: {self.remove}"


@dataclass(frozen=True)
class RemovedFile:
    """A file a recipe step left in the image that generalisation deleted (a credential, a key, a shell history):
    its path and kind, never its content. Reported so the recipe's author learns the recipe handled it."""

    path: str
    kind: str  # ssh key, aws credentials, netrc, docker credentials, shell history


@dataclass(frozen=True)
class CheckResult:
    name: str  # e.g. "unit nginx", "command nginx -t", "http :80/"
    kind: str  # ready | unit | command | http | tcp
    passed: bool
    detail: str


@dataclass(frozen=True)
class BootReport:
    """One boot of a version and what its checks found. The verdict is derived from the checks, never kept apart
    from them: a report passes when it has checks and every one passed (no checks is no evidence)."""

    # Properties that JSON renderings include beside the fields.
    __computed__ = ("passed",)

    time_to_ready: float | None  # seconds from QEMU start to the AMIFORGE-READY marker; None if never ready
    checks: tuple[CheckResult, ...]
    console: str
    accel: str  # tcg | kvm
    started_at: datetime
    duration: float
    id: int | None = None
    version_id: int | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


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


# --- supply chain: packages, findings, signatures, channels ----------------------------------------------------


class Severity(StrEnum):
    """Ordered from least to most severe; `rank` compares them."""

    UNKNOWN = "unknown"
    NEGLIGIBLE = "negligible"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {s: i for i, s in enumerate(Severity)}  # a gate ranks every finding: a lookup, not a list scan


class FindingKind(StrEnum):
    CVE = "cve"
    SECRET = "secret"  # a credential or key that must never ship
    RESIDUE = "residue"  # build leftovers that break clones: host keys, machine-id, histories, cloud-init state
    POLICY = "policy"


@dataclass(frozen=True)
class Package:
    """One installed Debian package, as dpkg records it."""

    name: str
    version: str
    arch: str
    source: str | None = None  # source package name, where it differs or dpkg records it
    source_version: str | None = None

    @property
    def source_name(self) -> str:
        return self.source or self.name


@dataclass(frozen=True)
class DebianVerdict:
    """What the Debian Security Tracker says of one CVE in one source package on the image's release."""

    status: str  # resolved | open | undetermined
    urgency: str  # as Debian publishes it: unimportant, low, medium, high, "not yet assigned", end-of-life, …
    fixed_version: str | None = None
    # Why Debian issues no security update for it: its no-dsa note, "postponed" or "ignored" (None: none given).
    no_dsa: str | None = None

    @property
    def minor(self) -> bool:
        """Shown, but never failing a gate unless the policy says so: unimportant, or no DSA planned."""
        return self.urgency.rstrip("*").strip().lower() == "unimportant" or self.no_dsa is not None


@dataclass(frozen=True)
class CvssScore:
    """One CVSS rating of a CVE, scored from its vector by the `cvss` library."""

    version: str  # 2.0 | 3.0 | 3.1 | 4.0
    vector: str
    score: float
    severity: Severity
    source: str  # who published it, e.g. "cna", "adp:CISA-ADP", "nvd"


@dataclass(frozen=True)
class Finding:
    """A value, never a verdict: gates decide what a finding means for a channel.

    Secret findings carry `redacted` (a few characters and a length), never the secret itself."""

    kind: FindingKind
    id: str  # advisory id (DSA-5474-1, CVE-…), or a rule id for secrets/residue (e.g. private-key)
    severity: Severity
    title: str
    source: str  # which scanner produced it: osv, trivy, grype, secrets, residue, raw-disk
    package: str | None = None
    installed: str | None = None
    fixed: str | None = None  # None: no fix published
    aliases: tuple[str, ...] = ()
    path: str | None = None
    line: int | None = None
    redacted: str | None = None
    # CVE findings: where `severity` came from (debian, cvss, osv, trivy, grype, or None: unrated), and the ratings
    # it was chosen from, so a gate can choose again by its own policy (severity_source): Debian's verdict, the
    # CVSS rating and the scanner's own word (`reported`) — of the most severe of the CVEs an advisory covers.
    severity_source: str | None = None
    debian: DebianVerdict | None = None
    cvss: CvssScore | None = None
    reported: Severity | None = None
    # Other CVEs of the advisory that still affect the package and that nothing rates: the gate judges the finding
    # at least as its channel's unknown_cve_severity (fail closed), whatever the rated ones say.
    unrated_cves: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """What a waiver names: the id plus where (package or path)."""
        return f"{self.id}:{self.package or self.path or ''}"


@dataclass(frozen=True)
class ChangelogEntry:
    """One entry of a package's changelog.Debian as the image ships it: its version and the CVE ids it names."""

    version: str
    cves: tuple[str, ...]


@dataclass(frozen=True)
class ScanRecord:
    """One scan of a version: the SBOM (CycloneDX JSON), the packages it lists, and every finding."""

    scanned_at: datetime
    packages: tuple[Package, ...]
    sbom: str
    sbom_digest: str
    findings: tuple[Finding, ...]
    vulndb: str  # which advisory data the CVE match used, e.g. "osv import 3 (2026-11-27, 10 advisories)"
    # Source package -> its changelog entries (newest first) that name CVEs, read from the image: `images diff`
    # says what an upgrade fixed from these, with no database at all.
    changelogs: Mapping[str, tuple[ChangelogEntry, ...]] = field(default_factory=dict)
    # Vulnerability source -> how old its data was (VulnDbSource.as_of) when the scan matched against it: the gate
    # refuses findings judged by data older than the policy's max_vulndb_age.
    vulndb_as_of: Mapping[str, datetime] = field(default_factory=dict)
    release: str | None = None  # the image's Debian release (os-release VERSION_ID, e.g. "12"), for a rescan
    id: int | None = None
    version_id: int | None = None


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    algorithm: str
    public_key: str  # PEM
    added_at: datetime
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


@dataclass(frozen=True)
class SignatureRecord:
    key_id: str
    envelope: str  # DSSE JSON
    statement_digest: str
    signed_at: datetime
    id: int | None = None
    version_id: int | None = None


@dataclass(frozen=True)
class Operation:
    """One attempt at a long operation on a version (kind: distribute). Attempts share `run_id`, so a rerun
    adopts what an earlier one created; `state` is running, done or failed; `detail` what it did so far."""

    id: int
    kind: str
    version_id: int
    run_id: str
    state: str
    actor: str
    started_at: datetime
    finished_at: datetime | None
    detail: Mapping[str, object]


# A rollout in these states is not over: someone drives it (or will, after `rollout resume`), and it owns its target.
ROLLOUT_LIVE = ("running", "paused", "rolling-back")


@dataclass(frozen=True)
class Rollout:
    """One rollout of a version onto a target fleet: the durable state the controller resumes from.

    `state`: running, paused, succeeded, failed (a gate failed and the waves were rolled back), aborted.
    `requested`: pause or abort, set by another process; the controller acts on it between steps.
    `waves`: how many members each wave replaces; `wave`: the index of the wave in progress (len(waves) when done)."""

    id: int
    target: str
    version_id: int
    version_ref: str
    strategy: Mapping[str, object]
    waves: tuple[int, ...]
    wave: int
    state: str
    requested: str | None
    actor: str
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    detail: Mapping[str, object]
    undoes: int | None = None  # a rollback: the rollout whose change it undoes
    controller: str | None = None  # who drives it (host:pid:id), while its lease lasts
    controller_seen_at: datetime | None = None  # when that controller last renewed its lease


@dataclass(frozen=True)
class RolloutReplacement:
    """One member to replace, recorded (with its token) before the fleet is asked, so a resumed controller asks
    again with the same token and the fleet finds what it already launched. kind: forward or rollback."""

    id: int
    rollout_id: int
    wave: int
    kind: str
    old_member: str
    old_version: str | None
    token: str
    new_member: str | None
    state: str  # planned, done (new member ready), failed (new member failed)
    at: datetime


@dataclass(frozen=True)
class RolloutDecision:
    """A gate decision on a wave, with the numbers behind it; action: continue, wait, rollback, abort, done."""

    id: int
    rollout_id: int
    wave: int
    at: datetime
    passed: bool
    action: str
    numbers: Mapping[str, object]


@dataclass(frozen=True)
class ChannelPointer:
    """Where a channel of one image name points now, and before (the rollback image)."""

    name: str
    channel: str
    current: str  # NAME@N
    previous: str | None
    moved_at: datetime
    moved_by: str
    reason: str


# The tag a dev/test version carries to say when it may go (`amiforge retire`): the one amiforge tag a recipe sets.
EXPIRES_TAG = "amiforge:expires"


def expiry_time(text: str) -> datetime:
    """An `amiforge:expires` value as a time: a date means the end of that day (UTC), a time without a zone UTC.
    ValueError for anything else."""
    text = text.strip()
    if len(text) == 10:
        return datetime.combine(date.fromisoformat(text) + timedelta(days=1), time(), UTC)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# The way out of one artifact (lifecycle/retire.py): deprecated, then deregistered (the image is gone, its
# snapshots may stay), then purged (its snapshots deleted too). Each stage is reached once; a rerun resumes.
RETIRE_STAGES = ("deprecated", "deregistered", "purged")


@dataclass(frozen=True)
class Retirement:
    """Where one artifact stands on its way out. `snapshots` are the image's, read when it was deprecated (an image
    that is gone can no longer say which snapshots it had)."""

    artifact_id: int
    version_id: int
    stage: str  # one of RETIRE_STAGES
    deprecated_at: datetime
    deregistered_at: datetime | None
    purged_at: datetime | None
    snapshots: tuple[str, ...]
    run_id: str


# Who may do what through `amiforge serve` (docs/architecture.md §14): each role can do what the ones before it can.
TOKEN_ROLES = ("read", "operate", "admin")


@dataclass(frozen=True)
class ApiToken:
    """A bearer token of the web console and API. Only the SHA-256 of its secret is kept; the secret is shown once."""

    id: int
    name: str
    role: str  # read | operate | admin
    created_at: datetime
    created_by: str
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    def allows(self, role: str) -> bool:
        return self.revoked_at is None and TOKEN_ROLES.index(self.role) >= TOKEN_ROLES.index(role)


@dataclass(frozen=True)
class VulnDbImport:
    id: int
    source: str
    imported_at: datetime
    count: int


@dataclass(frozen=True)
class AdvisoryHead:
    """What a finding takes from the OSV advisory it comes from. Parsed once at import and kept beside the raw
    record, so a scan or rescan reads no JSON record and validates nothing a second time."""

    id: str
    title: str
    identifiers: tuple[str, ...]  # other ids a waiver may name: aliases, upstream ids, related CVEs
    severity: Severity  # the record's own rating, else the highest of its affected entries
    withdrawn: bool


@dataclass(frozen=True)
class AdvisoryRange:
    """One affected interval, or list of versions, of one Debian source package in one ecosystem ("Debian:12", or
    a bare "Debian" for every release), as parsed from an advisory at import."""

    advisory_id: str
    ecosystem: str
    package: str  # the source package
    introduced: str | None  # "0": every version before `fixed`; None: only `versions` are affected
    fixed: str | None
    last_affected: str | None
    versions: tuple[str, ...]
    severity: Severity  # Debian's urgency for this entry, if it gives one


@dataclass(frozen=True)
class StoredAdvisory:
    """An advisory as the registry keeps it: the raw OSV record (exports give it back byte for byte in meaning),
    and what matching needs of it, parsed at import."""

    id: str
    modified: str
    record: Mapping[str, object]
    head: AdvisoryHead
    ranges: tuple[AdvisoryRange, ...]


VulnSourceName = Literal["osv", "debian", "cve"]
VULN_SOURCES: tuple[VulnSourceName, ...] = ("osv", "debian", "cve")


@dataclass(frozen=True)
class VulnDbSource:
    """The data of one vulnerability source the registry holds now, and how old it is."""

    name: VulnSourceName  # osv: advisories; debian: the Security Tracker's verdicts; cve: CVSS ratings
    origin: str  # the URL or file it came from
    # When it was fetched from its publisher: a download's time; an offline bundle keeps the time of the download
    # it carries; a file imported by path, its modification time (amiforge cannot know better).
    as_of: datetime
    imported_at: datetime
    sha256: str  # of what was imported (for files: of their bytes)
    size: int
    count: int  # records it holds now


# --- fleets: what the rollout controller and its gates look at -------------------------------------------------

MemberState = Literal["launching", "ready", "failed", "stopped"]
# heartbeat: the member's heartbeat unit was heard (the latest time only); the others happen once per member.
SignalKind = Literal["launch", "ready", "failed", "replaced", "heartbeat", "timing"]


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
    timed_out: bool = False  # failed: never ready within its limit (M1 counts it as a timeout)
    # timing: the boot's phases as the guest's systemd measured them, {phase or unit: seconds} (guest.boot_timing)
    timeline: Mapping[str, float] | None = None
    console_tail: tuple[str, ...] = ()  # failed: the last lines its console printed (guest.console_tail)


# --- telemetry: what happened to every boot of a version (docs/architecture.md §13) ------------------------------

BootOutcome = Literal["ready", "failed", "timeout"]
BOOT_OUTCOMES: tuple[BootOutcome, ...] = ("ready", "failed", "timeout")
# The target of a boot test; fleets are `local:NAME` and `aws:REGION/GROUP`.
BOOT_TEST_TARGET = "boot-test"


@dataclass(frozen=True)
class BootObservation:
    """What is known now of one boot of a version on a target (a boot test, a fleet member, an instance). Recording
    it again later only moves it forward: an outcome, a stop or a replacement is set once; heartbeats only advance."""

    instance: str
    version_id: int
    launched_at: datetime
    outcome: BootOutcome | None = None  # None: still booting
    time_to_ready: float | None = None  # seconds from launch to the readiness marker
    ended_at: datetime | None = None  # when the outcome was known
    stopped_at: datetime | None = None
    replaced: bool = False  # stopped because another member took its place (a rollout, self-healing)
    last_heartbeat_at: datetime | None = None
    detail: str = ""
    timeline: Mapping[str, float] | None = None  # {kernel, userspace, the slowest units: seconds}, set once
    console_tail: tuple[str, ...] = ()  # a boot that failed: its console's last lines, kept with its outcome


@dataclass(frozen=True)
class BootRecord:
    """One boot as the registry keeps it."""

    id: int
    version_id: int
    version_ref: str
    target: str
    instance: str
    launched_at: datetime
    outcome: BootOutcome | None
    time_to_ready: float | None
    ended_at: datetime | None
    stopped_at: datetime | None
    replaced: bool
    last_heartbeat_at: datetime | None
    detail: str
    timeline: Mapping[str, float] | None = None
    console_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class BootTotals:
    """Every boot of a version on a target since the registry began (what Prometheus counters export): outcomes,
    replacements, and times to ready as a count per whole second (ceil), so a bucket at any whole number of seconds
    (every SLO threshold) is exact."""

    version_id: int
    target: str
    ready: int
    failed: int
    timeout: int
    replaced: int
    ttr_sum: float
    ttr_seconds: Mapping[int, int]  # ceil(time to ready) -> boots

    def within(self, seconds: float) -> int:
        """Ready boots whose time to ready was at most `seconds`."""
        return sum(n for s, n in self.ttr_seconds.items() if s <= seconds)

    def cumulative(self, bounds: Sequence[float]) -> list[int]:
        """`within(b)` for each of the ascending `bounds`, in one pass over the seconds (a scrape asks for a dozen
        buckets of thousands of rows)."""
        counts, total, i = [], 0, 0
        ordered = sorted(self.ttr_seconds.items())
        for bound in bounds:
            while i < len(ordered) and ordered[i][0] <= bound:
                total += ordered[i][1]
                i += 1
            counts.append(total)
        return counts


# --- JSON ----------------------------------------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """Documents and domain values -> JSON-ready values (dataclasses with their `__computed__` properties, times as
    ISO 8601, enums as their values, paths as text, mappings and sequences element by element)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)] + list(getattr(value, "__computed__", ()))
        return {name: to_json(getattr(value, name)) for name in names}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value
