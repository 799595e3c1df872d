"""What the rollout controller's two modes (lifecycle/rollout.py: canary waves; lifecycle/refresh.py: a cloud's
instance refresh) share: the controller's clock and progress, its outcome, rollout targets and which artifact of a
version a fleet runs."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from amiforge.errors import ConfigError, NotFound
from amiforge.model import AWS_REGION_PATTERN, IMAGE_NAME_PATTERN, Artifact, ImageVersion, Rollout
from amiforge.providers import provider_for
from amiforge.providers.interface import Fleet, FleetProvider, Member, PhaseUpdate
from amiforge.settings import Settings
from amiforge.store.interface import Store
from amiforge.strategy import WaveDecision

logger = logging.getLogger(__name__)

# How often a wave is looked at while it bakes.
POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Controls:
    """The controller's clock and progress, injectable for tests."""

    progress: Callable[[PhaseUpdate], None] = lambda _u: None
    # Looked up when a Controls is made (not when this class is defined), so a test can swap the module's clock.
    sleep: Callable[[float], None] = field(default_factory=lambda: time.sleep)
    clock: Callable[[], float] = field(default_factory=lambda: time.monotonic)
    # Raises when the controller may no longer act (its lease was lost: lifecycle/leases.py); called before each
    # step that changes the fleet and at each poll.
    fence: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class RolloutOutcome:
    rollout: Rollout
    decisions: list[WaveDecision]


# --- targets -----------------------------------------------------------------------------------------------------


# What a target's name may be: a local fleet's name, or an Auto Scaling group (1–255 characters, no ':' and no control
# characters, as AWS allows) with its region.
_GROUP = r"[^:\x00-\x1f\x7f]{1,255}"
_TARGETS = {
    "local": re.compile(IMAGE_NAME_PATTERN),
    "aws": re.compile(rf"{AWS_REGION_PATTERN}/{_GROUP}"),
}
# What parse_target accepts, as one pattern (the web API states it in its schema).
TARGET_PATTERN = rf"(?:local:)?{IMAGE_NAME_PATTERN}|aws:{AWS_REGION_PATTERN}/{_GROUP}"


def parse_target(target: str) -> tuple[str, str]:
    """`local:NAME` (or a bare NAME) → ("local", NAME); `aws:REGION/GROUP` → ("aws", "REGION/GROUP")."""
    kind, sep, name = target.partition(":")
    if not sep:
        kind, name = "local", target
    pattern = _TARGETS.get(kind)
    if pattern is None or pattern.fullmatch(name) is None:
        raise ConfigError(
            f"target {target!r} is not local:NAME or aws:REGION/GROUP",
            fix="name a local fleet (amiforge fleet list) or an Auto Scaling group as aws:eu-west-1/web-asg",
        )
    return kind, name


def canonical_target(target: str) -> str:
    kind, name = parse_target(target)
    return f"{kind}:{name}"


def fleet_of(target: str, settings: Settings) -> tuple[Fleet, str, str]:
    """(the fleet, its provider's name, the region whose artifacts it runs)."""
    kind, name = parse_target(target)
    provider = provider_for(kind, settings)
    if not isinstance(provider, FleetProvider):
        raise ConfigError(f"the {kind} provider has no fleets", fix="use a local fleet or an Auto Scaling group")
    return provider.fleet(name), kind, provider.fleet_region(name)


def artifact_in(version: ImageVersion, store: Store, provider: str, region: str) -> Artifact:
    for artifact in store.artifacts(version.id):
        if artifact.provider == provider and artifact.region == region:
            return artifact
    raise NotFound(
        f"{version.ref} has no {provider} artifact in {region}",
        fix=f"amiforge distribute {version.ref} (its recipe must list {region})"
        if provider == "aws"
        else "bake it with the local provider",
    )


def versions_by_location(store: Store, provider: str) -> dict[str, str]:
    """Artifact location (qcow2 path, AMI id) → NAME@N, for members that do not carry their version."""
    return {artifact.location: ref for ref, artifact in store.provider_artifacts(provider)}


def live(members: Sequence[Member]) -> list[Member]:
    """The members that count as the fleet: not stopped."""
    return [m for m in members if m.state != "stopped"]
