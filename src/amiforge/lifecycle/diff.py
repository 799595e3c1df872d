"""images diff: what changed between two versions — packages, CVEs, secrets/residue and size — from their scans.

For each upgraded package it also says what the upgrade fixed by the image's own word: the CVE ids its Debian
changelog names between the two versions (`ScanRecord.changelogs` of the newer scan, read from the image at scan
time), each beside the database's view of it, from the two scans' CVE findings. The two can differ and both are
shown: a changelog names fixes the advisories may not know yet, and each scan matched against the advisories
imported when it ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from amiforge.errors import NotFound
from amiforge.model import Finding, FindingKind, ImageVersion, Package, ScanRecord
from amiforge.scanners.changelogs import cves_between
from amiforge.scanners.vulns import dpkg_compare
from amiforge.store.interface import Store


@dataclass(frozen=True)
class PackageChange:
    name: str
    arch: str
    old: str | None
    new: str | None

    @property
    def change(self) -> str:
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        return "upgraded" if dpkg_compare(self.new, self.old) > 0 else "downgraded"


class ChangelogState(StrEnum):
    """Whether the newer image's changelog could tell what an upgrade fixed."""

    READ = "read"  # the changelog of the package's source was read (it may name no CVE in the range)
    MISSING = "missing"  # the scan read changelogs, but the image ships none for this source (or it was unreadable)
    NOT_RECORDED = "not-recorded"  # the scan recorded no changelogs: made before they were read, or no /usr/share/doc


class DbView(StrEnum):
    """What the two scans' CVE findings (matched against the advisory database) say of a CVE in one package."""

    FIXED = "fixed"  # a finding in the older scan, none in the newer
    INTRODUCED = "introduced"  # a finding in the newer scan only
    STILL_OPEN = "still-open"  # a finding in both
    NOT_IN_DATABASE = "not-in-database"  # a finding in neither

    @property
    def label(self) -> str:
        return _DB_LABELS[self]


_DB_LABELS = {
    DbView.FIXED: "fixed",
    DbView.INTRODUCED: "introduced",
    DbView.STILL_OPEN: "still open",
    DbView.NOT_IN_DATABASE: "not in the database",
}


@dataclass(frozen=True)
class ChangelogCve:
    """One CVE id an upgrade's changelog entries name, and the database's view of it for that package."""

    id: str
    db: DbView


@dataclass(frozen=True)
class UpgradeFixes:
    """One upgraded binary package and the CVEs its source's changelog names between the two versions."""

    name: str
    arch: str
    source: str  # the source package in the newer image: whose changelog was read
    old: str  # binary versions, as dpkg records them
    new: str
    changelog: ChangelogState
    cves: tuple[ChangelogCve, ...]  # newest entry first; () unless `changelog` is READ


@dataclass(frozen=True)
class VersionDiff:
    old: ImageVersion
    new: ImageVersion
    packages: tuple[PackageChange, ...]
    cves_fixed: tuple[Finding, ...]
    cves_introduced: tuple[Finding, ...]
    secrets_removed: tuple[Finding, ...]
    secrets_added: tuple[Finding, ...]
    size_delta: int | None
    upgrades: tuple[UpgradeFixes, ...]  # one per upgraded package, in `packages` order
    changelogs_recorded: bool  # False: the newer scan recorded no changelogs (every upgrade is NOT_RECORDED)


def _scan(version: ImageVersion, store: Store) -> ScanRecord:
    scan = store.latest_scan(version.id)
    if scan is None:
        raise NotFound(
            f"{version.ref} has not been scanned, so there is nothing to compare", fix=f"amiforge scan {version.ref}"
        )
    return scan


def diff(ref_a: str, ref_b: str, *, store: Store) -> VersionDiff:
    """What changed from version `ref_a` to `ref_b`, from their latest scans (NotFound if either has none)."""
    a, b = store.get_version(ref_a), store.get_version(ref_b)
    return diff_scans(a, b, _scan(a, store), _scan(b, store))


def diff_from(ref: str, *, store: Store, against: str | None = None) -> VersionDiff:
    """What changed in `ref` from `against`, by default its parent (NotFound for a first version)."""
    version = store.get_version(ref)
    base = against or version.parent
    if base is None:
        raise NotFound(f"{version.ref} is a first version: it has no parent to compare with",
                       fix="compare it with another version (?against=NAME@N, amiforge images diff A B)")  # fmt: skip
    return diff(base, version.ref, store=store)


