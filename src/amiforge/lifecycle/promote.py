"""promote / revoke: moving a channel pointer through the policy's gates, and taking a version out of service.

promote gathers the facts about a version (boot test, scan, a signature that still verifies against the bytes,
revocations up its ancestry, time spent in the previous channel), lets `policy.evaluate` judge them, and either
moves the pointer (compare-and-set; the old pointer becomes the rollback image) or raises GateFailed listing every
unmet gate. Every waiver used is an event.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from amiforge.errors import AmiforgeError, ConfigError, GateFailed, PartlyDone
from amiforge.lifecycle.boottest import provider_spec_of
from amiforge.lifecycle.runs import new_run_id
from amiforge.lifecycle.sign import verify
from amiforge.model import ChannelPointer, ImageVersion, Status
from amiforge.policy import Candidate, GateDecision, Policy, default_policy, evaluate, load_policy
from amiforge.providers import provider_for
from amiforge.providers.interface import Publisher
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)


def policy_of(settings: Settings, path: Path | None = None) -> Policy:
    """The policy at `path` if given (a command's --policy), else the settings' (AMIFORGE_POLICY), else the built-in
    one."""
    chosen = path or settings.policy
    return load_policy(chosen) if chosen else default_policy()


def candidate(version: ImageVersion, *, store: Store, settings: Settings) -> Candidate:
    reports = store.boot_reports(version.id)
    scan = store.latest_scan(version.id)
    try:
        verify(version.ref, store=store, settings=settings)
        signature_error = None
    except GateFailed as e:
        signature_error = "; ".join(f"{f.name}: {f.detail}" for f in e.failures)
    return Candidate(
        ref=version.ref,
        status=version.status,
        boot_test_passed=bool(reports) and reports[-1].passed,
        findings=scan.findings if scan else (),
        signature_error=signature_error,
        scanned=scan is not None,
        revoked=version.status == Status.REVOKED,
        revoked_ancestors=store.revoked_ancestors([version.id])[version.id],
        entered=store.channel_entries(version.id),
        vulndb_as_of=scan.vulndb_as_of if scan else {},
    )


@dataclass(frozen=True)
class PromoteOutcome:
    pointer: ChannelPointer
    decision: GateDecision
    moved: bool
    published: tuple[Mapping[str, object], ...] = ()


def publish_channel(
    version: ImageVersion, channel: str, *, store: Store, settings: Settings
) -> list[dict[str, object]]:
    """Where the provider publishes channels (AWS: an SSM parameter per region, a launch-template version), point
    `channel` at every artifact of `version`. Idempotent, so a promote that failed here converges when rerun."""
    provider = provider_for(version.provider, settings)
    if not isinstance(provider, Publisher):
        return []
    artifacts = [a for a in store.artifacts(version.id) if a.provider == version.provider]
    run_id = new_run_id()
    logger.info(
        "publish %s:%s -> %s (%d artifact(s), run %s)", version.name, channel, version.ref, len(artifacts), run_id
    )
    try:
        records = provider.publish(
            artifacts, provider_spec_of(version), name=version.name, channel=channel, run_id=run_id
        )
    except AmiforgeError as e:
        error = e.error if isinstance(e, PartlyDone) else e
        if isinstance(e, PartlyDone):
            # Publications before the failure happened (those parameters and templates hold the version now): their
            # records, what each replaced included, are kept as for a complete publish.
            store.append_event(
                "publish",
                actor=settings.actor,
                ref=version.ref,
                data={"channel": channel, "run": run_id, "records": list(e.done), "incomplete": True},
            )
        store.append_event(
            "publish.failed",
            actor=settings.actor,
            ref=version.ref,
            data={"channel": channel, "run": run_id, "error": str(error)},
        )
        rerun = f"{version.name}:{channel} points at {version.ref} in the registry; rerun the promote to publish it"
        error.fix = f"{error.fix}; then {rerun}" if error.fix else rerun
        if error is e:
            raise
        raise error from error.__cause__  # the failure itself, not the wrapper of what was done before it
    store.append_event(
        "publish", actor=settings.actor, ref=version.ref, data={"channel": channel, "run": run_id, "records": records}
    )
    return records


def promote(ref: str, channel: str, *, store: Store, settings: Settings, reason: str = "") -> PromoteOutcome:
    version = store.get_version(ref)
    policy = policy_of(settings)
    decision = evaluate(policy, channel, candidate(version, store=store, settings=settings), now=datetime.now(UTC))
    actor = settings.actor
    logger.info(
        "promote %s to %s: gate %s; unmet: %s",
        version.ref,
        channel,
        "passed" if decision.passed else "failed",
        [f"{u.name}: {u.detail}" for u in decision.unmet] or "none",
    )
    if not decision.passed:
        store.append_event(
            "promote.refused",
            actor=actor,
            ref=version.ref,
            data={"channel": channel, "unmet": [f"{u.name}: {u.detail}" for u in decision.unmet]},
        )
        decision.raise_if_unmet()
    pointers = store.channels(version.name, channel)
    current = pointers[0] if pointers else None
    if current is not None and current.current == version.ref:
        published = publish_channel(version, channel, store=store, settings=settings)
        return PromoteOutcome(current, decision, moved=False, published=tuple(published))
    expect = store.get_version(current.current).id if current else None
    pointer = store.move_channel(
        version.name, channel, version.id, expect_current=expect, actor=actor, reason=reason or "promoted"
    )
    # Recorded only for a move that happened: a waiver "used" by a refused promotion excused nothing.
    for waiver in decision.waivers_used:
        store.append_event(
            "waiver.used", actor=actor, ref=version.ref, data={"channel": channel, "waiver": waiver.describe()}
        )
    store.append_event(
        "promote",
        actor=actor,
        ref=version.ref,
        data={"channel": channel, "previous": pointer.previous, "reason": reason},
    )
    published = publish_channel(version, channel, store=store, settings=settings)
    return PromoteOutcome(pointer, decision, moved=True, published=tuple(published))


@dataclass(frozen=True)
class RevokeOutcome:
    version: ImageVersion
    flagged_channels: list[ChannelPointer]
    flagged_versions: list[str]


def descendants(version: ImageVersion, store: Store) -> list[ImageVersion]:
    """Versions whose ancestry includes `version`, newest first (parents are versions of the same image name)."""
    return [v for v in store.descendants(version.id) if v.name == version.name]


def revoke(ref: str, *, store: Store, settings: Settings, reason: str) -> RevokeOutcome:
    if not reason.strip():
        raise ConfigError("a revocation needs a reason", fix='amiforge revoke REF --reason "why"')
    version = store.get_version(ref)
    version = store.transition(version.id, Status.REVOKED, expect=version.status)
    store.append_event("revoke", actor=settings.actor, ref=version.ref, data={"reason": reason})
    logger.info("revoked %s", version.ref)
    children = descendants(version, store)
    affected = {version.ref} | {c.ref for c in children}
    # A channel holds a version as its current image or as its rollback image (previous): both need attention.
    flagged = [p for p in store.channels(version.name) if p.current in affected or p.previous in affected]
    for pointer in flagged:
        store.append_event(
            "channel.flagged",
            actor=settings.actor,
            ref=pointer.current,
            data={"channel": f"{pointer.name}:{pointer.channel}", "because": f"{version.ref} revoked: {reason}"},
        )
    for child in children:
        store.append_event(
            "version.flagged", actor=settings.actor, ref=child.ref, data={"because": f"ancestor {version.ref} revoked"}
        )
    return RevokeOutcome(version, flagged, [c.ref for c in children])
