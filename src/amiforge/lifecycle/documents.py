"""The documents commands print with `--json` and the web API returns: one frozen dataclass each, built here from
the registry, so `amiforge images show --json` and `GET /api/v1/versions/{ref}` are the same document.

The web API declares these as its response models (pydantic reads the dataclasses for the OpenAPI schema); both
render them with `model.to_json`. Like views.py, nothing here imports a
provider or a scanner at import time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from amiforge.errors import ConfigError, NotFound
from amiforge.lifecycle.leases import controller_gone
from amiforge.lifecycle.views import channels_flags, finding_json, findings_summary, generalised_of, leftovers_of
from amiforge.model import (
    ROLLOUT_LIVE,
    ApiToken,
    Artifact,
    BootReport,
    ChannelPointer,
    CheckResult,
    Event,
    ImageVersion,
    LayerRecord,
    Leftover,
    Operation,
    RemovedFile,
    Rollout,
    RolloutDecision,
    RolloutReplacement,
    ScanRecord,
    Status,
)
from amiforge.store.interface import Store

if TYPE_CHECKING:  # the policy engine is not imported by read commands
    from amiforge.policy.document import Policy

# Pages of a listing: at most this many items, however many are asked for.
MAX_PAGE = 500
# A version's document names its nearest ancestors only (an image baked daily for years has thousands).
ANCESTRY_SHOWN = 20


# --- versions ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionRow:
    """A version in a listing."""

    ref: str
    name: str
    number: int
    status: Status
    digest: str | None
    size_bytes: int | None
    parent: str | None
    recipe_digest: str
    created_at: datetime

    @classmethod
    def of(cls, v: ImageVersion) -> VersionRow:
        return cls(v.ref, v.name, v.number, v.status, v.digest, v.size_bytes, v.parent, v.recipe_digest, v.created_at)


@dataclass(frozen=True)
class VersionPage:
    """One page of a listing of versions, newest first; `next_before` is the cursor of the next page (None: last)."""

    items: list[VersionRow]
    next_before: int | None


def version_page(
    store: Store,
    *,
    name: str | None = None,
    statuses: Sequence[Status] | None = None,
    search: str | None = None,
    limit: int = 50,
    before: int | None = None,
) -> VersionPage:
    limit = max(1, min(limit, MAX_PAGE))
    if search is not None and "\x00" in search:
        raise ConfigError("the search holds a NUL character", fix="search for part of an image name")
    # One more than asked tells whether a next page exists without counting.
    found = store.list_versions(
        name, limit=limit + 1, before=before, summary=True, statuses=statuses, name_contains=search or None
    )
    rows = [VersionRow.of(v) for v in found[:limit]]
    return VersionPage(rows, found[limit - 1].id if len(found) > limit else None)


@dataclass(frozen=True)
class VersionHead:
    """A version's own fields (without its build log and recipe, which are large) and its NAME@N."""

    id: int
    ref: str
    name: str
    number: int
    status: Status
    recipe_digest: str
    recipe_path: str
    provider: str
    created_at: datetime
    updated_at: datetime
    digest: str | None
    size_bytes: int | None
    parent: str | None
    tags: Mapping[str, str]

    @classmethod
    def of(cls, v: ImageVersion) -> VersionHead:
        return cls(v.id, v.ref, v.name, v.number, v.status, v.recipe_digest, v.recipe_path, v.provider, v.created_at,
                   v.updated_at, v.digest, v.size_bytes, v.parent, dict(v.tags))  # fmt: skip


@dataclass(frozen=True)
class ScanSummary:
    scanned_at: datetime
    packages: int
    sbom_digest: str
    findings: Mapping[str, int]
    cves: list[Mapping[str, object]]
    vulndb: str
    vulndb_as_of: Mapping[str, datetime]


@dataclass(frozen=True)
class SignatureRow:
    key_id: str
    signed_at: datetime
    statement: str


@dataclass(frozen=True)
class ChannelRole:
    channel: str
    role: Literal["current", "rollback"]