def diff_scans(a: ImageVersion, b: ImageVersion, scan_a: ScanRecord, scan_b: ScanRecord) -> VersionDiff:
    """What changed from version `a` (scanned as `scan_a`) to `b` (`scan_b`)."""
    old = {(p.name, p.arch): p.version for p in scan_a.packages}
    new = {(p.name, p.arch): p.version for p in scan_b.packages}
    changes = tuple(
        PackageChange(name, arch, old.get((name, arch)), new.get((name, arch)))
        for name, arch in sorted(old.keys() | new.keys())
        if old.get((name, arch)) != new.get((name, arch))
    )

    def keyed(scan: ScanRecord, kinds: set[FindingKind]) -> dict[str, Finding]:
        return {f.key: f for f in scan.findings if f.kind in kinds}

    cves_a, cves_b = keyed(scan_a, {FindingKind.CVE}), keyed(scan_b, {FindingKind.CVE})
    other = {FindingKind.SECRET, FindingKind.RESIDUE}
    sec_a, sec_b = keyed(scan_a, other), keyed(scan_b, other)
    size = b.size_bytes - a.size_bytes if a.size_bytes is not None and b.size_bytes is not None else None
    return VersionDiff(
        old=a,
        new=b,
        packages=changes,
        cves_fixed=tuple(cves_a[k] for k in sorted(cves_a.keys() - cves_b.keys())),
        cves_introduced=tuple(cves_b[k] for k in sorted(cves_b.keys() - cves_a.keys())),
        secrets_removed=tuple(sec_a[k] for k in sorted(sec_a.keys() - sec_b.keys())),
        secrets_added=tuple(sec_b[k] for k in sorted(sec_b.keys() - sec_a.keys())),
        size_delta=size,
        upgrades=upgrade_fixes(changes, scan_a, scan_b),
        changelogs_recorded=bool(scan_b.changelogs),
    )


def upgrade_fixes(
    changes: tuple[PackageChange, ...], scan_a: ScanRecord, scan_b: ScanRecord
) -> tuple[UpgradeFixes, ...]:
    """For each upgraded package in `changes`, the CVEs the newer image's changelog names between the two versions,
    each with the database's view of it (see `DbView`)."""
    packages_a = {(p.name, p.arch): p for p in scan_a.packages}
    packages_b = {(p.name, p.arch): p for p in scan_b.packages}
    known_a, known_b = _cve_ids_by_package(scan_a), _cve_ids_by_package(scan_b)
    out = []
    for change in changes:
        if change.change != "upgraded":
            continue
        before, after = packages_a[(change.name, change.arch)], packages_b[(change.name, change.arch)]
        entries = scan_b.changelogs.get(after.source_name)
        named: tuple[str, ...] = ()
        if not scan_b.changelogs:
            state = ChangelogState.NOT_RECORDED
        elif entries is None:
            state = ChangelogState.MISSING
        else:
            # Changelog entries carry source versions: a binNMU's "+b1" or a binary versioned apart from its
            # source (gcc-defaults' cpp) would misplace the range.
            state, named = ChangelogState.READ, cves_between(entries, _source_version(before), _source_version(after))
        in_a, in_b = known_a.get(change.name, frozenset()), known_b.get(change.name, frozenset())
        cves = tuple(ChangelogCve(cve, _db_view(cve in in_a, cve in in_b)) for cve in named)
        out.append(
            UpgradeFixes(change.name, change.arch, after.source_name, before.version, after.version, state, cves)
        )
    return tuple(out)


def _source_version(pkg: Package) -> str:
    return pkg.source_version or pkg.version


def _cve_ids_by_package(scan: ScanRecord) -> Mapping[str, frozenset[str]]:
    """Binary package -> every id its CVE findings go by (a DSA finding names its CVEs among its aliases)."""
    ids: dict[str, set[str]] = {}
    for f in scan.findings:
        if f.kind is FindingKind.CVE and f.package is not None:
            ids.setdefault(f.package, set()).update((f.id, *f.aliases))
    return {package: frozenset(names) for package, names in ids.items()}


def _db_view(in_old: bool, in_new: bool) -> DbView:
    if in_old:
        return DbView.STILL_OPEN if in_new else DbView.FIXED
    return DbView.INTRODUCED if in_new else DbView.NOT_IN_DATABASE
