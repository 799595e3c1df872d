"""Which severity a CVE finding has under a policy: Debian's urgency, a CVSS rating, or the most severe of them.

A finding carries every rating its sources gave (`Finding.debian`, `Finding.cvss`, and the scanner's own word in
`Finding.reported`), so a gate can choose again by its own policy without a new scan. `severity_source`:

- `debian` (the default): Debian's urgency when Debian assigned one, else CVSS, else the scanner's own word. Debian
  rates how a flaw affects Debian's own builds (a CVSS 9.8 in a feature Debian compiles out is `unimportant`), which
  is why distribution scanners (debsecan, Trivy, Grype) put it first. An OSV record for Debian carries Debian's
  urgency too (osv.dev copies it), so its word counts as Debian's when the tracker has none;
- `cvss`: the CVSS rating first, then Debian's, then the scanner's;
- `max`: the most severe of them all.

Nothing rated at all is `unknown`, which the gate judges as the channel's `unknown_cve_severity` (fail closed).
Urgencies the tracker marks with `**` ("low**") are NVD's rating copied while Debian has assigned none: they are not
Debian's, and count only where nothing else rates the CVE.
"""

from __future__ import annotations

from typing import Literal

from amiforge.model import Finding, Severity

SeveritySource = Literal["debian", "cvss", "max"]

# Debian's urgencies (security-tracker's data/CVE/list); "not yet assigned" and "end-of-life" rate nothing.
_URGENCY = {
    "unimportant": Severity.NEGLIGIBLE,
    "low": Severity.LOW,
    "medium": Severity.MEDIUM,
    "high": Severity.HIGH,
}

_Choice = tuple[Severity | None, str]


def urgency_severity(urgency: str) -> Severity | None:
    """Debian's own urgency as a Severity; None where Debian has not rated it (including NVD's copied `**`)."""
    word = urgency.strip().lower()
    return None if word.endswith("*") else _URGENCY.get(word)


def _copied_from_nvd(urgency: str) -> Severity | None:
    word = urgency.strip().lower()
    return _URGENCY.get(word.rstrip("*").strip()) if word.endswith("*") else None


def rated(finding: Finding, source: SeveritySource = "debian") -> tuple[Severity, str | None]:
    """(severity, where it came from) of `finding` under `source`; (UNKNOWN, None) when nothing rates it."""
    urgency = finding.debian.urgency if finding.debian is not None else ""
    debian: _Choice = (urgency_severity(urgency), "debian")
    cvss: _Choice = (finding.cvss.severity if finding.cvss is not None else None, "cvss")
    # A finding not rated yet (straight from a scanner) holds the scanner's word in `severity` itself.
    word = finding.reported if finding.severity_source is not None else finding.severity
    word = None if word is Severity.UNKNOWN else word
    scanner: _Choice = (word, finding.source)
    nvd_copy: _Choice = (_copied_from_nvd(urgency), "debian (nvd)")
    if source == "cvss":
        order = [cvss, debian, scanner, nvd_copy]
    elif finding.source == "osv":  # osv.dev's Debian records carry Debian's urgency
        order = [debian, scanner, cvss, nvd_copy]
    else:
        order = [debian, cvss, scanner, nvd_copy]
    present = [(s, origin) for s, origin in order if s is not None]
    if not present:
        return Severity.UNKNOWN, None
    if source == "max":
        return max(present, key=lambda c: c[0].rank)
    return present[0]