@dataclass(frozen=True)
class LeftoverRow:
    what: str
    where: str
    remove: str
    error: str
    removed: bool  # gc has removed it since


@dataclass(frozen=True)
class BootReportRow:
    """A boot report; its console only when asked for (None otherwise: it can be long)."""

    id: int | None
    started_at: datetime
    passed: bool
    time_to_ready: float | None
    duration: float
    accel: str
    checks: tuple[CheckResult, ...]
    console: str | None

    @classmethod
    def of(cls, r: BootReport, *, console: bool) -> BootReportRow:
        return cls(r.id, r.started_at, r.passed, r.time_to_ready, r.duration, r.accel, r.checks,
                   r.console if console else None)  # fmt: skip


@dataclass(frozen=True)
class RunningOn:
    """How many members of a target run the version now, as last collected."""

    target: str
    members: int


@dataclass(frozen=True)
class VersionDocument:
    """Everything the registry holds about one version: `amiforge images show --json`, `GET /api/v1/versions/{ref}`.
    A boot report's console is left out unless asked for (`console`), the build log likewise (`log`)."""

    version: VersionHead
    artifacts: list[Artifact]
    layers: list[LayerRecord]
    boot_reports: list[BootReportRow]
    events: list[Event]  # the newest, oldest first; `older_events` more are a page away (/versions/{ref}/events)
    scan: ScanSummary | None
    signatures: list[SignatureRow]
    channels: list[ChannelRole]
    generalised: list[RemovedFile]
    orphaned: list[LeftoverRow]
    ancestry: list[str]  # parent, grandparent, … (NAME@N), the nearest ANCESTRY_SHOWN
    children: list[str]  # versions baked from this one, newest first
    running: list[RunningOn]
    operations: list[Operation]  # distributions: copies per region, shares per account
    older_events: int = 0
    more_ancestors: bool = False  # the ancestry goes on beyond what `ancestry` lists
    recipe: str | None = None  # the recipe as baked (canonical JSON), when asked for
    log: str | None = None  # the build log, when asked for


def version_document(
    store: Store,
    ref: str,
    *,
    console: bool = False,
    log: bool = False,
    recipe: bool = False,
    events: int | None = 200,
) -> VersionDocument:
    """The version's document; `events`: its newest that many events (the rest are a page away; None: all)."""
    v = store.get_version(ref)
    history = store.events(v.ref, limit=events)
    scan = store.latest_scan(v.id)
    held = [p for p in store.channels(v.name) if v.ref in (p.current, p.previous)]
    reports = [BootReportRow.of(r, console=console) for r in store.boot_reports(v.id)]
    ancestors = store.ancestry(v.id, limit=ANCESTRY_SHOWN + 1)
    # What generalisation removed and what runs left behind, from their own events in one read, however many others
    # the version has (its newest `events` may not hold them).
    hygiene = store.events(v.ref, kinds={"bake.built", "orphaned"})
    running: dict[str, int] = {}
    for version_id, target, _ in store.running_members():
        if version_id == v.id:
            running[target] = running.get(target, 0) + 1
    return VersionDocument(
        version=VersionHead.of(v),
        artifacts=store.artifacts(v.id),
        layers=store.layers(v.id),
        boot_reports=reports,
        events=history,
        scan=None if scan is None else _scan_summary(scan),
        signatures=[SignatureRow(s.key_id, s.signed_at, s.statement_digest) for s in store.signatures(v.id)],
        channels=[ChannelRole(p.channel, "current" if p.current == v.ref else "rollback") for p in held],
        generalised=list(generalised_of(hygiene)),
        orphaned=[_leftover(left, removed) for left, removed in leftovers_of(store, hygiene)],
        ancestry=[a.ref for a in ancestors[:ANCESTRY_SHOWN]],
        children=store.children(v.id),
        running=[RunningOn(t, n) for t, n in sorted(running.items())],
        operations=store.operations(v.id),
        more_ancestors=len(ancestors) > ANCESTRY_SHOWN,
        older_events=0 if events is None or len(history) < events else store.count_events(v.ref) - len(history),
        recipe=v.recipe if recipe else None,
        log=v.log if log else None,
    )


