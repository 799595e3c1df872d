"""Which severity a CVE finding has under a policy: Debian's urgency, a CVSS rating, or the higher of the two.

A finding carries every rating its sources gave (`Finding.debian`, `Finding.cvss`, and the scanner's own word in
`severity` when `severity_source` names the scanner), so a gate can choose again by its own policy without a new
scan. `severity_source`:

- `debian` (the default): Debian's urgency when Debian assigned one, else the scanner's rating, else CVSS. Debian
  rates how a flaw affects Debian's own builds (a CVSS 9.8 in a feature Debian compiles out is `unimportant`), which
  is why distribution scanners (debsecan, Trivy, Grype) put it first;
- `cvss`: the CVSS rating first, then Debian's, then the scanner's;
- `max`: the most severe of them all.

Nothing rated at all is `unknown`, which the gate judges as the channel's `unknown_cve_severity` (fail closed).
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


def urgency_severity(urgency: str) -> Severity | None:
    """Debian's urgency as a Severity; None where Debian has not rated it. Trailing asterisks ("low**") qualify
    the rating (how sure the tracker is), they do not change it."""
    return _URGENCY.get(urgency.strip().rstrip("*").strip().lower())


def rated(finding: Finding, source: SeveritySource = "debian") -> tuple[Severity, str | None]:
    """(severity, where it came from) of `finding` under `source`; (UNKNOWN, None) when nothing rates it."""
    debian = urgency_severity(finding.debian.urgency) if finding.debian is not None else None
    cvss = finding.cvss.severity if finding.cvss is not None else None
    own = finding.severity_source not in ("debian", "cvss") and finding.severity is not Severity.UNKNOWN
    scanner = finding.severity if own else None
    choices: list[tuple[Severity | None, str | None]] = [
        (debian, "debian"),
        (scanner, finding.severity_source or finding.source),
        (cvss, "cvss"),
    ]
    if source == "cvss":
        choices = [choices[2], choices[0], choices[1]]
    present = [(s, origin) for s, origin in choices if s is not None]
    if not present:
        return Severity.UNKNOWN, None
    if source == "max":
        return max(present, key=lambda c: c[0].rank)
    return present[0]
