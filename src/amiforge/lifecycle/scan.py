"""scan: what is inside a version — SBOM, CVEs, secrets and residue — read from the bytes the artifact ships.

The scan never boots the image: packages come from the dpkg database, files from a read-only mount of the
artifact, key material also from its raw disk bytes. Findings are values; the gate (policy.evaluate for the
first channel) says what they mean, and `scan` reports it without changing the version's fate beyond `scanned`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from amiforge.errors import NotFound
from amiforge.lifecycle.boottest import baked_value
from amiforge.lifecycle.promote import policy_of
from amiforge.lifecycle.runs import new_run_id, record_leftovers
from amiforge.lifecycle.views import findings_summary, vulndb_label
from amiforge.lifecycle.vulndb import MatchingData
from amiforge.model import Finding, ImageVersion, Leftover, Package, ScanRecord, Status, require_status
from amiforge.policy import Candidate, GateDecision, Policy, evaluate
from amiforge.providers import provider_for
from amiforge.scanners.changelogs import read_changelogs
from amiforge.scanners.debian_tracker import codename_of
from amiforge.scanners.ratings import cve_ids, debian_release, rate
from amiforge.scanners.sbom import cyclonedx_sbom, read_dpkg_status, sbom_digest
from amiforge.scanners.secrets import scan_raw, scan_tree
from amiforge.scanners.vulns import import_report
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

# A scan only reads the artifact, so any version whose artifact is in use is scanned — before its boot test too
# (people scan before spending a boot), and after a failed one. The gates at promote still require the boot test;
# `scanned` as a state still means "tested, then scanned". Not scanned: a version still baking (no finished
# artifact), and deprecated, revoked or retired ones (a new scan record would change what their signature covers).
SCANNABLE = (Status.BUILT, Status.TESTED, Status.SCANNED, Status.SIGNED, Status.FAILED)


@dataclass(frozen=True)
class ScanOutcome:
    version: ImageVersion
    scan: ScanRecord
    orphaned: tuple[Leftover, ...] = ()  # what the scan's scratch cleanup could not remove


def expected_authorized_keys(version: ImageVersion) -> list[str]:
    """authorized_keys files the recipe itself installs (user steps with keys) are expected, not residue."""
    steps = baked_value(version, "steps", [])
    paths = []
    for step in steps if isinstance(steps, list) else []:
        user = step.get("user") if isinstance(step, dict) else None
        if isinstance(user, dict) and user.get("ssh_authorized_keys") and isinstance(user.get("name"), str):
            home = "/root" if user["name"] == "root" else f"/home/{user['name']}"
            paths.append(f"{home}/.ssh/authorized_keys")
    return paths


@dataclass(frozen=True)
class Vulnerabilities:
    """CVE findings of a package list against the registry's data now, rated by the policy."""

    findings: list[Finding]
    not_affected: list[Finding]  # matched by an advisory, but Debian's tracker says the installed version is fixed
    as_of: dict[str, datetime]  # vulnerability source -> the age of its data

    def describe(self) -> str:
        left_out = f"; {len(self.not_affected)} left out (Debian: fixed in the installed version)"
        return f"{len(self.findings)} CVE finding(s)" + (left_out if self.not_affected else "")


def vulnerabilities(
    packages: Sequence[Package],
    release: str,
    extra: Sequence[Finding],
    *,
    store: Store,
    policy: Policy,
    codename: str | None = None,
    data: MatchingData | None = None,
) -> Vulnerabilities:
    """Match `packages` (of Debian `release`, os-release VERSION_ID) against the advisories, add `extra` (from
    imported reports), and rate them all with Debian's verdicts and CVSS ratings under the policy's
    severity_source. The same for a scan and a rescan, which re-reads nothing from the image; a rescan of many
    versions passes one `data` for all of them."""
    data = data or MatchingData(store)
    as_of: dict[str, datetime] = {s.name: s.as_of for s in data.sources}
    sources = {p.source_name for p in packages}
    matched = data.matcher(sources, release).match(packages) + list(extra)
    codename = codename or codename_of(release)
    verdicts = data.verdicts(sources, codename) if codename else {}
    scores = data.scores({c for f in matched for c in cve_ids(f)})
    rated, unaffected = rate(matched, packages, verdicts, scores, severity_source=policy.severity_source,
                             memo=data.ratings(codename))  # fmt: skip
    return Vulnerabilities(rated, unaffected, as_of)