def _scan_summary(scan: ScanRecord) -> ScanSummary:
    cves = [finding_json(f) for f in scan.findings if f.kind.value == "cve"]
    return ScanSummary(scan.scanned_at, len(scan.packages), scan.sbom_digest, findings_summary(scan.findings), cves,
                       scan.vulndb, dict(scan.vulndb_as_of))  # fmt: skip


def _leftover(left: Leftover, removed: bool) -> LeftoverRow:
    return LeftoverRow(left.what, left.where, left.remove, left.error, removed)


def sbom_text(store: Store, ref: str, fmt: Literal["cyclonedx", "spdx"]) -> tuple[ImageVersion, str, int]:
    """The SBOM the version's latest scan recorded, as CycloneDX 1.6 (as stored) or SPDX 2.3 JSON: (version, text,
    how many packages)."""
    version = store.get_version(ref)
    record = store.latest_scan(version.id)
    if record is None or version.digest is None:
        raise NotFound(f"{version.ref} has no SBOM yet", fix=f"amiforge scan {version.ref}")
    if fmt == "cyclonedx":
        return version, record.sbom, len(record.packages)
    from amiforge.scanners.sbom import spdx_sbom  # the SPDX tools load only for SPDX

    text = spdx_sbom(
        record.packages,
        image_name=version.name,
        image_version=str(version.number),  # the documents name the image NAME@N themselves
        digest=version.digest,
        timestamp=record.scanned_at,
    )
    return version, text, len(record.packages)


@dataclass(frozen=True)
class FindingRow:
    """A finding of the version's latest scan, and the policy's waivers that name it (with their channels)."""

    finding: Mapping[str, object]
    waivers: list[str]


def findings_of(store: Store, policy: Policy, ref: str) -> list[FindingRow]:
    """Every finding of the latest scan (CVEs, secrets, residue), most severe first, with the waivers naming it."""
    version = store.get_version(ref)
    scan = store.latest_scan(version.id)
    if scan is None:
        raise NotFound(f"{version.ref} has not been scanned", fix=f"amiforge scan {version.ref}")
    order = {s: i for i, s in enumerate(("critical", "high", "medium", "low", "negligible", "unknown"))}
    rows = []
    for f in sorted(scan.findings, key=lambda f: (order.get(f.severity.value, 9), f.id)):
        named = [w for w in policy.waivers if w.finding == f.id and (w.package is None or w.package == f.package)
                 and (w.path is None or w.path == f.path)]  # fmt: skip
        rows.append(FindingRow(finding_json(f), [
            w.describe() + (f" (channels {', '.join(w.channels)})" if w.channels else " (every channel)") for w in named
        ]))  # fmt: skip
    return rows


@dataclass(frozen=True)
class IncidentDocument:
    """What ran a version lately: its rollouts, the members they launched, its events, and how to undo it."""

    version: VersionHead
    hours: float
    rollouts: list[Rollout]
    members: list[RolloutReplacement]
    timeline: list[tuple[datetime, str, str]]
    rollback_commands: list[str]


def incident_document(store: Store, ref: str, *, hours: float = 24.0) -> IncidentDocument:
    from amiforge.lifecycle.rollout import incident  # the controller (and with it the providers) loads here only

    found = incident(ref, store=store, hours=hours)
    return IncidentDocument(VersionHead.of(found.version), hours, found.rollouts, found.members, found.timeline,
                            found.rollback_commands)  # fmt: skip


