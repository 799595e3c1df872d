"""Rating CVE findings with what Debian and the CVE records say: Debian's verdict, a CVSS rating, the severity the
policy picks from them, a fixed version the tracker knows — and leaving out what Debian says does not affect the
installed version. Pure: the caller reads the verdicts and ratings from the registry.

Debian's tracker names *source* packages and CVE ids; a finding names a binary package and an advisory (a DSA, a
DLA, a CVE) with the CVEs it covers in its aliases. An advisory covering several CVEs takes the most severe verdict
of those that still affect the installed version: fail closed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from amiforge.errors import ConfigError
from amiforge.imagefs import read_inside
from amiforge.model import CvssScore, DebianVerdict, Finding, FindingKind, Package
from amiforge.policy import SeveritySource, rated, urgency_severity
from amiforge.scanners.cve_scores import preferred
from amiforge.scanners.vulns import dpkg_compare

CVE_RE = re.compile(r"^CVE-\d{4}-\d{4,}$")


def cve_ids(finding: Finding) -> tuple[str, ...]:
    """The CVE ids a finding is about: its own id if it is one, then the CVEs among its aliases."""
    return tuple(dict.fromkeys(i for i in (finding.id, *finding.aliases) if CVE_RE.match(i)))


def not_affected(verdict: DebianVerdict, installed: str) -> bool:
    """Debian says this release is fixed at or below `installed` (a source version), or was never affected ("0")."""
    fixed = verdict.fixed_version
    return verdict.status == "resolved" and fixed is not None and (fixed == "0" or dpkg_compare(installed, fixed) >= 0)


def _weight(verdict: DebianVerdict) -> tuple[bool, int]:
    """What makes one verdict more severe than another: affecting the gate at all first, then the urgency."""
    severity = urgency_severity(verdict.urgency)
    return (not verdict.minor, -1 if severity is None else severity.rank)


def rate(
    findings: Sequence[Finding],
    packages: Sequence[Package],
    verdicts: Mapping[tuple[str, str], DebianVerdict],
    scores: Mapping[str, Sequence[CvssScore]],
    *,
    severity_source: SeveritySource,
) -> tuple[list[Finding], list[Finding]]:
    """(findings rated, CVE findings Debian says do not affect the installed version). Findings that are not
    CVEs pass through unchanged."""
    by_name = {p.name: p for p in packages}
    kept: list[Finding] = []
    dropped: list[Finding] = []
    for finding in findings:
        if finding.kind is not FindingKind.CVE:
            kept.append(finding)
            continue
        package = by_name.get(finding.package or "")
        source = package.source_name if package else (finding.package or "")
        installed = (package.source_version or package.version) if package else (finding.installed or "")
        ids = cve_ids(finding)
        known = [v for v in (verdicts.get((source, cve)) for cve in ids) if v is not None]
        affecting = [v for v in known if not (installed and not_affected(v, installed))]
        if known and len(known) == len(ids) and not affecting:
            dropped.append(finding)
            continue
        debian = max(affecting, key=_weight, default=None)
        ratings = [r for r in (preferred(scores.get(cve, ())) for cve in ids) if r is not None]
        cvss = max(ratings, key=lambda r: r.score, default=None)
        fixed = finding.fixed
        # The tracker may know a fix OSV does not list yet (a point release, a security upload).
        tracker_fix = debian.fixed_version if debian is not None else None
        if fixed is None and tracker_fix and installed and dpkg_compare(tracker_fix, installed) > 0:
            fixed = tracker_fix
        with_ratings = replace(finding, debian=debian, cvss=cvss, fixed=fixed)
        severity, origin = rated(with_ratings, severity_source)
        kept.append(replace(with_ratings, severity=severity, severity_source=origin))
    return kept, dropped


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
    if fields.get("ID") != "debian" or not number or not codename:
        said = ", ".join(f"{k}={fields[k]}" for k in ("ID", "VERSION_ID", "VERSION_CODENAME") if k in fields)
        raise ConfigError(
            f"the image is not a Debian release amiforge can match advisories for ({said or 'no os-release'})", fix=fix
        )
    return number, codename