def scan(
    ref: str, *, store: Store, settings: Settings, reports: list[Path] | None = None, actor: str | None = None
) -> ScanOutcome:
    version = store.get_version(ref)
    policy = policy_of(settings)  # a broken policy fails here, before the image is read
    fix = "wait for its bake to finish" if version.status is Status.BAKING else "scan a version still in use"
    require_status(version, SCANNABLE, doing="scanned", fix=fix)
    artifacts = [a for a in store.artifacts(version.id) if a.provider == version.provider]
    if not artifacts or version.digest is None:
        raise NotFound(
            f"{version.ref} has no artifact to scan (its bake failed before the disk was made, or it was retired)",
            fix=f"bake the recipe again: amiforge bake {version.recipe_path}",
        )
    imported: list[Finding] = []
    for report in reports or []:
        imported += import_report(report)  # parse first: a bad report fails before any work
    provider = provider_for(version.provider, settings)
    run_id = new_run_id()
    logger.info("scan %s (run %s): reading %s", version.ref, run_id, artifacts[0].location)
    with provider.inspect(artifacts[0]) as view:
        packages = read_dpkg_status(view.root)
        findings = list(scan_tree(view.root, expected_authorized_keys=expected_authorized_keys(version)))
        if view.raw is not None:
            # Deleted data lies in free blocks (live files were scanned above); offsets are into the artifact's disk.
            raw = scan_raw(view.raw, ranges=view.unallocated)
            findings += [replace(f, path=(f.path or "").replace(str(view.raw), "disk")) for f in raw]
        release, codename = debian_release(view.root)
        changelogs = read_changelogs(view.root, packages)
    cves = vulnerabilities(packages, release, imported, store=store, policy=policy, codename=codename)
    logger.info("scan %s: %s", version.ref, cves.describe())
    findings = cves.findings + findings
    logger.info("scan %s: %d package(s), findings %s", version.ref, len(packages), findings_summary(findings) or "none")
    now = datetime.now(UTC)
    sbom = cyclonedx_sbom(
        packages, image_name=version.name, image_version=str(version.number), digest=version.digest, timestamp=now
    )
    record = store.add_scan(
        version.id,
        ScanRecord(now, tuple(packages), sbom, sbom_digest(sbom), tuple(findings), vulndb_label(store),
                   changelogs=changelogs, vulndb_as_of=cves.as_of, release=release),
    )  # fmt: skip
    if version.status == Status.TESTED:
        version = store.transition(version.id, Status.SCANNED, expect=Status.TESTED)
    store.append_event(
        "scan.completed",
        actor=actor or settings.actor,
        ref=version.ref,
        data={"run": run_id, "packages": len(packages), "findings": findings_summary(findings)},
    )
    record_leftovers(store, view.leftovers, actor=actor or settings.actor, ref=version.ref, run_id=run_id)
    return ScanOutcome(version, record, tuple(view.leftovers))


def scan_gate(
    scan: ScanRecord, *, policy: Policy, now: datetime, ref: str = "the version", data_age: bool = True
) -> GateDecision:
    """The scan judged by the rules of the policy's entry channel (the one with no `after`): what `scan` reports
    as its gate. `data_age` False: the age of the vulnerability data is not judged (see release.releasable)."""
    entry = next(name for name, rule in policy.channels.items() if rule.after is None)
    return findings_gate(scan, entry, policy=policy, now=now, ref=ref, data_age=data_age)


def findings_gate(
    scan: ScanRecord, channel: str, *, policy: Policy, now: datetime, ref: str = "the version", data_age: bool = True
) -> GateDecision:
    """The scan's findings, and the age of the data behind them, judged by `channel`'s rules. Boot test,
    signature, ancestry and soak are promote's business, so they count as met here."""
    after = policy.channel(channel).after
    facts = Candidate(
        ref=ref,
        status=Status.SIGNED,
        boot_test_passed=True,
        findings=scan.findings,
        signature_error=None,
        scanned=True,
        revoked=False,
        revoked_ancestors=(),
        entered={after: datetime.min.replace(tzinfo=UTC)} if after else {},
        vulndb_as_of=scan.vulndb_as_of if data_age else None,
    )
    return evaluate(policy, channel, facts, now=now)
