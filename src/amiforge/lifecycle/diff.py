"""images diff: what changed between two versions — packages, CVEs, secrets/residue and size — from their scans."""

from __future__ import annotations

from dataclasses import dataclass

from amiforge.errors import NotFound
from amiforge.model import Finding, FindingKind, ImageVersion, ScanRecord
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


def _scan(version: ImageVersion, store: Store) -> ScanRecord:
    scan = store.latest_scan(version.id)
    if scan is None:
        raise NotFound(
            f"{version.ref} has not been scanned, so there is nothing to compare", fix=f"amiforge scan {version.ref}"
        )
    return scan


def diff(ref_a: str, ref_b: str, *, store: Store) -> VersionDiff:
    a, b = store.get_version(ref_a), store.get_version(ref_b)
    scan_a, scan_b = _scan(a, store), _scan(b, store)
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
    )
