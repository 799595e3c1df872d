"""rescan: re-match versions against today's vulnerability data without reading their images again.

A scan stores the image's packages (its SBOM) and Debian release, so a rescan re-runs only the matching and the
rating (`scan.vulnerabilities`) and records a new scan with the same SBOM: the findings a gate judges, and the age
of the data behind them, become today's. Findings that do not come from advisories (secrets, residue) and those
imported from other scanners' reports are kept from the scan before (imported ones are rated again).

What matters to a team is the channels: `rescan` takes every channel's current version (or the channels, or the
versions, asked for), and reports each whose gate result changed. A channel that now holds a version its own gate
refuses is flagged (an event, `rescan.flagged`) and the command exits 4: a version in prod with a new critical CVE
is an incident, as a revocation is.

The signature still verifies (`verify` compares the image, and says the findings changed since signing): the packages
are what was signed, only what is known about them changed — and a rollback must never need a new signature.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from amiforge.errors import ConfigError, NotFound
from amiforge.lifecycle.promote import policy_of
from amiforge.lifecycle.scan import findings_gate, vulnerabilities
from amiforge.lifecycle.views import findings_summary, sources_label
from amiforge.lifecycle.vulndb import MatchingData
from amiforge.model import Finding, FindingKind, ImageVersion, ScanRecord
from amiforge.policy import GateDecision, Policy
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

# Findings a rescan re-derives from the advisories; every other finding is kept as the image scan found it.
_MATCHED_SOURCES = ("osv",)


@dataclass(frozen=True)
class ChannelVerdict:
    channel: str  # a channel of the policy (a pointer is NAME:CHANNEL; the version names the image)
    before: GateDecision
    after: GateDecision

    @property
    def changed(self) -> bool:
        return self.before.passed != self.after.passed or _reasons(self.before) != _reasons(self.after)

    @property
    def newly_failing(self) -> bool:
        return self.before.passed and not self.after.passed


@dataclass(frozen=True)
class Rescanned:
    version: ImageVersion
    scan: ScanRecord
    new: tuple[Finding, ...]  # CVE findings today's data adds
    gone: tuple[Finding, ...]  # CVE findings it no longer has (fixed upstream data, Debian says not affected, …)
    channels: tuple[ChannelVerdict, ...]  # the channels that hold it now, judged before and after

    @property
    def flagged(self) -> tuple[str, ...]:
        """Channels holding this version whose own gate refuses it now."""
        return tuple(v.channel for v in self.channels if not v.after.passed)


def _reasons(decision: GateDecision) -> list[str]:
    return sorted(f"{u.name}: {u.detail}" for u in decision.unmet)


def targets(
    refs: Sequence[str], channels: Sequence[str], *, store: Store, settings: Settings
) -> dict[int, tuple[ImageVersion, list[str]]]:
    """version id -> (version, the channels it is current in, of those asked): the versions named, the versions
    current in the channels named, or — when neither is named — every channel's current version."""
    policy = policy_of(settings)
    for channel in channels:
        policy.channel(channel)  # ConfigError naming the channels if it is not one
    chosen: dict[int, tuple[ImageVersion, list[str]]] = {}
    for ref in refs:
        version = store.get_version(ref)
        chosen.setdefault(version.id, (version, []))
    if channels or not refs:
        for pointer in store.channels():
            if channels and pointer.channel not in channels:
                continue
            version = store.get_version(pointer.current)
            chosen.setdefault(version.id, (version, []))[1].append(pointer.channel)
    for version, held in chosen.values():
        if version.ref in refs:  # a version named is judged in every channel that holds it
            held[:] = sorted({p.channel for p in store.channels(version.name) if p.current == version.ref})
    if channels and not any(held for _, held in chosen.values()):
        raise NotFound(f"no version is current in {', '.join(channels)}", fix="amiforge channels lists them")
    return chosen


def release_of(scan: ScanRecord) -> str | None:
    """The image's Debian release (os-release VERSION_ID): recorded by scans since 0007; for an older scan, the
    major version of its base-files package (12.4+deb12u5 is Debian 12), which always matches it."""
    if scan.release:
        return scan.release
    base = next((p.version for p in scan.packages if p.name == "base-files"), "")
    major = re.match(r"(\d+)(?:\.|$)", base)
    return major.group(1) if major else None


@dataclass(frozen=True)
class _Target:
    version: ImageVersion
    channels: list[str]
    before: ScanRecord
    release: str


