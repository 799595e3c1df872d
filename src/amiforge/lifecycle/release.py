"""The release gate: what a version must be before it leaves the registry for the world (distribute, rollout).

docs/architecture.md §8: a version leaves the registry only when it is signed, its signature verifies against the
artifact's bytes now, and its findings pass the entry gate. Promotion judges the same facts
through the policy of its channel; distribution and rollouts use this one gate.
"""

from __future__ import annotations

from datetime import UTC, datetime

from amiforge.errors import GateFailed, GateFailure
from amiforge.lifecycle.promote import policy_of
from amiforge.lifecycle.scan import scan_gate
from amiforge.lifecycle.sign import verify
from amiforge.model import ImageVersion, Status, require_status
from amiforge.settings import Settings
from amiforge.store.interface import Store


def releasable(version: ImageVersion, *, store: Store, settings: Settings, action: str) -> None:
    """Raise unless `version` is signed, its signature verifies now, and its findings pass the entry gate."""
    require_status(
        version,
        {Status.SIGNED},
        doing=action,
        fix=f"amiforge pipeline run, or: amiforge scan {version.ref} && amiforge sign {version.ref}",
    )
    verify(version.ref, store=store, settings=settings)  # GateFailed names what no longer matches
    scan = store.latest_scan(version.id)
    assert scan is not None  # verify() refuses an unscanned version
    # The findings still gate; the age of the data behind them does not: promote judged it when a channel took the
    # version, and a rollback in an incident must never wait for `vulndb update`.
    decision = scan_gate(scan, policy=policy_of(settings), now=datetime.now(UTC), ref=version.ref, data_age=False)
    if not decision.passed:
        raise GateFailed(
            "scan gate",
            [GateFailure(u.name, u.detail) for u in decision.unmet],
            fix="fix the findings and bake again, or add an expiring waiver to the policy",
        )
