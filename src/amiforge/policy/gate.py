"""The promotion gate: may a version enter a channel, judged against the policy (docs/architecture.md §3 step 6, §7).

`evaluate()` is pure: the caller gathers the facts about a version into a `Candidate` (status, boot test,
findings, signature check, revocations, when it entered each channel) and passes `now`; nothing here reads the
store, the clock or the network. It returns a `GateDecision` listing every unmet requirement, never just the
first; raising `GateFailed` is the caller's move (`GateDecision.raise_if_unmet()`).

Fail-closed choices worth knowing: residue and policy findings always gate (only a waiver excuses them); an
expired waiver gates instead of waiving; deprecated, retired, failed and unfinished versions never pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import assert_never

from amiforge.durations import format_duration
from amiforge.errors import GateFailed, GateFailure
from amiforge.model import Finding, FindingKind, Severity, Status
from amiforge.policy.document import ChannelPolicy, Policy, Waiver
from amiforge.policy.fields import as_utc
from amiforge.policy.severity import SeveritySource, rated

__all__ = ["Candidate", "GateDecision", "evaluate"]

# How far ahead of now a time may be before it is one that lies (clocks of two machines differ by a little).
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """Facts about one version, gathered by the caller; `evaluate()` only judges them.

    Keyword-only: several fields are booleans, and a swapped pair must not silently pass a gate.
    """

    ref: str
    status: Status
    boot_test_passed: bool
    findings: Sequence[Finding]
    signature_error: str | None  # None: a signature verified against the artifact's current bytes
    scanned: bool
    revoked: bool
    revoked_ancestors: Sequence[str]
    entered: Mapping[str, datetime]  # channel -> when this version was last promoted into it
    # Vulnerability source -> how old its data was when the latest scan matched against it (ScanRecord.vulndb_as_of);
    # None: the data's age is not judged (a rollout or rollback of a version a channel already took).
    vulndb_as_of: Mapping[str, datetime] | None


@dataclass(frozen=True)
class GateDecision:
    """Whether a version may enter a channel, with every unmet requirement and the waivers involved."""

    channel: str
    passed: bool
    unmet: tuple[GateFailure, ...]
    waivers_used: tuple[Waiver, ...] = ()  # valid waivers that excused a finding (to record in the event)
    expired_waivers: tuple[Waiver, ...] = ()  # expired waivers that would have excused a finding

    def raise_if_unmet(self) -> None:
        """Raise GateFailed listing every unmet requirement; return if the gate passed."""
        if not self.passed:
            raise GateFailed(
                f"promotion to {self.channel}",
                self.unmet,
                fix="fix each item listed, or add an expiring waiver to the policy for a finding you accept",
            )


# States in which a version can never be promoted, whatever the rest says.
_NOT_PROMOTABLE: Mapping[Status, str] = {
    Status.BAKING: "is still baking",
    Status.FAILED: "failed (bake or boot test)",
    Status.DEPRECATED: "is deprecated (on its way to retirement)",
    Status.RETIRED: "is retired",
}


def evaluate(policy: Policy, channel: str, candidate: Candidate, *, now: datetime) -> GateDecision:
    """Judge `candidate` against the rules of `channel` at time `now`; list every unmet requirement.

    Raises ConfigError (listing the channels) if the policy has no such channel. Pure: no store, no clock.
    """
    rule = policy.channel(channel)
    now = as_utc(now)
    ref = candidate.ref
    unmet: list[GateFailure] = []

    if candidate.revoked or candidate.status is Status.REVOKED:
        unmet.append(GateFailure("revoked", f"{ref} is revoked and can never be promoted; bake a new version"))
    if candidate.revoked_ancestors:
        ancestors = ", ".join(candidate.revoked_ancestors)
        unmet.append(
            GateFailure(
                "revoked-ancestor",
                f"{ref} descends from revoked {ancestors}; rebake it from a parent that is not revoked",
            )
        )
    if candidate.status in _NOT_PROMOTABLE:
        unmet.append(
            GateFailure("status", f"{ref} {_NOT_PROMOTABLE[candidate.status]}; only a tested, scanned version moves")
        )
    if not candidate.scanned:
        unmet.append(GateFailure("scan", f"{ref} has not been scanned; run `amiforge scan {ref}`"))
    elif candidate.vulndb_as_of is not None:
        unmet += _stale_data(ref, channel, rule, candidate.vulndb_as_of, now)
    if rule.require_boot_test and not candidate.boot_test_passed:
        unmet.append(
            GateFailure(
                "boot-test", f"{ref} has no passing boot test; run `amiforge test {ref}` and fix what it reports"
            )
        )
    if rule.require_signature and candidate.signature_error is not None:
        unmet.append(
            GateFailure(
                "signature",
                f"{ref}: no signature verifies against its artifact ({candidate.signature_error}); "
                f"if it was never signed run `amiforge sign {ref}`, if the artifact changed find out why first",
            )
        )

    used: list[Waiver] = []
    expired: list[Waiver] = []
    for finding in candidate.findings:
        reason = _offence(rule, channel, finding, policy.severity_source)
        if reason is None:
            continue
        matching = [w for w in policy.waivers if w.matches(finding, channel)]
        valid = [w for w in matching if not w.expired(now)]
        if valid:
            used.extend(w for w in valid[:1] if w not in used)
            continue
        stale = [w for w in matching if w.expired(now)]
        expired.extend(w for w in stale if w not in expired)
        unmet.append(GateFailure(_finding_name(finding), _finding_detail(finding, reason, stale)))

    if rule.after is not None:
        entered = candidate.entered.get(rule.after)
        if entered is None:
            unmet.append(
                GateFailure(
                    "after",
                    f"{ref} has never been in {rule.after}; {channel} takes versions from {rule.after}: "
                    f"run `amiforge promote {ref} --channel {rule.after}` first",
                )
            )
        elif rule.min_soak > timedelta(0):
            soaked = now - as_utc(entered)
            if soaked < rule.min_soak:
                ready = as_utc(entered) + rule.min_soak
                unmet.append(
                    GateFailure(
                        "soak",
                        f"{ref} has been in {rule.after} for {_human(soaked)} of the {_human(rule.min_soak)} "
                        f"{channel} requires: {_human(rule.min_soak - soaked)} left "
                        f"(promote after {ready.isoformat(timespec='seconds')})",
                    )
                )

    return GateDecision(
        channel=channel,
        passed=not unmet,
        unmet=tuple(unmet),
        waivers_used=tuple(used),
        expired_waivers=tuple(expired),
    )


def _stale_data(
    ref: str, channel: str, rule: ChannelPolicy, as_of: Mapping[str, datetime], now: datetime
) -> list[GateFailure]:
    """A scan judged by no advisories, or by data older than the channel allows, proves nothing: fail closed."""
    if "osv" not in as_of:
        return [
            GateFailure(
                "vulndb",
                f"the scan of {ref} matched against no advisories (or was made before amiforge recorded their age); "
                "run `amiforge vulndb update` (or `vulndb import`), then `amiforge rescan " + ref + "`",
            )
        ]
    failures = []
    for source, when in sorted(as_of.items()):
        age = now - as_utc(when)
        if age < -CLOCK_SKEW:  # data from the future is a clock or a file that lies: its age proves nothing
            failures.append(
                GateFailure(
                    "vulndb",
                    f"the {source} data the scan of {ref} used claims to be from {as_utc(when).isoformat()}, later "
                    "than now: check this machine's clock and where the data came from, then "
                    f"`amiforge vulndb update` and `amiforge rescan {ref}`",
                )
            )
        elif age > rule.max_vulndb_age:
            failures.append(
                GateFailure(
                    "vulndb",
                    f"the {source} data the scan of {ref} used is {_human(age)} old; {channel} allows "
                    f"{_human(rule.max_vulndb_age)} (max_vulndb_age): run `amiforge vulndb update`, then "
                    f"`amiforge rescan {ref}`",
                )
            )
    return failures


def _offence(rule: ChannelPolicy, channel: str, finding: Finding, source: SeveritySource) -> str | None:
    """Why `finding` counts against `channel`, or None if the channel's rules let it through."""
    match finding.kind:
        case FindingKind.CVE:
            if finding.debian is not None and finding.debian.minor and not rule.count_debian_minor:
                return None
            if rule.fixed_only and finding.fixed is None:
                return None
            severity, origin = rated(finding, source)
            judged = rule.unknown_cve_severity if severity is Severity.UNKNOWN else severity
            why = f" (unrated, judged {judged})" if severity is Severity.UNKNOWN else f" ({origin})"
            if finding.unrated_cves and rule.unknown_cve_severity.rank > judged.rank:
                # Other CVEs of the advisory still affect the package and nothing rates them: fail closed.
                judged = rule.unknown_cve_severity
                why += f"; {', '.join(finding.unrated_cves)} unrated, judged {judged}"
            if judged.rank <= rule.max_cve_severity.rank:
                return None
            return f"severity {severity}{why} is above {channel}'s max_cve_severity {rule.max_cve_severity}"
        case FindingKind.SECRET:
            if rule.allow_secrets:
                return None
            return f"a secret in the image ({channel} does not allow secrets)"
        case FindingKind.RESIDUE:
            return "build residue breaks every clone of the image (shared host keys, machine-id, histories)"
        case FindingKind.POLICY:
            return "a policy violation"
        case _:
            assert_never(finding.kind)