def rescan(
    refs: Sequence[str] = (),
    channels: Sequence[str] = (),
    *,
    store: Store,
    settings: Settings,
    now: datetime | None = None,
) -> list[Rescanned]:
    """Re-match each target version against today's data, record the new scan, and judge each channel that
    holds it before and after (flagging those whose gate now refuses it). Every target is checked before anything
    is written: a rescan that cannot do one version does none."""
    with _cycle_collector_paused():
        return _rescan(refs, channels, store=store, settings=settings, now=now)


@contextlib.contextmanager
def _cycle_collector_paused() -> Iterator[None]:
    """Python's cycle collector walks every live object again and again while a rescan builds objects that stay
    alive (each target's scan: ~1,000 packages and ~1,000 findings; the advisories' index): 2.3 of 6.9 s of a
    rescan of 100 versions, measured. What a rescan drops, reference counting frees; the few cycles made meanwhile
    wait for the collector's next run after it. Process-wide: a concurrent thread's cycles wait as long."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rescan(
    refs: Sequence[str], channels: Sequence[str], *, store: Store, settings: Settings, now: datetime | None
) -> list[Rescanned]:
    policy = policy_of(settings)
    now = now or datetime.now(UTC)
    plan: list[_Target] = []
    for version, held in targets(refs, channels, store=store, settings=settings).values():
        before = store.latest_scan(version.id)
        if before is None:
            raise NotFound(f"{version.ref} has never been scanned", fix=f"amiforge scan {version.ref}")
        release = release_of(before)
        if release is None:
            raise ConfigError(
                f"the scan of {version.ref} says neither the image's Debian release nor its base-files version, so "
                "it cannot be matched again without reading the image",
                fix=f"amiforge scan {version.ref} (once; later rescans need no image)",
            )
        dropped = [c for c in held if c not in policy.channels]
        if dropped:
            logger.warning("rescan: %s is current in %s, which the policy no longer has: not judged there",
                           version.ref, ", ".join(dropped))  # fmt: skip
        plan.append(_Target(version, [c for c in held if c in policy.channels], before, release))
    # The advisories for every target's packages, read and indexed once (a kernel alone has thousands); Debian's
    # verdicts and the CVSS ratings read once for all the versions that share them.
    data = MatchingData(store)
    sources = {p.source_name for t in plan for p in t.before.packages}
    for release in {t.release for t in plan}:
        data.matcher(sources, release)
    return [_rescan_one(t, data, store=store, settings=settings, policy=policy, now=now) for t in plan]


def _rescan_one(
    target: _Target,
    data: MatchingData,
    *,
    store: Store,
    settings: Settings,
    policy: Policy,
    now: datetime,
) -> Rescanned:
    version, before = target.version, target.before
    kept = [f for f in before.findings if f.kind is not FindingKind.CVE]
    imported = [f for f in before.findings if f.kind is FindingKind.CVE and f.source not in _MATCHED_SOURCES]
    cves = vulnerabilities(before.packages, target.release, imported, store=store, policy=policy, data=data)
    after = store.add_scan(
        version.id,
        replace(before, scanned_at=now, findings=tuple(cves.findings + kept), vulndb=sources_label(data.sources),
                vulndb_as_of=cves.as_of, release=target.release, id=None, version_id=None),
    )  # fmt: skip
    old_keys = {f.key for f in before.findings if f.kind is FindingKind.CVE}
    new_keys = {f.key for f in cves.findings}
    verdicts = tuple(
        ChannelVerdict(
            channel,
            findings_gate(before, channel, policy=policy, now=now, ref=version.ref),
            findings_gate(after, channel, policy=policy, now=now, ref=version.ref),
        )
        for channel in target.channels
    )
    result = Rescanned(
        version,
        after,
        tuple(f for f in cves.findings if f.key not in old_keys),
        tuple(f for f in before.findings if f.kind is FindingKind.CVE and f.key not in new_keys),
        verdicts,
    )
    store.append_event(
        "rescan.completed",
        actor=settings.actor,
        ref=version.ref,
        data={"findings": findings_summary(after.findings), "new": [f.key for f in result.new],
              "gone": [f.key for f in result.gone], "vulndb": after.vulndb, "judged": list(target.channels)},
    )  # fmt: skip
    for verdict in verdicts:
        if not verdict.after.passed:
            logger.warning("rescan: %s in %s fails its gate now", version.ref, verdict.channel)
            store.append_event(
                "rescan.flagged",
                actor=settings.actor,
                ref=version.ref,
                data={"channel": verdict.channel, "reasons": _reasons(verdict.after), "newly": verdict.newly_failing},
            )
    return result