# --- the catalog ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelRow:
    """A channel pointer and why it needs attention (`flags`: a revoked version or ancestor, a failed rescan)."""

    name: str
    channel: str
    current: str
    previous: str | None
    moved_at: datetime
    moved_by: str
    reason: str
    flags: list[str]

    @classmethod
    def of(cls, p: ChannelPointer, flags: list[str]) -> ChannelRow:
        return cls(p.name, p.channel, p.current, p.previous, p.moved_at, p.moved_by, p.reason, flags)


def channel_rows(store: Store, name: str | None = None) -> list[ChannelRow]:
    pointers = store.channels(name)
    return [ChannelRow.of(p, flags) for p, flags in zip(pointers, channels_flags(pointers, store), strict=True)]


@dataclass(frozen=True)
class ImageRow:
    """An image name: how many versions it has in each state, its newest version, its channels."""

    name: str
    versions: int
    by_status: Mapping[str, int]
    newest: str | None
    channels: list[ChannelRow]


@dataclass(frozen=True)
class Catalog:
    images: list[ImageRow]


def catalog(store: Store) -> Catalog:
    """Every image name with its tallies and channels: three grouped reads, and one read per image name for its
    newest version."""
    tallies: dict[str, dict[str, int]] = {}
    for name, status, count in store.version_tally():
        tallies.setdefault(name, {})[status] = count
    channels: dict[str, list[ChannelRow]] = {}
    for row in channel_rows(store):
        channels.setdefault(row.name, []).append(row)
    images = []
    for name, counts in sorted(tallies.items()):
        newest = store.list_versions(name, limit=1, summary=True)
        images.append(ImageRow(name, sum(counts.values()), counts, newest[0].ref if newest else None,
                               channels.get(name, [])))  # fmt: skip
    return Catalog(images)


# --- rollouts ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutReport:
    """A rollout with every gate decision (and its numbers) and every member it replaced; `orphaned`: it is not
    over and not paused, yet no controller drives it (a server or CLI that drove it stopped): resume or abort it."""

    rollout: Rollout
    decisions: list[RolloutDecision]
    replacements: list[RolloutReplacement]
    orphaned: bool = False


def rollout_report(store: Store, rollout_id: int) -> RolloutReport:
    return rollout_report_of(store, store.get_rollout(rollout_id))


def rollout_report_of(store: Store, rollout: Rollout) -> RolloutReport:
    live = rollout.state in ROLLOUT_LIVE and rollout.state != "paused"
    return RolloutReport(rollout, store.decisions(rollout.id), store.replacements(rollout.id),
                         live and controller_gone(rollout))  # fmt: skip


@dataclass(frozen=True)
class RolloutPage:
    items: list[Rollout]
    next_before: int | None


def rollout_page(
    store: Store, *, states: Sequence[str] | None = None, limit: int = 50, before: int | None = None
) -> RolloutPage:
    limit = max(1, min(limit, MAX_PAGE))
    found = store.rollout_page(limit=limit + 1, before=before, states=states)
    return RolloutPage(found[:limit], found[limit - 1].id if len(found) > limit else None)


# --- the audit log -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventPage:
    """Events, oldest first; `next_before` is the cursor of the page of older events (None: this is the first)."""

    items: list[Event]
    next_before: int | None


def event_page(store: Store, *, ref: str | None = None, limit: int = 100, before: int | None = None) -> EventPage:
    limit = max(1, min(limit, MAX_PAGE))
    found = store.events(ref, limit=limit + 1, before=before)
    items = found[-limit:]
    return EventPage(items, items[0].seq if len(found) > limit else None)


@dataclass(frozen=True)
class ChainCheck:
    """The hash chain of the audit log recomputed: intact, or one message per broken link."""

    intact: bool
    events: int
    problems: list[str]


def verify_chain(store: Store) -> ChainCheck:
    problems = store.verify_events()
    return ChainCheck(not problems, store.count_events(), problems)


# --- tokens --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRow:
    """A token as listed: never its secret (the registry does not have it)."""

    name: str
    role: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, t: ApiToken) -> TokenRow:
        return cls(t.name, t.role, t.created_at, t.created_by, t.revoked_at, t.last_used_at)
