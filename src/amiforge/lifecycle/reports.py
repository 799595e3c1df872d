"""amiforge report cost | tags: what the registry's images store and cost, and which lack the tags they must carry.

Cost: each artifact still stored (not purged) — its snapshots on AWS (the stored size EC2 reports, else the volume
size, marked as an upper bound), its files locally, in the store or the Recycle Bin — priced per GB-month from the
price table, and summed by image, owner, cost center and region (owner and cost center from the image's tags on AWS,
else the version's). Tags: every version of the registry and every image resource (image, snapshots) missing a tag
the policy requires.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from amiforge.errors import AmiforgeError
from amiforge.lifecycle.retire import inventory
from amiforge.model import Artifact, ImageVersion, Status
from amiforge.policy.reporting import Prices, TagRules
from amiforge.providers import capable_of
from amiforge.providers.interface import SourceFailure, StorageReader, Stored
from amiforge.settings import Settings
from amiforge.store.interface import Store

ReaderFor = Callable[[str], StorageReader | None]
GB = 1024**3
UNSET = "(none)"


def reader_for(settings: Settings) -> ReaderFor:
    return capable_of(settings, StorageReader)


@dataclass(frozen=True)
class CostRow:
    version: str
    image: str
    provider: str
    region: str
    location: str
    gb: float
    exact: bool
    owner: str
    cost_center: str
    price: float  # per GB-month
    regional_price: bool  # False: the table's default
    monthly: float


@dataclass(frozen=True)
class CostReport:
    at: datetime
    currency: str
    source: str
    rows: tuple[CostRow, ...]
    by_image: Mapping[str, float]
    by_owner: Mapping[str, float]
    by_cost_center: Mapping[str, float]
    by_region: Mapping[str, float]
    total: float
    failures: tuple[SourceFailure, ...]


@dataclass(frozen=True)
class TagRow:
    kind: str  # version | image | snapshot
    id: str
    region: str
    version: str
    missing: tuple[str, ...]


@dataclass(frozen=True)
class TagReport:
    __computed__ = ("untagged",)

    at: datetime
    required: tuple[str, ...]
    rows: tuple[TagRow, ...]
    failures: tuple[SourceFailure, ...]

    @property
    def untagged(self) -> int:
        return len(self.rows)


def _stored(store: Store, reader: ReaderFor) -> tuple[list[tuple[ImageVersion, Artifact, Stored]], list[SourceFailure]]:
    """Every artifact still stored, with what it stores; the regions that could not be read."""
    by_region: dict[tuple[str, str], list[tuple[ImageVersion, Artifact]]] = defaultdict(list)
    for entry in inventory(store):
        for h in entry.holdings:
            if h.retirement is None or h.retirement.stage != "purged":
                by_region[(h.artifact.provider, h.artifact.region)].append((entry.version, h.artifact))

    def read(key: tuple[str, str]) -> tuple[list[tuple[ImageVersion, Artifact, Stored]], list[SourceFailure]]:
        kind, region = key
        held = by_region[key]
        try:
            found = reader(kind)
            if found is None:
                return [], [SourceFailure(region, f"{kind} provider", "it cannot say what its images store")]
            sizes = found.stored(region, [a for _, a in held])
        except AmiforgeError as e:
            return [], [SourceFailure(region, f"{kind} storage", e.message)]
        return [(v, a, sizes[a.location]) for v, a in held if a.location in sizes], []

    rows: list[tuple[ImageVersion, Artifact, Stored]] = []
    failures: list[SourceFailure] = []
    keys = sorted(by_region)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(keys))), thread_name_prefix="report") as pool:
        for found, failed in pool.map(read, keys):
            rows += found
            failures += failed
    return rows, failures


def _sums(rows: Iterable[CostRow], key: Callable[[CostRow], str]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for r in rows:
        sums[key(r)] += r.monthly
    return dict(sorted(sums.items()))


def cost_report(store: Store, reader: ReaderFor, prices: Prices, tags: TagRules) -> CostReport:
    held, failures = _stored(store, reader)
    rows = []
    for version, artifact, stored in held:
        labels = {**version.tags, **stored.tags}
        price, regional = prices.of(artifact.region)
        gb = stored.size_bytes / GB
        rows.append(CostRow(
            version.ref, version.name, artifact.provider, artifact.region, artifact.location, gb,
            stored.exact, labels.get(tags.owner, UNSET), labels.get(tags.cost_center, UNSET), price, regional,
            gb * price,
        ))  # fmt: skip
    rows.sort(key=lambda r: (r.image, r.version, r.region))
    return CostReport(
        datetime.now(UTC), prices.currency, prices.source, tuple(rows), _sums(rows, lambda r: r.image),
        _sums(rows, lambda r: r.owner), _sums(rows, lambda r: r.cost_center), _sums(rows, lambda r: r.region),
        sum(r.monthly for r in rows), tuple(failures),
    )  # fmt: skip


def tag_report(store: Store, reader: ReaderFor, tags: TagRules) -> TagReport:
    required = tuple(tags.required)
    rows: list[TagRow] = []
    failures: list[SourceFailure] = []
    if required:
        for v in store.list_versions(summary=True):
            missing = tuple(t for t in required if t not in v.tags)
            if missing and v.status is not Status.RETIRED:
                rows.append(TagRow("version", v.ref, "", v.ref, missing))
        held, failures = _stored(store, reader)
        for version, artifact, stored in held:
            for kind, rid, labels in stored.resources:
                if kind == "file":
                    continue  # a local file carries no tags: its version's are checked above
                missing = tuple(t for t in required if t not in labels)
                if missing:
                    rows.append(TagRow(kind, rid, artifact.region, version.ref, missing))
    return TagReport(datetime.now(UTC), required, tuple(rows), tuple(failures))
