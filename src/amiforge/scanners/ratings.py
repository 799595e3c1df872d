"""Rating CVE findings with what Debian and the CVE records say: Debian's verdict, a CVSS rating, the severity the
policy picks from them, a fixed version the tracker knows — and leaving out what Debian says does not affect the
installed version. Pure: the caller reads the verdicts and ratings from the registry.

Debian's tracker names *source* packages and CVE ids; a finding names a binary package and an advisory (a DSA, a
DLA, a CVE) with the CVEs it covers in its aliases. An advisory covering several CVEs is rated by the most severe of
those that still affect the installed version, each rated on its own (Debian's verdict and CVSS of that CVE); it is
one of Debian's minor issues only when every one of them is, and CVEs among them that nothing rates make the gate
judge it at least as unknown (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from amiforge.errors import ConfigError
from amiforge.imagefs import read_inside
from amiforge.model import CvssScore, DebianVerdict, Finding, FindingKind, Package, Severity
from amiforge.policy import SeveritySource, rated
from amiforge.scanners.cve_scores import preferred
from amiforge.scanners.vulns import dpkg_compare, is_dpkg_version

CVE_RE = re.compile(r"^CVE-\d{4}-\d{4,}$")
_VERSION_ID = re.compile(r"^\d{1,4}(\.\d{1,4}){0,2}$")
_CODENAME = re.compile(r"^[a-z]{1,20}$")


def cve_ids(finding: Finding) -> tuple[str, ...]:
    """The CVE ids a finding is about: its own id if it is one, then the CVEs among its aliases."""
    return tuple(dict.fromkeys(i for i in (finding.id, *finding.aliases) if CVE_RE.match(i)))


def not_affected(verdict: DebianVerdict, installed: str) -> bool:
    """Debian says this release is fixed at or below `installed` (a source version), or was never affected ("0")."""
    fixed = verdict.fixed_version
    return verdict.status == "resolved" and fixed is not None and (fixed == "0" or dpkg_compare(installed, fixed) >= 0)


# What rating a CVE finding changes in it: (severity, its origin, fixed, Debian's verdict, the CVSS rating, the
# scanner's own word, CVEs nothing rates); None when Debian says no CVE it covers affects the installed version.
_Rating = tuple[
    Severity, str | None, str | None, DebianVerdict | None, CvssScore | None, Severity | None, tuple[str, ...]
]


@dataclass
class RatingMemo:
    """Ratings already made with one set of verdicts and scores (or a subset of a later one): a rescan rates the
    same advisory on the same source package version for many binaries and versions (~90,000 findings of a
    rescan of 100 versions are ~9,000 distinct ones, rated from ~4,000 distinct (advisory, source version))."""

    ratings: dict[tuple[object, ...], _Rating | None] = field(default_factory=dict)
    findings: dict[tuple[object, ...], Finding | None] = field(default_factory=dict)


def rate(
    findings: Sequence[Finding],
    packages: Sequence[Package],
    verdicts: Mapping[tuple[str, str], DebianVerdict],
    scores: Mapping[str, Sequence[CvssScore]],
    *,
    severity_source: SeveritySource,
    memo: RatingMemo | None = None,
) -> tuple[list[Finding], list[Finding]]:
    """(findings rated, CVE findings Debian says do not affect the installed version). Findings that are not
    CVEs pass through unchanged. `memo` keeps the ratings for the next call with the same verdicts and scores
    (or more of them)."""
    by_name = {p.name: p for p in packages}
    memo = RatingMemo() if memo is None else memo
    kept: list[Finding] = []
    dropped: list[Finding] = []
    for finding in findings:
        if finding.kind is not FindingKind.CVE:
            kept.append(finding)
            continue
        package = by_name.get(finding.package or "")
        source = None if package is None else (package.source_name, package.source_version or package.version)
        whole = (finding, source, severity_source)
        if whole in memo.findings:
            out = memo.findings[whole]
        else:
            # Everything the rating reads of the finding and its package: not the binary's name or version.
            key = (finding.id, finding.aliases, finding.source, finding.severity, finding.severity_source,
                   finding.reported, finding.fixed, source, severity_source)  # fmt: skip
            if key not in memo.ratings:
                memo.ratings[key] = _rate(finding, package, verdicts, scores, severity_source)
            out = memo.findings[whole] = _rated(finding, memo.ratings[key])
        if out is None:
            dropped.append(finding)
        else:
            kept.append(out)
    return kept, dropped


def _rated(finding: Finding, rating: _Rating | None) -> Finding | None:
    if rating is None:
        return None
    severity, origin, fixed, debian, cvss, reported, unrated = rating
    return replace(finding, severity=severity, severity_source=origin, fixed=fixed, debian=debian, cvss=cvss,
                   reported=reported, unrated_cves=unrated)  # fmt: skip


def _rate(
    finding: Finding,
    package: Package | None,
    verdicts: Mapping[tuple[str, str], DebianVerdict],
    scores: Mapping[str, Sequence[CvssScore]],
    severity_source: SeveritySource,
) -> _Rating | None:
    """`finding` rated by its worst CVE still affecting the package; None when Debian says none does."""
    # The scanner's own word, kept apart so that a later judgement under another severity_source still has it.
    reported = finding.reported if finding.severity_source is not None else finding.severity
    base = replace(finding, reported=None if reported is Severity.UNKNOWN else reported)
    # Debian's verdicts are about Debian's packages: a finding from an imported report for something dpkg does not
    # know (a pip or npm package of the same name) keeps its own rating, and only CVSS is added.
    installed = (package.source_version or package.version) if package is not None else None
    debian_ok = package is not None and installed is not None and is_dpkg_version(installed)
    ids = cve_ids(finding) or (finding.id,)
    affecting: list[tuple[str, DebianVerdict | None]] = []
    for cve in ids:
        verdict = verdicts.get((package.source_name, cve)) if debian_ok and package is not None else None
        if verdict is not None and installed is not None and not_affected(verdict, installed):
            continue
        affecting.append((cve, verdict))
    if not affecting:
        return None  # every CVE it covers is fixed in the installed version, or never affected it (Debian)
    minor = all(v is not None and v.minor for _, v in affecting)
    candidates = []
    for cve, verdict in affecting:
        if verdict is not None and verdict.minor and not minor:
            continue  # a minor CVE never stands for an advisory that also covers one that is not
        one = replace(base, debian=verdict, cvss=preferred(scores.get(cve, ())))
        severity, origin = rated(one, severity_source)
        candidates.append((cve, one, severity, origin))
    cve, worst, severity, origin = max(candidates, key=lambda c: c[2].rank)
    unrated = tuple(c for c, _, s, _ in candidates if s is Severity.UNKNOWN and c != cve)
    fixed = worst.fixed
    # The tracker may know a fix OSV does not list yet (a point release, a security upload).
    tracker_fix = worst.debian.fixed_version if worst.debian is not None else None
    if fixed is None and tracker_fix and installed and dpkg_compare(tracker_fix, installed) > 0:
        fixed = tracker_fix
    return severity, origin, fixed, worst.debian, worst.cvss, base.reported, unrated


def debian_release(root: Path) -> tuple[str, str]:
    """(VERSION_ID, VERSION_CODENAME) of the image, from its /etc/os-release (e.g. ("12", "bookworm")).

    ConfigError when the image does not say: matching advisories of the wrong release would be worse than none."""
    fix = (
        "amiforge scans Debian images: the image's /etc/os-release must name its release (VERSION_ID, VERSION_CODENAME)"
    )
    fields: dict[str, str] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            text = read_inside(root, path, max_bytes=64 * 1024).decode("utf-8", "replace")
        except (ConfigError, OSError):
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip().strip("'\"")
        break
    number, codename = fields.get("VERSION_ID", ""), fields.get("VERSION_CODENAME", "")
    # The image's builder wrote this file: only a release number and a codename as Debian writes them are used.
    if fields.get("ID") != "debian" or not _VERSION_ID.match(number) or not _CODENAME.match(codename):
        said = ", ".join(f"{k}={fields[k][:40]!r}" for k in ("ID", "VERSION_ID", "VERSION_CODENAME") if k in fields)
        raise ConfigError(
            f"the image is not a Debian release amiforge can match advisories for ({said or 'no os-release'})", fix=fix
        )
    return number, codename
