"""drift: the machines that run what they should not (docs/architecture.md §15).

Every machine a provider can list — this machine's fleet members, EC2 instances in every region the registry knows,
Auto Scaling group members among them — is matched to the version it runs (a local member's record names it; an
instance's image is looked up among the registry's artifacts), and judged:

- **unmanaged**: the registry knows no version of its image;
- **revoked**, **deprecated**, **retired** or **failed**: its version is;
- **in no channel**: its version is no channel's current or previous version;
- **behind**: newer versions of its image lead up to a channel's current one (more than `max_behind` of them);
- **not allowed**: the account's Allowed AMIs setting would refuse its image now (AWS).

A machine that is none of these is in line. The report says which sources could not be read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from amiforge.errors import AmiforgeError
from amiforge.lifecycle.gc import aws_view
from amiforge.model import ChannelPointer, ImageVersion, Status
from amiforge.providers import capable_of
from amiforge.providers.interface import MachineLister, Running, SourceFailure
from amiforge.settings import Settings
from amiforge.store.interface import Store

ListerFor = Callable[[str], MachineLister | None]


def lister_for(settings: Settings) -> ListerFor:
    return capable_of(settings, MachineLister)


_BAD_STATES = {
    Status.REVOKED: "revoked",
    Status.DEPRECATED: "deprecated (on its way out)",
    Status.RETIRED: "retired",
    Status.FAILED: "failed its checks",
}


@dataclass(frozen=True)
class DriftRow:
    provider: str
    region: str
    target: str
    machine: str
    state: str
    image: str
    version: str | None
    status: str | None
    channels: tuple[str, ...]  # "dev (current)", "prod (previous)": where its version stands
    behind: int | None  # versions behind the nearest channel ahead of it; None: its image has no channel
    allowed: bool | None
    findings: tuple[str, ...]


@dataclass(frozen=True)
class DriftReport:
    __computed__ = ("drifted",)

    at: datetime
    rows: tuple[DriftRow, ...]
    failures: tuple[SourceFailure, ...]
    notes: tuple[str, ...]
    max_behind: int

    @property
    def drifted(self) -> int:
        return sum(1 for r in self.rows if r.findings)


def _behind(version: ImageVersion, numbers: Sequence[int], channels: Iterable[ChannelPointer]) -> tuple[int, str]:
    """(versions between it and the nearest channel current ahead of it, that channel); (0, "") when none is ahead."""
    best: tuple[int, str] = (0, "")
    for c in channels:
        current = int(c.current.rpartition("@")[2])
        if current <= version.number:
            return 0, ""  # a channel is on it, or behind it (a canary of a newer version)
        between = sum(1 for n in numbers if version.number < n <= current)
        if best[1] == "" or between < best[0]:
            best = (between, f"{c.name}:{c.channel}")
    return best


def drift(
    store: Store,
    lister_for: ListerFor,
    *,
    local_region: str,
    regions: Iterable[str] = (),
    max_behind: int = 0,
    now: datetime | None = None,
) -> DriftReport:
    moment = now or datetime.now(UTC)
    asked = set(regions)
    found: list[Running] = []
    failures: list[SourceFailure] = []
    notes: list[str] = []
    _, aws_regions = aws_view(store)
    for kind, where in (("local", {local_region}), ("aws", aws_regions)):
        wanted = {r for r in where if not asked or r in asked}
        if not wanted:
            continue
        try:
            lister = lister_for(kind)
        except AmiforgeError as e:
            failures += [SourceFailure(r, f"{kind} provider", e.message) for r in sorted(wanted)]
            continue
        if lister is None:
            continue
        survey = lister.running(wanted)
        found += survey.machines
        failures += survey.failures
        notes += survey.notes
    versions = {v.ref: v for v in store.list_versions(summary=True)}
    by_location: dict[tuple[str, str, str], str] = {}
    for kind in sorted({r.provider for r in found}):
        for ref, artifact in store.provider_artifacts(kind):
            by_location.setdefault((kind, artifact.region, artifact.location), ref)
    numbers: dict[str, list[int]] = defaultdict(list)
    for v in versions.values():
        if v.status not in (Status.BAKING, Status.FAILED):
            numbers[v.name].append(v.number)
    pointers: dict[str, list[ChannelPointer]] = defaultdict(list)
    for c in store.channels():
        pointers[c.name].append(c)
    rows = [_row(m, versions, by_location, numbers, pointers, max_behind) for m in found]
    rows.sort(key=lambda r: (r.provider, r.region, r.target, r.machine))
    return DriftReport(moment, tuple(rows), tuple(failures), tuple(notes), max_behind)


def _row(
    machine: Running,
    versions: dict[str, ImageVersion],
    by_location: dict[tuple[str, str, str], str],
    numbers: dict[str, list[int]],
    pointers: dict[str, list[ChannelPointer]],
    max_behind: int,
) -> DriftRow:
    m = machine.member
    ref = by_location.get((machine.provider, machine.region, m.location)) or m.version_ref
    version = versions.get(ref or "")
    findings: list[str] = []
    channels: list[str] = []
    behind: int | None = None
    if version is None:
        findings.append(f"unmanaged: the registry knows no version of {m.location}")
    else:
        if version.status in _BAD_STATES:
            findings.append(_BAD_STATES[version.status])
        for c in pointers.get(version.name, []):
            if c.current == version.ref:
                channels.append(f"{c.channel} (current)")
            elif c.previous == version.ref:
                channels.append(f"{c.channel} (previous)")
        if not channels:
            findings.append("in no channel")
        if pointers.get(version.name):
            behind, channel = _behind(version, numbers[version.name], pointers[version.name])
            if behind > max_behind:
                findings.append(f"{behind} version(s) behind {channel}")
    if machine.allowed is False:
        findings.append("the account's Allowed AMIs setting would refuse its image")
    return DriftRow(
        machine.provider, machine.region, machine.target, m.id, m.state, m.location,
        version.ref if version else None, version.status.value if version else None, tuple(channels), behind,
        machine.allowed, tuple(findings),
    )  # fmt: skip