def _finding_name(finding: Finding) -> str:
    where = f" in {finding.package}" if finding.package else f" at {finding.path}" if finding.path else ""
    return f"{finding.kind} {finding.id}{where}"


def _finding_detail(finding: Finding, reason: str, stale: Sequence[Waiver]) -> str:
    text = f"{finding.title}: {reason}"
    match finding.kind:
        case FindingKind.CVE:
            if finding.fixed is not None:
                text += f"; upgrade {finding.package or 'the package'} to {finding.fixed} or later and rebake"
            else:
                text += "; no fix is published yet"
        case FindingKind.SECRET:
            at = f"{finding.path}:{finding.line}" if finding.line is not None else str(finding.path)
            seen = f" ({finding.redacted})" if finding.redacted else ""
            text += f"; remove it from {at}{seen}, rotate the credential and rebake"
        case FindingKind.RESIDUE:
            text += f"; clean {finding.path or 'it'} up at the end of the bake and rebake"
        case FindingKind.POLICY:
            text += "; fix the recipe and rebake"
        case _:
            assert_never(finding.kind)
    for waiver in stale:
        text += f"; the {waiver.describe()} has EXPIRED: renew it (new expires) only if the reason still holds"
    if not stale:
        scope = (
            f", package: {finding.package}" if finding.package else f", path: {finding.path}" if finding.path else ""
        )
        text += f"; to accept it, waive it: {{finding: {finding.id}{scope}, reason, by, expires}}"
    return text


def _human(value: timedelta) -> str:
    """A duration for a person, rounded up to whole seconds (so "0s left" never appears on a failing gate)."""
    return format_duration(max(0, math.ceil(value.total_seconds())))
