"""scan: what is inside a version — SBOM, CVEs, secrets and residue — read from the bytes the artifact ships.

The scan never boots the image: packages come from the dpkg database, files from a read-only mount of the
artifact, key material also from its raw disk bytes. Findings are values; the gate (policy.evaluate for the
first channel) says what they mean, and `scan` reports it without changing the version's fate beyond `scanned`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from amiforge.errors import NotFound
from amiforge.lifecycle.boottest import baked_value
from amiforge.lifecycle.runs import new_run_id, record_leftovers
from amiforge.lifecycle.views import findings_summary, vulndb_label
from amiforge.model import Finding, ImageVersion, Leftover, ScanRecord, Status, VulnDbImport, require_status
from amiforge.policy import Candidate, GateDecision, Policy, evaluate
from amiforge.providers import provider_for
from amiforge.scanners.sbom import cyclonedx_sbom, read_dpkg_status, sbom_digest
from amiforge.scanners.secrets import scan_raw, scan_tree
from amiforge.scanners.vulns import import_report, load_osv_records, match, parse_osv_records, source_packages
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


def scan(
    ref: str, *, store: Store, settings: Settings, reports: list[Path] | None = None, actor: str | None = None
) -> ScanOutcome:
    version = store.get_version(ref)
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
    advisories = parse_osv_records(store.advisories_for({p.source_name for p in packages}))
    findings = match(packages, advisories) + imported + findings
    logger.info("scan %s: %d package(s), findings %s", version.ref, len(packages), findings_summary(findings) or "none")
    now = datetime.now(UTC)
    sbom = cyclonedx_sbom(
        packages, image_name=version.name, image_version=str(version.number), digest=version.digest, timestamp=now
    )
    record = store.add_scan(
        version.id,
        ScanRecord(now, tuple(packages), sbom, sbom_digest(sbom), tuple(findings), vulndb_label(store)),
    )
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


def import_vulndb(path: Path, *, store: Store, actor: str) -> VulnDbImport:
    """Load OSV advisories (folder, .json or osv.dev's Debian all.zip) into the registry, every record validated."""
    loaded = load_osv_records(path)
    records = [(a.id, a.modified.isoformat() if a.modified else "", dict(raw), source_packages(a)) for a, raw in loaded]
    result = store.import_advisories(str(path), records)
    store.append_event("vulndb.import", actor=actor, data={"source": str(path), "count": result.count})
    return result


def scan_gate(findings: tuple[Finding, ...], *, policy: Policy, now: datetime) -> GateDecision:
    """The findings judged by the rules of the policy's entry channel (the one with no `after`): what `scan`
    reports as its gate. Boot test, signature and soak are promote's business, so they count as met here."""
    entry = next(name for name, rule in policy.channels.items() if rule.after is None)
    facts = Candidate(
        ref="scan",
        status=Status.SIGNED,
        boot_test_passed=True,
        findings=findings,
        signature_error=None,
        scanned=True,
        revoked=False,
        revoked_ancestors=(),
        entered={},
    )
    return evaluate(policy, entry, facts, now=now)
